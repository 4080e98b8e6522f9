"""End-to-end tests of teacher_server: a real `python -m teacher_server` process on
127.0.0.1 serving the tiny teacher with vLLM (CPU), checked against a
transformers float32 forward of the same checkpoint.

    .venv/bin/python -m pytest tests/e2e/test_teacher_server.py -x -q

Uses the session `teacher_server` fixture (tests/fixtures/teacher.py, API key
set). The queue-full and graceful-shutdown test runs on test_teacher_load.py's
small-queue server (one teacher start-up less).
"""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import numpy as np
import pytest
import requests
import torch

from teacher_server.protocol import (CONTENT_TYPE_MSGPACK, LogprobsResponse, ModelInfo, TokenizerInfo,
                                     load_tokenizer_info, tokenizer_fingerprint)

TOL = 1e-4
VOCAB = 320
MAX_LEN = 511  # the tiny teacher's 512 positions minus the one vLLM samples after a prompt


def reference(model, token_ids: list[int], start: int, temperature: float = 1.0, top_k: int = 0):
    """transformers float32: log_softmax(logits / T) at positions start-1 .. T-2
    (the logits that predict token_ids[start:]), as float64 numpy."""
    with torch.no_grad():
        logits_T_V = model(torch.tensor([token_ids])).logits[0].double()
    lps_P_V = torch.log_softmax(logits_T_V[start - 1:-1] / temperature, dim=-1)
    given_P = lps_P_V.gather(1, torch.tensor(token_ids[start:])[:, None])[:, 0]
    return given_P.numpy(), lps_P_V.numpy()


def random_batch(seed: int, n: int, min_len: int = 2, max_len: int = 80):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(0, VOCAB, size=length).tolist()
        seqs.append({"token_ids": ids, "start": int(rng.integers(1, length))})
    return seqs


def post(server, path, body, **kw):
    return requests.post(server.url + path, json=body, headers=server.headers(), timeout=120, **kw)


def assert_matches(model, seqs, results, temperature=1.0, top_k=0):
    assert len(results) == len(seqs)
    for seq, res in zip(seqs, results, strict=True):
        given_P, lps_P_V = reference(model, seq["token_ids"], seq["start"], temperature)
        got = np.asarray(res["logprobs"])
        assert got.shape == (len(seq["token_ids"]) - seq["start"],)
        np.testing.assert_allclose(got, given_P, atol=TOL, rtol=0)
        if top_k == 0:
            assert "top_ids" not in res and "top_logprobs" not in res
            continue
        top_ids_P_K = np.asarray(res["top_ids"])
        top_lps_P_K = np.asarray(res["top_logprobs"])
        assert top_ids_P_K.shape == top_lps_P_K.shape == (len(got), top_k)
        # Values: the reference's K largest, in order; ids: the returned ids carry those values
        # (robust to ties, whose order is unspecified).
        ref_sorted_P_K = -np.sort(-lps_P_V, axis=1)[:, :top_k]
        np.testing.assert_allclose(top_lps_P_K, ref_sorted_P_K, atol=TOL, rtol=0)
        np.testing.assert_allclose(np.take_along_axis(lps_P_V, top_ids_P_K, 1), top_lps_P_K, atol=TOL, rtol=0)
        assert (np.diff(top_lps_P_K, axis=1) <= 1e-7).all()


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("top_k,temperature", [(0, 1.0), (5, 1.0), (3, 0.7), (0, 2.0)])
def test_logprobs_match_transformers(teacher_server, teacher_hf, top_k, temperature):
    # Ragged lengths, starts anywhere from 1 to len-1, including the full max_model_len.
    seqs = random_batch(seed=top_k * 10 + int(temperature * 10), n=12)
    seqs.append({"token_ids": [(i * 7) % VOCAB for i in range(MAX_LEN)], "start": 1})
    seqs.append({"token_ids": [5, 9], "start": 1})
    r = post(teacher_server, "/v1/logprobs", {"sequences": seqs, "top_k": top_k, "temperature": temperature})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == teacher_server.model_path
    assert_matches(teacher_hf, seqs, body["results"], temperature, top_k)


def test_msgpack_encoding_equals_json(teacher_server):
    seqs = random_batch(seed=7, n=4)
    req = {"sequences": seqs, "top_k": 2, "temperature": 1.0}
    as_json = post(teacher_server, "/v1/logprobs", req).json()
    r = requests.post(teacher_server.url + "/v1/logprobs", data=msgspec.msgpack.encode(req),
                      headers=teacher_server.headers(CONTENT_TYPE_MSGPACK), timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(CONTENT_TYPE_MSGPACK)
    as_msgpack = msgspec.msgpack.decode(r.content, type=LogprobsResponse)
    for a, b in zip(as_json["results"], as_msgpack.results, strict=True):
        np.testing.assert_allclose(a["logprobs"], b.logprobs, atol=1e-6)
        assert a["top_ids"] == b.top_ids


def test_model_info_fingerprint(teacher_server, student_path, teacher_path):
    r = requests.get(teacher_server.url + "/v1/model", headers=teacher_server.headers(), timeout=10)
    info = msgspec.json.decode(r.content, type=ModelInfo)
    assert (info.vocab_size, info.max_model_len, info.dtype) == (VOCAB, MAX_LEN, "float32")
    # Student and teacher share one tokenizer, so a client can compare fingerprints.
    assert info.tokenizer_sha256 == tokenizer_fingerprint(student_path) == tokenizer_fingerprint(teacher_path)
    # /v1/tokenizer: what the hash covers, in full (vLLM's own tokenizer of the
    # teacher), equal to the student's tokenizer read from disk.
    r = requests.get(teacher_server.url + "/v1/tokenizer", headers=teacher_server.headers(), timeout=10)
    tok = msgspec.json.decode(r.content, type=TokenizerInfo)
    assert tok == load_tokenizer_info(student_path) and tok.sha256() == info.tokenizer_sha256
    assert info.tokenizer_size == len(tok.vocab) == VOCAB
    r = requests.get(teacher_server.url + "/v1/tokenizer", timeout=10)  # no key: like every endpoint but /health
    assert r.status_code == 401


def test_sixteen_concurrent_clients(teacher_server, teacher_hf):
    n_clients = 20
    batches = [random_batch(seed=100 + c, n=3, max_len=60) for c in range(n_clients)]

    async def client(session, seqs):
        async with session.post(teacher_server.url + "/v1/logprobs", json={"sequences": seqs, "top_k": 1},
                                headers=teacher_server.headers()) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
            return await asyncio.gather(*(client(s, b) for b in batches))

    for seqs, body in zip(batches, asyncio.run(main()), strict=True):
        assert_matches(teacher_hf, seqs, body["results"], 1.0, 1)


def test_generate(teacher_server, teacher_hf):
    prompt = [1, 40, 50, 60]
    req = {"prompts": [{"token_ids": prompt}, {"token_ids": [2, 3]}], "n": 2, "max_new_tokens": 8,
           "temperature": 0.8, "seed": 123}
    a = post(teacher_server, "/v1/generate", req)
    assert a.status_code == 200, a.text
    b = post(teacher_server, "/v1/generate", req).json()
    a = a.json()
    assert a == b  # seeded: reproducible
    assert [len(r["samples"]) for r in a["results"]] == [2, 2]
    for p, res in zip(req["prompts"], a["results"], strict=True):
        for s in res["samples"]:
            assert len(s["token_ids"]) == len(s["logprobs"]) == 8 and s["finish_reason"] == "length"
            # The reported logprobs are of the distribution sampled from (T = 0.8).
            ids = p["token_ids"] + s["token_ids"]
            given, _ = reference(teacher_hf, ids, len(p["token_ids"]), temperature=0.8)
            np.testing.assert_allclose(s["logprobs"], given, atol=TOL)
    # Every id a stop token: the first sampled token ends the sample.
    stop = post(teacher_server, "/v1/generate", {"prompts": [{"token_ids": prompt}], "max_new_tokens": 8,
                                                 "stop_token_ids": list(range(VOCAB))}).json()
    sample = stop["results"][0]["samples"][0]
    assert sample["finish_reason"] == "stop" and len(sample["token_ids"]) == 1


def test_seeded_generate_with_more_prompt_tokens_than_one_engine_step(teacher_server):
    """A seeded batch whose prompts overflow one engine step (vLLM's CPU default
    is 2048 tokens): vLLM 0.32 on CPU killed its engine here when it split a
    prefill (teacher_server.engine.cpu_engine_setup)."""
    prompts = [{"token_ids": [1 + (i + j) % (VOCAB - 1) for j in range(60)]} for i in range(80)]  # 4800 tokens
    req = {"prompts": prompts, "n": 1, "max_new_tokens": 2, "temperature": 1.0, "seed": 7}
    a = post(teacher_server, "/v1/generate", req)
    assert a.status_code == 200, a.text
    assert [len(r["samples"][0]["token_ids"]) for r in a.json()["results"]] == [2] * 80
    assert post(teacher_server, "/v1/generate", req).json() == a.json()   # still seeded: reproducible


# ----------------------------------------------------------------------------- bad input

GOOD = {"token_ids": [1, 2, 3, 4], "start": 1}
BAD_REQUESTS = [
    ({"sequences": [{"token_ids": [1, -1, 3], "start": 1}]}, "sequences[0].token_ids[1]", "out of range"),
    ({"sequences": [GOOD, {"token_ids": [1, 2, VOCAB], "start": 1}]}, "sequences[1].token_ids[2]", "out of range"),
    ({"sequences": [{"token_ids": [], "start": 1}]}, "sequences[0].token_ids", "empty"),
    ({"sequences": []}, "sequences", "no sequences"),
    ({"sequences": [{"token_ids": [1, 2, 3], "start": 0}]}, "sequences[0].start", "out of range"),
    ({"sequences": [{"token_ids": [1, 2, 3], "start": 3}]}, "sequences[0].start", "out of range"),
    ({"sequences": [{"token_ids": [1] * (MAX_LEN + 1), "start": 1}]}, "sequences[0].token_ids", "max_model_len"),
    ({"sequences": [{"token_ids": [1, "2"], "start": 1}]}, "sequences[0].token_ids[1]", "Expected `int`"),
    ({"sequences": [{"token_ids": [1, 2.5], "start": 1}]}, "sequences[0].token_ids[1]", "Expected `int`"),
    ({"sequences": [{"token_ids": [1, 2], "start": True}]}, "sequences[0].start", "Expected `int`"),
    ({"sequences": {"token_ids": [1, 2]}}, "sequences", "Expected `array`"),
    ({"sequences": [{"token_ids": [1, 2]}]}, "sequences[0].start", "missing required field"),
    ({"sequences": [GOOD], "extra": 1}, "extra", "unknown field"),
    ({"sequences": [{**GOOD, "mask": [1]}]}, "sequences[0].mask", "unknown field"),
    ({"sequences": [GOOD], "top_k": -1}, "top_k", "out of range"),
    ({"sequences": [GOOD], "top_k": 21}, "top_k", "out of range"),
    ({"sequences": [GOOD], "top_k": "3"}, "top_k", "Expected `int`"),
    ({"sequences": [GOOD], "temperature": 0.0}, "temperature", "out of range"),
    ({"sequences": [GOOD], "temperature": -1.0}, "temperature", "out of range"),
    ({"sequences": [GOOD], "temperature": 1000.0}, "temperature", "out of range"),
    ({"sequences": [GOOD], "temperature": "hot"}, "temperature", "Expected `float`"),
    ([GOOD], None, "Expected `object`"),
]


@pytest.mark.parametrize("body,field,reason", BAD_REQUESTS)
def test_bad_logprobs_request_is_400_naming_the_field(teacher_server, body, field, reason):
    r = post(teacher_server, "/v1/logprobs", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request" and err["field"] == field and reason in err["message"], err


@pytest.mark.parametrize("raw", [b'{"sequences": [', b"not json", b"",
                                 b'{"sequences": [{"token_ids": [1,2], "start": 1}]}x'])
def test_malformed_json_is_400(teacher_server, raw):
    r = requests.post(teacher_server.url + "/v1/logprobs", data=raw, headers=teacher_server.headers(), timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request" and "malformed" in r.json()["error"]["message"]


def test_bad_generate_request(teacher_server):
    for body, field in [({"prompts": [{"token_ids": [1]}], "n": 0}, "n"),
                        ({"prompts": [{"token_ids": [1]}], "top_p": 0.0}, "top_p"),
                        ({"prompts": [{"token_ids": [1, 999]}]}, "prompts[0].token_ids[1]"),
                        ({"prompts": [{"token_ids": [1]}], "max_new_tokens": MAX_LEN}, "prompts[0].token_ids"),
                        ({"prompts": [{"token_ids": [1]}], "stop": [2]}, "stop")]:
        r = post(teacher_server, "/v1/generate", body)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (body, r.text)


def test_http_level_errors(teacher_server):
    big = {"sequences": [{"token_ids": [1] * 200, "start": 1}] * 2000}  # ~1.2 MB > the 1 MB limit
    r = post(teacher_server, "/v1/logprobs", big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = requests.post(teacher_server.url + "/v1/logprobs", data=b"{}", timeout=10,
                      headers={**teacher_server.headers(), "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["field"] == "Content-Type"
    r = requests.get(teacher_server.url + "/v1/nope", headers=teacher_server.headers(), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = requests.get(teacher_server.url + "/v1/logprobs", headers=teacher_server.headers(), timeout=10)
    assert r.status_code == 405


def test_still_correct_after_bad_requests(teacher_server, teacher_hf):
    # Runs after the bad-input tests (file order): the server must still answer correctly.
    for raw in (b"\xff\xfe", b'{"sequences": [{"token_ids": [1e999], "start": 1}]}', b"[[[[[[[[[["):
        assert requests.post(teacher_server.url + "/v1/logprobs", data=raw, headers=teacher_server.headers(),
                             timeout=10).status_code == 400
    seqs = random_batch(seed=99, n=5)
    r = post(teacher_server, "/v1/logprobs", {"sequences": seqs, "top_k": 2})
    assert r.status_code == 200
    assert_matches(teacher_hf, seqs, r.json()["results"], 1.0, 2)


# ----------------------------------------------------------------------------- auth, metrics

def test_auth(teacher_server):
    body = {"sequences": [GOOD]}
    url = teacher_server.url + "/v1/logprobs"
    wrong = teacher_server.api_key[:-1] + ("x" if teacher_server.api_key[-1] != "x" else "y")
    for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": teacher_server.api_key},
                    {"Authorization": f"Basic {teacher_server.api_key}"}):
        r = requests.post(url, json=body, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "unauthorized"
        assert teacher_server.api_key not in r.text
    assert requests.get(teacher_server.url + "/v1/model", timeout=10).status_code == 401
    assert requests.get(teacher_server.url + "/health", timeout=10).json() == {"status": "ok"}  # probes: no key
    assert requests.post(url, json=body, headers=teacher_server.headers(), timeout=10).status_code == 200
    assert teacher_server.api_key not in teacher_server.log_tail(10**7)


def _metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", headers=server.headers(), timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


def test_metrics_count_tokens(teacher_server):
    before = _metric(teacher_server, "teacher_tokens_scored_total")
    seqs = [{"token_ids": list(range(10)), "start": 3}, {"token_ids": list(range(5)), "start": 1}]
    assert post(teacher_server, "/v1/logprobs", {"sequences": seqs}).status_code == 200
    assert _metric(teacher_server, "teacher_tokens_scored_total") - before == 7 + 4
    assert _metric(teacher_server, "teacher_queue_depth") == 0
    assert _metric(teacher_server, 'teacher_request_latency_seconds_count{endpoint="/v1/logprobs"}') >= 1


PHASES = ("read", "decode", "validate", "engine", "convert", "encode")


def test_metrics_time_each_phase_of_answered_requests(teacher_server):
    """/metrics splits a scoring request's time into phases; a refused request adds none."""
    def phase(stat: str, name: str) -> float:
        return _metric(teacher_server, f'teacher_phase_seconds_{stat}{{endpoint="/v1/logprobs",phase="{name}"}}')

    def latency_sum() -> float:
        return _metric(teacher_server, 'teacher_request_latency_seconds_sum{endpoint="/v1/logprobs"}')

    seqs = [{"token_ids": list(range(40)), "start": 3}]
    assert post(teacher_server, "/v1/logprobs", {"sequences": seqs}).status_code == 200  # every series exists
    count0 = {p: phase("count", p) for p in PHASES}
    sum0, lat0 = {p: phase("sum", p) for p in PHASES}, latency_sum()
    assert post(teacher_server, "/v1/logprobs", {"sequences": seqs * 4}).status_code == 200
    assert post(teacher_server, "/v1/logprobs", {"sequences": [{"token_ids": [VOCAB], "start": 1}]}).status_code == 400
    for p in PHASES:
        assert phase("count", p) - count0[p] == 1, p  # the 200 once; the 400 not at all
    spent = {p: phase("sum", p) - sum0[p] for p in PHASES}
    assert spent["engine"] > 0
    # The admitted phases of the 200 happen inside its request latency (read precedes admission);
    # the 400's latency only adds to the right-hand side.
    inside = sum(spent[p] for p in PHASES if p != "read")
    assert inside <= latency_sum() - lat0, spent
