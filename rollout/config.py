"""The rollout stage's config: the student the samplers serve, the teacher the
client scores with, the prompt data, and sampling.

Frozen dataclasses with a comment on every field; cluster/config.py composes
them (with the learner's, learner/config.py) into the one tree of a run, and
owns the front end: YAML, dotted overrides, cross-section checks. Each
section's `problems()` checks its own fields; the field checks below are
shared by every section of the tree, and name a field by its dotted key
("rollout.top_p"), which cluster/config.py registers in `SECTION_NAMES` when
it composes the tree.

    python -m cluster.config configs/demo.yaml    # the resolved tree
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# --------------------------------------------------------------------------
# Field checks (shared by every section of the tree)
# --------------------------------------------------------------------------

# Section class -> its dotted key in the tree ("rollout", "log.wandb"),
# filled by cluster/config.py; a section not in the tree is named by its class.
SECTION_NAMES: dict[type, str] = {}


def section_name(obj) -> str:
    return SECTION_NAMES.get(type(obj), type(obj).__name__)


def positive(obj, *names: str) -> list[str]:
    return [f"{section_name(obj)}.{n}: {getattr(obj, n)!r} must be > 0"
            for n in names if getattr(obj, n) is not None and not getattr(obj, n) > 0]


def non_negative(obj, *names: str) -> list[str]:
    return [f"{section_name(obj)}.{n}: {getattr(obj, n)!r} must be >= 0"
            for n in names if getattr(obj, n) is not None and not getattr(obj, n) >= 0]


# --------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StudentConfig:
    # Student checkpoint (required): a local Hugging Face directory, a hub id
    # (e.g. Qwen/Qwen3-1.7B), or `tiny:NAME` for a tiny model built locally
    # (cluster/tiny_models.py, tests and the demo).
    model: str | None = None
    # Weight dtype in the samplers: "auto" is bfloat16 when the run has GPUs,
    # float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Longest prompt + completion the samplers accept (tokens).
    max_model_len: int = 4096

    def problems(self) -> list[str]:
        return positive(self, "max_model_len")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    # URL of a running teacher_server (e.g. http://teacher-node:8000). When
    # null, the driver starts `python -m teacher_server --model teacher.model`
    # itself, in a Ray actor that books its GPUs and CPUs, and stops it at the
    # end (cluster/teacher_proc.py).
    url: str | None = None
    # Model the driver serves when `url` is null (same forms as student.model).
    model: str | None = None
    # File holding the API key sent as `Authorization: Bearer ...` (the key is
    # never logged). For a self-started server the same key is configured on
    # it; null there = a random key made for the run.
    api_key_file: str | None = None
    # Teacher weight dtype for a self-started server: "auto" is bfloat16 when
    # the run has GPUs, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Max sequence length of a self-started server.
    max_model_len: int = 4096
    # Tensor parallel size of a self-started server (GPUs it takes).
    tensor_parallel_size: int = 1
    # Ray CPUs a self-started server's actor books (its GPUs:
    # tensor_parallel_size when the run has GPUs).
    cpus: float = 1.0
    # Softmax temperature applied to the teacher's logits before scoring (the
    # target of the loss). loss.kind=reverse_kl requires it to equal
    # rollout.temperature (then the student learns the teacher itself); the
    # top-k losses fit the student at 1 to the teacher at this temperature.
    # eval/reverse_kl always scores at 1.
    temperature: float = 1.0
    # Top-k teacher support fetched per position (needed by the *_topk and jsd
    # losses; 0 = only the sampled token's logprob).
    top_k: int = 0
    # Token budget of one /v1/logprobs request; larger batches are split.
    max_tokens_per_request: int = 16384
    # Requests in flight at once from this run.
    max_concurrency: int = 8
    # Timeout of one HTTP request (seconds).
    request_timeout_s: float = 120.0
    # Give up on a batch (the run checkpoints and stops) once the teacher has
    # been unreachable or overloaded for this long (seconds).
    unavailable_timeout_s: float = 600.0
    # How long a self-started server may take to report healthy (seconds).
    startup_timeout_s: float = 600.0

    def problems(self) -> list[str]:
        out = positive(self, "max_model_len", "tensor_parallel_size", "temperature",
                       "max_tokens_per_request", "max_concurrency", "request_timeout_s",
                       "unavailable_timeout_s", "startup_timeout_s")
        out += non_negative(self, "cpus")
        if self.top_k < 0:
            out.append(f"teacher.top_k: {self.top_k} is negative; use 0 (sampled token only) or K > 0")
        return out


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Training prompts (required): a JSONL or Parquet file, or a `datasets`
    # dataset saved with save_to_disk, each record with a `prompt` (text) or
    # `messages` (chat) field; `answer` and other fields are carried through.
    # `tiny:arithmetic` builds the demo's arithmetic task locally.
    train: str | None = None
    # Held-out prompts in the same format; null takes `eval_size` records off
    # the end of the training file instead.
    eval: str | None = None
    # Held-out records split off `train` when `eval` is null.
    eval_size: int = 64
    # Render `prompt`/`messages` with the tokenizer's chat template.
    apply_chat_template: bool = True
    # Shuffle the prompt stream (deterministically by run.seed, per epoch).
    shuffle: bool = True
    # Prompts longer than this (tokens) are an error naming the record.
    max_prompt_tokens: int = 1024

    def problems(self) -> list[str]:
        return positive(self, "max_prompt_tokens") + non_negative(self, "eval_size")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    # Number of sampler actors (each a vLLM engine).
    num_samplers: int = 1
    # Completions sampled per prompt (n).
    samples_per_prompt: int = 4
    # Longest completion (tokens).
    max_new_tokens: int = 1024
    # Sampling temperature T (0 = greedy). loss.kind=reverse_kl trains the
    # distribution sampled from, softmax(logits / T), toward the teacher at
    # teacher.temperature, which must equal T (> 0); for the top-k losses and
    # sft T only chooses the states trained on (docs/method.md, "Temperatures").
    temperature: float = 1.0
    # Nucleus sampling mass (1.0 = off) and top-k sampling (0 = off). The
    # learner scores tokens under the same truncation (vLLM's rule, repeated
    # on its logits: learner/logprobs.py), so the importance ratio stays 1
    # on-policy; reverse_kl then trains the truncated policy (learner/losses.py).
    top_p: float = 1.0
    top_k: int = 0
    # Strings that end a completion (besides the EOS token).
    stop: tuple[str, ...] = ()
    # Token ids that end a completion (besides the EOS token).
    stop_token_ids: tuple[int, ...] = ()
    # Base sampling seed; each step and sampler derive their own from it.
    seed: int = 0
    # Tensor parallel size of one sampler engine (GPUs per sampler on GPU).
    tensor_parallel_size: int = 1
    # CPUs reserved per sampler actor in the placement group.
    cpus_per_sampler: float = 1.0
    # GPU memory fraction a sampler's vLLM engine may use (GPU only; vLLM's
    # default). Lower it when placement.gpus_per_bundle < 1 puts other roles
    # on the same GPU.
    gpu_memory_utilization: float = 0.9
    # Where a sampler's vLLM engine runs: "inprocess" (inside the sampler actor:
    # on CPU it starts faster, needs less memory and generates faster, with no
    # engine processes to spawn and no message queue per call: python -m
    # bench.sampler_engine), "multiprocess" (vLLM's default: a separate
    # engine-core process, which overlaps scheduling with GPU work), or
    # "auto": inprocess on CPU with tensor_parallel_size 1, multiprocess
    # otherwise.
    engine_process: Literal["auto", "inprocess", "multiprocess"] = "auto"
    # Run vLLM without CUDA graphs / torch.compile (faster start, slower
    # decoding on GPU). CPU samplers always run eager.
    enforce_eager: bool = False
    # Weight transport learner rank 0 -> samplers: "nccl" (vLLM's official NCCL
    # weight-transfer engine, GPU), "gloo" (CPU, any node: loopback or network
    # TCP), or "auto": nccl when the samplers have GPUs, else gloo.
    weight_sync_backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Bucket size of one weight-sync transfer (MiB): bounds the extra memory.
    weight_sync_bucket_mb: int = 64
    # Timeout of one weight update, and of a sampler RPC (seconds).
    weight_sync_timeout_s: float = 600.0
    # Timeout of one generate call (seconds); a sampler that exceeds it is
    # treated as dead and restarted.
    generate_timeout_s: float = 1800.0

    def problems(self) -> list[str]:
        out = positive(self, "num_samplers", "samples_per_prompt", "max_new_tokens", "tensor_parallel_size",
                       "weight_sync_bucket_mb", "weight_sync_timeout_s", "generate_timeout_s")
        out += non_negative(self, "temperature", "top_k", "cpus_per_sampler")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"rollout.top_p: {self.top_p} is outside (0, 1]; use 1.0 to disable nucleus sampling")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            out.append(f"rollout.gpu_memory_utilization: {self.gpu_memory_utilization} is outside (0, 1]")
        if self.engine_process == "inprocess" and self.tensor_parallel_size != 1:
            out.append(f"rollout.engine_process=inprocess runs one engine worker, but tensor_parallel_size is "
                       f"{self.tensor_parallel_size}: use engine_process=multiprocess (or auto)")
        return out


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """Settings that only matter where a role runs on CPU (the tests and the
    demo). A run whose roles have GPUs ignores this section."""

    # KV cache of each CPU sampler (GiB; vLLM's VLLM_CPU_KVCACHE_SPACE).
    sampler_kv_cache_gib: float = 1.0
    # Threads of a CPU sampler's engine: "auto" (every core the sampler's
    # process may run on but one, vLLM's own reserve), or cores like "0-1" /
    # "0,2,4" (the engine is pinned to them, one thread each). Passed on as
    # VLLM_CPU_OMP_THREADS_BIND when the engine runs in its own process (which
    # also takes vLLM's "nobind" and per-rank "0-3|4-7").
    sampler_threads: str = "auto"
    # KV cache of a teacher server the driver starts on CPU (GiB).
    teacher_kv_cache_gib: float = 1.0
    # Torch threads of a CPU learner rank; 0 = Ray's default (one per CPU the
    # rank reserves, learner.cpus_per_worker). In train.mode=sync the roles
    # take turns, so a rank may use more cores than it reserves; in async
    # mode, or with several ranks on one node, extra threads oversubscribe.
    learner_threads: int = 0

    def problems(self) -> list[str]:
        out = positive(self, "sampler_kv_cache_gib", "teacher_kv_cache_gib")
        out += non_negative(self, "learner_threads")
        try:
            parse_cpu_list(self.sampler_threads)
        except ValueError as e:
            out.append(f"{section_name(self)}.sampler_threads: {e}")
        return out


def parse_cpu_list(spec: str) -> list[int] | None:
    """Cores of `cpu.sampler_threads`: None for "auto" (and vLLM's
    "nobind"), else the listed cores ("0-3", "0,2,4", "0-1,6"; vLLM's per-rank
    groups "0-3|4-7" give their union), sorted and unique."""
    if spec in ("auto", "nobind"):
        return None
    cores: set[int] = set()
    for part in str(spec).replace("|", ",").split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{spec!r} is not 'auto' or a core list like '0-3' or '0,2,4'") from None
        if a < 0 or b < a:
            raise ValueError(f"{spec!r}: the range {part.strip()!r} is empty or negative")
        cores.update(range(a, b + 1))
    return sorted(cores)
