"""The teacher backend adapters (rollout/teacher_backends.py) on recorded real
replies of the installed vLLM's OpenAI server (tests/fixtures/teacher_responses/,
recorded by `python -m tests.fixtures.record_vllm_responses`), and the SGLang
adapter on replies shaped as SGLang's source builds them (no SGLang server runs
here). The recorded replies are fixtures of the parser, not proof of the
feature: tests/e2e/test_teacher_backends.py scores through a live vLLM server.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import msgspec
import pytest

from rollout import teacher_backends as TB
from rollout.config import TeacherConfig
from rollout.teacher_client import TeacherBackendError
from teacher_server import protocol as P

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "teacher_responses"
# vLLM (float32 weights, float32 log_softmax) against transformers in float32
# weights with a float64 log_softmax: both do the same float32 matmuls, in a
# different order; the recorded difference is ~1e-6 (ENVIRONMENT.md: ~5e-7).
TOL = 1e-4


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"vllm_{name}.json").read_text())


def reply_bytes(doc: dict) -> bytes:
    return json.dumps(doc["response"]).encode()


@pytest.fixture(scope="module")
def ref():
    doc = json.loads((FIXTURES / "vllm_reference.json").read_text())
    doc["seqs"] = [(s["token_ids"], s["start"]) for s in doc["sequences"]]
    return doc


@pytest.fixture(scope="module")
def model() -> str:
    return load("models")["response"]["data"][0]["id"]


def test_fixtures_are_what_the_adapter_sends(ref, model):
    """The recorded requests are the adapter's own bodies (rerun the recorder
    after changing VllmBackend.score_body)."""
    adapter = TB.VllmBackend(model)
    for k in (ref["top_k"], 0):
        doc = load(f"score_top{k}")
        assert doc["vllm_version"] == load("version")["response"]["version"]
        assert doc["request"]["path"] == adapter.path
        assert doc["request"]["body"] == msgspec.json.decode(adapter.score_body(ref["seqs"], k, 1.0))


@pytest.mark.parametrize("top_k", [5, 0])
def test_vllm_reply_parses_to_the_reference(ref, model, top_k):
    doc = load(f"score_top{top_k}")
    assert doc["status"] == 200
    got = TB.VllmBackend(model).parse_score(reply_bytes(doc), P.CONTENT_TYPE_JSON, ref["seqs"], top_k)
    assert len(got) == len(ref["seqs"])
    for r, want, (ids, start) in zip(got, ref["results"], ref["seqs"], strict=True):
        assert isinstance(r, P.SequenceLogprobs), r
        # Positions before `start` are skipped: one logprob per scored token.
        assert len(r.logprobs) == len(ids) - start
        assert max(abs(a - b) for a, b in zip(r.logprobs, want["logprobs"], strict=True)) < TOL
        if top_k == 0:
            assert r.top_ids is None and r.top_logprobs is None
            continue
        assert r.top_ids == [row[:top_k] for row in want["top_ids"]]
        for row, want_row in zip(r.top_logprobs, want["top_logprobs"], strict=True):
            assert row == sorted(row, reverse=True)  # most likely first, as opd's server
            assert max(abs(a - b) for a, b in zip(row, want_row, strict=True)) < TOL


def test_vllm_given_token_inside_and_outside_the_top_k(ref, model):
    """The recorded reply has both layouts of a position's dict: the given token
    outside the top-K (K + 1 entries, its logprob still there) and inside it (K
    entries, its key first with its top-K rank); both parse to the reference."""
    doc = load("score_top5")
    sizes = {len(entry) for c, (ids, start) in zip(doc["response"]["choices"], ref["seqs"], strict=True)
             for entry in c["prompt_logprobs"][start:]}
    assert sizes == {5, 6}, sizes
    got = TB.VllmBackend(model).parse_score(reply_bytes(doc), P.CONTENT_TYPE_JSON, ref["seqs"], 5)
    for r, (ids, start) in zip(got, ref["seqs"], strict=True):
        for j, t in enumerate(ids[start:]):
            if t in r.top_ids[j]:
                assert r.top_logprobs[j][r.top_ids[j].index(t)] == r.logprobs[j]


def test_vllm_reply_that_does_not_fit_fails_the_sequence_not_the_pack(ref, model):
    doc = load("score_top0")
    reply = json.loads(json.dumps(doc["response"]))
    ids, start = ref["seqs"][1]
    del reply["choices"][1]["prompt_logprobs"][start][str(ids[start])]  # the given token's logprob missing
    reply["choices"][2]["prompt_token_ids"][3] += 1  # the server scored another id
    got = TB.VllmBackend(model).parse_score(json.dumps(reply).encode(), P.CONTENT_TYPE_JSON, ref["seqs"], 0)
    assert isinstance(got[0], P.SequenceLogprobs)
    assert "lack the given token" in got[1]
    assert "other token ids than sent" in got[2]
    with pytest.raises(TB.ReplyError, match="expected 2 choices"):
        TB.VllmBackend(model).parse_score(reply_bytes(doc), P.CONTENT_TYPE_JSON, ref["seqs"][:2], 0)


def test_vllm_error_replies():
    """vLLM's 400 bodies ({"error": {"message", "type", "param", "code"}}) read
    as the protocol's errors; the one for top_k above --max-logprobs is
    recognised, the one for an id outside the vocabulary is not."""
    top = load("error_top_k_above_max")
    assert top["status"] == 400
    err = P.ProtocolError.from_body(400, reply_bytes(top), P.CONTENT_TYPE_JSON)
    assert err.type == "BadRequestError" and "max allowed: 20" in err.message
    assert TB.vllm_max_logprobs_refusal(err.message)
    oov = load("error_out_of_vocab")
    assert oov["status"] == 400
    err = P.ProtocolError.from_body(400, reply_bytes(oov), P.CONTENT_TYPE_JSON)
    assert err.field is None  # the prompt is not named: the client bisects the pack
    assert not TB.vllm_max_logprobs_refusal(err.message)
    assert TB.VllmBackend.bisect_unnamed_400 and not TB.OpdBackend.bisect_unnamed_400


def test_probe_identifies_vllm_and_nothing_else():
    models = load("models")
    info = TB.identify("vllm", "/v1/models", reply_bytes(models), P.CONTENT_TYPE_JSON)
    assert info.backend == "vllm" and info.model == models["response"]["data"][0]["id"]
    assert info.max_model_len == 512 - 1  # one token is sampled after a scored prompt
    assert TB.identify("opd", "/v1/models", reply_bytes(models), P.CONTENT_TYPE_JSON) is None
    assert TB.identify("sglang", "/v1/models", reply_bytes(models), P.CONTENT_TYPE_JSON) is None
    assert load("opd_probe_path")["status"] == 404  # vLLM answers opd's probe path with 404
    opd = P.ModelInfo(model="t", vocab_size=320, max_model_len=511, dtype="float32", tokenizer_sha256="ab",
                      max_top_k=20)
    got = TB.identify("opd", "/v1/model", P.encode(opd), P.CONTENT_TYPE_JSON)
    assert got.backend == "opd" and got.opd_info == opd and got.model_info(5) == opd
    assert TB.identify("vllm", "/v1/models", P.encode(opd), P.CONTENT_TYPE_JSON) is None
    sgl = json.dumps({"model_path": "/m", "tokenizer_path": "/m", "is_generation": True}).encode()
    assert TB.identify("sglang", "/model_info", sgl, P.CONTENT_TYPE_JSON).backend == "sglang"
    assert TB.identify("vllm", "/model_info", sgl, P.CONTENT_TYPE_JSON) is None


@pytest.fixture(scope="module")
def student_tok():
    from cluster.tiny_models import build_model

    return P.load_tokenizer_info(build_model("student"))


def tokenize_replies():
    doc = json.loads((FIXTURES / "vllm_tokenize.json").read_text())
    return [(p["text"], p["add_special_tokens"], p["response"]) for p in doc["probes"]]


def test_tokenizer_probe_accepts_the_same_tokenizer(student_tok):
    assert TB.tokenizer_probe_differences(student_tok, tokenize_replies()) == []


def test_tokenizer_probe_names_ids_that_differ(student_tok):
    vocab = dict(student_tok.vocab)
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # a student whose tokenizer swaps two ids
    swapped = P.TokenizerInfo(vocab=vocab, prefix_ids=student_tok.prefix_ids, suffix_ids=student_tok.suffix_ids)
    diffs = TB.tokenizer_probe_differences(swapped, tokenize_replies())
    assert len(diffs) == 1 and "2 token ids" in diffs[0] and "'a'" in diffs[0], diffs
    bos = P.TokenizerInfo(vocab=student_tok.vocab, prefix_ids=[0], suffix_ids=[])
    diffs = TB.tokenizer_probe_differences(bos, tokenize_replies())
    assert len(diffs) == 1 and "adds ids [] before" in diffs[0], diffs


def sglang_reply(ref, top_k: int) -> list[dict]:
    """What SGLang's /generate returns for the reference sequences with
    logprob_start_len = start - 1 (see TB.SglangBackend): entries from token
    start - 1 on, the first one's logprob null."""
    out = []
    for (ids, start), r in zip(ref["seqs"], ref["results"], strict=True):
        tok = [[None, ids[start - 1], None]] + [[lp, t, None] for lp, t in zip(r["logprobs"], ids[start:],
                                                                               strict=True)]
        meta = {"input_token_logprobs": tok, "output_token_logprobs": [], "prompt_tokens": len(ids)}
        if top_k:
            meta["input_top_logprobs"] = [None] + [[[lp, t, None] for lp, t in zip(lps[:top_k], tids[:top_k],
                                                                                   strict=True)]
                                                   for lps, tids in zip(r["top_logprobs"], r["top_ids"],
                                                                        strict=True)]
        out.append({"text": "", "meta_info": meta})
    return out


@pytest.mark.parametrize("top_k", [3, 0])
def test_sglang_parser_on_replies_shaped_as_sglangs_source(ref, top_k):
    adapter = TB.SglangBackend()
    body = msgspec.json.decode(adapter.score_body(ref["seqs"], top_k, 1.0))
    assert body["logprob_start_len"] == [s - 1 for _, s in ref["seqs"]] and body["return_logprob"]
    assert body["top_logprobs_num"] == top_k and body["input_ids"] == [ids for ids, _ in ref["seqs"]]
    got = adapter.parse_score(json.dumps(sglang_reply(ref, top_k)).encode(), P.CONTENT_TYPE_JSON, ref["seqs"], top_k)
    for r, want in zip(got, ref["results"], strict=True):
        assert r.logprobs == want["logprobs"]
        if top_k:
            assert r.top_ids == [row[:top_k] for row in want["top_ids"]]
        else:
            assert r.top_ids is None
    bad = sglang_reply(ref, 0)
    bad[1]["meta_info"]["input_token_logprobs"][2][1] += 1
    bad[2]["meta_info"]["input_token_logprobs"].pop()
    got = adapter.parse_score(json.dumps(bad).encode(), P.CONTENT_TYPE_JSON, ref["seqs"], 0)
    assert isinstance(got[0], P.SequenceLogprobs) and "not the sent" in got[1] and "input_token_logprobs" in got[2]


def test_backends_without_temperature_refuse_it(ref, model):
    for adapter in (TB.VllmBackend(model), TB.SglangBackend()):
        assert not adapter.applies_temperature
        with pytest.raises(ValueError, match="temperature 1"):
            adapter.score_body(ref["seqs"], 0, 2.0)
    assert TB.OpdBackend().applies_temperature


def test_logits_are_not_taken_for_logprobs(ref, model):
    real = TB.VllmBackend(model).parse_score(reply_bytes(load("score_top5")), P.CONTENT_TYPE_JSON, ref["seqs"], 5)
    assert not TB.logits_not_logprobs(real)
    # --logprobs-mode raw_logits: the same fields hold logits (shift-invariant, so add a constant).
    shifted = [P.SequenceLogprobs(logprobs=[x + 3.0 for x in r.logprobs], top_ids=r.top_ids,
                                  top_logprobs=[[x + 3.0 for x in row] for row in r.top_logprobs]) for r in real]
    assert TB.logits_not_logprobs(shifted)
    assert math.isclose(sum(math.exp(x) for x in real[0].top_logprobs[0]), 1.0) is False  # top-5 < all mass


def test_backend_config_problems():
    assert TeacherConfig(backend="vllm", url="http://h:1").problems() == []
    assert any("needs teacher.url" in p or "needs TeacherConfig.url" in p
               for p in TeacherConfig(backend="sglang").problems())
    assert any("temperature 1 only" in p for p in TeacherConfig(backend="vllm", url="http://h:1",
                                                                temperature=2.0).problems())
    assert TeacherConfig(backend="opd", url="http://h:1", temperature=2.0).problems() == []


def test_backend_error_pickles():
    e = TeacherBackendError("http://h:1", "auto", "the server does not answer")
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and "teacher.url=http://h:1" in str(e) and "teacher.backend=auto" in str(e)
