"""The task reward in the loss, against naive float64
references: the group baseline and advantage (cluster/task_fns.py
`group_advantages`), and reverse_kl's value and gradient with the reward
advantage added (learner/losses.py), from raw rewards to the gradient; the
reward stage of the driver (cluster/stages.py `reward_completions`) and the
chunk merge of its metrics.

    .venv/bin/python -m pytest tests/unit/test_reward.py -q
"""

from __future__ import annotations

import math
import random
import statistics
import types
from fractions import Fraction

import pytest
import torch

from cluster.loop import merge_chunk_metrics
from cluster.task_fns import TaskFunctionError, group_advantages
from learner import losses

B, T_MAX = 6, 8


def _cfg(**kw):
    base = dict(kind="reverse_kl", kl_coef=1.0, discount=0.0, ratio_cap=2.0, normalize="token", jsd_beta=0.5,
                topk_tail="bucket")
    base.update(kw)
    return types.SimpleNamespace(**base)


# --------------------------------------------------------------- the baseline

def _naive_group_advantages(rewards, groups, coef):
    """Exact rational arithmetic: coef * (R_i - mean of i's group)."""
    out = []
    for r, g in zip(rewards, groups):
        members = [Fraction(x) for x, h in zip(rewards, groups) if h == g]
        out.append(Fraction(coef) * (Fraction(r) - sum(members) / len(members)))
    return out


@pytest.mark.parametrize("coef", [1.0, 0.3, -2.0])
def test_group_advantages_match_exact_reference(coef):
    rng = random.Random(7)
    # Ragged groups (a prompt whose samples were partly dropped has fewer),
    # interleaved, one singleton group (its advantage is exactly 0).
    groups = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 1, 0]
    rewards = [rng.uniform(-5.0, 5.0) for _ in groups]
    got = group_advantages(rewards, groups, coef)
    ref = _naive_group_advantages(rewards, groups, coef)
    # Each mean sums at most 5 values of magnitude <= 5: the float error is a
    # few ulps of 5 * |coef| * 5, far below 1e-13.
    for g, r in zip(got, ref, strict=True):
        assert abs(Fraction(g) - r) < 1e-13
    assert got[6] == 0.0  # a lone sample is its own baseline
    # Advantages of a group sum to 0 (the baseline is the group mean).
    for grp in set(groups):
        assert abs(sum(a for a, h in zip(got, groups) if h == grp)) < 1e-13


def test_group_advantages_are_zero_for_equal_rewards_and_scale_with_coef():
    assert group_advantages([0.5, 0.5, 0.5], [4, 4, 4], 3.0) == [0.0, 0.0, 0.0]
    assert group_advantages([1.0, 0.0], [0, 0], 2.0) == [1.0, -1.0]


# ------------------------------------------------------- the loss with reward

def _inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T_MAX, 5, 1, 0, 7, 3])
    mask = (torch.arange(T_MAX)[None, :] < lengths[:, None]).to(dtype)
    mask[1, 2] = 0.0  # a hole inside a row
    sampler = -torch.rand(B, T_MAX, generator=gen, dtype=torch.float64) * 3
    learner = sampler + 0.8 * torch.randn(B, T_MAX, generator=gen, dtype=torch.float64)  # some ratios > cap
    teacher = -torch.rand(B, T_MAX, generator=gen, dtype=torch.float64) * 3
    learner[mask == 0] = 50.0  # garbage at padding must not leak
    rewards = [float(x) for x in torch.rand(B, generator=gen, dtype=torch.float64)]
    return [x.to(dtype) for x in (learner, sampler, teacher, mask)], rewards


def _naive_loss_and_grad(learner, sampler, teacher, mask, rewards, groups, *, kl_coef, reward_coef, gamma, cap,
                         normalize):
    """Token by token in Python floats, from the raw rewards: the group
    baseline, the discounted KL advantage plus the undiscounted reward
    advantage, the truncated importance weight, the normalisation."""
    rows = [[t for t in range(T_MAX) if float(mask[b, t]) > 0] for b in range(B)]
    denom = (sum(len(r) for r in rows) if normalize == "token" else sum(1 for r in rows if r))
    reward_adv = [float(a) for a in _naive_group_advantages(rewards, groups, reward_coef)]
    total, grad = 0.0, torch.zeros(B, T_MAX, dtype=torch.float64)
    for b in range(B):
        idx = rows[b]
        a = {t: -kl_coef * (float(sampler[b, t]) - float(teacher[b, t])) for t in idx}
        row_sum = 0.0
        for t in idx:
            adv = sum(gamma ** (s - t) * a[s] for s in idx if s >= t) if gamma > 0 else a[t]
            adv += reward_adv[b]
            w = min(math.exp(float(learner[b, t]) - float(sampler[b, t])), cap)
            row_sum += -w * adv
            scale = 1.0 / denom if normalize == "token" else 1.0 / (len(idx) * denom)
            grad[b, t] = -w * adv * scale
        if idx:
            total += row_sum if normalize == "token" else row_sum / len(idx)
    return total / denom, grad


# float64: a few hundred operations on values of order 10 -> ~1e-13 of the
# scale; float32: ~1e-6 per term, summed over ~30 tokens.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("gamma", [0.0, 0.6])
@pytest.mark.parametrize("kl_coef,reward_coef", [(1.0, 0.5), (0.0, 1.0), (0.7, -1.3)])
def test_reverse_kl_with_reward_matches_float64_reference(dtype, normalize, gamma, kl_coef, reward_coef):
    (learner, sampler, teacher, mask), rewards = _inputs(dtype, seed=11)
    groups = [0, 0, 1, 1, 1, 0]  # two prompts, samples interleaved
    # What the driver computes (stages.reward_completions) and the worker
    # broadcasts over each row's tokens.
    adv_B = group_advantages(rewards, groups, reward_coef)
    reward_adv_B_T = torch.tensor(adv_B, dtype=dtype)[:, None].expand(B, T_MAX)
    learner.requires_grad_(True)
    cfg = _cfg(normalize=normalize, discount=gamma, kl_coef=kl_coef, ratio_cap=1.5)
    denom = losses.loss_denominator(mask, normalize)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=learner, sampler_lp_B_T=sampler, teacher_lp_B_T=teacher,
                               reward_advantage_B_T=reward_adv_B_T)
    loss, extras = losses.compute_loss(inputs, cfg, denom)
    loss.backward()
    ref_loss, ref_grad = _naive_loss_and_grad(learner.detach().double(), sampler.double(), teacher.double(), mask,
                                              rewards, groups, kl_coef=kl_coef, reward_coef=reward_coef,
                                              gamma=gamma, cap=1.5, normalize=normalize)
    scale = float(ref_grad.abs().max())
    assert abs(float(loss.detach()) - ref_loss) <= TOL[dtype] * max(scale * mask.sum().item(), 1.0)
    assert float((learner.grad.double() - ref_grad).abs().max()) <= TOL[dtype] * scale
    assert (learner.grad[mask == 0] == 0).all()
    assert bool(extras["truncated"][mask > 0].any())  # the cap is exercised
    # The reward term is not discounted: at the last token of a row the
    # advantage is the KL term of that token plus the row's reward advantage.
    b, t = 0, T_MAX - 1
    want = -kl_coef * (float(sampler[b, t]) - float(teacher[b, t])) + adv_B[b]
    assert abs(float(extras["advantage"][b, t]) - want) < 1e-5
    # Masked tokens (padding, holes) get no reward advantage.
    _, plain = losses.reverse_kl(learner.detach(), sampler, teacher, mask, kl_coef=kl_coef, discount=gamma,
                                 ratio_cap=1.5)
    assert torch.equal(extras["advantage"][mask == 0], plain["advantage"][mask == 0])


def test_zero_reward_advantage_is_bitwise_the_distillation_loss():
    """reward.coef = 0 sends no reward (None); and a reward advantage of
    exactly 0 changes nothing either: x + 0.0 == x in IEEE arithmetic."""
    (learner, sampler, teacher, mask), _ = _inputs(torch.float32, seed=5)
    cfg = _cfg(discount=0.5)
    denom = losses.loss_denominator(mask, "token")
    outs = []
    for reward in (None, torch.zeros(B, T_MAX)):
        lp = learner.clone().requires_grad_(True)
        inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=lp, sampler_lp_B_T=sampler, teacher_lp_B_T=teacher,
                                   reward_advantage_B_T=reward)
        loss, _ = losses.compute_loss(inputs, cfg, denom)
        loss.backward()
        outs.append((loss.detach(), lp.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_plain_rl_on_policy_gradient_is_the_advantage():
    """kl_coef = 0, learner == sampler (r = 1): d loss / d lp_t = -(R - b) / tokens."""
    (_, sampler, teacher, mask), rewards = _inputs(torch.float64, seed=2)
    groups = [0, 1, 0, 1, 0, 1]
    adv = group_advantages(rewards, groups, 1.0)
    lp = sampler.clone().requires_grad_(True)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=lp, sampler_lp_B_T=sampler, teacher_lp_B_T=teacher,
                               reward_advantage_B_T=torch.tensor(adv, dtype=torch.float64)[:, None].expand(B, T_MAX))
    loss, _ = losses.compute_loss(inputs, _cfg(kl_coef=0.0), float(mask.sum()))
    loss.backward()
    want = -torch.tensor(adv, dtype=torch.float64)[:, None] * mask / mask.sum()
    torch.testing.assert_close(lp.grad, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["sft", "forward_kl_topk"])
def test_reward_advantage_with_another_loss_is_refused(kind):
    (learner, sampler, teacher, mask), _ = _inputs(torch.float32, seed=1)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=learner, sampler_lp_B_T=sampler, teacher_lp_B_T=teacher,
                               reward_advantage_B_T=torch.zeros(B, T_MAX))
    with pytest.raises(ValueError, match="reverse_kl"):
        losses.compute_loss(inputs, _cfg(kind=kind), 1.0)


# ----------------------------------------------------- the driver's reward stage

class _Tok:
    """Decodes token id i as the character chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _comps_and_records(texts_per_prompt):
    from rollout.prompts import PromptRecord
    from rollout.types import Completion

    recs, comps = [], []
    for p, texts in enumerate(texts_per_prompt):
        recs.append(PromptRecord(index=100 + p, prompt_ids=[1], text=f"q{p}", answer=str(p),
                                 where=f"f.jsonl line {p + 1}"))
        for s, text in enumerate(texts):
            comps.append(Completion(prompt_index=p, sample_index=s, prompt_ids=[1],
                                    completion_ids=[ord(c) for c in text], sampler_logprobs=[-1.0] * len(text),
                                    finish_reason="stop", policy_version=0))
    return comps, recs


def test_reward_stage_scores_every_completion_with_the_group_baseline():
    from cluster.config import RewardConfig
    from cluster.stages import reward_completions

    comps, recs = _comps_and_records([["12", "ab", "1b"], ["", "9999"]])
    rewards, adv, m = reward_completions(comps, recs, RewardConfig(fn="tests.fixtures.user_task:digit_fraction",
                                                                   coef=2.0), _Tok())
    assert rewards == [1.0, 0.0, 0.5, 0.0, 1.0]
    assert adv == pytest.approx([2 * (1.0 - 0.5), 2 * (0.0 - 0.5), 0.0, 2 * (0.0 - 0.5), 2 * (1.0 - 0.5)], abs=1e-15)
    assert m["reward/mean"] == pytest.approx(statistics.fmean(rewards), abs=1e-15)
    assert m["reward/std"] == pytest.approx(statistics.pstdev(rewards), abs=1e-15)
    # coef 0: the reward is logged, nothing reaches the loss.
    rewards0, adv0, m0 = reward_completions(comps, recs, RewardConfig(fn="tests.fixtures.user_task:digit_fraction"),
                                            _Tok())
    assert rewards0 == rewards and adv0 is None and m0["reward/mean"] == m["reward/mean"]


def test_reward_stage_names_the_function_and_the_record_on_failure():
    from cluster.config import RewardConfig
    from cluster.stages import reward_completions

    comps, recs = _comps_and_records([["1"], ["2"]])
    with pytest.raises(TaskFunctionError) as ei:
        reward_completions(comps, recs, RewardConfig(fn="tests.fixtures.user_task:returns_text"), _Tok())
    msg = str(ei.value)
    assert "reward.fn 'tests.fixtures.user_task:returns_text'" in msg and "f.jsonl line 1" in msg
    assert "'correct'" in msg and "finite number" in msg


def test_chunk_merge_pools_the_reward_std():
    """reward/std merged over chunks is the std of all the step's rewards."""
    chunks = [[0.1, 0.9, 0.4], [1.0, 0.0, 0.2, 0.3, 0.8]]
    parts = [{"rollout/completions": len(c), "reward/mean": statistics.fmean(c), "reward/std": statistics.pstdev(c)}
             for c in chunks]
    m = merge_chunk_metrics(parts)
    allv = [x for c in chunks for x in c]
    assert m["reward/mean"] == pytest.approx(statistics.fmean(allv), abs=1e-15)
    assert m["reward/std"] == pytest.approx(statistics.pstdev(allv), abs=1e-14)
    assert m["rollout/completions"] == 8
