"""Load / soak tool for teacher_server: many concurrent clients mixing valid and
invalid /v1/logprobs requests, every answer checked.

    .venv/bin/python -m bench.teacher_load --url http://127.0.0.1:8000 --clients 64 --duration-s 60 \
        [--invalid-frac 0.3] [--api-key-file FILE] [--max-request-bytes N] [--server-pid PID] \
        [--model PATH] [--json-out report.json]

What it does:
1. Reads GET /v1/model (vocab, max_model_len, max_top_k) and builds a fixed pool
   of random ragged token sequences, with reference log-probs from ONE
   transformers float32 forward of the teacher per sequence (the model directory
   is --model, or the path the server reports as its model name).
2. `--clients` asyncio clients (one aiohttp session, one connection each) send
   requests back to back until `--duration-s` or `--max-requests`:
   - valid: 1-4 pool sequences with random starts, sometimes top_k > 0 and/or a
     temperature != 1, JSON or MessagePack. Every 200 answer is compared with the
     reference (|diff| <= --tol on every logprob; the top-k values are the
     reference's K largest, and the reference value of each returned id matches).
   - invalid (`--invalid-frac` of them): bad token ids, out-of-range start, wrong
     types, unknown/missing fields, bad top_k/temperature, empty/too long
     sequences, malformed JSON, a wrong Content-Type, an oversized body (needs
     --max-request-bytes), a wrong API key (when one is configured), an unknown
     path. Each has its expected status, error type and error field; the answer
     must match all three.
   429 and 503 answers are the server's deliberate backpressure; they must carry
   Retry-After, and the client backs off briefly (not the full Retry-After, so the
   queue stays full) before its next request.
3. A thread samples the RSS of the server process (and, separately, of its
   children: vLLM's engine core) every 0.25 s with psutil. On CPU the engine
   core's RSS grows with oneDNN's primitive cache (ragged batches are new matmul
   shapes; up to 1024 are cached with their buffers, +0.5 GiB in a first 15 s on
   the tiny teacher); start the server with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 to
   see the growth that is not that cache.
4. Prints a table: requests by kind and status, error types, valid answers
   correct/wrong, latency p50/p99 of valid 200s, baseline and peak RSS.

Only 127.0.0.1/localhost URLs are accepted; the run is bounded by --duration-s
and --max-requests. `run_load(LoadOptions(...)) -> LoadReport` is the in-process
API (used by tests/e2e/test_teacher_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable

import aiohttp
import msgspec
import numpy as np

from teacher_server.protocol import CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, ModelInfo

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
BACKPRESSURE_STATUSES = (429, 503)


@dataclasses.dataclass
class LoadOptions:
    url: str
    clients: int = 64
    duration_s: float = 60.0
    invalid_frac: float = 0.3
    api_key: str | None = None
    max_request_bytes: int | None = None  # the server's --max-request-bytes (enables oversized probes)
    server_pid: int | None = None  # default: the process listening on the URL's port
    model_path: str | None = None  # default: the model path the server reports
    pool_size: int = 64
    max_seq_len: int = 96
    max_seqs_per_request: int = 4
    tol: float = 1e-4
    seed: int = 0
    max_requests: int = 1_000_000
    request_timeout_s: float = 120.0
    rss_interval_s: float = 0.25


@dataclasses.dataclass
class PoolSeq:
    token_ids: list[int]
    raw_lps_P_V: np.ndarray  # (len - 1, V) float64: log p(. | ids[:p+1]) at T = 1, predicting ids[p+1]


@dataclasses.dataclass
class Probe:
    """One request and what its answer must be."""

    kind: str  # "valid" or the invalid kind, e.g. "bad_token_id"
    body: bytes
    headers: dict[str, str]
    path: str = "/v1/logprobs"
    method: str = "POST"
    expect_status: int = 200
    expect_type: str | None = None  # error.type of a non-200
    expect_field: str | None = None  # error.field of a non-200 (None: must be null)
    # valid probes: what the answer is checked against
    seqs: list[tuple[int, int]] | None = None  # (pool index, start)
    top_k: int = 0
    temperature: float = 1.0


@dataclasses.dataclass
class LoadReport:
    requests_sent: int = 0
    duration_s: float = 0.0
    by_kind_status: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    error_types: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    valid_correct: int = 0
    valid_wrong: int = 0
    invalid_as_expected: int = 0
    invalid_unexpected: int = 0
    backpressure: int = 0  # 429/503 with Retry-After
    backpressure_without_retry_after: int = 0
    server_errors: int = 0  # 5xx that are not backpressure (500, 502, 504, ...)
    transport_errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latencies_valid_ok_s: list[float] = dataclasses.field(default_factory=list)
    rss_baseline_bytes: int = 0  # the server's own process, before the load
    rss_peak_bytes: int = 0
    rss_children_baseline_bytes: int = 0  # vLLM engine core process(es)
    rss_children_peak_bytes: int = 0
    rss_samples: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)  # first few failures, for the message

    def note(self, msg: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(msg)

    @property
    def status_counts(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for per in self.by_kind_status.values():
            c.update(per)
        return c

    def latency_pct_ms(self, q: float) -> float:
        if not self.latencies_valid_ok_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_valid_ok_s), q) * 1000)

    def to_dict(self) -> dict:
        return {
            "requests_sent": self.requests_sent, "duration_s": round(self.duration_s, 2),
            "requests_per_s": round(self.requests_sent / max(self.duration_s, 1e-9), 1),
            "by_status": {str(k): v for k, v in sorted(self.status_counts.items(), key=lambda kv: str(kv[0]))},
            "by_kind_status": {k: {str(s): n for s, n in v.items()} for k, v in sorted(self.by_kind_status.items())},
            "error_types": dict(self.error_types), "valid_correct": self.valid_correct,
            "valid_wrong": self.valid_wrong, "invalid_as_expected": self.invalid_as_expected,
            "invalid_unexpected": self.invalid_unexpected, "backpressure": self.backpressure,
            "backpressure_without_retry_after": self.backpressure_without_retry_after,
            "server_errors": self.server_errors, "transport_errors": dict(self.transport_errors),
            "latency_valid_ok_p50_ms": round(self.latency_pct_ms(50), 1),
            "latency_valid_ok_p99_ms": round(self.latency_pct_ms(99), 1),
            "rss_baseline_mib": round(self.rss_baseline_bytes / 2**20, 1),
            "rss_peak_mib": round(self.rss_peak_bytes / 2**20, 1),
            "rss_children_baseline_mib": round(self.rss_children_baseline_bytes / 2**20, 1),
            "rss_children_peak_mib": round(self.rss_children_peak_bytes / 2**20, 1),
            "rss_samples": self.rss_samples, "examples": self.examples,
        }


# ----------------------------------------------------------------------------- reference pool

def build_pool(model_path: str, info: ModelInfo, size: int, max_len: int, seed: int) -> list[PoolSeq]:
    """Random ragged sequences with the teacher's raw (T = 1) log-softmax rows,
    from a transformers float32 forward (one per sequence: no padding effects)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    pool = []
    with torch.no_grad():
        for _ in range(size):
            n = int(rng.integers(2, min(max_len, info.max_model_len) + 1))
            ids = rng.integers(0, info.vocab_size, n).tolist()
            logits_T_V = model(torch.tensor([ids])).logits[0].double()
            pool.append(PoolSeq(ids, torch.log_softmax(logits_T_V[:-1], dim=-1).numpy()))
    return pool


def check_answer(probe: Probe, pool: list[PoolSeq], results: list, tol: float) -> str | None:
    """None when every number of a 200 answer matches the reference, else what is wrong."""
    if len(results) != len(probe.seqs):
        return f"{len(results)} results for {len(probe.seqs)} sequences"
    for i, ((idx, start), res) in enumerate(zip(probe.seqs, results, strict=True)):
        ref_P_V = pool[idx].raw_lps_P_V[start - 1:]
        if probe.temperature != 1.0:  # log_softmax(l / T) == log_softmax(z / T) exactly
            scaled = ref_P_V / probe.temperature
            ref_P_V = scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)
        ids = pool[idx].token_ids[start:]
        want_P = ref_P_V[np.arange(len(ids)), ids]
        got_P = np.asarray(res.get("logprobs", []), dtype=np.float64)
        if got_P.shape != want_P.shape:
            return f"results[{i}].logprobs has shape {got_P.shape}, expected {want_P.shape}"
        err = float(np.max(np.abs(got_P - want_P)))
        if not err <= tol:
            return f"results[{i}].logprobs differ from the reference by {err:.3g} > {tol}"
        if probe.top_k == 0:
            if "top_ids" in res or "top_logprobs" in res:
                return f"results[{i}] has top_* fields although top_k = 0"
            continue
        top_ids = np.asarray(res.get("top_ids", []), dtype=np.int64)
        top_lps = np.asarray(res.get("top_logprobs", []), dtype=np.float64)
        if top_ids.shape != (len(ids), probe.top_k) or top_lps.shape != top_ids.shape:
            return f"results[{i}] top_* shapes {top_ids.shape}/{top_lps.shape}, expected {(len(ids), probe.top_k)}"
        want_top = -np.sort(-ref_P_V, axis=1)[:, :probe.top_k]
        err_v = float(np.max(np.abs(top_lps - want_top)))
        err_id = float(np.max(np.abs(np.take_along_axis(ref_P_V, top_ids, axis=1) - top_lps)))
        if not (err_v <= tol and err_id <= tol):
            return f"results[{i}] top-k differs from the reference (values {err_v:.3g}, by id {err_id:.3g})"
    return None


# ----------------------------------------------------------------------------- request mix

class ProbeFactory:
    """Draws valid and invalid probes; `rng` is per client (no shared state)."""

    def __init__(self, pool: list[PoolSeq], info: ModelInfo, opts: LoadOptions):
        self.pool, self.info, self.opts = pool, info, opts
        self.invalid_kinds: list[Callable[[np.random.Generator], Probe]] = [
            self._bad_token_id, self._bad_start, self._wrong_type, self._unknown_field, self._missing_field,
            self._bad_top_k, self._bad_temperature, self._empty_sequences, self._too_long, self._malformed_json,
            self._bad_content_type, self._unknown_path]
        if opts.max_request_bytes:
            self.invalid_kinds.append(self._oversized)
        if opts.api_key:
            self.invalid_kinds.append(self._bad_auth)

    def one_of_each(self, rng: np.random.Generator) -> list[Probe]:
        """One probe of every invalid kind plus one valid probe (for a sequential check)."""
        return [make(rng) for make in self.invalid_kinds] + [self.valid(rng)]

    def headers(self, ct: str = CONTENT_TYPE_JSON) -> dict[str, str]:
        h = {"Content-Type": ct}
        if self.opts.api_key:
            h["Authorization"] = f"Bearer {self.opts.api_key}"
        return h

    def draw(self, rng: np.random.Generator) -> Probe:
        if rng.random() < self.opts.invalid_frac:
            return self.invalid_kinds[int(rng.integers(len(self.invalid_kinds)))](rng)
        return self.valid(rng)

    def _seqs(self, rng) -> tuple[list[tuple[int, int]], list[dict]]:
        picks = []
        for _ in range(int(rng.integers(1, self.opts.max_seqs_per_request + 1))):
            idx = int(rng.integers(len(self.pool)))
            picks.append((idx, int(rng.integers(1, len(self.pool[idx].token_ids)))))
        return picks, [{"token_ids": self.pool[i].token_ids, "start": s} for i, s in picks]

    def valid(self, rng) -> Probe:
        picks, seqs = self._seqs(rng)
        top_k = int(rng.integers(1, self.info.max_top_k + 1)) if rng.random() < 0.3 else 0
        temperature = float(np.round(rng.uniform(0.5, 2.0), 3)) if rng.random() < 0.3 else 1.0
        body = {"sequences": seqs, "top_k": top_k, "temperature": temperature}
        ct = CONTENT_TYPE_MSGPACK if rng.random() < 0.25 else CONTENT_TYPE_JSON
        return Probe("valid", msgspec.msgpack.encode(body) if ct == CONTENT_TYPE_MSGPACK else msgspec.json.encode(body),
                     self.headers(ct), seqs=picks, top_k=top_k, temperature=temperature)

    def _invalid(self, kind: str, body: dict | list, field: str | None, status: int = 400,
                 type_: str = "invalid_request") -> Probe:
        return Probe(kind, msgspec.json.encode(body), self.headers(), expect_status=status, expect_type=type_,
                     expect_field=field)

    def _bad_token_id(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        i = int(rng.integers(len(seqs)))
        ids = list(seqs[i]["token_ids"])
        j = int(rng.integers(len(ids)))
        off = int(rng.integers(0, 1000))
        ids[j] = self.info.vocab_size + off if rng.random() < 0.5 else -1 - off
        seqs[i] = {"token_ids": ids, "start": seqs[i]["start"]}
        # Validation reports the first bad field; earlier sequences are valid, so it is this id.
        return self._invalid("bad_token_id", {"sequences": seqs}, f"sequences[{i}].token_ids[{j}]")

    def _bad_start(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        i = int(rng.integers(len(seqs)))
        n = len(seqs[i]["token_ids"])
        seqs[i] = {**seqs[i], "start": int(rng.choice([0, n, n + 7, -3]))}
        return self._invalid("bad_start", {"sequences": seqs}, f"sequences[{i}].start")

    def _wrong_type(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        choice = int(rng.integers(4))
        if choice == 0:
            seqs[0] = {**seqs[0], "start": str(seqs[0]["start"])}
            return self._invalid("wrong_type", {"sequences": seqs}, "sequences[0].start")
        if choice == 1:
            seqs[0] = {**seqs[0], "token_ids": [float(t) + 0.5 for t in seqs[0]["token_ids"]]}
            return self._invalid("wrong_type", {"sequences": seqs}, "sequences[0].token_ids[0]")
        if choice == 2:
            return self._invalid("wrong_type", {"sequences": seqs, "top_k": "3"}, "top_k")
        return self._invalid("wrong_type", {"sequences": seqs[0]}, "sequences")

    def _unknown_field(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        if rng.random() < 0.5:
            return self._invalid("unknown_field", {"sequences": seqs, "logprobs": True}, "logprobs")
        seqs[0] = {**seqs[0], "mask": [1]}
        return self._invalid("unknown_field", {"sequences": seqs}, "sequences[0].mask")

    def _missing_field(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        if rng.random() < 0.5:
            return self._invalid("missing_field", {"top_k": 1}, "sequences")
        seqs[0] = {"token_ids": seqs[0]["token_ids"]}
        return self._invalid("missing_field", {"sequences": seqs}, "sequences[0].start")

    def _bad_top_k(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        k = int(rng.choice([-1, self.info.max_top_k + 1, 10**6]))
        return self._invalid("bad_top_k", {"sequences": seqs, "top_k": k}, "top_k")

    def _bad_temperature(self, rng) -> Probe:
        _, seqs = self._seqs(rng)
        t = float(rng.choice([0.0, -1.0, 1e-3, 1e4]))
        return self._invalid("bad_temperature", {"sequences": seqs, "temperature": t}, "temperature")

    def _empty_sequences(self, rng) -> Probe:
        if rng.random() < 0.5:
            return self._invalid("empty", {"sequences": []}, "sequences")
        return self._invalid("empty", {"sequences": [{"token_ids": [], "start": 1}]}, "sequences[0].token_ids")

    def _too_long(self, rng) -> Probe:
        n = self.info.max_model_len + 1 + int(rng.integers(0, 50))
        return self._invalid("too_long", {"sequences": [{"token_ids": [1] * n, "start": 1}]}, "sequences[0].token_ids")

    def _malformed_json(self, rng) -> Probe:
        raw = [b'{"sequences": [', b"not json", b"", b"\xff\xfe\x00",
               b'{"sequences": [{"token_ids": [1e999], "start": 1}]}', b"[" * 5000,
               b'{"sequences": [{"token_ids": [1, 2], "start": 1}]}trailing'][int(rng.integers(7))]
        field = "sequences[0].token_ids[0]" if b"1e999" in raw else None
        p = Probe("malformed", raw, self.headers(), expect_status=400, expect_type="invalid_request",
                  expect_field=field)
        if raw.startswith(b"[["):
            p.expect_field = None  # msgspec: depth or type error at the top level, no field
        return p

    def _bad_content_type(self, rng) -> Probe:
        ct = str(rng.choice(["text/plain", "application/xml", "multipart/form-data; boundary=x"]))
        body = msgspec.json.encode({"sequences": self._seqs(rng)[1]})
        return Probe("bad_content_type", body, {**self.headers(), "Content-Type": ct}, expect_status=415,
                     expect_type="unsupported_media_type", expect_field="Content-Type")

    def _unknown_path(self, rng) -> Probe:
        return Probe("unknown_path", b"{}", self.headers(), path="/v1/nope", expect_status=404, expect_type="not_found")

    def _oversized(self, rng) -> Probe:
        # A valid request padded with JSON whitespace past the limit: only its size is wrong.
        body = msgspec.json.encode({"sequences": self._seqs(rng)[1]})
        body += b" " * (self.opts.max_request_bytes + 1 - len(body) + int(rng.integers(0, 4096)))
        return Probe("oversized", body, self.headers(), expect_status=413, expect_type="request_too_large")

    def _bad_auth(self, rng) -> Probe:
        h = self.headers()
        h["Authorization"] = str(rng.choice([f"Bearer {self.opts.api_key}x", f"Basic {self.opts.api_key}", "Bearer"]))
        if rng.random() < 0.3:
            del h["Authorization"]
        body = msgspec.json.encode({"sequences": self._seqs(rng)[1]})
        return Probe("bad_auth", body, h, expect_status=401, expect_type="unauthorized", expect_field="Authorization")


# ----------------------------------------------------------------------------- RSS sampling

def find_listening_pid(port: int) -> int | None:
    import psutil

    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return c.pid
    return None


class RssSampler(threading.Thread):
    """Peak RSS of a process and (summed) of its children, every `interval_s`."""

    def __init__(self, pid: int, interval_s: float):
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.baseline, self.children_baseline = self.sample()
        self.peak, self.children_peak, self.samples = self.baseline, self.children_baseline, 1

    def sample(self) -> tuple[int, int]:
        import psutil

        own = self.proc.memory_info().rss
        kids = 0
        for ch in self.proc.children(recursive=True):
            try:
                kids += ch.memory_info().rss
            except psutil.Error:  # a child that just exited
                pass
        return own, kids

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                own, kids = self.sample()
            except Exception:  # noqa: BLE001 - the server died: the load loop reports that
                return
            self.peak, self.children_peak = max(self.peak, own), max(self.children_peak, kids)
            self.samples += 1


# ----------------------------------------------------------------------------- the load loop

async def _send(session: aiohttp.ClientSession, url: str, probe: Probe, report: LoadReport,
                pool: list[PoolSeq], tol: float) -> float | None:
    """Send one probe, account its answer; returns a back-off delay for backpressure."""
    t0 = time.perf_counter()
    try:
        async with session.request(probe.method, url + probe.path, data=probe.body, headers=probe.headers) as r:
            raw = await r.read()
            status, headers, ct = r.status, r.headers, r.headers.get("Content-Type", "")
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
        report.transport_errors[type(e).__name__] += 1
        report.note(f"{probe.kind}: transport error {type(e).__name__}: {e}")
        return 0.1
    dt = time.perf_counter() - t0
    report.by_kind_status[probe.kind][status] += 1
    try:
        payload = msgspec.msgpack.decode(raw) if ct.startswith(CONTENT_TYPE_MSGPACK) else msgspec.json.decode(raw)
    except msgspec.DecodeError:
        payload = None
    err = payload.get("error") if isinstance(payload, dict) and status != 200 else None
    if err is not None:
        report.error_types[str(err.get("type"))] += 1
    if status in BACKPRESSURE_STATUSES:
        if "Retry-After" in headers and err is not None:
            report.backpressure += 1
        else:
            report.backpressure_without_retry_after += 1
            report.note(f"{probe.kind}: {status} without Retry-After or error body: {raw[:200]!r}")
        return 0.05
    if status >= 500:
        report.server_errors += 1
        report.note(f"{probe.kind}: {status} {raw[:300]!r}")
        return None
    if probe.kind == "valid":
        problem = (f"status {status}: {raw[:300]!r}" if status != 200 or not isinstance(payload, dict)
                   else check_answer(probe, pool, payload.get("results", []), tol))
        if problem is None:
            report.valid_correct += 1
            report.latencies_valid_ok_s.append(dt)
        else:
            report.valid_wrong += 1
            report.note(f"valid request {probe.seqs} top_k={probe.top_k} T={probe.temperature}: {problem}")
        return None
    ok = (status == probe.expect_status and err is not None and err.get("type") == probe.expect_type
          and err.get("field") == probe.expect_field and bool(err.get("message")))
    if ok:
        report.invalid_as_expected += 1
    else:
        report.invalid_unexpected += 1
        report.note(f"{probe.kind}: expected {probe.expect_status} {probe.expect_type} field={probe.expect_field}, "
                    f"got {status} {raw[:300]!r}")
    return None


async def _load(opts: LoadOptions, factory: ProbeFactory, report: LoadReport) -> None:
    deadline = time.monotonic() + opts.duration_s
    budget = [opts.max_requests]

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        rng = np.random.default_rng([opts.seed, k])
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            report.requests_sent += 1
            backoff = await _send(session, opts.url, factory.draw(rng), report, factory.pool, opts.tol)
            if backoff:
                await asyncio.sleep(backoff * (0.5 + rng.random()))

    timeout = aiohttp.ClientTimeout(total=opts.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=opts.clients, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(k, session) for k in range(opts.clients)))


def run_probes(opts: LoadOptions, probes: list[Probe], pool: list[PoolSeq]) -> LoadReport:
    """Send `probes` one at a time (no contention: no backpressure expected) and
    account them like the load does."""
    report = LoadReport()

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=opts.request_timeout_s)) as session:
            for probe in probes:
                report.requests_sent += 1
                await _send(session, opts.url.rstrip("/"), probe, report, pool, opts.tol)

    asyncio.run(go())
    return report


def fetch_model_info(url: str, api_key: str | None) -> ModelInfo:
    import urllib.request

    req = urllib.request.Request(url + "/v1/model", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return msgspec.json.decode(r.read(), type=ModelInfo)


def check_local(url: str) -> int:
    """Refuse anything but a loopback URL; returns the port."""
    u = urllib.parse.urlparse(url)
    if u.scheme != "http" or u.hostname not in LOCAL_HOSTS or u.port is None:
        raise SystemExit(f"teacher_load: --url {url!r} must be http://127.0.0.1:PORT (this tool only loads "
                         "a local server)")
    return u.port


def run_load(opts: LoadOptions, pool: list[PoolSeq] | None = None, info: ModelInfo | None = None) -> LoadReport:
    """Run the load against `opts.url` and return the counts (no assertion here:
    the caller decides what passes). `pool`/`info` may be passed to reuse a pool."""
    port = check_local(opts.url)
    opts.url = opts.url.rstrip("/")
    info = info or fetch_model_info(opts.url, opts.api_key)
    if pool is None:
        model_path = opts.model_path or info.model
        if not Path(model_path).is_dir():
            raise SystemExit(f"teacher_load: the server's model {info.model!r} is not a local directory; "
                             "pass --model PATH (the teacher checkpoint, for the reference logprobs)")
        pool = build_pool(model_path, info, opts.pool_size, opts.max_seq_len, opts.seed)
    pid = opts.server_pid or find_listening_pid(port)
    sampler = RssSampler(pid, opts.rss_interval_s) if pid else None
    report = LoadReport()
    if sampler:
        sampler.start()
    t0 = time.monotonic()
    try:
        asyncio.run(_load(opts, ProbeFactory(pool, info, opts), report))
    finally:
        report.duration_s = time.monotonic() - t0
        if sampler:
            sampler.stop_event.set()
            sampler.join()
            report.rss_baseline_bytes, report.rss_peak_bytes = sampler.baseline, sampler.peak
            report.rss_children_baseline_bytes, report.rss_children_peak_bytes = (sampler.children_baseline,
                                                                                  sampler.children_peak)
            report.rss_samples = sampler.samples
    return report


def format_report(report: LoadReport) -> str:
    d = report.to_dict()
    statuses = sorted({s for v in d["by_kind_status"].values() for s in v})
    lines = [f"{'kind':<18}" + "".join(f"{s:>8}" for s in statuses) + f"{'total':>8}"]
    for kind, per in d["by_kind_status"].items():
        lines.append(f"{kind:<18}" + "".join(f"{per.get(s, 0):>8}" for s in statuses) + f"{sum(per.values()):>8}")
    lines.append(f"{'all':<18}" + "".join(f"{d['by_status'].get(s, 0):>8}" for s in statuses)
                 + f"{sum(d['by_status'].values()):>8}")
    lines += [
        "",
        f"requests sent          {d['requests_sent']} in {d['duration_s']} s ({d['requests_per_s']} req/s)",
        f"valid answers          {d['valid_correct']} correct, {d['valid_wrong']} wrong",
        f"invalid answers        {d['invalid_as_expected']} as expected, {d['invalid_unexpected']} unexpected",
        f"backpressure 429/503   {d['backpressure']} with Retry-After, {d['backpressure_without_retry_after']} without",
        f"other 5xx              {d['server_errors']}",
        f"transport errors       {d['transport_errors'] or 0}",
        f"error types            {d['error_types']}",
        f"latency valid 200      p50 {d['latency_valid_ok_p50_ms']} ms, p99 {d['latency_valid_ok_p99_ms']} ms",
        f"server RSS             baseline {d['rss_baseline_mib']} MiB, peak {d['rss_peak_mib']} MiB "
        f"({d['rss_samples']} samples)",
        f"engine-core RSS        baseline {d['rss_children_baseline_mib']} MiB, peak {d['rss_children_peak_mib']} MiB",
    ]
    if report.examples:
        lines += ["", "first failures:"] + [f"  {e}" for e in report.examples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.teacher_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT of a running teacher_server")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--invalid-frac", type=float, default=0.3)
    p.add_argument("--api-key-file", default=None, help="the server's API key file (also enables bad-auth probes)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="the server's --max-request-bytes (enables oversized-body probes)")
    p.add_argument("--server-pid", type=int, default=None, help="default: the process listening on the port")
    p.add_argument("--model", default=None, help="teacher checkpoint for the references (default: the server's)")
    p.add_argument("--pool-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=96)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if not 0.0 <= a.invalid_frac <= 1.0 or a.clients < 1 or a.duration_s <= 0:
        p.error("need --clients >= 1, --duration-s > 0 and 0 <= --invalid-frac <= 1")
    key = Path(a.api_key_file).read_text().strip() if a.api_key_file else None
    opts = LoadOptions(url=a.url, clients=a.clients, duration_s=a.duration_s, invalid_frac=a.invalid_frac,
                       api_key=key, max_request_bytes=a.max_request_bytes, server_pid=a.server_pid,
                       model_path=a.model, pool_size=a.pool_size, max_seq_len=a.max_seq_len, tol=a.tol,
                       seed=a.seed, max_requests=a.max_requests)
    report = run_load(opts)
    print(format_report(report))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report.to_dict(), indent=2))
    failed = (report.valid_wrong or report.invalid_unexpected or report.server_errors
              or report.backpressure_without_retry_after or sum(report.transport_errors.values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
