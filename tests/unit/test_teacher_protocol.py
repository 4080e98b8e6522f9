"""Unit tests of teacher_server's wire protocol and the pure conversion from vLLM's
flat prompt logprobs to protocol results (no engine, no server).

    .venv/bin/python -m pytest tests/unit/test_teacher_protocol.py -q
"""

from __future__ import annotations

import json
import pickle
import shutil
import types

import numpy as np
import pytest

from teacher_server.engine import prompt_logprobs_to_result
from teacher_server.protocol import (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, GeneratePrompt, GenerateRequest,
                                     LogprobsRequest, LogprobsResponse, ProtocolError, ScoreSequence,
                                     SequenceLogprobs, count_tokens, decode, encode, media_type,
                                     tokenizer_fingerprint, validate_generate_request,
                                     validate_logprobs_request)

V, L = 320, 511


def _decode_error(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        decode(body, LogprobsRequest)
    return e.value


@pytest.mark.parametrize("body,field,words", [
    (b'{"sequences": [{"token_ids": [1, "x"], "start": 1}]}', "sequences[0].token_ids[1]", "Expected `int`"),
    (b'{"sequences": [{"token_ids": [1, 2], "start": 1, "mask": 1}]}', "sequences[0].mask", "unknown field"),
    (b'{"sequences": [{"token_ids": [1, 2]}]}', "sequences[0].start", "missing required field"),
    (b'{"sequences": [], "foo": 1}', "foo", "unknown field"),
    (b'{"sequences": [], "temperature": null}', "temperature", "Expected `float`"),
    (b'{"sequences": [{"token_ids": [1, true], "start": 1}]}', "sequences[0].token_ids[1]", "Expected `int`"),
    (b'{"sequences": [', None, "malformed"),
    (b'[1, 2]', None, "Expected `object`"),
])
def test_decode_errors_name_the_field(body, field, words):
    err = _decode_error(body)
    assert (err.status, err.type, err.field) == (400, "invalid_request", field)
    assert words in err.message


def test_roundtrip_json_and_msgpack():
    req = LogprobsRequest([ScoreSequence([1, 2, 3], 1), ScoreSequence([4, 5], 1)], top_k=2, temperature=0.5)
    for ct in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, "application/json; charset=utf-8"):
        assert decode(encode(req, ct), LogprobsRequest, ct) == req
    resp = LogprobsResponse("m", [SequenceLogprobs([-1.5, -0.25]), SequenceLogprobs([-2.0], [[3]], [[-0.1]])])
    wire = json.loads(encode(resp))
    assert wire == {"model": "m", "results": [{"logprobs": [-1.5, -0.25]},  # no top_* keys when top_k == 0
                                              {"logprobs": [-2.0], "top_ids": [[3]], "top_logprobs": [[-0.1]]}]}
    assert decode(encode(resp, CONTENT_TYPE_MSGPACK), LogprobsResponse, CONTENT_TYPE_MSGPACK) == resp
    assert media_type(None) == media_type("*/*") == CONTENT_TYPE_JSON
    assert media_type("application/x-msgpack") == CONTENT_TYPE_MSGPACK
    with pytest.raises(ProtocolError) as e:
        decode(b"{}", LogprobsRequest, "text/plain")
    assert e.value.status == 415


def _req(seqs, top_k=0, temperature=1.0):
    return LogprobsRequest([ScoreSequence(t, s) for t, s in seqs], top_k, temperature)


@pytest.mark.parametrize("req,field", [
    (_req([]), "sequences"),
    (_req([([], 1)]), "sequences[0].token_ids"),
    (_req([([1, 2], 1), ([1, 2, 3], 0)]), "sequences[1].start"),
    (_req([([1, 2, 3], 3)]), "sequences[0].start"),
    (_req([([1, 2, -5], 1)]), "sequences[0].token_ids[2]"),
    (_req([([1, V, 2], 1)]), "sequences[0].token_ids[1]"),
    (_req([([1] * (L + 1), 1)]), "sequences[0].token_ids"),
    (_req([([1, 2], 1)], top_k=-1), "top_k"),
    (_req([([1, 2], 1)], top_k=21), "top_k"),
    (_req([([1, 2], 1)], temperature=0.0), "temperature"),
    (_req([([1, 2], 1)], temperature=float("nan")), "temperature"),
    (_req([([1, 2], 1)], temperature=float("inf")), "temperature"),
])
def test_validate_logprobs_request(req, field):
    with pytest.raises(ProtocolError) as e:
        validate_logprobs_request(req, V, L, max_top_k=20)
    assert (e.value.status, e.value.field) == (400, field)


def test_validate_accepts_edges():
    validate_logprobs_request(_req([([0, V - 1], 1), ([1] * L, L - 1)], top_k=20, temperature=100.0), V, L, 20)
    assert count_tokens(_req([([1, 2, 3], 1), ([1, 2], 1)])) == 5


@pytest.mark.parametrize("kw,field", [
    (dict(prompts=[]), "prompts"),
    (dict(n=0), "n"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.0), "temperature"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=[V]), "stop_token_ids[0]"),
    (dict(max_new_tokens=L), "prompts[0].token_ids"),
])
def test_validate_generate_request(kw, field):
    req = GenerateRequest(**{"prompts": [GeneratePrompt([1, 2])], **kw})
    with pytest.raises(ProtocolError) as e:
        validate_generate_request(req, V, L)
    assert e.value.field == field


def test_protocol_error_pickles_and_parses_replies():
    err = ProtocolError(429, "overloaded", "queue full", None, retry_after_s=2.0)
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.type, back.message, back.retry_after_s) == (429, "overloaded", "queue full", 2.0)
    parsed = ProtocolError.from_body(400, encode(ProtocolError(400, "invalid_request", "bad", "top_k").to_body()))
    assert (parsed.status, parsed.type, parsed.field) == (400, "invalid_request", "top_k")
    html = ProtocolError.from_body(502, b"<html>bad gateway</html>")
    assert html.type == "http_error" and "bad gateway" in html.message


# ----------------------------------------------------------------------------- tokenizer fingerprint

def test_tokenizer_fingerprint(student_path, teacher_path, tmp_path):
    fp = tokenizer_fingerprint(teacher_path)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(student_path)
    copy = tmp_path / "tok"
    shutil.copytree(teacher_path, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12345  # does not change the id mapping
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg, indent=4))
    assert tokenizer_fingerprint(copy) == fp
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # nor does the chat template
    cfg["eos_token"] = "<|endoftext|>"  # nor which token ends a turn
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg, indent=4))
    assert tokenizer_fingerprint(copy) == fp
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"  # a different special token
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    assert tokenizer_fingerprint(copy) != fp
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tokenizer_fingerprint(tmp_path / "empty")


# ----------------------------------------------------------------------------- vLLM flat logprobs -> result

def _fake_flat(token_ids, logprobs_T_V, width):
    """vLLM FlatLogprobs layout: entry 0 None; entry p = [given token, top-(width-1) sorted]."""
    flat = types.SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[])
    for p in range(1, len(token_ids)):
        row = logprobs_T_V[p - 1]
        order = np.argsort(-row, kind="stable")[:width - 1]
        flat.start_indices.append(len(flat.logprobs))
        flat.token_ids += [token_ids[p], *order.tolist()]
        flat.logprobs += [float(row[token_ids[p]]), *row[order].tolist()]
        flat.end_indices.append(len(flat.logprobs))
    return flat


@pytest.mark.parametrize("top_k,temperature", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 3.0)])
def test_prompt_logprobs_to_result(top_k, temperature):
    rng = np.random.default_rng(0)
    vocab, n, start = 11, 9, 4
    ids = rng.integers(0, vocab, n).tolist()
    logits = rng.normal(size=(n - 1, vocab)) * 3
    raw = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    width = vocab + 1 if temperature != 1.0 else top_k + 1  # what engine.py asks vLLM for
    res = prompt_logprobs_to_result(_fake_flat(ids, raw, width), ids, start, top_k, temperature)
    ref = logits / temperature
    ref = ref - np.log(np.exp(ref).sum(1, keepdims=True))
    ref = ref[start - 1:]
    np.testing.assert_allclose(res.logprobs, ref[np.arange(n - start), ids[start:]], atol=1e-12)
    if top_k == 0:
        assert res.top_ids is None and res.top_logprobs is None
    else:
        want_ids = np.argsort(-ref, axis=1, kind="stable")[:, :top_k]
        assert res.top_ids == want_ids.tolist()
        np.testing.assert_allclose(res.top_logprobs, np.take_along_axis(ref, want_ids, 1), atol=1e-12)


def test_prompt_logprobs_layout_change_is_detected():
    ids = [1, 2, 3]
    flat = _fake_flat(ids, np.zeros((2, 5)), 1)
    flat.token_ids[0] = 4  # not the scored token first
    with pytest.raises(RuntimeError, match="layout"):
        prompt_logprobs_to_result(flat, ids, 1, 0, 1.0)
