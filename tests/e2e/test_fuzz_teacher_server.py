"""Property-based fuzzing of a REAL teacher_server over HTTP:
random JSON/MessagePack bodies with random field types, ids, starts, top_k and
temperatures, random raw bytes, random methods, paths, content types, Accept
and Authorization headers. Never a 500, the process stays alive, every error has
the protocol's error body, and every 200 is numerically correct.

    .venv/bin/python -m pytest tests/e2e/test_fuzz_teacher_server.py -x -q

Uses the session `teacher_server` fixture (API key, 1 MB request limit). The
expected answer of a body is what the protocol's own functions say
(`decode` + `validate_*`, themselves checked against the documented rules in
tests/unit/test_fuzz_protocol.py): 200 exactly when they accept it, else their
status and error field. Example counts are modest (the whole file takes well
under a minute on an idle 2-core machine).

Open teacher_server bug found here (not fixed: the module is not this file's
owner's): /v1/generate with 2 < temperature <= 100 passes the protocol's
validation but vLLM's SamplingParams refuses it, and the server answers 500.
`test_generate_temperature_vllm_refuses_is_400_not_500` pins it; `test_fuzz_generate`
fails on it too (usually within its first examples) until it is fixed.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from teacher_server.protocol import (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, MAX_TEMPERATURE, MIN_TEMPERATURE,
                                     ErrorBody, GenerateRequest, GenerateResponse, LogprobsRequest, LogprobsResponse,
                                     ModelInfo, ProtocolError, decode, media_type, validate_generate_request,
                                     validate_logprobs_request)
from tests.unit.test_fuzz_protocol import encodings, generate_body, logprobs_body

FUZZ = settings(max_examples=120, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOL = 1e-4  # at T = 1; scaled by 1/T below (the raw logprobs' float32 error is divided by T)


@pytest.fixture(scope="module")
def info(teacher_server) -> ModelInfo:
    r = requests.get(teacher_server.url + "/v1/model", headers=teacher_server.headers(), timeout=30)
    return msgspec.json.decode(r.content, type=ModelInfo)


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        yield s


def _error_of(r: requests.Response) -> ErrorBody:
    """Every non-2xx answer carries the protocol's error body, in the reply's encoding."""
    ct = r.headers.get("Content-Type", "")
    assert media_type(ct) in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK), ct
    err = decode(r.content, ErrorBody, ct)
    assert err.error.type and err.error.message, err
    return err


def _assert_not_a_server_error(r: requests.Response, server) -> None:
    event(f"status {r.status_code}")  # --hypothesis-show-statistics
    if r.status_code in (429, 503):  # deliberate backpressure only
        assert int(r.headers["Retry-After"]) >= 1
        return
    assert r.status_code < 500, f"{r.status_code} {r.text[:500]}\nserver log:\n{server.log_tail()}"


def _check_logprobs(model, req: LogprobsRequest, resp: LogprobsResponse) -> None:
    assert len(resp.results) == len(req.sequences)
    tol = TOL / min(req.temperature, 1.0)
    for seq, res in zip(req.sequences, resp.results, strict=True):
        with torch.no_grad():
            logits_T_V = model(torch.tensor([seq.token_ids])).logits[0].double()
        ref_P_V = torch.log_softmax(logits_T_V[seq.start - 1:-1] / req.temperature, dim=-1).numpy()
        want_P = ref_P_V[np.arange(len(seq.token_ids) - seq.start), seq.token_ids[seq.start:]]
        np.testing.assert_allclose(res.logprobs, want_P, atol=tol, rtol=1e-5)
        if req.top_k:
            top_P_K = np.asarray(res.top_logprobs)
            np.testing.assert_allclose(top_P_K, -np.sort(-ref_P_V, axis=1)[:, :req.top_k], atol=tol, rtol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(ref_P_V, np.asarray(res.top_ids), axis=1), top_P_K,
                                       atol=tol, rtol=1e-5)
        else:
            assert res.top_ids is None and res.top_logprobs is None


def _expected(raw: bytes, ct: str, typ, info: ModelInfo) -> tuple[int, object, str | None]:
    """(status, decoded request or None, error field) by the protocol's own functions."""
    try:
        req = decode(raw, typ, ct)
        if typ is LogprobsRequest:
            validate_logprobs_request(req, info.vocab_size, info.max_model_len, info.max_top_k)
        else:
            validate_generate_request(req, info.vocab_size, info.max_model_len)
    except ProtocolError as e:
        return e.status, None, e.field
    return 200, req, None


def _cheap_generate(body):
    """Keep accepted /v1/generate bodies cheap on a 2-core machine (types untouched)."""
    if isinstance(body, dict):
        for name, cap in (("n", 2), ("max_new_tokens", 8)):
            v = body.get(name)
            if type(v) is int and v > cap:
                body[name] = cap
        if isinstance(body.get("prompts"), list) and "max_new_tokens" not in body:
            body["max_new_tokens"] = 4
    return body


@FUZZ
@given(body=logprobs_body(),
       accept=st.sampled_from([None, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, "*/*", "text/html"]),
       pick=st.integers(0, 1))
def test_fuzz_logprobs(teacher_server, teacher_hf, info, http, body, accept, pick):
    encoded = encodings(body)
    raw, ct = encoded[min(pick, len(encoded) - 1)]
    headers = teacher_server.headers(ct)
    if accept:
        headers["Accept"] = accept
    r = http.post(teacher_server.url + "/v1/logprobs", data=raw, headers=headers, timeout=60)
    _assert_not_a_server_error(r, teacher_server)
    status, req, field = _expected(raw, ct, LogprobsRequest, info)
    if r.status_code == 200:
        assert status == 200, f"server accepted what the protocol refuses ({field}): {body!r}"
        reply_ct = r.headers["Content-Type"]
        _check_logprobs(teacher_hf, req, decode(r.content, LogprobsResponse, reply_ct))
        return
    err = _error_of(r)
    assert (r.status_code, err.error.field) == (status, field), (body, r.text[:300])


# Well-formed, cheap /v1/generate bodies over the protocol's whole documented range
# (the mixed strategy above rarely yields one that is accepted).
valid_generate = st.fixed_dictionaries({
    "prompts": st.lists(st.fixed_dictionaries({"token_ids": st.lists(st.integers(0, 319), min_size=1, max_size=20)}),
                        min_size=1, max_size=3),
    "n": st.integers(1, 2), "max_new_tokens": st.integers(1, 8),
    "temperature": st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE), "top_p": st.floats(0.01, 1.0),
    "seed": st.none() | st.integers(0, 2**63 - 1), "stop_token_ids": st.lists(st.integers(0, 319), max_size=2)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=generate_body().map(_cheap_generate) | valid_generate, pick=st.integers(0, 1))
def test_fuzz_generate(teacher_server, info, http, body, pick):
    encoded = encodings(body)
    raw, ct = encoded[min(pick, len(encoded) - 1)]
    r = http.post(teacher_server.url + "/v1/generate", data=raw, headers=teacher_server.headers(ct), timeout=120)
    _assert_not_a_server_error(r, teacher_server)
    status, req, field = _expected(raw, ct, GenerateRequest, info)
    if r.status_code == 200:
        assert status == 200, f"server accepted what the protocol refuses ({field}): {body!r}"
        resp = decode(r.content, GenerateResponse, r.headers["Content-Type"])
        assert len(resp.results) == len(req.prompts)
        for res in resp.results:
            assert len(res.samples) == req.n
            for s in res.samples:
                assert 1 <= len(s.token_ids) <= req.max_new_tokens and len(s.logprobs) == len(s.token_ids)
                assert all(0 <= t < info.vocab_size for t in s.token_ids)
                assert all(math.isfinite(x) and x <= 1e-6 for x in s.logprobs)
        return
    err = _error_of(r)
    assert (r.status_code, err.error.field) == (status, field), (body, r.text[:300])


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
PATHS = ["/v1/logprobs", "/v1/generate", "/v1/model", "/health", "/metrics", "/", "/v1/", "/v1/logprobs/",
         "/v1/LOGPROBS", "/%00", "/v1/logprobs?x=1", "/../etc/passwd", "/v1/nope"]
CONTENT_TYPES = [None, CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, "application/json; charset=latin-1", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz", "*/*", "",
                 "application/json, application/msgpack", "\u00e9"]


@FUZZ
@given(method=st.sampled_from(["POST"] * 6 + METHODS), path=st.sampled_from(["/v1/logprobs"] * 6 + PATHS),
       raw=st.binary(max_size=400) | st.text(max_size=200).map(str.encode)
       | st.sampled_from([b"{}", b"[]", b"null", b'{"sequences": [{"token_ids": [1, 2], "start": 1}]}',
                          msgspec.msgpack.encode({"sequences": [{"token_ids": [1, 2], "start": 1}]})]),
       ct=st.sampled_from([CONTENT_TYPE_JSON] * 4 + [CONTENT_TYPE_MSGPACK] * 2 + CONTENT_TYPES)
       # (requests itself refuses header values with leading/trailing whitespace)
       | st.text(max_size=20).filter(lambda t: t.isprintable() and t.isascii() and t == t.strip()),
       auth=st.sampled_from(["right", "right", "right", "none", "wrong", "basic", "empty"]),
       chunked=st.booleans())
def test_fuzz_raw_http(teacher_server, http, method, path, raw, ct, auth, chunked):
    headers = teacher_server.headers()
    headers.pop("Content-Type")
    if ct is not None:
        headers["Content-Type"] = ct
    key = teacher_server.api_key
    headers["Authorization"] = {"right": f"Bearer {key}", "none": None, "wrong": f"Bearer {key}x",
                                "basic": f"Basic {key}", "empty": ""}[auth]
    headers = {k: v for k, v in headers.items() if v is not None}
    data = iter([raw[: len(raw) // 2], raw[len(raw) // 2:]]) if chunked else raw  # chunked transfer encoding
    r = http.request(method, teacher_server.url + path, data=data, headers=headers, timeout=60)
    _assert_not_a_server_error(r, teacher_server)
    assert key not in r.text, "the API key must never be echoed"
    if r.status_code >= 400:
        err = _error_of(r)
        if r.status_code == 401:
            assert auth != "right" and err.error.type == "unauthorized"


def test_generate_temperature_vllm_refuses_is_400_not_500(teacher_server, http):
    """Found by test_fuzz_generate. teacher_server BUG (open, not fixed here): the
    protocol accepts temperature up to MAX_TEMPERATURE = 100 for /v1/generate, but
    vLLM's SamplingParams refuses temperature > 2.0 (VLLMValidationError), which the
    server turns into 500 internal. A client's bad value must be a 400 naming the field."""
    body = {"prompts": [{"token_ids": [1, 2, 3]}], "max_new_tokens": 2, "temperature": 3.0}
    r = http.post(teacher_server.url + "/v1/generate", json=body, headers=teacher_server.headers(), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "temperature", r.text


def test_alive_and_correct_after_fuzzing(teacher_server, teacher_hf, info, http):
    # Runs after the fuzz tests above (file order).
    assert teacher_server.proc.poll() is None, f"the server died:\n{teacher_server.log_tail()}"
    assert http.get(teacher_server.url + "/health", timeout=10).json() == {"status": "ok"}
    rng = np.random.default_rng(3)
    seqs = [{"token_ids": rng.integers(0, info.vocab_size, n).tolist(), "start": s} for n, s in ((40, 5), (7, 6))]
    body = {"sequences": seqs, "top_k": 3, "temperature": 0.7}
    r = http.post(teacher_server.url + "/v1/logprobs", json=body, headers=teacher_server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    req = msgspec.json.decode(msgspec.json.encode(body), type=LogprobsRequest)
    _check_logprobs(teacher_hf, req, decode(r.content, LogprobsResponse))
