"""Student sampler: a Ray actor that owns one vLLM engine of the student.

`SamplerActor` generates `n` completions per prompt (token ids, text, or chat
messages rendered with the tokenizer's chat template) and returns, for every
completion, its token ids, the sampler's logprob of each sampled token under
the distribution it was actually drawn from (vLLM `logprobs_mode=
"processed_logprobs"`: temperature, top-k and top-p applied), the finish
reason and the weight version that produced it. `score` gives current-policy
logprobs of given tokens (prompt_logprobs).

Weight updates arrive through vLLM's four control-plane calls
(init_weight_transfer_engine / start_weight_update / update_weights /
finish_weight_update), forwarded to the workers with `llm.collective_rpc`;
the transport is vLLM's NCCL engine on GPU and `rollout/weight_receiver.py`'s
"opd_gloo" engine on CPU (`engine_backend`). Atomicity for callers:

* the actor is threaded (`max_concurrency > 1`) so control calls and
  `weight_version()` answer while another call is running, but generate/score
  and a weight update are mutually exclusive (a condition variable): generate
  waits while an update is open (start .. finish), and start waits for a
  running generate to end;
* the version advances only in `finish_weight_update`, after success, which
  also resets vLLM's prefix cache (KV of the old weights must not serve a
  shared prefix under the new ones);
* a rejected update (unknown name, wrong shape) raises `WeightSyncError` and
  modifies nothing; a transport failure after some weights were loaded marks
  the sampler `needs_full_update`: generate/score then raise until a full
  update succeeds (we never silently serve half-updated weights, and keeping a
  whole-model backup to restore from would double the sampler's memory);
* a sender that gives an update up calls `abort_weight_update`: the update is
  closed on every worker (vLLM's NCCL engine leaves its layerwise reload open
  after a failed receive; it is rolled back); a sampler still inside the
  receive (an NCCL broadcast whose sender aborted never returns) reports
  `stuck_in_weight_receive` and is restarted by the driver.

`SamplerPool` (rollout/pool.py) spreads a batch over several actors and fans
the weight-sync calls out to all of them.

Created by `SamplerPool.create(...)`; directly:
    actor = ray.remote(SamplerActor).options(max_concurrency=4).remote(path, rollout_cfg, student_cfg)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Union

from rollout.config import CpuConfig, ThreadShare, parse_cpu_list
from rollout.host import KV_MAX_SEQS, kv_cache_size
from rollout.types import Completion
from rollout.weight_sync import WeightSyncError, concrete_dtype, engine_backend
from teacher_server.engine import cpu_engine_setup, engine_settings, merge_engine_args

log = logging.getLogger(__name__)

# A prompt: token ids, plain text, or chat messages [{"role", "content"}, ...].
Prompt = Union[list[int], str, list[dict]]

WORKER_EXTENSION = "rollout.weight_receiver.WeightSyncWorkerExtension"
# Concurrent calls a sampler actor serves (one engine user at a time, the rest
# are control-plane calls and waits).
SAMPLER_MAX_CONCURRENCY = 8
# vLLM executor of a tensor-parallel engine: its worker processes on this
# actor's node, on the GPUs Ray gave the actor (its bundle's
# gpus_per_bundle x tensor_parallel_size). Left unset, vLLM picks its Ray
# executor whenever it runs inside a placement group (ParallelConfig, vllm/config/parallel.py),
# and that executor refuses a bundle of more than one GPU (and any CPU platform).
TP_EXECUTOR_BACKEND = "mp"
# How long abort_weight_update waits for a weight-update call that is inside
# the engine to end before it calls the sampler stuck there.
ABORT_WAIT_S = 10.0


class SamplerNotReady(RuntimeError):
    """generate/score refused: the weights are not in a servable state. Pickles."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.message,))


def mix_seed(seed: int, index: int) -> int:
    """Seed of prompt `index` of a request seeded `seed` (splitmix64 mix, so
    neighbouring seeds/prompts give unrelated streams; vLLM adds 0..n-1 for
    the n samples of one prompt)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x3FFFFFFF


def engine_in_process(engine_process: str, has_gpu: bool, tensor_parallel_size: int) -> bool:
    """Whether the vLLM engine runs inside the sampler actor
    (`rollout.engine_process`; "auto": on CPU with one engine worker).

    On CPU, vLLM's separate engine-core and worker processes cost ~35 s of
    start-up (more imports of vLLM and torch, spawns, handshakes) and ~1.2 GiB
    of RSS per sampler, and buy nothing: the actor's generate call blocks on
    the engine either way (`python -m bench.sampler_engine`). On GPU the separate
    process overlaps scheduling with the GPU's work, as vLLM intends."""
    if engine_process == "auto":
        return not has_gpu and tensor_parallel_size == 1
    return engine_process == "inprocess"


def bind_cpu_threads(spec: str, share: ThreadShare | None = None) -> int:
    """Torch threads for an in-process CPU engine, as vLLM's CPU worker sets
    them from VLLM_CPU_OMP_THREADS_BIND in its own process: "auto" = the
    placement plan's `share` (cluster/placement.py cpu_thread_shares), or
    without a plan every core this process may use but one (vLLM's default
    reserve); a core list pins the process to those cores, one thread each.
    Returns the thread count."""
    import torch

    cores = parse_cpu_list(spec)
    if cores is not None:
        os.sched_setaffinity(0, cores)
        n = len(cores)
    elif share is not None:
        n = share.threads()
    else:
        n = max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(n)
    return n


def set_thread_num_threads(n: int) -> None:
    """torch.set_num_threads(n) from the calling thread: sets this thread's
    OpenMP thread count (a new thread starts at OMP_NUM_THREADS) and torch's.
    Calls torch._C.set_num_threads because vLLM's CPU worker replaces
    torch.set_num_threads with a no-op once its engine is up."""
    import torch

    torch._C.set_num_threads(n)


def vllm_max_lora_rank(rank: int) -> int:
    """vLLM's `max_lora_rank` for adapters of rank `rank`: the smallest value
    it accepts (vllm/config/lora.py MaxLoRARanks) that is >= rank."""
    import typing

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    for r in allowed:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above {allowed[-1]}, the largest vLLM serves")


def vllm_serves_lora(model: str) -> bool:
    """Whether vLLM's implementation of `model`'s architecture takes LoRA
    adapters (its model class implements SupportsLoRA: the check
    LoRAModelRunnerMixin.load_lora_model makes at engine start). Asked
    before the engine starts, so a model without it falls back to merged
    weight pushes instead of failing to start."""
    try:
        from transformers import AutoConfig
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_lora

        for arch in AutoConfig.from_pretrained(model).architectures or []:
            cls = ModelRegistry._try_load_model_cls(arch)
            if cls is not None:
                return bool(supports_lora(cls))
    except Exception as e:  # noqa: BLE001 - undecidable here: let the engine try (its error is clear)
        log.warning("could not tell whether vLLM serves LoRA on %s (%s); trying", model, e)
        return True
    return False


class SamplerActor:
    """One vLLM engine of the student. Use as a threaded Ray actor."""

    def __init__(self, model: str, rollout_cfg, student_cfg, sampler_index: int = 0,
                 initial_version: int = 0, require_update: bool = False, cpu_cfg: CpuConfig | None = None,
                 lora_rank: int = 0, thread_share: ThreadShare | None = None) -> None:
        """`require_update`: start refusing to sample until the first weight
        update lands (a restarted sampler must not serve its checkpoint's
        weights while the others serve the learner's). `cpu_cfg`: the run's
        `cpu:` section (used only when this actor has no GPU). `lora_rank`:
        the learner's LoRA rank (learner.lora.rank); > 0 starts vLLM with LoRA
        support when vLLM can serve adapters on this model
        (`serves_lora_adapters`), and the samplers then sample with the
        adapter each push brings (`load_lora_adapter`). `thread_share`: the
        placement plan's threads for this sampler on CPU (used when
        cpu.sampler_threads is "auto" and the engine runs in this process)."""
        import torch

        cpu_cfg = cpu_cfg or CpuConfig()
        self._engine_threads = 0  # > 0: an in-process CPU engine's threads (see _acquire_engine)
        self.cfg = rollout_cfg
        self.index = sampler_index
        has_gpu = torch.cuda.is_available()
        self.in_process = engine_in_process(rollout_cfg.engine_process, has_gpu, rollout_cfg.tensor_parallel_size)
        # Read by vLLM when the engine is built (this actor owns its process).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        kwargs: dict[str, Any] = {}
        if not has_gpu:
            # The driver sizes "auto" to the run's batch; an engine started
            # without it takes vLLM's full concurrency at max_model_len.
            kv = kv_cache_size(cpu_cfg.sampler_kv_cache_gib, model, concrete_dtype(student_cfg.dtype, False),
                               seqs=KV_MAX_SEQS, seq_tokens=student_cfg.max_model_len,
                               max_model_len=student_cfg.max_model_len)
            kwargs["kv_cache_memory_bytes"] = kv.bytes
            kwargs.update(cpu_engine_setup())
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's CPU platform would override the size with it
            log.info("sampler %d: KV cache %.0f MiB (%s)", sampler_index, kv.bytes / 2**20, kv.reason)
            if self.in_process:
                n = self._engine_threads = bind_cpu_threads(cpu_cfg.sampler_threads, thread_share)
                log.info("sampler %d: %d engine threads (%s)", sampler_index, n,
                         thread_share.reason if thread_share and cpu_cfg.sampler_threads == "auto"
                         else f"cpu.sampler_threads={cpu_cfg.sampler_threads}")
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cfg.sampler_threads
        self.backend = engine_backend(rollout_cfg.weight_sync_backend, has_gpu)

        import rollout.weight_receiver  # noqa: F401  (registers opd_gloo here too)
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        if has_gpu:
            kwargs["gpu_memory_utilization"] = rollout_cfg.gpu_memory_utilization
        if rollout_cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = TP_EXECUTOR_BACKEND
        # LoRA: one adapter at a time (the current policy's); each push loads
        # the next under a new id and removes the old one.
        self._lora_dir: str | None = None
        self._lora_request = None
        self._serves_lora = lora_rank > 0 and vllm_serves_lora(model)
        if lora_rank > 0 and not self._serves_lora:
            log.warning("sampler %d: vLLM has no LoRA support for %s; the learner pushes merged weights",
                        sampler_index, model)
        if self._serves_lora:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora_rank), max_loras=1)
            self._lora_dir = tempfile.mkdtemp(prefix=f"opd-lora-sampler{sampler_index}-")
        kwargs.update(model=model, dtype=concrete_dtype(student_cfg.dtype, has_gpu),
                      max_model_len=student_cfg.max_model_len,
                      tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                      enforce_eager=rollout_cfg.enforce_eager or not has_gpu,
                      logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
                      weight_transfer_config=WeightTransferConfig(backend=self.backend),
                      seed=rollout_cfg.seed + sampler_index)
        # The user's rollout.engine_args; one that opd sets here is an error.
        kwargs = merge_engine_args("rollout.engine_args", kwargs, rollout_cfg.engine_args)
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:
            # vLLM's config errors (pydantic) do not pickle across Ray: re-raise as text.
            raise RuntimeError(f"sampler {sampler_index}: vLLM engine for {model!r} failed to start: "
                               f"{type(e).__name__}: {e}") from None
        self.tokenizer = self.llm.get_tokenizer()
        log.info("sampler %d: vLLM engine %s", sampler_index, self.engine_config())
        self._version = initial_version
        self._cond = threading.Condition()
        self._busy = False  # the engine is generating/scoring
        self._update_open = False  # between start_weight_update and its end
        self._needs_full_update: str | None = (  # reason, when weights are mixed or stale
            "restarted: waiting for the learner's current weights" if require_update else None)

    # -- status -------------------------------------------------------------

    def ready(self) -> bool:
        return True

    def weight_version(self) -> int:
        return self._version

    def pid(self) -> int:
        """This actor's process id (its in-process vLLM engine runs here too)."""
        return os.getpid()

    def shm_files(self) -> list[str]:
        """The /dev/shm segments (Python `SharedMemory`, "psm_*": vLLM's
        message queues) mapped by this actor and its vLLM processes. vLLM does
        not unlink them when its processes are killed (measured: 160-240 MiB
        per engine left in /dev/shm, which is RAM); the pool removes them after
        shutting the sampler down or killing it."""
        return sorted(_mapped_shm_files())

    def engine_config(self) -> dict:
        """Settings of this sampler's vLLM engine as vLLM resolved them (its
        defaults, opd's choices and rollout.engine_args together)."""
        return engine_settings(self.llm.llm_engine.vllm_config)

    def num_workers(self) -> int:
        """Worker processes of this engine (its ranks in the weight-sync group)."""
        return len(self.llm.collective_rpc("opd_weight_state"))

    def weight_states(self) -> list[dict]:
        """Each engine worker's weight state (rollout.weight_receiver
        `opd_weight_state`: dirty, last error, reload open, engine)."""
        return self.llm.collective_rpc("opd_weight_state")

    def needs_full_update(self) -> str | None:
        return self._needs_full_update

    def serves_lora_adapters(self) -> bool:
        """Whether this engine serves LoRA adapters (started with a LoRA rank,
        on a model vLLM supports LoRA for)."""
        return self._serves_lora

    # -- engine use (mutually exclusive with weight updates) ----------------

    def _acquire_engine(self) -> None:
        timeout = self.cfg.weight_sync_timeout_s
        with self._cond:
            if not self._cond.wait_for(lambda: not self._busy and not self._update_open, timeout=timeout):
                raise SamplerNotReady(f"sampler {self.index}: a weight update has been open for over "
                                      f"{timeout:.0f}s (rollout.weight_sync_timeout_s); refusing to generate")
            if self._needs_full_update:
                raise SamplerNotReady(f"sampler {self.index} holds partially updated weights "
                                      f"({self._needs_full_update}); push a full weight update first")
            self._busy = True
        if self._engine_threads:
            # This actor is threaded: each call may run on another Ray thread,
            # whose OpenMP thread count starts at Ray's OMP_NUM_THREADS. vLLM's
            # CPU attention sizes its scheduler metadata from that count and
            # checks it against the count torch's ops use (bind_cpu_threads'),
            # so set it in the calling thread too.
            set_thread_num_threads(self._engine_threads)

    def _release_engine(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _prompt_ids(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], dict)):
            if not prompt:
                raise ValueError(f"prompt {i} is an empty message list")
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if not prompt:
                raise ValueError(f"prompt {i} has no tokens")
            return list(prompt)
        raise TypeError(f"prompt {i} is a {type(prompt).__name__}: expected token ids (list[int]), text (str) "
                        "or chat messages (list[dict] with role/content)")

    def generate(self, prompts: list[Prompt], *, n: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, max_new_tokens: int | None = None,
                 stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                 seed: int | None = None, prompt_index_offset: int = 0) -> list[list[Completion]]:
        """`n` completions of each prompt: result[p][s] is sample s of
        prompts[p], with `prompt_index = prompt_index_offset + p`. Unset
        arguments take RolloutConfig's values. With `seed`, prompt p samples
        with seed `mix_seed(seed, prompt_index)` (the result does not depend on
        how a pool split the batch)."""
        from vllm import SamplingParams

        c = self.cfg
        n = c.samples_per_prompt if n is None else n
        ids_P = [self._prompt_ids(p, i) for i, p in enumerate(prompts)]
        base = dict(
            n=n,
            temperature=c.temperature if temperature is None else temperature,
            top_p=c.top_p if top_p is None else top_p,
            top_k=(c.top_k if top_k is None else top_k) or 0,
            max_tokens=c.max_new_tokens if max_new_tokens is None else max_new_tokens,
            stop=list(c.stop if stop is None else stop) or None,
            stop_token_ids=list(c.stop_token_ids if stop_token_ids is None else stop_token_ids) or None,
            logprobs=0,
        )
        params = [SamplingParams(**base, seed=None if seed is None else mix_seed(seed, prompt_index_offset + i))
                  for i in range(len(ids_P))]
        self._acquire_engine()
        try:
            version = self._version
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in ids_P], params, use_tqdm=False,
                                     lora_request=self._lora_request)
        finally:
            self._release_engine()
        result: list[list[Completion]] = []
        for p, (ids, out) in enumerate(zip(ids_P, outs, strict=True)):
            samples = []
            for s, o in enumerate(sorted(out.outputs, key=lambda o: o.index)):
                tokens = list(o.token_ids)
                lps = [float(pos[t].logprob) for pos, t in zip(o.logprobs, tokens, strict=True)]
                samples.append(Completion(prompt_index=prompt_index_offset + p, sample_index=s, prompt_ids=ids,
                                          completion_ids=tokens, sampler_logprobs=lps,
                                          finish_reason=str(o.finish_reason), policy_version=version))
            result.append(samples)
        return result

    def score(self, sequences: list[list[int]], start: int | list[int] = 1) -> list[list[float]]:
        """log p(seq[t] | seq[:t]) under the current weights (raw model
        distribution, temperature 1) for t in [start, len(seq)) of each
        sequence (`start` per sequence or one for all; >= 1)."""
        from vllm import SamplingParams

        starts = [start] * len(sequences) if isinstance(start, int) else list(start)
        if len(starts) != len(sequences):
            raise ValueError(f"score: {len(starts)} start offsets for {len(sequences)} sequences")
        for i, (seq, st) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= st <= len(seq):
                raise ValueError(f"score: start {st} of sequence {i} (length {len(seq)}) must be in [1, len]")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        self._acquire_engine()
        try:
            outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False,
                                     lora_request=self._lora_request)
        finally:
            self._release_engine()
        return [[float(out.prompt_logprobs[t][seq[t]].logprob) for t in range(st, len(seq))]
                for seq, st, out in zip(sequences, starts, outs, strict=True)]

    # -- LoRA adapters --------------------------------------------------------

    def load_lora_adapter(self, version: int, files: dict[str, bytes]) -> None:
        """Serve the LoRA adapter `files` (peft's format: adapter_config.json,
        adapter_model.safetensors) as policy `version` from the next generate
        on. vLLM loads adapters from a directory only (LoRAModel
        .from_local_checkpoint): the files go to this sampler's own temp
        directory, one per version. Exclusive with generate/score, as a
        weight update is. The adapter loads under a new id before the old one
        is removed, so a bad adapter raises and the old one keeps serving.
        vLLM's prefix cache keys blocks by the adapter's name and path
        (kv_cache_utils `_gen_lora_extra_hash_keys`), so no KV of the old
        adapter is reused."""
        from vllm.lora.request import LoRARequest

        from rollout.weight_sync import write_adapter

        if not self._serves_lora:
            raise WeightSyncError(f"sampler {self.index}: load_lora_adapter, but this engine serves no adapters "
                                  "(started without a LoRA rank, or vLLM has no LoRA support for the model)",
                                  "transfer")
        timeout = self.cfg.weight_sync_timeout_s
        with self._cond:
            if self._update_open:
                raise WeightSyncError(f"sampler {self.index}: load_lora_adapter while an update is open", "start")
            if not self._cond.wait_for(lambda: not self._busy, timeout=timeout):
                raise WeightSyncError(f"sampler {self.index}: generate still running after {timeout:.0f}s",
                                      "start")
            self._update_open = True
        try:
            path = write_adapter(os.path.join(self._lora_dir, f"v{int(version)}"), files)
            # Ids must be > 0 and differ per adapter (vLLM caches by id).
            request = LoRARequest(lora_name=f"opd-policy-v{int(version)}", lora_int_id=int(version) + 1,
                                  lora_path=str(path))
            engine = self.llm.llm_engine
            try:
                engine.add_lora(request)
            except Exception as e:
                shutil.rmtree(path, ignore_errors=True)
                raise WeightSyncError(f"sampler {self.index}: vLLM refused the LoRA adapter of version {version} "
                                      f"(still serving version {self._version}): {type(e).__name__}: {e}",
                                      "transfer") from None
            old, self._lora_request = self._lora_request, request
            if old is not None and old.lora_int_id != request.lora_int_id:
                if old.lora_int_id in engine.list_loras():
                    engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
            with self._cond:
                self._version = int(version)
                self._needs_full_update = None
        finally:
            with self._cond:
                self._update_open = False
                self._cond.notify_all()

    # -- weight updates (vLLM's control plane) ------------------------------

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Join the learner's transfer group (blocks until the learner joins)."""
        try:
            self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))
        except Exception as e:
            raise WeightSyncError(f"sampler {self.index}: init_weight_transfer_engine failed: {e}", "init") from None

    def start_weight_update(self) -> None:
        timeout = self.cfg.weight_sync_timeout_s
        with self._cond:
            if self._update_open:
                raise WeightSyncError(f"sampler {self.index}: start_weight_update while an update is open",
                                      "start")
            if not self._cond.wait_for(lambda: not self._busy, timeout=timeout):
                raise WeightSyncError(f"sampler {self.index}: generate still running after {timeout:.0f}s",
                                      "start")
            self._update_open = True
        try:
            self.llm.collective_rpc("start_weight_update")
        except Exception as e:
            # vLLM's NCCL engine may have put part of the model into its
            # layerwise reload before failing: roll that back too.
            self._after_failed_update(f"start_weight_update failed: {e}")
            raise WeightSyncError(f"sampler {self.index}: start_weight_update failed: {e}", "start") from None

    def update_weights(self, update_info: dict, fused: bool = False,
                       weight_version: str | int | None = None) -> None:
        """Receive one whole update (blocks in the transfer: the sender
        broadcasts concurrently). `fused`: start it here first, and finish it
        (`finish_weight_update(weight_version)`) after: two RPCs less per push
        (the sender decides: `SamplerPool.fused_updates`). If the start fails
        this sampler still joins the group's accept vote, with a reject, so
        nobody waits for it and nothing is loaded anywhere."""
        if fused:
            try:
                self.start_weight_update()
            except WeightSyncError as e:
                try:
                    self.llm.collective_rpc("opd_reject_update", args=(str(e),))
                except Exception as e2:  # noqa: BLE001 - the start error is the one to report
                    log.warning("sampler %d: could not vote reject after a failed start: %s", self.index, e2)
                raise
        with self._cond:
            if not self._update_open:
                raise WeightSyncError(f"sampler {self.index}: update_weights without start_weight_update",
                                      "transfer")
            if self._in_update_rpc:
                raise WeightSyncError(f"sampler {self.index}: update_weights while another weight-update call "
                                      "is inside the engine", "transfer")
            self._in_update_rpc, self._abandoned = True, None
        error = None
        try:
            self.llm.collective_rpc("update_weights", args=(update_info,))
        except Exception as e:
            error = e
            self._after_failed_update(f"update_weights failed: {e}")
        finally:
            with self._cond:
                self._in_update_rpc = False
                self._cond.notify_all()
        if error is not None:
            raise WeightSyncError(f"sampler {self.index}: update_weights failed "
                                  f"(still serving version {self._version}"
                                  f"{'; weights mixed, needs a full update' if self._needs_full_update else ''}): "
                                  f"{error}", "transfer") from None
        if fused:
            self.finish_weight_update(weight_version)

    def finish_weight_update(self, weight_version: str | int | None = None) -> None:
        """Commit: the new weights serve from here on, with `weight_version`
        (None = the previous version + 1)."""
        if not self._update_open:
            raise WeightSyncError(f"sampler {self.index}: finish_weight_update without an open update", "finish")
        try:
            self.llm.collective_rpc("finish_weight_update")
        except Exception as e:
            self._after_failed_update(f"finish_weight_update failed: {e}")
            raise WeightSyncError(f"sampler {self.index}: finish_weight_update failed: {e}", "finish") from None
        self._reset_prefix_cache()
        with self._cond:
            self._version = self._version + 1 if weight_version is None else int(weight_version)
            self._needs_full_update = None
            self._update_open = False
            self._cond.notify_all()

    def _reset_prefix_cache(self) -> None:
        """Drop vLLM's prefix cache after new weights committed (called by
        finish_weight_update, with the engine held by the update). vLLM keeps
        prefix caching on and its weight-update calls leave the cache alone:
        prompts sharing a prefix of a KV block or more (16 tokens on GPU, 128
        on CPU: a system prompt, a chat template, the next epoch) would be
        served KV computed by the old weights, so the samples would be
        off-policy and their logprobs wrong. Resetting costs a pass over the
        block table (KVCacheManager.reset_prefix_cache); turning prefix
        caching off instead would recompute every prompt once per sample.

        The reset refuses while requests hold blocks; none run here (generate
        and updates exclude each other), and `reset_running_requests` also
        preempts any a failed generate left behind. If it fails anyway the
        sampler refuses to sample until a full update resets it."""
        try:
            ok = self.llm.reset_prefix_cache(reset_running_requests=True)
            error = "" if ok else "vLLM reported blocks still in use"
        except Exception as e:  # noqa: BLE001 - reported below, with what to do
            ok, error = False, f"{type(e).__name__}: {e}"
        if ok:
            return
        reason = f"the prefix cache could not be reset after a weight update ({error})"
        with self._cond:
            self._needs_full_update = reason
            self._update_open = False
            self._cond.notify_all()
        raise WeightSyncError(f"sampler {self.index}: {reason}; it holds KV of the old weights and refuses to "
                              "sample until the next full update", "finish")

    # Weight-update calls inside the engine (the state lives on the class so
    # that __init__ need not know it): `_in_update_rpc` while update_weights
    # (or an abort) is inside `collective_rpc`; `_abandoned` is why the sender
    # gave the update up while this sampler was still receiving it.
    _in_update_rpc = False
    _abandoned: str | None = None

    def abort_weight_update(self, reason: str | None = None, wait_s: float = ABORT_WAIT_S) -> None:
        """Close an update its sender gave up or died in (weights then count as
        mixed if any had been received). No-op when no update is open.

        While the engine is inside the receive, nothing can reach it: a call
        would run beside the receive (an in-process engine) or queue behind
        it (vLLM's engine processes), and an NCCL receive whose sender
        aborted never returns. The sampler then only records that it was
        abandoned there; `stuck_in_weight_receive` reports it until the
        receive ends, and the driver restarts such samplers. `wait_s`: how
        long a call inside the engine may take to end first."""
        reason = reason or "the sender gave the update up"
        with self._cond:
            if not self._update_open:
                return
            # A receive that is failing too ends within moments: let it.
            if not self._cond.wait_for(lambda: not self._in_update_rpc, timeout=wait_s):
                self._abandoned = reason
                log.warning("sampler %d: the sender gave up a weight update this sampler is still receiving "
                            "(%s); it needs a restart unless the receive ends", self.index, reason)
                return
            if not self._update_open:
                return  # the receive ended and closed it
            self._in_update_rpc = True
        try:
            self._after_failed_update(f"aborted: {reason}")
        finally:
            with self._cond:
                self._in_update_rpc = False
                self._cond.notify_all()

    def stuck_in_weight_receive(self) -> str | None:
        """Why this sampler is stuck inside a weight receive its sender gave
        up (None: it is not): it cannot serve or take another update until it
        is restarted (cluster/loop.py restart_dead_samplers)."""
        with self._cond:
            return self._abandoned if self._in_update_rpc else None

    def kill_engine_processes(self) -> int:
        """SIGKILL every process this actor started (vLLM's engine-core and
        worker processes; none for an in-process engine); returns how many.
        For a sampler about to be replaced because it is stuck in a receive:
        vLLM's workers watch their parent only to close their queues
        (multiproc_executor.py `monitor_death_pipe`), so one blocked in a CUDA
        wait would outlive the actor and keep its GPU memory."""
        import psutil

        try:
            procs = psutil.Process().children(recursive=True)
        except psutil.Error:
            return 0
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return len(procs)

    def validate_update(self, update_info: dict) -> list[str]:
        """Problems of an update against this sampler's model (touches nothing)."""
        return self.llm.collective_rpc("opd_check_update", args=(update_info,))[0]

    def _after_failed_update(self, error: str | None = None) -> None:
        """Close the update after `error`: every worker leaves what the failure
        left open (rollout.weight_receiver `opd_abort_weight_update`: vLLM's
        NCCL engine leaves its layerwise reload open) and says whether its
        weights are now mixed; if any are, refuse to sample until a full
        update succeeds."""
        try:
            states = self.llm.collective_rpc("opd_abort_weight_update", args=(error,))
            dirty = [s for s in states if s["dirty"]]
            reason = (dirty[0]["last_error"] or error or "a failed weight update") if dirty else None
        except Exception as e:  # cannot tell: assume the worst
            reason = f"weight state unknown after a failed update ({e})"
        with self._cond:
            if reason:
                self._needs_full_update = reason
            self._update_open = False
            self._cond.notify_all()

    def shutdown(self) -> None:
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
        files = _mapped_shm_files()
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None
        # Give vLLM's engine process a moment to exit before Ray kills us.
        time.sleep(0.1)
        unlink_shm_files(files)


def _mapped_shm_files() -> set[str]:
    """/dev/shm/psm_* files mapped by this process and its descendants."""
    import psutil

    out: set[str] = set()
    procs = [psutil.Process()]
    try:
        procs += psutil.Process().children(recursive=True)
    except psutil.Error:
        pass
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
                    path = parts[5].strip() if len(parts) == 6 else ""
                    if path.startswith("/dev/shm/psm_"):
                        out.add(path.removesuffix(" (deleted)"))
        except OSError:
            continue
    return out


def unlink_shm_files(paths) -> int:
    """Remove the given /dev/shm/psm_* files (missing ones are skipped);
    returns how many were removed. A process still mapping one keeps its
    mapping: unlinking only frees the memory once the last mapping goes."""
    n = 0
    for p in paths:
        if not str(p).startswith("/dev/shm/psm_"):
            continue
        try:
            os.unlink(p)
            n += 1
        except OSError:  # gone already, or not ours to remove: cleanup never fails a run
            pass
    return n
