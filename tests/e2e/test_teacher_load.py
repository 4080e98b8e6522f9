"""teacher_server under load: 64 concurrent clients mixing valid
and invalid /v1/logprobs requests against a REAL `python -m teacher_server`
process, every answer checked.

    .venv/bin/python -m pytest tests/e2e/test_teacher_load.py -x -q

The server is this module's own (`launch_teacher_server` from
tests/fixtures/teacher.py) because the session server's --max-queue 256 never
pushes back at 64 clients: here --max-queue 8 makes 429 + Retry-After actually
happen, --max-request-bytes 64 KiB makes oversized bodies cheap to send, and an
API key makes bad-auth requests meaningful. The load runs LOAD_S seconds, twice, in CI;
the 60 s soak is `python -m bench.teacher_load` (see its docstring). The last
test fills the queue on purpose and then stops the server with SIGTERM.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from bench.teacher_load import (LoadOptions, ProbeFactory, build_pool, fetch_model_info, format_report, run_load,
                                run_probes)
from tests.e2e.test_teacher_server import GOOD, VOCAB, _metric, assert_matches, post
from tests.fixtures.teacher import launch_teacher_server

CLIENTS = 64
LOAD_S = 15.0
MAX_QUEUE = 8
MAX_REQUEST_BYTES = 64 * 1024
# RSS margins (sampled every 0.25 s with psutil).
# Front-end (aiohttp + msgspec), over its pre-load baseline: at most MAX_QUEUE
# requests are admitted, each <= 64 KiB of body plus ~1 MB of decoded full-vocab
# answer (4 seqs x 96 positions x 320 floats at T != 1), so < 10 MB is live at
# once; 64 MiB is several times that: it catches growth with the number of
# admitted requests (no queue bound, or retained full-vocab arrays).
# Engine core (vLLM): its KV cache is zeroed, hence resident, at start-up
# (VLLM_CPU_KVCACHE_SPACE=1 GiB), so what grows under load is caches and the
# allocator. The biggest is oneDNN's primitive cache: ragged scoring batches make
# almost every batch a new matmul shape, and each of up to 1024 cached shapes
# keeps its kernel and buffers (+470..+540 MiB in a first 15 s, +60..+160 MiB per
# further 15 s: bounded by oneDNN's capacity, not by this code, and different on
# every CPU). The server here runs with that cache off
# (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0; same throughput on this workload), and the
# engine's growth is measured over a SECOND load, after the first has warmed the
# allocator: what is left to grow is what the engine keeps per request. A leak of
# ENGINE_MARGIN_BYTES / (valid answers in LOAD_S, ~1,300 here) = ~100 KB per
# answer, a quarter of one full-vocab answer, fails the test.
FRONTEND_MARGIN_BYTES = 64 * 2**20
ENGINE_MARGIN_BYTES = 128 * 2**20
SERVER_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


@pytest.fixture(scope="module")
def small_queue_server(teacher_path):
    with launch_teacher_server(teacher_path, "--max-queue", str(MAX_QUEUE), "--max-request-bytes",
                               str(MAX_REQUEST_BYTES), api_key="load-key-" + os.urandom(8).hex(),
                               env_extra=SERVER_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def load_setup(small_queue_server, teacher_path):
    opts = LoadOptions(url=small_queue_server.url, clients=CLIENTS, duration_s=LOAD_S, invalid_frac=0.3,
                       api_key=small_queue_server.api_key, max_request_bytes=MAX_REQUEST_BYTES,
                       server_pid=small_queue_server.proc.pid, model_path=teacher_path, pool_size=48, seed=1)
    info = fetch_model_info(opts.url, opts.api_key)
    pool = build_pool(teacher_path, info, opts.pool_size, opts.max_seq_len, opts.seed)
    return opts, info, pool


def _assert_no_failures(report, server):
    msg = f"{format_report(report)}\nserver log tail:\n{server.log_tail()}"
    assert report.server_errors == 0, msg
    assert report.backpressure_without_retry_after == 0, msg
    assert not report.transport_errors, msg
    assert report.valid_wrong == 0, msg
    assert report.invalid_unexpected == 0, msg
    return msg


def test_every_error_kind_alone(load_setup, small_queue_server):
    """Without contention, each invalid kind gets exactly its status, error type and
    field (the load below then only has to show this holds under pressure)."""
    opts, info, pool = load_setup
    factory = ProbeFactory(pool, info, opts)
    rng = np.random.default_rng(7)
    probes = [p for _ in range(3) for p in factory.one_of_each(rng)]
    report = run_probes(opts, probes, pool)
    msg = _assert_no_failures(report, small_queue_server)
    assert report.backpressure == 0, msg
    assert report.valid_correct == 3 and report.invalid_as_expected == len(probes) - 3, msg
    kinds = {k for k in report.by_kind_status}
    assert {"bad_auth", "oversized", "malformed", "bad_token_id", "unknown_field", "valid"} <= kinds, msg
    for kind, per in report.by_kind_status.items():
        assert len(per) == 1 and next(iter(per)) < 500, (kind, per)


def test_64_clients_mixed_load(load_setup, small_queue_server):
    opts, info, pool = load_setup
    report = run_load(opts, pool=pool, info=info)
    msg = _assert_no_failures(report, small_queue_server)
    print(msg.split("server log tail")[0])
    statuses = report.status_counts
    # Only deliberate backpressure may be 5xx-like: every 5xx is a 503 with Retry-After.
    assert all(s < 500 or s == 503 for s in statuses), msg
    # The queue bound was actually hit (the point of --max-queue 8 at 64 clients) ...
    assert report.backpressure > 0 and statuses[429] > 0, msg
    # ... and the server still did real work under it: valid answers, all correct.
    assert report.valid_correct >= 20, msg
    assert report.invalid_as_expected >= 10, msg
    assert report.requests_sent >= CLIENTS, msg
    # The front-end's memory is bounded (margins justified at the top of the file).
    assert report.rss_samples >= 10, msg
    assert report.rss_peak_bytes < report.rss_baseline_bytes + FRONTEND_MARGIN_BYTES, msg
    assert small_queue_server.proc.poll() is None, "the server died under load"

    # The same load again: the engine core, warmed by the first, does not keep growing.
    second = run_load(opts, pool=pool, info=info)
    msg = _assert_no_failures(second, small_queue_server)
    print(msg.split("server log tail")[0])
    assert second.valid_correct >= 20 and second.rss_samples >= 10, msg
    assert second.rss_peak_bytes < report.rss_baseline_bytes + FRONTEND_MARGIN_BYTES, msg
    assert second.rss_children_peak_bytes < second.rss_children_baseline_bytes + ENGINE_MARGIN_BYTES, msg

    # Afterwards: the queue drained, and the server answers correctly again.
    rng = np.random.default_rng(11)
    factory = ProbeFactory(pool, info, opts)
    after = run_probes(opts, [factory.valid(rng) for _ in range(5)], pool)
    assert after.valid_correct == 5 and after.backpressure == 0, format_report(after)


def test_stalled_uploads_do_not_starve_other_clients(small_queue_server, load_setup):
    """MAX_QUEUE connections send headers and 1 byte of a 1000-byte body, then stall
    (a slow or hung client, a half-open connection behind a proxy). A well-formed
    request from another client must still be answered within 10 s."""
    import socket
    import time
    import urllib.parse

    opts, info, pool = load_setup
    u = urllib.parse.urlparse(small_queue_server.url)
    head = (f"POST /v1/logprobs HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {opts.api_key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()
    stalled = []
    try:
        for _ in range(MAX_QUEUE):
            s = socket.create_connection((u.hostname, u.port), timeout=10)
            s.sendall(head)
            stalled.append(s)
        time.sleep(1.0)  # let the server admit them
        factory = ProbeFactory(pool, info, opts)
        rng = np.random.default_rng(5)
        deadline = time.monotonic() + 10
        while True:
            report = run_probes(opts, [factory.valid(rng)], pool)
            if report.valid_correct == 1 or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # the Retry-After the server sends
        assert report.valid_correct == 1, format_report(report)
    finally:
        for s in stalled:
            s.close()


def test_queue_full_then_graceful_shutdown(small_queue_server, teacher_hf):
    """Last in this module: it stops the server. /health was 503 while loading.
    With MAX_QUEUE slow requests running, one more gets 429 + Retry-After.
    SIGTERM during them: each still completes correctly, the process exits 0."""
    import signal
    import threading
    import time

    import requests

    server = small_queue_server
    # It listened before vLLM was up: /health said 503 "loading" until the model was ready.
    assert server.health_seen[0] == (503, '{"status":"loading"}'), server.health_seen
    assert server.health_seen[-1] == (200, '{"status":"ok"}')
    # Slow on purpose: full-vocab logprobs (temperature != 1) at every position of
    # 32 x 300 tokens per request. All MAX_QUEUE must be admitted before the
    # first finishes. 4 sequences scored from position 150 finish from 0.4 s on
    # (2-core box), a window a loaded box's scheduler can miss; 32 sequences
    # from position 1 (16x the positions, ~45 KB of JSON, under
    # MAX_REQUEST_BYTES) finish one by one from 2.4 s on.
    slow_seqs = 32
    rng = np.random.default_rng(5)
    bodies = [[{"token_ids": rng.integers(0, VOCAB, 300).tolist(), "start": 1} for _ in range(slow_seqs)]
              for _ in range(MAX_QUEUE)]
    result: dict[int, requests.Response] = {}
    go = threading.Barrier(MAX_QUEUE)

    def slow(i):
        go.wait()
        result[i] = post(server, "/v1/logprobs", {"sequences": bodies[i], "top_k": 2, "temperature": 0.9})

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(MAX_QUEUE)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    deadline = t0 + 60
    depths = []
    while (depth := _metric(server, "teacher_queue_depth")) < MAX_QUEUE:
        depths.append(depth)
        done = {i: (r.status_code, r.text[:200]) for i, r in list(result.items())}
        assert not done and time.monotonic() < deadline, (
            f"the {MAX_QUEUE} slow requests were never admitted at once: after {time.monotonic() - t0:.1f} s "
            f"queue depths seen {depths[-20:]}, finished before the last was admitted: {done}")
        time.sleep(0.02)
    r = post(server, "/v1/logprobs", {"sequences": [GOOD]})
    assert r.status_code == 429 and r.json()["error"]["type"] == "overloaded"
    assert int(r.headers["Retry-After"]) >= 1
    assert all(t.is_alive() for t in threads), "the slow requests finished too early for the test to mean anything"

    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=300)
    assert sorted(result) == list(range(MAX_QUEUE))
    assert all(r.status_code == 200 for r in result.values()), [r.text[:200] for r in result.values()]
    assert server.proc.wait(timeout=60) == 0
    for i in (0, MAX_QUEUE - 1):
        assert_matches(teacher_hf, bodies[i], result[i].json()["results"], 0.9, 2)
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=5)
