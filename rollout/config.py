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
import os
import re
from typing import Any, Literal

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


def url_list(url: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A teacher url field as its replicas' urls (null: none)."""
    if url is None:
        return ()
    return (url,) if isinstance(url, str) else tuple(url)


def url_problems(key: str, url: str | tuple[str, ...] | None) -> list[str]:
    """Problems of a teacher url field `key` (one url, or a list of replicas)."""
    if url is None:
        return []
    urls = url_list(url)
    if not urls:
        return [f"{key}: an empty list; give one url, a list of replica urls, or null"]
    out = [f"{key}: {u!r} must start with http:// or https:// (e.g. http://teacher-node:8000)"
           for u in urls if not u.startswith(("http://", "https://"))]
    bare = [u.rstrip("/") for u in urls]
    dup = sorted({u for u in bare if bare.count(u) > 1})
    if dup:
        out.append(f"{key}: {', '.join(dup)} listed more than once; give each replica's url once")
    return out


TEACHER_BACKENDS = ("auto", "opd", "vllm", "sglang")


def backend_problems(key: str, backend: str | None, url, temperature: float | None) -> list[str]:
    """Problems of a teacher's `backend` (section or route `key`) that show
    before any server answers: an unknown name, a server kind the driver
    cannot start, a temperature the server cannot apply."""
    if backend is None:
        return []
    if backend not in TEACHER_BACKENDS:
        return [f"{key}.backend: {backend!r} is not one of {list(TEACHER_BACKENDS)}"]
    out = []
    if backend in ("vllm", "sglang"):
        if url is None:
            out.append(f"{key}.backend: {backend} needs {key}.url (a running {backend} server); with no url the "
                       f"driver starts opd's teacher_server: set {key}.backend=auto (or opd)")
        if temperature is not None and temperature > 0 and temperature != 1.0:
            out.append(f"{key}.temperature: {temperature} with {key}.backend={backend}: a {backend} server "
                       f"returns the prompt's logprobs at temperature 1 only; use {key}.temperature=1 or opd's "
                       f"teacher_server ({key}.backend=opd), which applies any temperature")
    return out


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
class TeacherRoute:
    """One teacher of several (`teacher.routes`): the records whose
    `teacher.route_by` field holds one of `values` are scored by it. Every
    other setting is the default teacher's (the top-level `teacher.*`); the
    fields below override it where set (null = the default teacher's)."""

    # Name of this teacher in logs and metrics (teacher/<name>/reverse_kl, ...):
    # letters, digits, '_', '-', '.'; not "default" (the top-level teacher).
    name: str = ""
    # Values of the record field `teacher.route_by` this teacher scores
    # (e.g. [math, algebra]); a value may belong to one route only.
    values: tuple[str, ...] = ()
    # A running server for this teacher (as teacher.url). With `model` and no
    # `url`, the driver starts a server of its own for it; with neither, it
    # shares the default teacher's server (e.g. the same model, another prompt).
    url: str | tuple[str, ...] | None = None
    # Model the driver serves for this teacher when `url` is null; with a
    # `url`, only where its tokenizer (chat template) is read from.
    model: str | None = None
    # As teacher.backend (null = the default teacher's).
    backend: str | None = None
    # As teacher.api_key_file (null = the default teacher's).
    api_key_file: str | None = None
    # As teacher.temperature (null = the default teacher's); loss.kind=reverse_kl
    # holds every teacher to the same rule.
    temperature: float | None = None
    # As teacher.prompt (null = the default teacher's).
    prompt: str | None = None
    # As teacher.system_prompt (null = the default teacher's).
    system_prompt: str | None = None


# vLLM engine arguments of a teacher server the driver starts that opd sets
# itself: the key that sets each (None: opd's own). The other names the
# server takes as flags (teacher_server.engine.SERVER_ENGINE_ARGS) pass through.
TEACHER_ENGINE_ARGS: dict[str, str | None] = {
    "model": "teacher.model", "served_model_name": None, "dtype": "teacher.dtype",
    "tensor_parallel_size": "teacher.tensor_parallel_size", "max_model_len": "teacher.max_model_len",
    "kv_cache_memory_bytes": "cpu.teacher_kv_cache_gib on CPU", "seed": None, "max_logprobs": None,
    "logprobs_mode": None, "tokenizer": "teacher.model",
}


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    # URL of a running teacher_server (e.g. http://teacher-node:8000), or a
    # list of URLs: replicas of one teacher (same model, tokenizer and dtype).
    # The client sends each request to the replica with the fewest tokens in
    # flight and takes one that fails out of rotation until a later probe
    # answers (rollout/teacher_replicas.py). When null, the driver starts
    # `python -m teacher_server --model teacher.model` itself, in a Ray actor
    # that books its GPUs and CPUs, and stops it at the end
    # (cluster/teacher_proc.py).
    url: str | tuple[str, ...] | None = None
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
    # What serves teacher.url (rollout/teacher_backends.py): "opd" (opd's
    # teacher_server: any temperature, full tokenizer check, teacher
    # sampling), "vllm" (vLLM's OpenAI server, `vllm serve`: /v1/completions
    # with prompt_logprobs; temperature 1 only, top_k up to its
    # --max-logprobs), "sglang" (SGLang's /generate with return_logprob;
    # temperature 1 only, no tokenizer check), or "auto": probe the server
    # once at start-up and log what answered. A self-started server is opd's.
    backend: Literal["auto", "opd", "vllm", "sglang"] = "auto"
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
    # More vLLM engine arguments of the teacher server(s) the driver starts
    # (not of a server at teacher.url), as rollout.engine_args: fields of
    # vLLM's EngineArgs, e.g. {enable_prefix_caching: false, quantization:
    # fp8}; max_num_seqs and max_num_batched_tokens go to teacher_server's
    # --max-num-seqs and --max-batch-tokens. Not the ones opd sets from its
    # own keys (TEACHER_ENGINE_ARGS names them).
    engine_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Several teachers: the record field (e.g. data_source) whose value picks
    # the teacher of a record among `routes` (rollout/teacher_routes.py).
    # null = one teacher (this section) scores every record.
    route_by: str | None = None
    # The teachers by value of `route_by` (see TeacherRoute); metrics per
    # teacher: teacher/<name>/reverse_kl, tokens, latency_s.
    routes: tuple[TeacherRoute, ...] = ()
    # A record whose `route_by` value no route lists: "error" refuses the run
    # at start-up, naming the record and the value; "default" has this
    # section's teacher (named "default" in metrics) score it.
    unrouted: Literal["error", "default"] = "error"
    # The prefix the teacher scores the student's completion tokens after
    # (the completion ids are the same; only the prefix differs):
    # "student" (the student's prompt ids), "own_template" (the record's
    # prompt/messages rendered with the teacher's chat template: teacher.model's
    # tokenizer, which a teacher given only by url must name there too), or
    # "field:NAME" (the record's field NAME, text or messages, rendered as the
    # prompt is but with the teacher's chat template when teacher.model is
    # set: privileged context such as a reference solution).
    prompt: str = "student"
    # A system message put before the teacher's prompt (own_template or
    # field:NAME; added to a record's own system message). null = none.
    system_prompt: str | None = None

    def problems(self) -> list[str]:
        out = positive(self, "max_model_len", "tensor_parallel_size", "temperature",
                       "max_tokens_per_request", "max_concurrency", "request_timeout_s",
                       "unavailable_timeout_s", "startup_timeout_s")
        out += non_negative(self, "cpus")
        if self.top_k < 0:
            out.append(f"teacher.top_k: {self.top_k} is negative; use 0 (sampled token only) or K > 0")
        out += url_problems(f"{section_name(self)}.url", self.url)
        out += backend_problems(section_name(self), self.backend, self.url, self.temperature)
        if self.engine_args:
            from teacher_server.engine import engine_args_problems

            key = f"{section_name(self)}.engine_args"
            if self.url is not None and not self.routes:
                out.append(f"{key}: set, but teacher.url is a running server, which has its own engine "
                           "arguments; set them where it is served (`python -m teacher_server --engine-args`), "
                           "or drop teacher.url to have the driver start the teacher")
            out += engine_args_problems(key, self.engine_args, TEACHER_ENGINE_ARGS)
            for name in ("max_num_seqs", "max_num_batched_tokens"):   # teacher_server flags: checked here
                v = self.engine_args.get(name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    out.append(f"{key}.{name}: {v!r} must be a positive integer")
        return out + self._route_problems()

    def _route_problems(self) -> list[str]:
        """The prompt specs and the routes (names, values, per-teacher overrides)."""
        out = []
        s = section_name(self)
        for key, own, spec, system in [(s, self.prompt, self.prompt, self.system_prompt)] + [
                (f"{s}.routes[{i}]", r.prompt, r.prompt or self.prompt,
                 r.system_prompt if r.system_prompt is not None else self.system_prompt)
                for i, r in enumerate(self.routes)]:
            problem = prompt_spec_problem(spec)
            if problem:
                if own is not None:  # an inherited bad spec is reported once, at its own key
                    out.append(f"{key}.prompt: {problem}")
            elif spec == "student" and system is not None:
                out.append(f"{key}.system_prompt: set, but the teacher's prompt is the student's token ids "
                           f"(prompt=student), which it cannot add a message to; set {key}.prompt=own_template "
                           f"(or field:NAME), or drop the system prompt")
        if self.routes and not self.route_by:
            out.append(f"{s}.routes: {len(self.routes)} route(s) but {s}.route_by is null; set it to the record "
                       f"field whose value picks the teacher (e.g. {s}.route_by=data_source)")
        if self.route_by is not None and not self.routes:
            out.append(f"{s}.route_by: {self.route_by!r} but {s}.routes is empty; list the teachers "
                       f"(name, values, url or model), or set {s}.route_by=null for one teacher")
        if self.route_by is not None and not self.route_by.strip():
            out.append(f"{s}.route_by: empty; name a record field (e.g. data_source)")
        names: dict[str, int] = {}
        owner: dict[str, int] = {}
        for i, r in enumerate(self.routes):
            key = f"{s}.routes[{i}]"
            if not _ROUTE_NAME.fullmatch(r.name or ""):
                out.append(f"{key}.name: {r.name!r} is not a valid teacher name; use letters, digits, '_', '-' "
                           f"or '.' (it names the teacher/<name>/* metrics)")
            elif r.name == "default":
                out.append(f"{key}.name: 'default' names the top-level teacher ({s}.*); choose another name")
            elif r.name in names:
                out.append(f"{key}.name: {r.name!r} is also the name of {s}.routes[{names[r.name]}]; names "
                           f"must be unique")
            else:
                names[r.name] = i
            if not r.values:
                out.append(f"{key}.values: empty; list the values of the record field {self.route_by!r} "
                           f"this teacher scores")
            for v in r.values:
                if v in owner and owner[v] != i:
                    out.append(f"{key}.values: {v!r} is also listed by {s}.routes[{owner[v]}]; a value "
                               f"picks one teacher")
                owner.setdefault(v, i)
            if r.temperature is not None and not r.temperature > 0:
                out.append(f"{key}.temperature: {r.temperature!r} must be > 0 (or null for {s}.temperature)")
            out += url_problems(f"{key}.url", r.url)
            own_server = r.url is not None or bool(r.model)
            if own_server or r.backend is not None or r.temperature is not None:
                # This teacher's own combination (an inherited one is reported at `teacher`).
                out += backend_problems(key, r.backend or self.backend,
                                        r.url if own_server else self.url,
                                        r.temperature if r.temperature is not None else self.temperature)
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


# vLLM engine arguments a sampler sets itself: the key that sets each (None:
# opd's own, not settable); rollout.engine_args may not name them.
SAMPLER_ENGINE_ARGS: dict[str, str | None] = {
    "model": "student.model", "tokenizer": "student.model (the learner trains with its tokenizer)",
    "dtype": "student.dtype", "max_model_len": "student.max_model_len",
    "tensor_parallel_size": "rollout.tensor_parallel_size", "enforce_eager": "rollout.enforce_eager",
    "seed": "rollout.seed", "gpu_memory_utilization": "rollout.gpu_memory_utilization",
    "enable_lora": "learner.lora.rank", "max_lora_rank": "learner.lora.rank", "max_loras": None,
    "logprobs_mode": None, "worker_extension_cls": None, "weight_transfer_config": None,
    "distributed_executor_backend": None,
}


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
    # More vLLM engine arguments for every sampler, passed to vLLM as given:
    # fields of vllm.engine.arg_utils.EngineArgs (`vllm serve`'s flags with
    # '_' for '-'), e.g. {max_num_seqs: 512, enable_prefix_caching: true,
    # quantization: fp8, kv_cache_dtype: fp8}; override one with
    # rollout.engine_args.max_num_seqs=512. Not the ones opd sets from its
    # own keys (SAMPLER_ENGINE_ARGS names them).
    engine_args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def problems(self) -> list[str]:
        out = positive(self, "num_samplers", "samples_per_prompt", "max_new_tokens", "tensor_parallel_size",
                       "weight_sync_bucket_mb", "weight_sync_timeout_s", "generate_timeout_s")
        out += non_negative(self, "temperature", "top_k", "cpus_per_sampler")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"rollout.top_p: {self.top_p} is outside (0, 1]; use 1.0 to disable nucleus sampling")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            out.append(f"rollout.gpu_memory_utilization: {self.gpu_memory_utilization} is outside (0, 1]")
        if self.engine_args:
            from teacher_server.engine import engine_args_problems

            out += engine_args_problems("rollout.engine_args", self.engine_args, SAMPLER_ENGINE_ARGS)
        if self.engine_process == "inprocess" and self.tensor_parallel_size != 1:
            out.append(f"rollout.engine_process=inprocess runs one engine worker, but tensor_parallel_size is "
                       f"{self.tensor_parallel_size}: use engine_process=multiprocess (or auto)")
        return out


@dataclasses.dataclass(frozen=True)
class CpuConfig:
    """Settings that only matter where a role runs on CPU (the tests and the
    demo). A run whose roles have GPUs ignores this section."""

    # KV cache of each CPU sampler (GiB), allocated in full when its engine
    # starts: "auto" sizes it to the run's batch (a step's or an eval's
    # sequences, at most 256, each data.max_prompt_tokens +
    # rollout.max_new_tokens long, from the student's config.json: a few
    # hundred MiB for small models), or a number of GiB (fractions allowed).
    # It replaces VLLM_CPU_KVCACHE_SPACE. Too small only queues sequences;
    # below one sequence of student.max_model_len vLLM refuses to start.
    sampler_kv_cache_gib: float | Literal["auto"] = "auto"
    # The three *_threads below default to "auto": the placement plan
    # decides (cluster/placement.py cpu_thread_shares). In train.mode=sync
    # the roles take turns, so a role that runs alone in its phase uses every
    # core of its node (split evenly among its processes on that node: two
    # samplers on one node get half each); roles that run at the same time
    # (train.mode=async, or sampling and scoring overlapped by
    # train.rollout_chunks > 1 or train.sample_from=teacher) each keep the
    # CPUs Ray reserves for them (rollout.cpus_per_sampler,
    # learner.cpus_per_worker, teacher.cpus).
    #
    # Threads of a CPU sampler's engine: "auto" (the plan), or cores like
    # "0-1" / "0,2,4" (the engine is pinned to them, one thread each). Passed
    # on as VLLM_CPU_OMP_THREADS_BIND when the engine runs in its own process
    # (which also takes vLLM's "nobind" and per-rank "0-3|4-7"; there "auto"
    # is vLLM's own binding).
    sampler_threads: str = "auto"
    # KV cache of a teacher server the driver starts on CPU (GiB): "auto"
    # sizes it to a step's or an eval's sequences (at most 256) of teacher.max_model_len
    # tokens, from the teacher's config.json; or a number of GiB.
    teacher_kv_cache_gib: float | Literal["auto"] = "auto"
    # Threads of the teacher server the driver starts on CPU (its
    # OMP_NUM_THREADS): "auto" (the plan), a count, or 0 (the server's own
    # default: every core it may use but one).
    teacher_threads: int | Literal["auto"] = "auto"
    # Torch threads of a CPU learner rank: "auto" (the plan), a count, or 0
    # (Ray's default: one per CPU the rank reserves, learner.cpus_per_worker).
    learner_threads: int | Literal["auto"] = "auto"

    def problems(self) -> list[str]:
        out = []
        for name in ("sampler_kv_cache_gib", "teacher_kv_cache_gib"):
            v = getattr(self, name)
            if v != "auto" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                out.append(f"{section_name(self)}.{name}: {v!r} is not valid; use auto (sized to the run's batch) "
                           "or a size in GiB > 0, e.g. 0.25")
        for name in ("teacher_threads", "learner_threads"):
            v = getattr(self, name)
            if v != "auto" and not (isinstance(v, int) and v >= 0):
                out.append(f"{section_name(self)}.{name}: {v!r} is not valid; use auto (from the placement plan), "
                           "a thread count, or 0")
        try:
            parse_cpu_list(self.sampler_threads)
        except ValueError as e:
            out.append(f"{section_name(self)}.sampler_threads: {e}")
        return out


@dataclasses.dataclass(frozen=True)
class ThreadShare:
    """The threads of one CPU process of a role, as the placement plan
    decides them (cluster/placement.py cpu_thread_shares) and the process
    resolves them on its node, where its cores are known: `count` when > 0,
    else the node's cores divided by `divisor` (at least 1). The node's
    cores are those the process may run on, at most `node_cpus` (what Ray
    counts for the node) when that is > 0. `reason` says why (logged)."""

    count: int = 0
    divisor: int = 1
    node_cpus: float = 0.0
    reason: str = ""

    def threads(self, cores: int | None = None) -> int:
        if self.count > 0:
            return self.count
        if cores is None:
            cores = len(os.sched_getaffinity(0))
        if self.node_cpus > 0:
            cores = min(cores, int(self.node_cpus))
        return max(1, cores // max(1, self.divisor))


_ROUTE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def prompt_spec_problem(spec: str) -> str | None:
    """None when `spec` is a valid teacher.prompt, else what is wrong."""
    if spec in ("student", "own_template"):
        return None
    if spec.startswith("field:") and spec[len("field:"):].strip():
        return None
    return (f"{spec!r} is not valid; use student (the student's prompt), own_template (the record rendered "
            f"with the teacher's chat template) or field:NAME (the record's field NAME, e.g. field:teacher_prompt)")


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
