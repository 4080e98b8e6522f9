"""The scoring engine behind teacher_server: a vLLM v1 `AsyncLLM` (continuous
batching across all HTTP requests and clients) turned into the protocol's
`/v1/logprobs` and `/v1/generate` answers.

Each scored sequence is one vLLM request with `max_tokens=1` and
`prompt_logprobs`; vLLM's entry p holds log p(ids[p] | ids[:p]) with the given
token first, then the top-K tokens by logprob. `flat_logprobs=True` and
`detokenize=False` keep the front-end's per-token Python work to a few flat
lists, which numpy reshapes to (positions, K + 1).

Temperature. vLLM 0.32 computes prompt logprobs from the raw logits
(`gpu_model_runner._get_prompt_logprobs_dict` calls `compute_logprobs(logits)`;
the sampling temperature is never applied to prompt positions, whatever
`logprobs_mode`). log_softmax is shift-invariant, so with l = log_softmax(z):
log_softmax(z / T) = log_softmax(l / T) exactly. For T != 1 the engine therefore
asks for the full-vocabulary raw prompt logprobs (`prompt_logprobs=-1`, allowed by
`max_logprobs=-1`) and rescales them here in float64. Top-k order is invariant
under positive scaling, so the top-K of the rescaled row are the first K of
vLLM's sorted row. Cost: V floats per position instead of K + 1 (fine for
V in the tens of thousands at moderate batch; T = 1 stays cheap).

Used by `teacher_server.server`; `python -m teacher_server` builds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import os
import time

import numpy as np

from teacher_server.protocol import (DEFAULT_MAX_TOP_K, GenerateRequest, GenerateResponse, GenerateResult,
                                     GenerateSample, LogprobsRequest, LogprobsResponse, ModelInfo,
                                     SequenceLogprobs, TokenizerInfo, tokenizer_info)

log = logging.getLogger("teacher_server.engine")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What `python -m teacher_server` passes to vLLM (see __main__ for the flags)."""

    model: str
    served_model_name: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's own
    max_batch_tokens: int | None = None  # vLLM max_num_batched_tokens (per engine step)
    max_num_seqs: int = 256
    max_top_k: int = DEFAULT_MAX_TOP_K
    seed: int = 0
    kv_cache_memory_bytes: int | None = None  # vLLM's; None: its own choice
    # More vLLM engine arguments (--engine-args), none of SERVER_ENGINE_ARGS.
    engine_args: dict = dataclasses.field(default_factory=dict)


# vLLM engine arguments teacher_server sets from its own flags (the flag to
# use instead), or itself (None): `--engine-args` may not name them.
SERVER_ENGINE_ARGS: dict[str, str | None] = {
    "model": "--model", "served_model_name": "--served-model-name", "dtype": "--dtype",
    "tensor_parallel_size": "--tensor-parallel-size", "max_model_len": "--max-model-len",
    "max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-batch-tokens",
    "kv_cache_memory_bytes": "--kv-cache-memory-bytes", "seed": None, "max_logprobs": None, "logprobs_mode": None,
}


@functools.cache
def vllm_engine_arg_names() -> frozenset[str] | None:
    """The installed vLLM's engine argument names (the fields of its
    AsyncEngineArgs, what `vllm serve` takes as flags); None without vLLM."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        return None
    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def engine_args_problems(key: str, args: dict, reserved: dict[str, str | None]) -> list[str]:
    """What is wrong with user-given vLLM engine arguments `args` (named
    `key` in the messages): a name opd sets itself (`reserved`: the setting
    to use instead, or None), or one the installed vLLM does not have. Their
    values are vLLM's to check when the engine starts."""
    import difflib

    out: list[str] = []
    for k in args:
        if k in reserved:
            where = reserved[k]
            out.append(f"{key}.{k}: opd sets this engine argument itself"
                       + (f"; set {where} instead" if where else ""))
            continue
        names = vllm_engine_arg_names()
        if names is not None and k not in names:
            near = difflib.get_close_matches(k, sorted(names - set(reserved)), n=3)
            out.append(f"{key}.{k}: not an engine argument of the installed vLLM"
                       + (f" (did you mean {', '.join(near)}?)" if near else "")
                       + "; they are the fields of vllm.engine.arg_utils.EngineArgs, `vllm serve`'s flags "
                         "with '_' for '-' (e.g. enable_prefix_caching, max_num_seqs, quantization)")
    return out


def engine_settings(vllm_config) -> dict:
    """Settings of a started vLLM engine as vLLM resolved them (its defaults,
    opd's choices and the user's engine arguments together), for the logs."""
    sc, cc, mc = vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.model_config
    return {"max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
            "enable_prefix_caching": cc.enable_prefix_caching, "kv_cache_dtype": cc.cache_dtype,
            "quantization": mc.quantization, "max_model_len": mc.max_model_len,
            "dtype": str(mc.dtype).removeprefix("torch.")}


def merge_engine_args(key: str, own: dict, user: dict) -> dict:
    """`own` (what opd passes to vLLM) with the user's `user` added; a name in
    both is an error naming `key` (a setting opd needs on this machine, e.g.
    enable_chunked_prefill=False on CPU: `cpu_engine_setup`)."""
    clash = sorted(set(own) & set(user))
    if clash:
        raise ValueError(f"{key}: {', '.join(f'{k}={user[k]!r}' for k in clash)}: opd runs this engine with "
                         f"{', '.join(f'{k}={own[k]!r}' for k in clash)}; remove it from {key}")
    return {**own, **user}


def sampling_params_for_scoring(top_k: int, temperature: float):
    """SamplingParams of one scored sequence (shared with bench/teacher_server.py's
    offline ceiling so both measure the same engine work)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    full_vocab = temperature != 1.0
    return SamplingParams(max_tokens=1, prompt_logprobs=-1 if full_vocab else top_k, detokenize=False,
                          flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY, temperature=1.0)


def prompt_logprobs_to_result(flat, token_ids: list[int], start: int, top_k: int,
                              temperature: float) -> SequenceLogprobs:
    """Turn one request's vLLM prompt logprobs (a FlatLogprobs, entry 0 None) into
    the protocol result for positions start .. len(token_ids)-1."""
    n = len(token_ids)
    lo = flat.start_indices[start]
    hi = flat.end_indices[n - 1]
    width = flat.end_indices[start] - lo  # entries per position: the given token + K (or V) sorted
    ids_P_W = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n - start, width)
    lps_P_W = np.asarray(flat.logprobs[lo:hi], dtype=np.float64).reshape(n - start, width)
    if not np.array_equal(ids_P_W[:, 0], np.asarray(token_ids[start:], dtype=np.int64)):
        # vLLM puts the scored token first; anything else means a layout change upstream.
        raise RuntimeError("vLLM prompt logprobs do not start with the scored token; "
                           "this vLLM version's FlatLogprobs layout is not supported")
    if temperature != 1.0:
        # Full vocab in columns 1..V: rescale exactly (see module docstring).
        scaled_P_V = lps_P_W[:, 1:] / temperature
        lse_P = np.logaddexp.reduce(scaled_P_V, axis=1)
        given_P = lps_P_W[:, 0] / temperature - lse_P
        top_P_K = scaled_P_V[:, :top_k] - lse_P[:, None]
    else:
        given_P = lps_P_W[:, 0]
        top_P_K = lps_P_W[:, 1:1 + top_k]
    if top_k == 0:
        return SequenceLogprobs(logprobs=given_P.tolist())
    return SequenceLogprobs(logprobs=given_P.tolist(), top_ids=ids_P_W[:, 1:1 + top_k].tolist(),
                            top_logprobs=top_P_K.tolist())


def cpu_engine_setup() -> dict:
    """What every CPU vLLM engine of opd (the sampler's and the teacher
    server's) runs with; returns the engine arguments and sets up this process.

    - No prompt's prefill is split over engine steps. vLLM 0.32 rewinds a
      seeded request's generator when it drops the token sampled after a
      partial prefill (vllm/v1/worker/gpu_model_runner.py:3495-3502,
      `gen.set_offset`), which a CPU torch.Generator refuses ("CPU Generator
      does not use offset"): the engine dies as soon as a batch of seeded
      samples holds more prompt tokens than one step takes. Seeds are what
      make rollouts reproducible, so on CPU chunked prefill is off; vLLM then
      raises a step's token budget to at least max_model_len
      (vllm/engine/arg_utils.py:3136-3145), so every prompt fits in one step.
      A `--max-batch-tokens` below max_model_len is refused by vLLM's own
      config check.
    - torch.compile is off in this process and the engine-core processes it
      spawns (TORCH_COMPILE_DISABLE, read when torch._dynamo is imported). CPU
      engines run eagerly (enforce_eager), yet vLLM compiles the rank count of
      every returned logprob with inductor on first use
      (vllm/v1/sample/ops/logprobs.py:10; on CPU the platform's
      simple_compile_backend is "inductor"): 3-8 s of tracing and C++ compile
      in each engine's first request, for a `(x >= v).sum(-1)` that runs as
      fast eagerly. GPU engines keep it."""
    os.environ["TORCH_COMPILE_DISABLE"] = "1"
    import torch._dynamo

    torch._dynamo.config.disable = True
    return {"enable_chunked_prefill": False}


class TeacherEngine:
    """Owns one AsyncLLM. All methods are called from the server's event loop."""

    def __init__(self, engine, info: ModelInfo, tokenizer: TokenizerInfo):
        self._engine = engine
        self.info = info
        self.tokenizer = tokenizer  # what GET /v1/tokenizer returns
        self._ids = itertools.count()

    @classmethod
    def build(cls, opts: EngineOptions) -> "TeacherEngine":
        """Start vLLM (tens of seconds; spawns the engine-core process, which on
        CPU runs the model itself: `run_model_in_engine_core_on_cpu`). Safe to call
        from a worker thread: AsyncLLM starts its output loop lazily on the first
        request when no event loop runs in the constructing thread."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(model=opts.model, dtype=opts.dtype, tensor_parallel_size=opts.tensor_parallel_size,
                      max_model_len=opts.max_model_len, seed=opts.seed, max_num_seqs=opts.max_num_seqs,
                      # -1: no cap, so temperature != 1 can fetch full-vocab prompt logprobs.
                      max_logprobs=-1,
                      # /v1/generate reports the logprobs of the distribution sampled from;
                      # prompt logprobs are raw in every mode (see module docstring).
                      logprobs_mode="processed_logprobs",
                      served_model_name=opts.served_model_name)
        if opts.max_batch_tokens:
            kwargs["max_num_batched_tokens"] = opts.max_batch_tokens
        if opts.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = opts.kv_cache_memory_bytes
            # vLLM's CPU platform replaces the size with VLLM_CPU_KVCACHE_SPACE when that is set.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if _is_cpu_build():  # CUDA graphs do not exist on CPU
            kwargs["enforce_eager"] = True
            kwargs.update(cpu_engine_setup())
            if opts.tensor_parallel_size == 1:
                run_model_in_engine_core_on_cpu()
        kwargs = merge_engine_args("--engine-args", kwargs, opts.engine_args)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        log.info("teacher_server engine: %s", json.dumps(engine_settings(engine.vllm_config)))
        mc = engine.model_config
        # The tokenizer vLLM itself loaded: what the teacher's ids mean.
        tok = tokenizer_info(engine.get_tokenizer())
        # vLLM samples one token after a scored prompt, so the longest scorable sequence
        # is one shorter than the engine's context; that is what clients are told.
        info = ModelInfo(model=opts.served_model_name or opts.model, vocab_size=mc.get_vocab_size(),
                         max_model_len=mc.max_model_len - 1, dtype=str(mc.dtype).removeprefix("torch."),
                         tokenizer_sha256=tok.sha256(), max_top_k=opts.max_top_k, tokenizer_size=len(tok.vocab))
        return cls(engine, info, tok)

    def _request_id(self) -> str:
        return f"teacher-{os.getpid()}-{next(self._ids)}"

    async def _final(self, prompt_ids: list[int], params) -> object:
        out = None
        async for out in self._engine.generate({"prompt_token_ids": prompt_ids}, params, self._request_id()):
            pass
        if out is None:
            raise RuntimeError("vLLM returned no output for a request")
        return out

    async def score(self, req: LogprobsRequest, phase=None) -> LogprobsResponse:
        """Score every sequence of an already validated request; each sequence is one
        engine request so vLLM batches them with every other client's.
        `phase(name, seconds)`, if given, receives the time spent waiting on
        vLLM ("engine": queueing, prefill, vLLM's own prompt-logprob and output
        processing) and turning its output into the protocol's ("convert")."""
        params = sampling_params_for_scoring(req.top_k, req.temperature)
        t0 = time.perf_counter()
        outs = await _all(self._final(s.token_ids, params) for s in req.sequences)
        t1 = time.perf_counter()
        results = [prompt_logprobs_to_result(o.prompt_logprobs, s.token_ids, s.start, req.top_k, req.temperature)
                   for o, s in zip(outs, req.sequences, strict=True)]
        if phase is not None:
            phase("engine", t1 - t0)
            phase("convert", time.perf_counter() - t1)
        return LogprobsResponse(model=self.info.model, results=results)

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        def params(i: int, k: int):
            seed = None if req.seed is None else req.seed + i * req.n + k
            return SamplingParams(n=1, max_tokens=req.max_new_tokens, temperature=req.temperature,
                                  top_p=req.top_p, seed=seed, stop_token_ids=list(req.stop_token_ids),
                                  logprobs=0, detokenize=False, flat_logprobs=True,
                                  output_kind=RequestOutputKind.FINAL_ONLY)

        jobs = [self._final(p.token_ids, params(i, k)) for i, p in enumerate(req.prompts) for k in range(req.n)]
        outs = await _all(jobs)
        results = []
        for i in range(len(req.prompts)):
            samples = []
            for o in outs[i * req.n:(i + 1) * req.n]:
                c = o.outputs[0]
                flat = c.logprobs
                # Entry t's first element is the sampled token (vLLM puts it first).
                lps = [flat.logprobs[flat.start_indices[t]] for t in range(len(c.token_ids))]
                samples.append(GenerateSample(token_ids=list(c.token_ids), logprobs=lps,
                                              finish_reason="stop" if c.finish_reason == "stop" else "length"))
            results.append(GenerateResult(samples=samples))
        return GenerateResponse(model=self.info.model, results=results)

    @property
    def dead(self) -> bool:
        """True once vLLM's engine core has failed (the server then reports 503)."""
        return bool(getattr(self._engine, "errored", False))

    def shutdown(self) -> None:
        self._engine.shutdown()


async def _all(coros) -> list:
    """Await all, in order; on the first failure cancel the rest (vLLM then aborts
    their requests) instead of leaving them running for a reply nobody reads."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:  # includes CancelledError (the client went away, or shutdown)
        for t in tasks:
            t.cancel()
        raise


def run_model_in_engine_core_on_cpu() -> None:
    """Make vLLM's CPU engine-core process run the model itself (executor
    "uni") instead of spawning a worker process for it.

    On CPU, vLLM turns a one-worker engine's executor into its multiprocess
    one whenever VLLM_ENABLE_V1_MULTIPROCESSING is on (vllm/platforms/cpu.py,
    so that the worker can bind OpenMP threads); AsyncLLM keeps its separate
    engine-core process either way. Measured on the tiny teacher: healthy in
    34-36 s instead of 52 s, 2.4 GiB RSS instead of 3.0 GiB, identical
    logprobs, and the same scoring speed at the same thread count. Threads:
    OMP_NUM_THREADS if set, else every core this process may use but one,
    vLLM's own default reserve. Both variables are inherited by the
    engine-core process it spawns; only call this in the server's process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) - 1)))


def _is_cpu_build() -> bool:
    try:
        from vllm.platforms import current_platform
        return current_platform.is_cpu()
    except Exception:  # noqa: BLE001 - platform probing must not stop the server
        return False
