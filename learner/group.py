"""LearnerGroup: the world_size learner ranks (Ray actors) used as one.

The driver (cluster/) holds one LearnerGroup. Every method fans out to all
ranks at once and waits with `ray.get(..., timeout=collective_timeout_s)`:
the ranks run collectives together, so they must all be called, and a dead
rank surfaces as an error (its peers' collectives time out) instead of a hang.

    group = LearnerGroup.create(model_path, cfg.learner, cfg.loss, seed=cfg.run.seed,
                                scheduling_strategies=[...], total_steps=cfg.train.steps)
    metrics = group.train_step(batch, step=k, temperature=cfg.rollout.temperature,
                               top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)
    group.init_weight_sync(pool)            # once, after the samplers are up
    group.push_weights(pool, version=k + 1)
    group.save_shards(staging / "learner")  # cluster/checkpoint.py commits the checkpoint
    group.load(ckpt_dir / "learner")        # on resume, before the first step
    group.export_hf(run_dir / "final")
    group.shutdown()

Tests: tests/e2e/test_learner.py, tests/e2e/test_learner_sync.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from learner.batching import plan_micro_batches, rank_shard, sequence_lengths
from learner.config import LOSSES, LearnerConfig, LossConfig
from rollout.types import RolloutBatch
from rollout.weight_sync import ParamSpec, WeightSyncClient


def _token_denominator(batch: RolloutBatch, normalize: str) -> float:
    if normalize == "token":
        return float(batch.num_trained_tokens)
    if normalize == "sequence":
        return float(sum(1 for m in batch.loss_mask_B_T if sum(m) > 0))
    raise ValueError(f"loss.normalize={normalize!r} is not valid; use 'token' or 'sequence'")


# LearnerGroup's weight-sync transport when the samplers serve the LoRA
# adapter itself (learner.lora.rank > 0).
LORA_ADAPTER = "lora-adapter"
# Attempts at the learners' torch.distributed rendezvous when its port is lost (port_taken).
RENDEZVOUS_TRIES = 3

log = logging.getLogger(__name__)


def port_taken(e: BaseException) -> bool:
    """Whether a learner failed to start because its rendezvous port was in
    use (torch.distributed's DistNetworkError, EADDRINUSE, carried inside
    Ray's ActorDiedError text)."""
    text = str(e)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def _serves_adapters(client) -> bool:
    """Whether every sampler behind `client` serves LoRA adapters in place
    (SamplerPool.serves_lora_adapters); a client without that call does not."""
    fn = getattr(client, "serves_lora_adapters", None)
    return bool(fn()) if fn is not None else False


class LearnerGroup:
    def __init__(self, workers: list, learner_cfg: LearnerConfig, loss_cfg: LossConfig):
        self.workers = workers
        self.cfg = learner_cfg
        self.loss_cfg = loss_cfg
        self.timeout_s = learner_cfg.collective_timeout_s
        self._sync_backend: str | None = None
        self._sync_wait_s = self.timeout_s  # how long a weight-sync call may take (init_weight_sync)
        self.ranks: list[dict] = []  # each rank's ready() once started

    @classmethod
    def create(cls, model_path: str, learner_cfg: LearnerConfig, loss_cfg: LossConfig, seed: int,
               scheduling_strategies: list | None = None, *, num_gpus_per_worker: float = 0.0,
               total_steps: int | None = None, ds_config_overrides: dict | None = None,
               cpu_threads=0) -> "LearnerGroup":
        """Start `learner_cfg.world_size` ranks. `scheduling_strategies[r]`
        (e.g. a PlacementGroupSchedulingStrategy bundle) places rank r;
        `num_gpus_per_worker` > 0 gives each rank a GPU and NCCL;
        `total_steps` (train.steps) is needed by the cosine/linear lr schedules;
        `ds_config_overrides` is deep-merged into the DeepSpeed config;
        `cpu_threads`: torch threads of a CPU rank: a count (0: Ray's
        default), or a list of one ThreadShare per rank (the placement plan's,
        cluster/placement.py cpu_thread_shares)."""
        import ray

        from learner.worker import LearnerWorker, lr_factor
        from rollout.host import node_address

        n = learner_cfg.world_size
        if scheduling_strategies is not None and len(scheduling_strategies) != n:
            raise ValueError(f"{len(scheduling_strategies)} scheduling strategies for learner.world_size={n} ranks; "
                             "pass one per rank (or None)")
        # Fail here, not inside n actors, when the schedule needs total_steps.
        lr_factor(learner_cfg.warmup_steps, learner_cfg.warmup_steps, learner_cfg.lr_schedule, total_steps,
                  learner_cfg.min_lr_ratio)
        strategies = scheduling_strategies or [None] * n

        def opts(r):
            o = {"num_cpus": learner_cfg.cpus_per_worker, "num_gpus": num_gpus_per_worker}
            if strategies[r] is not None:
                o["scheduling_strategy"] = strategies[r]
            return o

        actor_cls = ray.remote(LearnerWorker)
        for attempt in range(1, RENDEZVOUS_TRIES + 1):
            # Rank 0's node hosts the torch.distributed rendezvous: ask a task
            # placed like rank 0 for that node's IP and a free port (a light
            # one: no torch; its worker exits after it). A single rank picks
            # its own port, in its own process.
            master_addr, master_port = None, None
            if n > 1:
                probe = ray.remote(max_calls=1)(node_address).options(**opts(0))
                master_addr, master_port = ray.get(probe.remote(), timeout=learner_cfg.collective_timeout_s)
            workers = [actor_cls.options(**opts(r)).remote(
                r, n, master_addr, master_port, str(model_path), learner_cfg, loss_cfg, seed,
                use_gpu=num_gpus_per_worker > 0, total_steps=total_steps, ds_config_overrides=ds_config_overrides,
                cpu_threads=cpu_threads[r] if isinstance(cpu_threads, (list, tuple)) else cpu_threads)
                for r in range(n)]
            group = cls(workers, learner_cfg, loss_cfg)
            try:
                # Each rank's ready(): device, ZeRO stage, DeepSpeed settings as the engine took them.
                group.ranks = group._all(lambda w: w.ready.remote())
                return group
            except BaseException as e:
                group.kill()
                # The probed port was free when probed; another process (any
                # outgoing connection takes ephemeral ports) may bind it before
                # rank 0's TCPStore does. Only that is retried, on a new port.
                if attempt == RENDEZVOUS_TRIES or not port_taken(e):
                    raise
                log.warning("learner rendezvous port was taken before rank 0 bound it (%s); retrying on a new "
                            "port (%d/%d)", e, attempt + 1, RENDEZVOUS_TRIES)
        raise AssertionError("unreachable")

    # ----------------------------------------------------------- plumbing

    def _get(self, refs: list, what: str = "learner call", timeout_s: float | None = None):
        import ray

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise TimeoutError(f"{what} did not finish on all {len(self.workers)} learner ranks within "
                               f"{timeout_s:g}s (learner.collective_timeout_s={self.timeout_s}; a rank died or "
                               "hangs)") from e

    def _all(self, call, what: str = "learner call", timeout_s: float | None = None) -> list:
        return self._get([call(w) for w in self.workers], what, timeout_s)

    # ------------------------------------------------------------ training

    def set_loss(self, loss_cfg: LossConfig) -> None:
        """Switch the objective between steps (e.g. an SFT warm-up, then
        reverse KL); the optimizer state is kept."""
        self._all(lambda w: w.set_loss_config.remote(loss_cfg), "set_loss")
        self.loss_cfg = loss_cfg

    def plan(self, batch: RolloutBatch) -> list[list[list[int]]]:
        return plan_micro_batches(sequence_lengths(batch), len(self.workers), self.cfg.micro_batch_tokens)

    def train_step(self, batch: RolloutBatch, step: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> dict:
        """One optimizer step on `batch` (all ranks). `temperature`, `top_k`,
        `top_p` are the batch's sampling parameters (the learner's sampling
        log-probs use logits / temperature masked to the same top-k /
        nucleus set, learner/logprobs.py; temperature 0 = greedy, treated as
        1 without truncation). Returns the `learner/*` and `time/*` metrics
        of the step."""
        t0 = time.perf_counter()
        kind, loss = self.loss_cfg.kind, LOSSES[self.loss_cfg.kind]
        if loss.needs_teacher_lp and batch.teacher_logprobs_B_T is None:
            raise ValueError(f"loss.kind={kind} needs teacher logprobs, but the batch has "
                             "teacher_logprobs_B_T=None; score it with the teacher or use loss.kind=sft")
        if loss.needs_topk and (batch.teacher_top_ids_B_T_K is None or batch.teacher_top_logprobs_B_T_K is None):
            raise ValueError(f"loss.kind={kind} needs the teacher's top-k support, but the batch has "
                             "teacher_top_ids_B_T_K=None; set teacher.top_k > 0 so the teacher returns it")
        plan = self.plan(batch)
        denom = _token_denominator(batch, self.loss_cfg.normalize)
        refs = []
        for w, mbs in zip(self.workers, plan, strict=True):
            shard, local_mbs = rank_shard(batch, mbs)
            refs.append(w.train_step.remote(shard, local_mbs, denom, temperature, top_k, top_p))
        per_rank = self._get(refs, f"train_step {step}")
        m = self._reduce(per_rank)
        m["learner/step"] = float(step)
        m["learner/micro_batches_per_rank"] = float(len(plan[0]))
        m["time/learner_train_step_s"] = time.perf_counter() - t0
        return m

    @staticmethod
    def _reduce(per_rank: list[dict]) -> dict:
        def tot(k):
            return sum(r[k] for r in per_rank)

        tokens = max(tot("tokens"), 1.0)
        out = {
            "learner/loss": tot("loss"),
            "learner/tokens": tot("tokens"),
            "learner/sequences": tot("sequences"),
            "learner/padding_fraction": 1.0 - tot("real_tokens") / max(tot("padded_tokens"), 1.0),
            "learner/student_logprob": tot("learner_lp_sum") / tokens,
            "learner/sampler_logprob": tot("sampler_lp_sum") / tokens,
            "learner/ratio_mean": tot("ratio_sum") / tokens,
            "learner/ratio_max": max(r["ratio_max"] for r in per_rank),
            "learner/ratio_truncated_frac": tot("truncated") / tokens,
            "learner/logprob_abs_diff": tot("abs_lp_diff_sum") / tokens,
            "learner/grad_norm": per_rank[0]["grad_norm"],
            "learner/lr": per_rank[0]["lr"],
            "learner/steps_done": per_rank[0]["steps_done"],
            "time/learner_forward_backward_s": max(r["forward_backward_s"] for r in per_rank),
            "time/learner_optimizer_step_s": max(r["optimizer_step_s"] for r in per_rank),
            "learner/peak_memory_gib": max(r.get("peak_memory_bytes", 0.0) for r in per_rank) / 2**30,
        }
        if tot("kl_tokens") > 0:
            out["learner/reverse_kl"] = tot("kl_sum") / tot("kl_tokens")
            out["learner/teacher_logprob"] = tot("teacher_lp_sum") / tot("kl_tokens")
        return out

    def logprobs(self, batch: RolloutBatch, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[list[float]]:
        """The learner's per-token log-probs of `batch`'s completions under
        the sampling distribution (temperature, top-k, top-p); rank 0's
        answer; every rank runs the forward, as ZeRO-3 requires."""
        return self._all(lambda w: w.logprobs.remote(batch, temperature, top_k, top_p), "logprobs")[0]

    # --------------------------------------------------------- weight sync

    def param_specs(self, dtype: str | None = None) -> list[ParamSpec]:
        import ray

        return ray.get(self.workers[0].param_specs.remote(dtype), timeout=self.timeout_s)

    def init_weight_sync(self, client: WeightSyncClient, backend: str = "gloo", bucket_bytes: int = 64 << 20,
                         timeout_s: float = 600.0, dtype: str | None = None) -> str:
        """Connect learner rank 0 to every sampler (once; again after a sampler
        restart). `backend`: "gloo" (CPU, any node), "nccl" (vLLM's NCCL engine)
        or "auto" (rank 0 picks: rollout.weight_sync.choose_backend); `dtype`
        casts the sent weights (e.g. the samplers' "bfloat16"), None = the
        learner's dtype. Returns the transport rank 0 chose."""
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"weight sync backend {backend!r} is not valid; use 'auto', 'gloo' or 'nccl'")
        if self.cfg.lora.rank > 0 and _serves_adapters(client):
            # LoRA, samplers that serve adapters: each push is the adapter
            # alone, through Ray's object store (push_weights); no transfer
            # group. Samplers that cannot serve adapters get the merged
            # weights over `backend` below (the export's tensors).
            self._sync_backend = LORA_ADAPTER
            return f"{LORA_ADAPTER} (each push: the LoRA adapter alone, through Ray's object store)"
        from learner.weight_sender import SEND_OVERRUN_S

        # Rank 0's sender gives up by itself after `timeout_s` (and aborts
        # the transfer, which takes a little longer): wait for its error
        # rather than calling the rank dead first.
        self._sync_wait_s = max(self.timeout_s, timeout_s + SEND_OVERRUN_S)
        chosen = self._all(lambda w: w.init_weight_sync.remote(client, backend, bucket_bytes, timeout_s, dtype),
                           "init_weight_sync", self._sync_wait_s)[0]
        self._sync_backend = chosen
        return chosen + (" (merged LoRA weights: the samplers cannot serve adapters)" if self.cfg.lora.rank > 0
                         else "")

    def push_weights(self, client: WeightSyncClient | None, version: int) -> dict:
        """Send the current weights to the samplers as `version` (all ranks in
        lockstep; rank 0 transmits). `client` is the one given to
        init_weight_sync (accepted here for symmetry). Returns sync/time metrics."""
        if self._sync_backend is None:
            if client is None:
                raise RuntimeError("push_weights before init_weight_sync and without a client")
            self.init_weight_sync(client)
        t0 = time.perf_counter()
        if self._sync_backend == LORA_ADAPTER:
            stats = self._push_adapter(client, version)
        else:
            stats = self._all(lambda w: w.push_weights.remote(version), f"push_weights v{version}",
                              self._sync_wait_s)[0]
        stats["time/learner_push_weights_s"] = time.perf_counter() - t0
        stats["sync/version"] = float(version)
        return stats

    def _push_adapter(self, client, version: int) -> dict:
        """LoRA: every rank gathers the adapter (ZeRO-3), rank 0 returns it in
        peft's format (a few MiB), and the samplers load it as the LoRA of
        `version` (SamplerPool.load_lora_adapter: one copy in Ray's object
        store, read by every sampler)."""
        if client is None:
            raise RuntimeError("push_weights of a LoRA adapter needs the sampler pool as its client")
        t0 = time.perf_counter()
        files = self._all(lambda w: w.adapter_files.remote(), f"adapter_files v{version}")[0]
        t1 = time.perf_counter()
        client.load_lora_adapter(version, files)
        t2 = time.perf_counter()
        return {"sync/bytes": float(sum(len(b) for b in files.values())), "sync/buckets": 1.0,
                "sync/adapter_gather_s": t1 - t0, "sync/adapter_load_s": t2 - t1, "sync/total_s": t2 - t0}

    # --------------------------------------------------------- checkpoints

    def save_shards(self, path: str | Path) -> None:
        """Every rank writes its part of the training state into the learner
        checkpoint directory `path` (LearnerWorker.save_checkpoint). Nothing
        is committed: the caller owns the directory (the driver's staging
        directory, cluster/checkpoint.py)."""
        self._all(lambda w: w.save_checkpoint.remote(str(path)), "save_checkpoint")

    def load(self, path: str | Path) -> dict:
        """Restore from the learner checkpoint directory `path` (a committed
        checkpoint's `learner/`). Returns {"steps_done", "path"}."""
        return self._all(lambda w: w.load_checkpoint.remote(str(path)), "load_checkpoint")[0]

    def export_hf(self, path: str | Path, max_shard_size: int | str | None = None) -> Path:
        """Hugging Face checkpoint at `path` (LearnerWorker.export_hf: sharded
        safetensors in the training dtype, config, generation config,
        tokenizer); `max_shard_size` defaults to the worker's (5GB)."""
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        return Path(self._all(lambda w: w.export_hf.remote(str(path), **kw), "export_hf")[0])

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Destroy the process groups, then end the actors."""
        import ray

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=60)
        except Exception:
            pass
        self.kill()

    def kill(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
