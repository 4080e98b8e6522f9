"""A vLLM OpenAI server as the teacher (`teacher.backend=vllm|auto`), all real on
CPU: vLLM's own `python -m vllm.entrypoints.openai.api_server` on the tiny
teacher in float32 (tests/fixtures/vllm_server.py, up for this module only),
next to the session's teacher_server on the same model and dtype.

- the vllm backend returns the same logprobs and top-k as opd's server for the
  same tokens (1e-4), keeps per-sequence failure isolation (a bad sequence in a
  pack fails alone) and the tokenizer check (a swapped tokenizer is refused);
  what it cannot do is refused at start-up with an error naming teacher.url
  and teacher.backend (temperature != 1, top_k above --max-logprobs, a server
  of another kind, teacher sampling);
- one driver run trains against the vLLM server with teacher.backend=auto and
  a top-k loss: exit 0, finite KL metrics, the log names the backend found.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rollout.teacher_client import TeacherBackendError, TeacherClient, TokenizerMismatchError
from tests.e2e.test_cluster import run_demo
from tests.fixtures.models import edit_tokenizer

# Same model, float32 in both, the same vLLM engine code; the two servers run
# it with different thread counts (summation order), which moves float32
# logprobs by ~1e-6 on this model (ENVIRONMENT.md: vLLM vs transformers ~5e-7).
TOL = 1e-4


def random_sequences(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 48))
        out.append((rng.integers(0, vocab, length).tolist(), int(rng.integers(1, length))))
    return out


@pytest.fixture(scope="module")
def seqs(teacher_path):
    vocab = json.loads((Path(teacher_path) / "config.json").read_text())["vocab_size"]
    return random_sequences(12, vocab, seed=5)


def assert_same_scores(a, b, top_k: int) -> None:
    assert not a.errors and not b.errors, (a.errors, b.errors)
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert len(x) == len(y) and max(abs(p - q) for p, q in zip(x, y, strict=True)) < TOL
    if not top_k:
        assert a.top_ids is None and b.top_ids is None
        return
    for ids_a, ids_b, lps_a, lps_b in zip(a.top_ids, b.top_ids, a.top_logprobs, b.top_logprobs, strict=True):
        for ra, rb, la, lb in zip(ids_a, ids_b, lps_a, lps_b, strict=True):
            assert max(abs(p - q) for p, q in zip(la, lb, strict=True)) < TOL
            # Same ids in the same order, except where two are tied within TOL.
            assert all(i == j or abs(p - q) < TOL for i, j, p, q in zip(ra, rb, la, lb, strict=True)), (ra, rb)


def test_vllm_backend_scores_as_opds_server(teacher_server, vllm_teacher_server, student_path, seqs, tmp_path):
    with TeacherClient(teacher_server.url, api_key_file=teacher_server.api_key_file, backend="opd") as opd, \
         TeacherClient(vllm_teacher_server.url, api_key_file=vllm_teacher_server.api_key_file, backend="auto",
                       max_tokens_per_request=200) as vllm:
        assert vllm.server().backend == "vllm"
        assert vllm.describe().startswith("vLLM OpenAI server at ") and "vLLM 0.32" in vllm.describe()
        info = vllm.check_tokenizer(student_path)  # the tiny student shares the teacher's tokenizer
        assert info.max_model_len == 511
        for k in (0, 5):
            a, b = opd.score(seqs, top_k=k), vllm.score(seqs, top_k=k)
            assert_same_scores(a, b, k)
            assert b.metrics["teacher/requests"] > 1  # several packs of <= 200 tokens
        # A sequence the server refuses (an id outside its vocabulary) fails
        # alone; the pack around it is halved and resent, the rest is scored.
        bad = seqs[:3] + [([1, 2, 10**6, 3], 1)] + seqs[3:6]
        r = vllm.score(bad)
        assert r.failed_indices == [3] and r.logprobs[3] is None and "vocab" in r.errors[0][1].lower(), r.errors
        assert r.metrics["teacher/split_requests"] >= 1
        ref = opd.score(seqs[:6])
        assert max(abs(p - q) for x, y in zip(ref.logprobs, r.logprobs[:3] + r.logprobs[4:], strict=True)
                   for p, q in zip(x, y, strict=True)) < TOL
        with pytest.raises(TeacherBackendError, match="temperature 1 only"):
            vllm.score(seqs[:1], temperature=2.0)
        with pytest.raises(TeacherBackendError, match="needs opd's teacher_server"):
            vllm.generate([[1, 2, 3]], max_new_tokens=2)
        # A tokenizer that maps ids differently is refused, naming them.
        swapped = edit_tokenizer(student_path, tmp_path / "swapped", swap=("a", "b"))
        with pytest.raises(TokenizerMismatchError, match="map differently"):
            vllm.check_tokenizer(swapped)


def test_vllm_backend_refuses_at_start_up(teacher_server, vllm_teacher_server):
    """Each refusal names teacher.url and teacher.backend and says how to fix it."""
    v, o = vllm_teacher_server, teacher_server

    def server(url, key, **kw):
        with TeacherClient(url, api_key_file=key, unavailable_timeout_s=30, **kw) as c:
            return c.server()

    with pytest.raises(TeacherBackendError, match=r"teacher.top_k=21 .*--max-logprobs 21") as e:
        server(v.url, v.api_key_file, backend="vllm", top_k=21)
    assert f"teacher.url={v.url}" in str(e.value) and "teacher.backend=vllm" in str(e.value)
    with pytest.raises(TeacherBackendError, match="temperature 1 only.*teacher.temperature=1"):
        server(v.url, v.api_key_file, backend="auto", temperature=0.7)
    with pytest.raises(TeacherBackendError, match="answers as opd teacher_server: set teacher.backend=opd"):
        server(o.url, o.api_key_file, backend="vllm")
    with pytest.raises(TeacherBackendError, match="answers as vLLM OpenAI server: set teacher.backend=vllm"):
        server(v.url, v.api_key_file, backend="sglang")
    assert server(o.url, o.api_key_file, backend="auto").backend == "opd"


@pytest.mark.slow
def test_driver_trains_against_a_vllm_server(ray_session, vllm_teacher_server, tmp_path, capfd):
    """teacher.url = vLLM's OpenAI server, teacher.backend=auto, a top-k loss
    (the top-5 travel through prompt_logprobs)."""
    rows = run_demo(tmp_path / "vllm", vllm_teacher_server, 2,
                    ["teacher.backend=auto", "loss.kind=reverse_kl_topk", "teacher.top_k=5", "eval.every_steps=2"])
    out = capfd.readouterr().out
    assert f"[opd] teacher: vLLM OpenAI server at {vllm_teacher_server.url} (teacher.backend=auto): vLLM" in out
    steps = [r for r in rows if "teacher/reverse_kl" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["teacher/reverse_kl"]) and r["teacher/failed_sequences"] == 0
        assert math.isfinite(r["learner/loss"])
    evals = [r["eval/reverse_kl"] for r in rows if "eval/reverse_kl" in r]
    assert evals and all(math.isfinite(x) for x in evals)
