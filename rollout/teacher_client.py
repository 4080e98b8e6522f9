"""Client of teacher_server (`/v1/model`, `/v1/tokenizer`, `/v1/logprobs`, `/v1/generate`).

Who calls it: the driver (synchronous code that also drives Ray) builds one
`TeacherClient.from_config(cfg.teacher, url)`, calls `check_tokenizer(student_dir)`
once before the first step, then `score(...)` on every rollout batch (and
`generate(...)` when `train.sample_from=teacher`). The client also pickles (it is
rebuilt from its settings on the other side), so a Ray actor can hold one.

Backends (`teacher.backend`, rollout/teacher_backends.py): the same client
scores through vLLM's OpenAI server (/v1/completions with prompt_logprobs) or
SGLang (/generate) when told to, or when `auto` finds one at the url (probed
once, on first use). Everything below holds for every backend; a vLLM or
SGLang 400 does not name the bad sequence, so its pack is halved until the
bad sequence is alone. `generate` needs opd's teacher_server.

What it does per call:
  * packs the sequences into requests of at most `max_tokens_per_request`
    tokens, in order (a sequence larger than the budget goes alone);
  * sends them with at most `max_concurrency` requests in flight;
  * retries 429 / 503 / connection errors / timeouts with exponential backoff
    and full jitter, waiting at least the server's Retry-After; 500 is retried
    `max_internal_retries` times;
  * with several urls (replicas of one teacher, `teacher.url` as a list),
    sends each request to the replica with the fewest tokens in flight; a
    replica whose request fails with a connection error, a timeout, 429 or 503
    leaves the rotation (the request goes at once to another replica) and gets
    a probe request after a wait that doubles per failure
    (rollout/teacher_replicas.py); only when every replica is out does a
    request back off as above;
  * gives up with `TeacherUnavailableError` once one request has been failing
    for `unavailable_timeout_s` (the driver then checkpoints and stops);
  * raises `TeacherRequestError` without retrying on a request-level 400 / 401 /
    404 / 415 (the request itself is wrong: retrying cannot help);
  * isolates sequence-level failures: a 400 naming `sequences[i]` (e.g. a token
    id out of the teacher's vocabulary), a lone sequence the server refuses as too
    large (413; larger packs are split in two and resent), a 500 that outlasts its
    retries, or a result of the wrong length. Such a sequence gets `None` and an
    entry in `ScoreResult.errors`, and is counted in `teacher/failed_sequences`:
    never a made-up score.

Event loop: the async core (aiohttp) runs on one event loop in a background
daemon thread that the client owns; the sync methods submit coroutines to it and
block on the result. Chosen over `asyncio.run` per call because (a) it keeps the
connection pool (HTTP keep-alive) across calls and (b) it works the same from a
plain thread, from a synchronous Ray actor and from inside a running event loop
(an async Ray actor), where `asyncio.run` is not allowed. Async callers use
`score_async` / `generate_async`, which await the same work without blocking
their loop.

The API key is read from `api_key_file` and only ever put in the Authorization
header; no message or log line contains it.

    python -m rollout.teacher_client http://127.0.0.1:8000 [STUDENT_DIR]   # model info + tokenizer check
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import random
import re
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from rollout import teacher_backends as TB
from rollout.config import TeacherConfig
from rollout.teacher_replicas import ReplicaSet
from teacher_server import protocol as P

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# Errors (all pickle: they cross Ray actor boundaries)
# --------------------------------------------------------------------------

class TeacherError(RuntimeError):
    """Base of the teacher client's errors."""


class TeacherUnavailableError(TeacherError):
    """The teacher (every replica of it) stayed unreachable or overloaded past
    `unavailable_timeout_s`. `url`: its url, or its replicas' joined by ", "."""

    def __init__(self, url: str, waited_s: float, timeout_s: float, last_error: str, attempts: int):
        self.url, self.waited_s, self.timeout_s = url, waited_s, timeout_s
        self.last_error, self.attempts = last_error, attempts
        urls = url.split(", ")
        what = f"teacher at {url}" if len(urls) == 1 else f"all {len(urls)} teacher replicas ({url})"
        check = (f"teacher_server is running and reachable from this node (GET {url}/health)" if len(urls) == 1
                 else "each replica's server is running and reachable from this node (GET URL/health)")
        super().__init__(
            f"{what} unavailable: a request kept failing for {waited_s:.1f} s over {attempts} "
            f"attempts, past teacher.unavailable_timeout_s={timeout_s:g}; last error: {last_error}. "
            f"Check that {check}, "
            f"or raise teacher.unavailable_timeout_s if it is only slow to load or overloaded")

    def __reduce__(self):
        return (TeacherUnavailableError, (self.url, self.waited_s, self.timeout_s, self.last_error, self.attempts))


class TeacherRequestError(TeacherError):
    """The server refused a request in a way retrying cannot fix (400/401/404/413/415)."""

    def __init__(self, url: str, status: int, type: str, message: str, field: str | None = None, hint: str = ""):
        self.url, self.status, self.type, self.message, self.field, self.hint = url, status, type, message, field, hint
        where = f" (field {field})" if field else ""
        super().__init__(f"teacher at {url} refused the request: {status} {type}{where}: {message}"
                         + (f"; {hint}" if hint else ""))

    def __reduce__(self):
        return (TeacherRequestError, (self.url, self.status, self.type, self.message, self.field, self.hint))


class TeacherBackendError(TeacherError):
    """The server at teacher.url is not the backend teacher.backend names, or
    cannot do what the run asks of it (top-k above its limit, a temperature
    it cannot apply, teacher sampling): a start-up error (exit 2)."""

    def __init__(self, url: str, backend: str, message: str):
        self.url, self.backend, self.message = url, backend, message
        super().__init__(f"teacher.url={url} with teacher.backend={backend}: {message}")

    def __reduce__(self):
        return (TeacherBackendError, (self.url, self.backend, self.message))


class TokenizerMismatchError(TeacherError):
    """The teacher's tokenizer maps ids differently from the student's
    (`differences`: what differs, from `protocol.tokenizer_differences`)."""

    def __init__(self, teacher_sha256: str, student_sha256: str, teacher_model: str, student_dir: str,
                 differences: Sequence[str] = ()):
        self.teacher_sha256, self.student_sha256 = teacher_sha256, student_sha256
        self.teacher_model, self.student_dir = teacher_model, student_dir
        self.differences = list(differences)
        super().__init__(
            f"teacher tokenizer differs from the student's (sha256 {teacher_sha256[:12]}... of teacher "
            f"{teacher_model} vs {student_sha256[:12]}... of student {student_dir}): on-policy distillation "
            f"scores the student's own token ids, so both must use one tokenizer"
            + "".join(f"; {d}" for d in self.differences)
            + "; serve a teacher that shares the student's tokenizer (a chat template or eos_token of its "
              "own is fine)")

    def __reduce__(self):
        return (TokenizerMismatchError, (self.teacher_sha256, self.student_sha256, self.teacher_model,
                                         self.student_dir, self.differences))


def check_tokenizers(student: P.TokenizerInfo, teacher: P.TokenizerInfo, student_name: str,
                     teacher_name: str) -> None:
    """Raise TokenizerMismatchError, naming what differs, unless the two
    tokenizers agree on what scoring depends on (the token->id map and the ids
    added around every text; see teacher_server/protocol.py)."""
    s_sha, t_sha = student.sha256(), teacher.sha256()
    if s_sha != t_sha:
        raise TokenizerMismatchError(t_sha, s_sha, teacher_name, student_name,
                                     P.tokenizer_differences(student, teacher))


# --------------------------------------------------------------------------
# Pure logic: packing and backoff (unit-tested in tests/unit/test_teacher_client_unit.py)
# --------------------------------------------------------------------------

def pack_by_budget(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy in-order packing of items (by index) into groups of total cost <=
    budget; an item costing more than the budget forms a group of its own."""
    if budget <= 0:
        raise ValueError(f"token budget {budget} must be > 0")
    packs: list[list[int]] = []
    cur: list[int] = []
    cur_cost = 0
    for i, c in enumerate(costs):
        if cur and cur_cost + c > budget:
            packs.append(cur)
            cur, cur_cost = [], 0
        cur.append(i)
        cur_cost += c
    if cur:
        packs.append(cur)
    return packs


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random,
                  retry_after_s: float | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based).

    Full jitter (uniform in [0, min(max_s, base_s * 2**attempt)]) spreads the
    retries of many clients after an outage. A server's Retry-After is a floor:
    wait that long plus a jitter of up to base_s, so clients do not all return
    in the same instant."""
    if retry_after_s is not None and retry_after_s >= 0:
        return retry_after_s + rng.uniform(0.0, base_s)
    return rng.uniform(0.0, min(max_s, base_s * (2.0 ** attempt)))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        v = float(value.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


def request_tokens(req: Any) -> int:
    """Tokens a request costs its server (spreads the load over replicas):
    the tokens scored, or prompt plus new tokens per sample generated."""
    if isinstance(req, P.LogprobsRequest):
        return sum(len(s.token_ids) for s in req.sequences)
    if isinstance(req, P.GenerateRequest):
        return sum((len(p.token_ids) + req.max_new_tokens) * req.n for p in req.prompts)
    return 0


_ITEM_RE = re.compile(r"^(\w+)\[(\d+)\]")


def item_index(field: str | None, collection: str) -> int | None:
    """`sequences[3].token_ids[7]` -> 3 (for collection "sequences"); else None."""
    m = _ITEM_RE.match(field or "")
    return int(m.group(2)) if m and m.group(1) == collection else None


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

@dataclasses.dataclass
class ScoreResult:
    """Teacher scores of a list of sequences, index-aligned with the input.

    A sequence whose scoring failed has `logprobs[i] is None` (and None top-k
    entries) and an entry (i, reason) in `errors`; nothing is zero-filled."""

    logprobs: list[list[float] | None]  # [i]: (T_i - start_i,)
    top_ids: list[list[list[int]] | None] | None  # [i]: (T_i - start_i, K); None when top_k == 0
    top_logprobs: list[list[list[float]] | None] | None
    errors: list[tuple[int, str]]
    metrics: dict[str, float]

    @property
    def failed_indices(self) -> list[int]:
        return [i for i, _ in self.errors]

    @property
    def num_failed(self) -> int:
        return len(self.errors)


@dataclasses.dataclass
class GenerateOutput:
    """Teacher-sampled completions, one entry per prompt (None where it failed)."""

    samples: list[list[P.GenerateSample] | None]  # [i]: n samples of prompt i
    errors: list[tuple[int, str]]
    metrics: dict[str, float]

    @property
    def num_failed(self) -> int:
        return len(self.errors)


class _CallStats:
    """Counters of one score/generate call (calls from different threads do not mix)."""

    def __init__(self) -> None:
        self.requests = 0
        self.retries = 0
        self.splits = 0
        self.wait_s = 0.0
        self.replicas: dict[str, float] = {}  # teacher/replica<i>/{requests,tokens,failures} of this call

    def count(self, key: str, n: float = 1) -> None:
        self.replicas[key] = self.replicas.get(key, 0) + n


# The client's cumulative metric keys (metrics()) and the per-call ones (result.metrics).
_COUNTERS = ("teacher/requests", "teacher/retries", "teacher/failed_sequences", "teacher/tokens_scored",
             "teacher/failed_prompts", "teacher/tokens_generated", "teacher/split_requests",
             "teacher/backoff_wait_s", "teacher/latency_s")


def _rebuild_client(kwargs: dict) -> "TeacherClient":
    return TeacherClient(**kwargs)


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------

class TeacherClient:
    """See the module docstring. Thread-safe: several threads may call it at once."""

    def __init__(self, url: str | Sequence[str], api_key_file: str | None = None, *,
                 max_tokens_per_request: int = 16384,
                 max_concurrency: int = 8, request_timeout_s: float = 120.0, unavailable_timeout_s: float = 600.0,
                 top_k: int = 0, temperature: float = 1.0, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 max_internal_retries: int = 2, encoding: str = P.CONTENT_TYPE_MSGPACK, jitter_seed: int | None = None,
                 backend: str = "opd"):
        # Several urls are replicas of one teacher (teacher_replicas.py spreads the requests).
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("teacher url: an empty list; give one url or a list of replica urls")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise ValueError(f"teacher url {u!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000)")
        urls = [u.rstrip("/") for u in urls]
        if len(set(urls)) != len(urls):
            raise ValueError(f"teacher url: {urls} lists a replica twice; give each replica's url once")
        if encoding not in P.CONTENT_TYPES:
            raise ValueError(f"encoding {encoding!r} is not one of {list(P.CONTENT_TYPES)}")
        for name, v in (("max_tokens_per_request", max_tokens_per_request), ("max_concurrency", max_concurrency),
                        ("request_timeout_s", request_timeout_s), ("unavailable_timeout_s", unavailable_timeout_s)):
            if not v > 0:
                raise ValueError(f"teacher.{name}: {v!r} must be > 0")
        self._kwargs = dict(url=url if isinstance(url, str) else tuple(url), api_key_file=api_key_file,
                            max_tokens_per_request=max_tokens_per_request,
                            max_concurrency=max_concurrency, request_timeout_s=request_timeout_s,
                            unavailable_timeout_s=unavailable_timeout_s, top_k=top_k, temperature=temperature,
                            backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
                            max_internal_retries=max_internal_retries, encoding=encoding, jitter_seed=jitter_seed,
                            backend=backend)
        self.urls = tuple(urls)
        self.url = ", ".join(self.urls)  # for messages; requests go to self.urls[i]
        self.api_key_file = api_key_file
        self.max_tokens_per_request = max_tokens_per_request
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.unavailable_timeout_s = unavailable_timeout_s
        self.top_k, self.temperature = top_k, temperature
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_internal_retries = max_internal_retries
        self.encoding = encoding
        self._headers = {"Content-Type": encoding, "Accept": encoding}
        if api_key_file is not None:
            self._headers["Authorization"] = f"Bearer {_read_key(api_key_file)}"
        self._rng = random.Random(jitter_seed)
        self._totals = dict.fromkeys(_COUNTERS, 0.0)
        self._replicas = ReplicaSet(self.urls, backoff_base_s, backoff_max_s)  # used on the loop thread only
        self._lock = threading.Lock()
        # Created on first use, in the loop thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        # teacher.backend: "opd" talks to teacher_server without a probe (the
        # default here, and the fast path); "auto" probes the server once, on
        # first use (teacher_backends.py), as "vllm"/"sglang" do to check it.
        if backend not in ("auto", *TB.BACKENDS):
            raise ValueError(f"teacher.backend {backend!r} is not one of {['auto', *TB.BACKENDS]}")
        self.backend = backend
        self._server: TB.ServerInfo | None = None  # what the probe found (loop thread only)
        self._probe_lock: asyncio.Lock | None = None

    @classmethod
    def from_config(cls, cfg: TeacherConfig, url: str | Sequence[str] | None = None, **overrides: Any
                    ) -> "TeacherClient":
        """Client for `url` (or `cfg.url`; a list: replicas) with the settings of `cfg`."""
        url = url or cfg.url
        if not url:
            raise ValueError("no teacher url: teacher.url is null and no url of a self-started server was "
                             "given; set teacher.url=http://HOST:PORT or let the driver start the server")
        kw = dict(api_key_file=cfg.api_key_file, max_tokens_per_request=cfg.max_tokens_per_request,
                  max_concurrency=cfg.max_concurrency, request_timeout_s=cfg.request_timeout_s,
                  unavailable_timeout_s=cfg.unavailable_timeout_s, top_k=cfg.top_k, temperature=cfg.temperature,
                  backend=cfg.backend)
        kw.update(overrides)
        return cls(url, **kw)

    def __reduce__(self):
        # The loop, session and thread stay here; the other side makes its own
        # and re-reads the key file (the key itself is not pickled).
        return (_rebuild_client, (self._kwargs,))

    def __repr__(self) -> str:
        url = self.urls[0] if len(self.urls) == 1 else list(self.urls)
        return (f"TeacherClient({url!r}, max_tokens_per_request={self.max_tokens_per_request}, "
                f"max_concurrency={self.max_concurrency}, auth={'yes' if self.api_key_file else 'no'})")

    # ------------------------------------------------------------ public, sync

    def model_info(self) -> P.ModelInfo:
        """The teacher's model info (waits, with retries, while the server is
        loading): opd's GET /v1/model; for vLLM and SGLang what their probe
        reports (see `teacher_backends.ServerInfo.model_info`)."""
        return self._run(self._model_info())

    def server(self) -> TB.ServerInfo:
        """What serves teacher.url (probed once: teacher.backend)."""
        return self._run(self._server_info())

    def describe(self) -> str:
        """One line naming what serves teacher.url (probing it if not yet)."""
        s = self.server()
        return f"{TB.SERVER_NAMES[s.backend]} at {self.url} (teacher.backend={self.backend}): {s.detail}"

    def tokenizer(self) -> P.TokenizerInfo:
        """GET /v1/tokenizer: the teacher's whole token->id map (a few MB for a
        large vocabulary)."""
        return self._run(self._get("/v1/tokenizer", P.TokenizerInfo))

    def check_tokenizer(self, student: str | Path | P.TokenizerInfo, student_name: str | None = None) -> P.ModelInfo:
        """Refuse a teacher whose tokenizer differs from the student's (a model
        directory, or its TokenizerInfo) in what scoring depends on. Compares
        the hash of /v1/model; only when it differs is the teacher's vocabulary
        fetched, to name the ids that differ.

        Other backends, as far as they expose the tokenizer: vLLM's server is
        asked to tokenize probe texts (`teacher_backends.TOKENIZER_PROBE_TEXTS`,
        with and without special tokens): every id it produces must map to the
        same token string in the student's vocabulary, and the ids it adds
        around a text must be the student's; ids no probe text produces are not
        compared. SGLang's native API exposes no tokenizer: not checked (a
        warning says so); its replies still name the ids they scored, which
        must be the ids sent."""
        s_info = student if isinstance(student, P.TokenizerInfo) else P.load_tokenizer_info(student)
        name = student_name or (str(student) if not isinstance(student, P.TokenizerInfo) else "the student")
        if len(self.urls) > 1:
            return self._check_each_replica(s_info, name)
        if self.backend != "opd" and (server := self.server()).backend != "opd":
            return self._run(self._check_tokenizer_other(server, s_info, name))
        info = self.model_info()
        if info.tokenizer_sha256 != s_info.sha256():
            check_tokenizers(s_info, self.tokenizer(), name, info.model)
            # The vocabularies agree: the server hashes differently (another version).
            log.warning("teacher %s reports tokenizer_sha256 %s..., its /v1/tokenizer hashes to the student's; "
                        "accepting", info.model, info.tokenizer_sha256[:12])
        return info

    def _check_each_replica(self, student: P.TokenizerInfo, student_name: str) -> P.ModelInfo:
        """check_tokenizer on every replica (each must be up and share the
        student's tokenizer; an error names the replica). Returns the first
        replica's ModelInfo with the smallest max_top_k / max_model_len of all."""
        infos = []
        for u in self.urls:
            with TeacherClient(**{**self._kwargs, "url": u}) as one:
                try:
                    infos.append(one.check_tokenizer(student, student_name))
                except TokenizerMismatchError as e:
                    raise TokenizerMismatchError(e.teacher_sha256, e.student_sha256,
                                                 f"{e.teacher_model} (replica {u})", e.student_dir,
                                                 e.differences) from None
        first = infos[0]
        for u, info in zip(self.urls[1:], infos[1:], strict=True):
            if (info.model, info.dtype) != (first.model, first.dtype):
                log.warning("teacher replicas differ: %s serves %s (%s), %s serves %s (%s); replicas should "
                            "serve one model in one dtype, or the run mixes their scores", self.urls[0],
                            first.model, first.dtype, u, info.model, info.dtype)
        return msgspec.structs.replace(first, max_top_k=min(i.max_top_k for i in infos),
                                       max_model_len=min(i.max_model_len for i in infos))

    def score(self, sequences: Sequence[tuple[Sequence[int], int]], top_k: int | None = None,
              temperature: float | None = None) -> ScoreResult:
        """Teacher log-probs of tokens start.. of each (token_ids, start).

        top_k / temperature default to the client's (teacher.top_k / .temperature)."""
        return self._run(self._score(sequences, top_k, temperature))

    def generate(self, prompts: Sequence[Sequence[int]], n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: Sequence[int] = ()) -> GenerateOutput:
        """Teacher-sampled completions (n per prompt). With a seed, the samples do
        not depend on how the prompts were packed into requests."""
        return self._run(self._generate(prompts, n, max_new_tokens, temperature, top_p, seed, stop_token_ids))

    # ------------------------------------------------------------ public, async

    async def score_async(self, sequences, top_k=None, temperature=None) -> ScoreResult:
        return await asyncio.wrap_future(self._submit(self._score(sequences, top_k, temperature)))

    async def generate_async(self, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=None,
                             stop_token_ids=()) -> GenerateOutput:
        return await asyncio.wrap_future(self._submit(
            self._generate(prompts, n, max_new_tokens, temperature, top_p, seed, stop_token_ids)))

    def metrics(self) -> dict[str, float]:
        """Cumulative counters since the client was made (with several
        replicas, also `teacher/replica<i>/*`: requests, tokens, failures, and
        healthy = 1 while in rotation)."""
        with self._lock:
            out = dict(self._totals)
        if len(self.urls) > 1:
            out.update(self._replicas.metrics())
        return out

    def close(self) -> None:
        """Close the connection pool and stop the loop thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = self._session = self._sem = None

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ loop plumbing

    def _submit(self, coro) -> concurrent.futures.Future:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("TeacherClient sync methods called from its own loop thread; use the *_async methods")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro):
        return self._submit(coro).result()

    def _ensure_session(self) -> aiohttp.ClientSession:
        # Runs in the loop thread only, so no lock is needed.
        if self._session is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_concurrency),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s))
        return self._session

    def _add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                self._totals[f"teacher/{k}"] += v

    # ------------------------------------------------------------ one request, with retries

    async def _request(self, method: str, path: str, body: bytes | None, stats: _CallStats, *, cost: int = 0
                       ) -> tuple[int, bytes, str]:
        """Send until a reply that is not retryable; return (status, body, content type).

        `cost`: the request's tokens (spreads the load over replicas). Retryable:
        connection errors, timeouts, 429, 503, and 500 up to max_internal_retries
        times (after that the 500 is returned). With several replicas, the first
        four take the replica out of rotation and the request goes at once to
        another one that is in rotation (teacher_replicas.py); when none is, the
        request backs off as with one url. Raises TeacherUnavailableError once
        this request has been failing for unavailable_timeout_s."""
        session = self._ensure_session()
        assert self._sem is not None
        reps = self._replicas
        many = len(reps) > 1
        outage_start: float | None = None
        attempt = tries = internal_errors = 0
        while True:
            t0 = time.monotonic()
            retry_after = None
            async with self._sem:
                ticket = reps.acquire(cost, time.monotonic())
                url = reps.replicas[ticket.index].url
                stats.requests += 1
                tries += 1
                try:
                    async with session.request(method, url + path, data=body, headers=self._headers) as resp:
                        data = await resp.read()
                        status, ctype = resp.status, resp.headers.get("Content-Type", P.CONTENT_TYPE_JSON)
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                    status, data, ctype = 0, b"", ""
                    kind = "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__
                    last_error = f"{kind} after {time.monotonic() - t0:.1f} s: {e or 'no detail'}"
                finally:
                    reps.release(ticket)
            retried_500 = status == 500 and internal_errors < self.max_internal_retries
            if status in (429, 503) or retried_500:
                last_error = str(P.ProtocolError.from_body(status, data, ctype))
            if many and (status in (0, 429, 503) or retried_500):
                last_error += f" (replica {url})"
            # Connection errors, timeouts, 429 and 503 are the replica's; any other reply shows it is up.
            replica_failed = status in (0, 429, 503)
            if replica_failed:
                if reps.failed(ticket, time.monotonic(), retry_after) and many:
                    log.warning("teacher replica %s out of rotation: %s", url, last_error)
            else:
                reps.answered(ticket, ok=status == 200)
            if many:
                key = f"teacher/replica{ticket.index}/"
                stats.count(key + "requests")
                stats.count(key + "failures", int(replica_failed))
                stats.count(key + "tokens", cost if status == 200 else 0)
            if retried_500:
                internal_errors += 1
            elif not replica_failed:
                return status, data, ctype
            if outage_start is None:
                outage_start = t0
                log.warning("teacher %s %s failed (%s); retrying %sfor up to %g s", method, path, last_error,
                            "on another replica or with backoff " if many else "with backoff ",
                            self.unavailable_timeout_s)
            waited = time.monotonic() - outage_start
            if waited >= self.unavailable_timeout_s:
                raise TeacherUnavailableError(self.url, waited, self.unavailable_timeout_s, last_error, tries)
            stats.retries += 1
            if many and replica_failed and reps.available(time.monotonic()):
                continue  # another replica is in rotation (or due for its probe): resend now, no wait
            with self._lock:  # the rng is shared by the loop's coroutines only, but keep it simple
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng, retry_after)
            # The last wait ends at the deadline, so the final attempt comes just then.
            delay = min(delay, self.unavailable_timeout_s - waited)
            stats.wait_s += delay
            attempt += 1
            await asyncio.sleep(delay)

    def _replica_metrics(self, stats: _CallStats) -> dict[str, float]:
        """A call's `teacher/replica<i>/*` (with several replicas): its requests,
        tokens and failures on each, and whether each is in rotation now."""
        if len(self._replicas) == 1:
            return {}
        out = {k: v for k, v in self._replicas.metrics().items() if k.endswith("/healthy")}
        for i in range(len(self._replicas)):
            for name in ("requests", "tokens", "failures"):
                out[f"teacher/replica{i}/{name}"] = stats.replicas.get(f"teacher/replica{i}/{name}", 0)
        return out

    def _refusal(self, status: int, data: bytes, ctype: str) -> TeacherRequestError:
        err = P.ProtocolError.from_body(status, data, ctype)
        hint = ""
        if status == 401:
            hint = (f"check teacher.api_key_file (now {self.api_key_file}): it must hold the key the server "
                    f"was started with" if self.api_key_file else
                    "the server needs an API key: set teacher.api_key_file to a file holding it")
        elif status == 404:
            hint = "is teacher.url the address of a teacher_server (python -m teacher_server)?"
        return TeacherRequestError(self.url, status, err.type, err.message, err.field, hint)

    async def _model_info(self) -> P.ModelInfo:
        if self.backend == "opd":
            return await self._get("/v1/model", P.ModelInfo)
        server = await self._server_info()
        return server.model_info(self.top_k) if server.backend != "opd" else await self._get("/v1/model",
                                                                                              P.ModelInfo)

    # ------------------------------------------------------------ backends (teacher_backends.py)

    async def _server_info(self) -> TB.ServerInfo:
        """Probe the server once (first caller; the others wait for it)."""
        if self._server is None:
            if self._probe_lock is None:  # created on the loop thread, like the session
                self._probe_lock = asyncio.Lock()
            async with self._probe_lock:
                if self._server is None:
                    self._server = await self._probe()
        return self._server

    async def _probe(self) -> TB.ServerInfo:
        """Find what serves teacher.url (GET each backend's info path, in
        `TB.PROBE_PATHS` order) and check that it can do what this client asks
        (top_k, temperature). opd without `auto` skips the probe."""
        if self.backend == "opd":
            return TB.opd_server_info(await self._get("/v1/model", P.ModelInfo))
        server, seen = await self._identify(self.backend)
        if server is None:
            what = ""
            if self.backend != "auto":
                other, _ = await self._identify("auto")
                if other is not None:
                    what = (f"; it answers as {TB.SERVER_NAMES[other.backend]}: set teacher.backend="
                            f"{other.backend} (or auto)")
            want = ("opd's teacher_server, a vLLM OpenAI server or an SGLang server" if self.backend == "auto"
                    else TB.SERVER_NAMES[self.backend])
            raise TeacherBackendError(self.url, self.backend, f"the server does not answer as {want} "
                                      f"({'; '.join(seen)}){what}")
        if server.backend == "opd" and server.opd_info.max_top_k < self.top_k:
            raise TeacherBackendError(self.url, self.backend, f"teacher.top_k={self.top_k} is above the "
                                      f"teacher_server's max_top_k {server.opd_info.max_top_k}: lower teacher.top_k, "
                                      f"or restart it with --max-top-k {self.top_k}")
        if server.backend != "opd":
            self._headers = {**self._headers, "Content-Type": P.CONTENT_TYPE_JSON, "Accept": P.CONTENT_TYPE_JSON}
            await self._check_scoring(server)
        if server.backend == "vllm":
            status, data, _ = await self._request("GET", "/version", None, _CallStats(), cost=0)
            try:
                version = msgspec.json.decode(data).get("version") if status == 200 else None
            except (msgspec.DecodeError, AttributeError):
                version = None
            server = dataclasses.replace(server, detail=f"vLLM {version or '(version unknown)'}, {server.detail}")
        log.info("teacher at %s: %s (teacher.backend=%s): %s", self.url, TB.SERVER_NAMES[server.backend],
                 self.backend, server.detail)
        return server

    async def _identify(self, backend: str) -> tuple[TB.ServerInfo | None, list[str]]:
        seen = []
        for name, path in TB.PROBE_PATHS:
            if backend not in ("auto", name):
                continue
            status, data, ctype = await self._request("GET", path, None, _CallStats(), cost=0)
            if status == 200:
                server = TB.identify(name, path, data, ctype)
                if server is not None:
                    return server, seen
                seen.append(f"GET {path}: 200 with another answer than {TB.SERVER_NAMES[name]}'s")
            elif status in (404, 405):
                seen.append(f"GET {path}: {status}")
            else:
                raise self._refusal(status, data, ctype)
        return None, seen

    def _adapter(self, server: TB.ServerInfo):
        if server.backend == "vllm":
            return TB.VllmBackend(server.model)
        if server.backend == "sglang":
            return TB.SglangBackend()
        return TB.OpdBackend(self.encoding)

    async def _check_scoring(self, server: TB.ServerInfo) -> None:
        """Refuse at start-up what a vLLM/SGLang server cannot do for this
        client: teacher.temperature != 1, teacher.top_k above its limit, logits
        where logprobs belong. Scores one 3-token sequence with top_k."""
        name = TB.SERVER_NAMES[server.backend]
        if self.temperature != 1.0:
            raise TeacherBackendError(self.url, self.backend, f"{name} returns the prompt's logprobs at "
                                      f"temperature 1 only, and teacher.temperature is {self.temperature}: set "
                                      f"teacher.temperature=1, or serve the teacher with opd's teacher_server "
                                      f"(python -m teacher_server), which applies any temperature")
        adapter = self._adapter(server)
        seqs = [([0, 0, 0], 1)]
        status, data, ctype = await self._request("POST", adapter.path, adapter.score_body(seqs, self.top_k, 1.0),
                                                  _CallStats(), cost=3)
        if status != 200:
            err = P.ProtocolError.from_body(status, data, ctype)
            if status == 400 and TB.vllm_max_logprobs_refusal(err.message):
                raise TeacherBackendError(self.url, self.backend, f"teacher.top_k={self.top_k} is above what the "
                                          f"{name} allows ({err.message}): lower teacher.top_k, or restart the "
                                          f"server with --max-logprobs {self.top_k} or more")
            raise TeacherBackendError(self.url, self.backend, f"{name} refused a scoring probe "
                                      f"(top_k={self.top_k}): {err}")
        try:
            results = adapter.parse_score(data, ctype, seqs, self.top_k)
        except TB.ReplyError as e:
            raise TeacherBackendError(self.url, self.backend, f"{name} answered a scoring probe in an unexpected "
                                      f"shape: {e}") from e
        bad = [r for r in results if isinstance(r, str)]
        if bad:
            raise TeacherBackendError(self.url, self.backend, f"{name} answered a scoring probe with: {bad[0]}")
        if TB.logits_not_logprobs(results):
            raise TeacherBackendError(self.url, self.backend, f"{name} returns values that are not log-"
                                      f"probabilities (positive, or top-k probabilities adding up to more "
                                      f"than 1): start vLLM with the default --logprobs-mode raw_logprobs")

    async def _check_tokenizer_other(self, server: TB.ServerInfo, student: P.TokenizerInfo,
                                     student_name: str) -> P.ModelInfo:
        info = server.model_info(self.top_k)
        if server.backend == "sglang":
            log.warning("teacher at %s is an SGLang server, which exposes no tokenizer: the student's tokenizer "
                        "is not compared with the teacher's; make sure they are the same", self.url)
            return info
        replies = []
        stats = _CallStats()
        for text in TB.TOKENIZER_PROBE_TEXTS:
            for special in (False, True):
                status, data, ctype = await self._request("POST", "/tokenize",
                                                          TB.tokenize_body(text, special, server.model), stats)
                if status != 200:
                    raise self._refusal(status, data, ctype)
                replies.append((text, special, msgspec.json.decode(data)))
        differences = TB.tokenizer_probe_differences(student, replies)
        if differences:
            raise TokenizerMismatchError("unknown", student.sha256(), f"{server.model} (vLLM, /tokenize of probe "
                                         f"texts)", student_name, differences)
        return info

    async def _get(self, path: str, type_: type):
        status, data, ctype = await self._request("GET", path, None, _CallStats(), cost=0)
        if status != 200:
            raise self._refusal(status, data, ctype)
        return P.decode(data, type_, ctype)

    # ------------------------------------------------------------ /v1/logprobs

    async def _score(self, sequences, top_k, temperature) -> ScoreResult:
        top_k = self.top_k if top_k is None else top_k
        temperature = self.temperature if temperature is None else temperature
        seqs = [(list(ids), int(start)) for ids, start in sequences]
        adapter = TB.OpdBackend(self.encoding) if self.backend == "opd" else self._adapter(await self._server_info())
        if temperature != 1.0 and not adapter.applies_temperature:
            raise TeacherBackendError(self.url, self.backend, f"{TB.SERVER_NAMES[adapter.name]} scores at "
                                      f"temperature 1 only; asked for {temperature}")
        t0 = time.monotonic()
        stats = _CallStats()
        out_lp: list[list[float] | None] = [None] * len(seqs)
        out_ids: list[Any] = [None] * len(seqs)
        out_tlp: list[Any] = [None] * len(seqs)
        errors: dict[int, str] = {}

        def take(i: int, r: P.SequenceLogprobs) -> None:
            ids, start = seqs[i]
            n = len(ids) - start
            bad = None
            if len(r.logprobs) != n:
                bad = f"teacher returned {len(r.logprobs)} logprobs for {n} scored positions"
            elif not all(math.isfinite(x) for x in r.logprobs):
                j = next(j for j, x in enumerate(r.logprobs) if not math.isfinite(x))
                bad = f"teacher returned a non-finite logprob {r.logprobs[j]} at position {start + j}"
            elif top_k > 0 and (r.top_ids is None or r.top_logprobs is None or len(r.top_ids) != n
                                or len(r.top_logprobs) != n or any(len(row) != top_k for row in r.top_ids)):
                bad = f"teacher returned top-k lists of the wrong shape (expected {n} x {top_k})"
            if bad:
                errors[i] = bad
            else:
                out_lp[i] = r.logprobs
                out_ids[i], out_tlp[i] = r.top_ids, r.top_logprobs

        async def run_pack(pending: list[int]) -> None:
            while pending:
                part = [seqs[i] for i in pending]

                def parse(data: bytes, ctype: str, part=part) -> list:
                    return adapter.parse_score(data, ctype, part, top_k)

                pending = await self._post_pack(adapter.path, adapter.score_body(part, top_k, temperature),
                                                sum(len(ids) for ids, _ in part), parse, pending, "sequences", take,
                                                errors, stats, run_pack, bisect_unnamed_400=adapter.bisect_unnamed_400)

        packs = pack_by_budget([len(ids) for ids, _ in seqs], self.max_tokens_per_request)
        await _gather_or_cancel([run_pack(p) for p in packs])
        nfail = len(errors)
        tokens = sum(len(seqs[i][0]) - seqs[i][1] for i in range(len(seqs)) if out_lp[i] is not None)
        metrics = {"teacher/requests": stats.requests, "teacher/retries": stats.retries,
                   "teacher/split_requests": stats.splits, "teacher/backoff_wait_s": stats.wait_s,
                   "teacher/failed_sequences": nfail, "teacher/tokens_scored": tokens,
                   "teacher/latency_s": time.monotonic() - t0}
        self._add(**{k.split("/", 1)[1]: v for k, v in metrics.items()})
        metrics.update(self._replica_metrics(stats))
        if nfail:
            log.warning("teacher scoring failed for %d of %d sequences; first: %s", nfail, len(seqs),
                        min(errors.items()))
        return ScoreResult(out_lp, out_ids if top_k > 0 else None, out_tlp if top_k > 0 else None,
                           sorted(errors.items()), metrics)

    async def _post_pack(self, path, body, cost, parse, pending, collection, take, errors, stats, run_pack,
                         bisect_unnamed_400=False):
        """POST one packed request (`body`, `cost` tokens) for the items
        `pending` (indices into the call's `collection`: "sequences" or
        "prompts"). `parse(data, ctype)` turns a 200 reply into one entry per
        item: its result, handed to take(i, result), or a string saying why that
        item could not be scored (it fails alone); a malformed reply
        (TB.ReplyError) fails them all. Returns the items still to send (see
        `_handle_item_error`). `bisect_unnamed_400`: a backend whose 400 does
        not name the bad item (vLLM, SGLang) has the pack halved and resent
        until the bad item is alone, and then fails it."""
        status, data, ctype = await self._request("POST", path, body, stats, cost=cost)
        if status == 400 and bisect_unnamed_400:
            err = P.ProtocolError.from_body(status, data, ctype)
            if len(pending) == 1:
                errors[pending[0]] = f"{err.message} (400 {err.type})"
                return []
            stats.splits += 1
            half = len(pending) // 2
            await _gather_or_cancel([run_pack(pending[:half]), run_pack(pending[half:])])
            return []
        if status != 200:
            return await self._handle_item_error(status, data, ctype, pending, collection, errors, stats, run_pack)
        try:
            results = parse(data, ctype)
        except TB.ReplyError as e:
            errors.update({i: f"malformed teacher reply: {e}" for i in pending})
            return []
        for i, r in zip(pending, results, strict=True):
            if isinstance(r, str):
                errors[i] = r
            else:
                take(i, r)
        return []

    async def _handle_item_error(self, status, data, ctype, pending, collection, errors, stats, run_pack):
        """Shared handling of a non-200 reply to a packed request: returns the
        items still to send (or raises). See the module docstring for the rules."""
        err = P.ProtocolError.from_body(status, data, ctype)
        j = item_index(err.field, collection)
        if status == 400 and j is not None and j < len(pending):
            # One bad item: fail it alone and resend the others.
            errors[pending[j]] = f"{err.message} (400 {err.type}, field {collection}[{pending[j]}]" \
                                 f"{err.field[err.field.index(']') + 1:] if err.field else ''})"
            return pending[:j] + pending[j + 1:]
        if status == 413 and len(pending) > 1:
            # Our budget is above the server's limit: halve the pack and resend both halves.
            stats.splits += 1
            half = len(pending) // 2
            await _gather_or_cancel([run_pack(pending[:half]), run_pack(pending[half:])])
            return []
        if status == 413 or status == 500:
            why = ("too large for the teacher even alone (413)" if status == 413 else
                   f"teacher internal error after {self.max_internal_retries} retries (500)")
            errors.update({i: f"{why}: {err.message}" for i in pending})
            return []
        raise self._refusal(status, data, ctype)

    # ------------------------------------------------------------ /v1/generate

    async def _generate(self, prompts, n, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> GenerateOutput:
        if self.backend != "opd" and (server := await self._server_info()).backend != "opd":
            raise TeacherBackendError(self.url, self.backend, f"teacher sampling (train.sample_from=teacher) needs "
                                      f"opd's teacher_server (/v1/generate); this is {TB.SERVER_NAMES[server.backend]}")
        ps = [list(p) for p in prompts]
        t0 = time.monotonic()
        stats = _CallStats()
        out: list[list[P.GenerateSample] | None] = [None] * len(ps)
        errors: dict[int, str] = {}

        def take(i: int, r: P.GenerateResult) -> None:
            if len(r.samples) != n or any(len(s.token_ids) != len(s.logprobs) for s in r.samples):
                errors[i] = f"teacher returned {len(r.samples)} samples (expected {n}) or ragged logprobs"
            else:
                out[i] = r.samples

        async def run_pack(pending: list[int]) -> None:
            while pending:
                # The server seeds prompt i, sample k with seed + i*n + k; several
                # requests send one request per prompt so each keeps its global seed.
                if seed is not None and len(pending) > 1 and pending != list(range(pending[0], pending[-1] + 1)):
                    await _gather_or_cancel([run_pack([i]) for i in pending])
                    return
                req = P.GenerateRequest(prompts=[P.GeneratePrompt(token_ids=ps[i]) for i in pending], n=n,
                                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        seed=None if seed is None else seed + pending[0] * n,
                                        stop_token_ids=list(stop_token_ids))
                pending = await self._post_pack("/v1/generate", P.encode(req, self.encoding), request_tokens(req),
                                                _results_parser(P.GenerateResponse, len(pending), "prompts"),
                                                pending, "prompts", take, errors, stats, run_pack)

        packs = pack_by_budget([(len(p) + max_new_tokens) * n for p in ps], self.max_tokens_per_request)
        await _gather_or_cancel([run_pack(p) for p in packs])
        tokens = sum(len(s.token_ids) for samples in out if samples for s in samples)
        metrics = {"teacher/requests": stats.requests, "teacher/retries": stats.retries,
                   "teacher/split_requests": stats.splits, "teacher/backoff_wait_s": stats.wait_s,
                   "teacher/failed_prompts": len(errors), "teacher/tokens_generated": tokens,
                   "teacher/latency_s": time.monotonic() - t0}
        self._add(**{k.split("/", 1)[1]: v for k, v in metrics.items()})
        metrics.update(self._replica_metrics(stats))
        return GenerateOutput(out, sorted(errors.items()), metrics)


def _results_parser(reply_type: type, n: int, collection: str):
    """`parse` of `_post_pack` for an opd reply with `.results` (one per item)."""
    def parse(data: bytes, ctype: str) -> list:
        try:
            resp = P.decode(data, reply_type, ctype)
        except P.ProtocolError as e:
            raise TB.ReplyError(e.message) from e
        if len(resp.results) != n:
            raise TB.ReplyError(f"teacher returned {len(resp.results)} results for {n} {collection}")
        return list(resp.results)
    return parse


async def _gather_or_cancel(coros) -> None:
    """Run concurrently; on the first exception cancel the rest and raise it
    (plain gather would leave the other requests retrying in the background)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _read_key(path: str) -> str:
    p = Path(path)
    try:
        key = p.read_text().strip()
    except OSError as e:
        raise ValueError(f"teacher.api_key_file: cannot read {path} ({e.strerror}); give a file holding the "
                         f"teacher server's API key") from e
    if not key:
        raise ValueError(f"teacher.api_key_file: {path} is empty; it must hold the teacher server's API key")
    return key


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not 1 <= len(argv) <= 2:
        print("usage: python -m rollout.teacher_client URL [STUDENT_DIR]", file=sys.stderr)
        return 2
    with TeacherClient(argv[0], unavailable_timeout_s=30.0) as client:
        try:
            info = client.check_tokenizer(argv[1]) if len(argv) == 2 else client.model_info()
        except TeacherError as e:
            print(e, file=sys.stderr)
            return 1
        print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
