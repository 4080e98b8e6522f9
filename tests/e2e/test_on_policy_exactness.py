"""The estimator stays exact where the method says it is, everything real
on CPU:

- the learner's truncation (learner/logprobs.py, top-k / top-p) repeats
  vLLM's own sampler code on the same logits, and its log-probs equal a real
  vLLM sampler's processed logprobs of the tokens it sampled;
- a sync driver run at rollout.top_p=0.8 with rollout.top_k stays on-policy:
  learner/logprob_abs_diff < 1e-3 at every step (~5e-7 measured; with the
  learner scoring the untruncated distribution the same run logs 1.5-1.7);
- self-distillation through the driver is exact too (every advantage 0, the
  export equal to the init bit for bit): checked by the recipe's own test,
  tests/e2e/test_recipes.py::test_self_distill_runs_its_three_runs_through_the_driver.

    flock /tmp/opd-heavy.lock .venv/bin/python -m pytest tests/e2e/test_on_policy_exactness.py -q
"""

from __future__ import annotations

import math

import pytest
import ray
import torch

from tests.e2e.test_cluster import run_demo

PROMPTS = ["12+7=", [{"role": "user", "content": "What is 3*4?"}], [5, 40, 41, 42, 43]]


def _learner_logprobs(model, seq: list[int], start: int, temperature: float, top_k: int, top_p: float):
    """The learner's path: transformers logits -> completion_logprobs."""
    from learner.logprobs import completion_logprobs

    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits
    pos = torch.arange(start - 1, len(seq) - 1)[None]
    ids = torch.tensor(seq[start:])[None, :, None]
    return completion_logprobs(logits, pos, ids, temperature, top_k=top_k, top_p=top_p)[0, :, 0].tolist()


def test_truncation_repeats_vllm_sampler_ops():
    """float32 logits: the learner's mask, tie weights and log-probs against
    vLLM 0.32's own CPU top-k / top-p code (vllm/v1/sample/ops/
    topk_topp_sampler.py, what the samplers run) applied to the same logits,
    and the log_softmax of its masked logits (the processed logprobs)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_only, apply_top_k_top_p_pytorch

    from learner.logprobs import _scaled_rows, _truncation, gathered_logprobs

    g = torch.Generator().manual_seed(7)
    M, V = 48, 301
    logits = torch.randn(M, V, generator=g) * 4
    # Row 5: a top token and 20 tied ones (p = 0.27, then 0.036 each): the
    # nucleus boundary falls inside the ties, and top-k 20 lands on them.
    logits[5] = -20.0
    logits[5, 7] = 3.0
    logits[5, 100:120] = 1.0
    rows = torch.arange(M)
    for top_k, top_p, temperature in [(0, 0.8, 1.0), (20, 1.0, 0.7), (20, 0.8, 0.7), (3, 0.5, 1.3),
                                      (0, 0.95, 0.5)]:
        x = _scaled_rows(logits, rows, torch.float32, temperature)
        assert torch.equal(x, logits / torch.full((M, 1), temperature))  # vLLM's logits.div_(temp[:, None])
        k = torch.full((M,), top_k or V, dtype=torch.long)
        p = torch.full((M,), top_p, dtype=torch.float32)
        if top_p < 1.0:
            masked = apply_top_k_top_p_pytorch(x.clone(), k if top_k else None, p, allow_cpu_sync=True)
        else:
            masked = apply_top_k_only(x.clone(), k)
        kept = torch.isfinite(masked)
        tau, frac = _truncation(x, top_k, top_p)
        ties = x == tau[:, None]
        # Every token above the threshold is vLLM's, none below; of the tied
        # ones vLLM keeps (its sort order) as many as the weight says.
        assert torch.equal(kept & ~ties, x > tau[:, None])
        assert torch.equal((kept & ties).sum(-1).double(), (frac.double() * ties.sum(-1)).round())
        if top_p < 1.0:
            assert frac[5] < 1.0  # row 5 does put the boundary inside its ties
        ref = masked.log_softmax(-1)
        ids = torch.multinomial(ref.exp(), 1, generator=g)
        got = gathered_logprobs(logits, rows, ids, temperature, top_k=top_k, top_p=top_p)
        # Both float32: the same set and normaliser, summed in another order:
        # a few ulp of the largest tempered logit.
        tol = 4 * torch.finfo(torch.float32).eps * float(x.abs().max())
        assert (got - ref.gather(-1, ids)).abs().max() < tol


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.8), (0.7, 5, 1.0), (1.3, 20, 0.8)])
def test_learner_truncated_logprobs_equal_the_samplers(student_sampler, student_hf, temperature, top_k, top_p):
    """vLLM (float32, CPU) vs the learner's computation on transformers'
    float32 logits of the same weights: the two engines' log-softmax agree
    to ~5e-7, so the truncated log-probs agree within the 1e-4 that
    tests/e2e/test_sampler.py allows (seeded: the same tokens every run),
    while the untruncated ones are off by the log nucleus mass (> 1e-2)."""
    groups = ray.get(student_sampler.generate.remote(PROMPTS, n=4, temperature=temperature, top_k=top_k,
                                                     top_p=top_p, seed=17))
    worst, worst_untruncated, n = 0.0, 0.0, 0
    for group in groups:
        for c in group:
            seq, start = c.prompt_ids + c.completion_ids, len(c.prompt_ids)
            got = _learner_logprobs(student_hf, seq, start, temperature, top_k, top_p)
            full = _learner_logprobs(student_hf, seq, start, temperature, 0, 1.0)
            assert len(got) == len(c.sampler_logprobs)
            for a, b, f in zip(got, c.sampler_logprobs, full, strict=True):
                assert math.isfinite(a) and math.isfinite(b)
                worst = max(worst, abs(a - b))
                worst_untruncated = max(worst_untruncated, abs(f - b))
                n += 1
    assert n > 20
    assert worst < 1e-4, f"learner vs sampler truncated logprobs differ by {worst}"
    assert worst_untruncated > 1e-2, worst_untruncated


@pytest.mark.slow
def test_top_p_run_stays_on_policy(ray_session, teacher_server, tmp_path):
    """A sync run sampling with top-p 0.8 and top-k 20: the learner's
    log-probs of the sampled tokens equal the sampler's at every step, before
    and after weight pushes (float32 on both sides: ~5e-7 mean; scoring the
    untruncated distribution, the same run logged 1.5-1.7 and a mean ratio of
    ~0.2, the nucleus mass), so the importance ratio is 1 on-policy."""
    run_dir = tmp_path / "top_p"
    rows = run_demo(run_dir, teacher_server, 3,
                    ["rollout.top_p=0.8", "rollout.top_k=20", "eval.every_steps=0", "learner.lr=2e-3"])
    rows = [r for r in rows if "learner/logprob_abs_diff" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    diffs = [r["learner/logprob_abs_diff"] for r in rows]
    assert max(diffs) < 1e-3, diffs
    assert all(abs(r["learner/ratio_mean"] - 1.0) < 1e-3 for r in rows), rows
    assert all(r["learner/grad_norm"] > 0 for r in rows)  # it trains (the policy moves between steps)
