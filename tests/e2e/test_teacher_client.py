"""The teacher client (rollout/teacher_client.py) against the REAL teacher_server
(session fixture `teacher_server`, tests/fixtures/teacher.py: vLLM CPU engine,
API key on).

Faults the real server will not produce on demand (503 twice, 503 forever, 413
for large bodies) come from `FaultProxy`: a real aiohttp reverse proxy on
127.0.0.1 in front of the real server that answers some requests itself and
forwards the rest unchanged.

    .venv/bin/python -m pytest tests/e2e/test_teacher_client.py -q
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
import time

import pytest
import torch
from aiohttp import ClientSession, web

from rollout.host import free_port
from rollout.teacher_client import (TeacherClient, TeacherRequestError, TeacherUnavailableError,
                                    TokenizerMismatchError, pack_by_budget)

TOL = 2e-4  # vLLM CPU vs transformers, float32 (ENVIRONMENT.md saw ~5e-7; margin for batching)


# ---------------------------------------------------------------- helpers

class FaultProxy:
    """Reverse proxy in its own thread/loop. `fail_first` requests (to /v1/*) get
    503 + Retry-After; with `fail_forever` all do; bodies over `max_body_bytes`
    get 413. Counts what it received and forwarded, and the peak concurrency."""

    def __init__(self, upstream: str, fail_first: int = 0, fail_forever: bool = False, retry_after: str = "1",
                 max_body_bytes: int | None = None, delay_s: float = 0.0):
        self.upstream = upstream
        self.fail_first, self.fail_forever, self.retry_after = fail_first, fail_forever, retry_after
        self.max_body_bytes, self.delay_s = max_body_bytes, delay_s
        self.received = self.forwarded = self.refused_413 = self.inflight = self.max_inflight = 0
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.path.startswith("/v1/"):
            self.received += 1
            if self.fail_forever or self.received <= self.fail_first:
                return web.json_response({"error": {"type": "loading", "message": "injected 503", "field": None}},
                                         status=503, headers={"Retry-After": self.retry_after})
            if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
                self.refused_413 += 1
                return web.json_response({"error": {"type": "request_too_large", "message": "injected 413",
                                                    "field": None}}, status=413)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            headers = {k: request.headers[k] for k in ("Content-Type", "Accept", "Authorization")
                       if k in request.headers}
            async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                             headers=headers) as r:
                data = await r.read()
                out = {k: r.headers[k] for k in ("Content-Type", "Retry-After") if k in r.headers}
            self.forwarded += 1
            return web.Response(body=data, status=r.status, headers=out)
        finally:
            self.inflight -= 1

    def __enter__(self) -> "FaultProxy":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start():
            self._session = ClientSession()
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            port = free_port()
            await web.TCPSite(self._runner, "127.0.0.1", port).start()
            return port

        self.url = f"http://127.0.0.1:{asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)}"
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def random_sequences(n: int, seed: int, min_len: int = 8, max_len: int = 48) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 259) for _ in range(rng.randint(min_len, max_len))]
        out.append((ids, rng.randint(1, len(ids) - 1)))
    return out


def reference(model, seqs, temperature=1.0, top_k=0):
    """Transformers float32 forward: log p(ids[t] | ids[:t]) for t >= start (and top-k)."""
    out = []
    with torch.no_grad():
        for ids, start in seqs:
            logits_T_V = model(torch.tensor([ids])).logits[0].double() / temperature
            lp_T_V = torch.log_softmax(logits_T_V, dim=-1)[start - 1:-1]  # position t-1 predicts ids[t]
            tok = torch.tensor(ids[start:])
            lp = lp_T_V.gather(1, tok[:, None])[:, 0].tolist()
            top = lp_T_V.topk(top_k, dim=-1) if top_k else None
            out.append((lp, top))
    return out


def client_for(url, server, **kw) -> TeacherClient:
    kw.setdefault("backoff_base_s", 0.05)
    return TeacherClient(url, api_key_file=server.api_key_file, **kw)


def assert_close(got, want, tol=TOL):
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < tol


# ---------------------------------------------------------------- scores are right


@pytest.mark.parametrize("encoding,temperature,top_k", [("application/msgpack", 1.0, 0),
                                                        ("application/json", 2.0, 5)])
def test_scores_equal_transformers_forward(teacher_server, teacher_hf, encoding, temperature, top_k):
    seqs = random_sequences(6, seed=1)
    with client_for(teacher_server.url, teacher_server, encoding=encoding) as client:
        res = client.score(seqs, top_k=top_k, temperature=temperature)
    assert res.errors == [] and res.metrics["teacher/failed_sequences"] == 0
    assert res.metrics["teacher/tokens_scored"] == sum(len(ids) - s for ids, s in seqs)
    for i, (lp, top) in enumerate(reference(teacher_hf, seqs, temperature, top_k)):
        assert_close(res.logprobs[i], lp)
        if top_k:
            assert res.top_ids[i] == top.indices.tolist()
            for got, want in zip(res.top_logprobs[i], top.values.tolist(), strict=True):
                assert_close(got, want)
        else:
            assert res.top_ids is None


def test_packing_splits_into_requests_in_order_with_bounded_concurrency(teacher_server):
    seqs = random_sequences(14, seed=2, min_len=20, max_len=40)
    with client_for(teacher_server.url, teacher_server) as c:
        whole = c.score(seqs)  # one request (default budget 16384 tokens)
    assert whole.metrics["teacher/requests"] == 1
    expected_packs = pack_by_budget([len(ids) for ids, _ in seqs], 64)
    assert 7 <= len(expected_packs) <= 14
    with FaultProxy(teacher_server.url, delay_s=0.2) as proxy, \
            client_for(proxy.url, teacher_server, max_tokens_per_request=64, max_concurrency=2) as c:
        packed = c.score(seqs)
    assert proxy.forwarded == len(expected_packs) == packed.metrics["teacher/requests"]
    assert proxy.max_inflight == 2  # the semaphore holds it at max_concurrency (0.2 s per request overlaps)
    for a, b in zip(packed.logprobs, whole.logprobs, strict=True):  # results back in input order
        assert_close(a, b, 1e-5)


def test_too_large_request_is_split_and_resent(teacher_server):
    seqs = random_sequences(8, seed=3, min_len=30, max_len=40)
    with client_for(teacher_server.url, teacher_server) as c:
        direct = c.score(seqs)
    # a proxy that refuses bodies over ~2 sequences' worth of JSON: the client halves until they fit
    with FaultProxy(teacher_server.url, max_body_bytes=400) as proxy, \
            client_for(proxy.url, teacher_server, encoding="application/json") as c:
        res = c.score(seqs)
    assert res.errors == [] and res.metrics["teacher/split_requests"] >= 2 and proxy.refused_413 >= 3
    for a, b in zip(res.logprobs, direct.logprobs, strict=True):
        assert_close(a, b, 1e-5)


# ---------------------------------------------------------------- retries and give-up


def test_503_twice_then_succeeds(teacher_server, teacher_hf):
    seqs = random_sequences(3, seed=4)
    with FaultProxy(teacher_server.url, fail_first=2, retry_after="1") as proxy, \
            client_for(proxy.url, teacher_server) as c:
        t0 = time.monotonic()
        res = c.score(seqs)
        elapsed = time.monotonic() - t0
    assert proxy.received == 3 and proxy.forwarded == 1
    assert res.metrics["teacher/retries"] == 2 and res.metrics["teacher/requests"] == 3
    assert elapsed >= 2.0  # Retry-After: 1 honoured twice
    assert res.errors == []
    for got, (want, _) in zip(res.logprobs, reference(teacher_hf, seqs), strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("down", ["closed_port", "503_forever"])
def test_teacher_that_stays_down_raises_after_timeout(teacher_server, down):
    timeout_s = 3.0
    with contextlib.ExitStack() as stack:
        if down == "closed_port":
            url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        else:
            url = stack.enter_context(FaultProxy(teacher_server.url, fail_forever=True, retry_after="1")).url
        c = stack.enter_context(client_for(url, teacher_server, unavailable_timeout_s=timeout_s))
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailableError) as ei:
            c.score(random_sequences(4, seed=5))
        elapsed = time.monotonic() - t0
    assert timeout_s <= elapsed < timeout_s + 2.0
    msg = str(ei.value)
    assert url in msg and "teacher.unavailable_timeout_s=3" in msg
    assert ("503 loading" in msg) if down == "503_forever" else ("Cannot connect" in msg or "refused" in msg)
    assert ei.value.attempts >= 3


def test_request_level_400_and_401_are_not_retried(teacher_server):
    seqs = random_sequences(2, seed=6)
    with FaultProxy(teacher_server.url) as proxy, client_for(proxy.url, teacher_server) as c:
        with pytest.raises(TeacherRequestError) as ei:
            c.score(seqs, top_k=10_000)
        assert proxy.received == 1  # no retry
    assert ei.value.status == 400 and ei.value.field == "top_k" and "top_k 10000 is out of range" in str(ei.value)

    bad_key = teacher_server.api_key_file + ".wrong"
    with open(bad_key, "w") as f:
        f.write("not-the-key\n")
    with FaultProxy(teacher_server.url) as proxy, TeacherClient(proxy.url, api_key_file=bad_key) as c:
        with pytest.raises(TeacherRequestError) as ei:
            c.score(seqs)
        assert proxy.received == 1
    assert ei.value.status == 401 and "check teacher.api_key_file" in str(ei.value)
    assert "not-the-key" not in str(ei.value) and teacher_server.api_key not in str(ei.value)


def test_bad_sequence_fails_alone_and_is_counted(teacher_server):
    seqs = random_sequences(5, seed=7)
    seqs[2] = (seqs[2][0][:5] + [400] + seqs[2][0][6:], 1)  # 400 >= the teacher's vocab size 320
    with client_for(teacher_server.url, teacher_server) as c:
        res = c.score(seqs)
        good = c.score([s for i, s in enumerate(seqs) if i != 2])
    assert res.failed_indices == [2] and res.logprobs[2] is None
    assert "token id 400 is out of range" in res.errors[0][1] and "sequences[2].token_ids[5]" in res.errors[0][1]
    assert res.metrics["teacher/failed_sequences"] == 1
    assert c.metrics()["teacher/failed_sequences"] == 1  # cumulative across calls
    for a, b in zip([lp for i, lp in enumerate(res.logprobs) if i != 2], good.logprobs, strict=True):
        assert_close(a, b, 1e-5)


# ---------------------------------------------------------------- tokenizer check


def test_tokenizer_check_accepts_same_and_refuses_different(teacher_server, student_path, tmp_path):
    from transformers import AutoTokenizer

    with client_for(teacher_server.url, teacher_server) as c:
        info = c.check_tokenizer(student_path)  # student and teacher share the tiny tokenizer
        assert info.vocab_size == 320
        tok = AutoTokenizer.from_pretrained(student_path)
        tok.add_tokens(["<|extra|>"])
        tok.save_pretrained(tmp_path / "other")
        with pytest.raises(TokenizerMismatchError) as ei:
            c.check_tokenizer(tmp_path / "other")
    msg = str(ei.value)
    assert msg.startswith(f"teacher tokenizer differs from the student's (sha256 {info.tokenizer_sha256[:12]}...")
    assert "on-policy distillation scores the student's own token ids, so both must use one tokenizer" in msg
    # The hashes differed, so the client fetched the teacher's vocabulary to name the id.
    assert "1 token id maps to different tokens (id 320): id 320: student '<|extra|>', teacher (none)" in msg


# ---------------------------------------------------------------- generate


def test_generate_logprobs_match_scoring_and_seed_is_packing_independent(teacher_server):
    prompts = [[1, 87, 85, 71, 84, 201] + [70 + i] * (3 + i) for i in range(4)]
    with client_for(teacher_server.url, teacher_server) as c:
        one = c.generate(prompts, n=2, max_new_tokens=8, seed=123)
        with client_for(teacher_server.url, teacher_server, max_tokens_per_request=40) as small:
            packed = small.generate(prompts, n=2, max_new_tokens=8, seed=123)
        assert packed.metrics["teacher/requests"] > one.metrics["teacher/requests"] == 1
        assert [[s.token_ids for s in r] for r in packed.samples] == [[s.token_ids for s in r] for r in one.samples]
        flat = [(p + s.token_ids, len(p)) for p, r in zip(prompts, one.samples, strict=True) for s in r]
        scored = c.score(flat)
    assert one.errors == [] and one.metrics["teacher/tokens_generated"] == sum(len(ids) - s for ids, s in flat)
    samples = [s for r in one.samples for s in r]
    for s, lp in zip(samples, scored.logprobs, strict=True):
        assert 1 <= len(s.token_ids) <= 8
        assert_close(s.logprobs, lp)  # temperature 1, top_p 1: sampled-from = raw teacher distribution


# ---------------------------------------------------------------- callers: threads, asyncio, Ray


def test_client_from_threads_asyncio_and_a_ray_actor(teacher_server, ray_session):
    ray = ray_session
    seqs = random_sequences(4, seed=8)
    with client_for(teacher_server.url, teacher_server) as c:
        want = c.score(seqs).logprobs
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # plain threads, concurrently
            for got in pool.map(lambda _: c.score(seqs).logprobs, range(4)):
                for a, b in zip(got, want, strict=True):
                    assert_close(a, b, 1e-5)

        async def in_a_loop():  # the caller's own running loop is not blocked by the client's
            return (await asyncio.gather(c.score_async(seqs), c.score_async(seqs[:2])))

        r1, r2 = asyncio.run(in_a_loop())
        for a, b in zip(r1.logprobs + r2.logprobs, want + want[:2], strict=True):
            assert_close(a, b, 1e-5)

        @ray.remote(num_cpus=0)
        class Scorer:
            def __init__(self, client):
                self.client = client  # arrives pickled: rebuilt from its settings, key re-read from the file

            def score(self, seqs):
                return self.client.score(seqs)

            def check(self, err_seqs):
                try:
                    self.client.score(err_seqs, top_k=10_000)
                except TeacherRequestError as e:
                    return e

        actor = Scorer.remote(c)
        res = ray.get(actor.score.remote(seqs), timeout=120)
        err = ray.get(actor.check.remote(seqs), timeout=120)
        ray.kill(actor)
    for a, b in zip(res.logprobs, want, strict=True):
        assert_close(a, b, 1e-5)
    assert isinstance(err, TeacherRequestError) and err.field == "top_k"  # errors pickle across the boundary
