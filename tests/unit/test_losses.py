"""learner/losses.py against naive float64 references (Python loops over
sequences, tokens and categories), values and gradients, on random ragged
batches with masks.

    .venv/bin/python -m pytest tests/unit/test_losses.py -q
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from learner import losses

B, T_MAX, V, K = 5, 9, 23, 6


def _cfg(**kw):
    base = dict(kind="reverse_kl", kl_coef=1.0, discount=0.0, ratio_cap=2.0, normalize="token", jsd_beta=0.5,
                topk_tail="renormalize")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _ragged_mask(gen, dtype=torch.float64):
    """Ragged lengths (one row empty) plus a few masked holes inside rows."""
    lengths = torch.tensor([T_MAX, 4, 1, 0, 7])
    mask = (torch.arange(T_MAX)[None, :] < lengths[:, None]).to(dtype)
    holes = torch.rand(B, T_MAX, generator=gen) < 0.15
    mask[holes] = 0.0
    mask[0, 0] = 1.0
    return mask, lengths


def _sampled_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask, _ = _ragged_mask(gen, dtype)
    sampler = -torch.rand(B, T_MAX, generator=gen, dtype=torch.float64) * 3
    learner = sampler + 0.8 * torch.randn(B, T_MAX, generator=gen, dtype=torch.float64)  # some ratios > cap
    teacher = -torch.rand(B, T_MAX, generator=gen, dtype=torch.float64) * 3
    # Garbage at padding must not leak into the loss.
    pad = mask == 0
    learner[pad] = 50.0
    return [x.to(dtype) for x in (learner, sampler, teacher, mask)]


def _denominator(mask, normalize):
    if normalize == "token":
        return sum(float(mask[b, t]) for b in range(B) for t in range(T_MAX))
    return sum(1.0 for b in range(B) if sum(float(mask[b, t]) for t in range(T_MAX)) > 0)


def _naive_reduce(per_token, mask, normalize):
    """per_token: nested list [b][t] of floats."""
    denom = _denominator(mask, normalize)
    total = 0.0
    for b in range(B):
        idx = [t for t in range(T_MAX) if mask[b, t] > 0]
        if not idx:
            continue
        s = sum(per_token[b][t] for t in idx)
        total += s if normalize == "token" else s / len(idx)
    return total / denom


def _naive_reverse_kl(learner, sampler, teacher, mask, coef, gamma, cap, normalize):
    """(loss, dloss/dlearner) computed token by token in Python floats."""
    denom = _denominator(mask, normalize)
    loss_tok = [[0.0] * T_MAX for _ in range(B)]
    grad = torch.zeros(B, T_MAX, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(T_MAX) if mask[b, t] > 0]
        a = {t: -coef * (float(sampler[b, t]) - float(teacher[b, t])) for t in idx}
        for t in idx:
            adv = sum(gamma ** (s - t) * a[s] for s in idx if s >= t) if gamma > 0 else a[t]
            r = math.exp(float(learner[b, t]) - float(sampler[b, t]))
            w = min(r, cap)
            loss_tok[b][t] = -w * adv
            scale = 1.0 / denom if normalize == "token" else 1.0 / (len(idx) * denom)
            grad[b, t] = -w * adv * scale
    return _naive_reduce(loss_tok, mask, normalize), grad


def _rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))


TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0])
def test_reverse_kl_value_and_gradient(dtype, normalize, gamma):
    learner, sampler, teacher, mask = _sampled_inputs(dtype)
    learner.requires_grad_(True)
    cfg = _cfg(normalize=normalize, discount=gamma, kl_coef=0.7, ratio_cap=1.5)
    denom = losses.loss_denominator(mask, normalize)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=learner, sampler_lp_B_T=sampler, teacher_lp_B_T=teacher)
    loss, extras = losses.compute_loss(inputs, cfg, denom)
    loss.backward()
    ref_loss, ref_grad = _naive_reverse_kl(learner.detach().double(), sampler.double(), teacher.double(),
                                           mask, 0.7, gamma, 1.5, normalize)
    assert _rel_err(loss.detach(), ref_loss) < TOL[dtype]
    assert _rel_err(learner.grad, ref_grad) < TOL[dtype]
    assert torch.isfinite(learner.grad).all()
    assert (learner.grad[mask == 0] == 0).all()
    # The inputs do exercise truncation (otherwise the cap would be untested).
    assert bool(extras["truncated"][mask > 0].any())


def test_reverse_kl_ratio_truncation():
    """Ratio above the cap: the value uses the cap and the token still trains
    with weight cap (truncated IS), below the cap the plain ratio is used."""
    sampler = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    learner = torch.tensor([[-1.0 + math.log(3.0), -1.0 + math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-0.5, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss_B_T, extras = losses.reverse_kl(learner, sampler, teacher, mask, kl_coef=1.0, discount=0.0, ratio_cap=2.0)
    adv = torch.tensor([[0.5, -1.0]], dtype=torch.float64)  # -(lp_s - lp_t)
    torch.testing.assert_close(extras["advantage"], adv)
    torch.testing.assert_close(extras["ratio"], torch.tensor([[3.0, 0.5]], dtype=torch.float64))
    assert extras["truncated"].tolist() == [[True, False]]
    torch.testing.assert_close(loss_B_T.detach(), torch.tensor([[-2.0 * 0.5, -0.5 * -1.0]], dtype=torch.float64))
    loss_B_T.sum().backward()
    torch.testing.assert_close(learner.grad, torch.tensor([[-2.0 * 0.5, -0.5 * -1.0]], dtype=torch.float64))


def test_reverse_kl_on_policy_value_is_sampled_kl():
    """With learner == sampler (r = 1) the loss equals coef * mean(lp_s - lp_t)."""
    _, sampler, teacher, mask = _sampled_inputs(torch.float64, seed=3)
    cfg = _cfg(kl_coef=1.0)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=sampler.clone(), sampler_lp_B_T=sampler,
                               teacher_lp_B_T=teacher)
    loss, _ = losses.compute_loss(inputs, cfg, losses.loss_denominator(mask, "token"))
    kl = float(((sampler - teacher) * mask).sum() / mask.sum())
    assert abs(float(loss) - kl) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_sft_value_and_gradient(dtype, normalize):
    learner, _, _, mask = _sampled_inputs(dtype, seed=1)
    learner.requires_grad_(True)
    cfg = _cfg(kind="sft", normalize=normalize)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=learner, sampler_lp_B_T=torch.zeros_like(learner))
    loss, _ = losses.compute_loss(inputs, cfg, losses.loss_denominator(mask, normalize))
    loss.backward()
    lp = learner.detach().double()
    ref = _naive_reduce([[-float(lp[b, t]) for t in range(T_MAX)] for b in range(B)], mask, normalize)
    denom = _denominator(mask, normalize)
    ref_grad = torch.zeros(B, T_MAX, dtype=torch.float64)
    for b in range(B):
        n = float(mask[b].sum())
        for t in range(T_MAX):
            if mask[b, t] > 0:
                ref_grad[b, t] = -1.0 / denom if normalize == "token" else -1.0 / (n * denom)
    assert _rel_err(loss.detach(), ref) < TOL[dtype]
    assert _rel_err(learner.grad, ref_grad) < TOL[dtype]


# -------------------------------------------------------------- top-k losses

def _topk_inputs(dtype, seed=0):
    """Student logits (B, T, V) (the leaf we differentiate), the teacher's
    top-k ids and full-distribution logprobs there, a ragged mask."""
    gen = torch.Generator().manual_seed(seed)
    mask, _ = _ragged_mask(gen, dtype)
    s_logits = (2 * torch.randn(B, T_MAX, V, generator=gen, dtype=torch.float64)).to(dtype)
    t_lp = torch.log_softmax(2 * torch.randn(B, T_MAX, V, generator=gen, dtype=torch.float64), dim=-1)
    t_top_lp, t_top_ids = t_lp.topk(K, dim=-1)
    return s_logits, t_top_ids, t_top_lp.to(dtype), mask


def _naive_categories(s_logits_row, ids, t_top_lp_row, tail):
    """Python floats: teacher and student probabilities over the categories."""
    s = [float(x) for x in s_logits_row]
    z = math.log(sum(math.exp(x) for x in s))
    q_full = [math.exp(x - z) for x in s]
    q = [q_full[int(i)] for i in ids]
    p = [math.exp(float(x)) for x in t_top_lp_row]
    if tail == "renormalize":
        return [x / sum(p) for x in p], [x / sum(q) for x in q]
    return p + [1.0 - sum(p)], q + [1.0 - sum(q)]


def _naive_kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0)


def _naive_div(kind, p, q, beta):
    if kind == "forward_kl_topk" or (kind == "jsd" and beta == 0.0):
        return _naive_kl(p, q)
    if kind == "reverse_kl_topk" or (kind == "jsd" and beta == 1.0):
        return _naive_kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return (beta * _naive_kl(p, m) + (1 - beta) * _naive_kl(q, m)) / (beta * (1 - beta))


def _ours(kind, s_logits, t_ids, t_top_lp, mask, normalize, tail, beta):
    s_top = torch.log_softmax(s_logits, dim=-1).gather(-1, t_ids)
    cfg = _cfg(kind=kind, normalize=normalize, topk_tail=tail, jsd_beta=beta)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=torch.zeros_like(mask),
                               sampler_lp_B_T=torch.zeros_like(mask),
                               student_top_lp_B_T_K=s_top, teacher_top_lp_B_T_K=t_top_lp)
    return losses.compute_loss(inputs, cfg, losses.loss_denominator(mask, normalize))[0]


def _naive_topk_loss(kind, s_logits, t_ids, t_top_lp, mask, normalize, tail, beta):
    per = [[_naive_div(kind, *_naive_categories(s_logits[b, t], t_ids[b, t], t_top_lp[b, t], tail), beta)
            if mask[b, t] > 0 else 0.0 for t in range(T_MAX)] for b in range(B)]
    return _naive_reduce(per, mask, normalize)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("kind,beta", [("forward_kl_topk", 0.5), ("reverse_kl_topk", 0.5), ("jsd", 0.3),
                                       ("jsd", 0.0), ("jsd", 1.0)])
def test_topk_value_and_gradient(dtype, tail, kind, beta):
    normalize = "sequence" if kind == "jsd" else "token"
    s_logits, t_ids, t_top_lp, mask = _topk_inputs(dtype)
    s_logits.requires_grad_(True)
    loss = _ours(kind, s_logits, t_ids, t_top_lp, mask, normalize, tail, beta)
    loss.backward()
    ref = _naive_topk_loss(kind, s_logits.detach().double(), t_ids, t_top_lp.double(), mask, normalize, tail, beta)
    assert _rel_err(loss.detach(), ref) < TOL[dtype]
    # Gradient reference: central finite differences of the naive float64 loss
    # on a sample of logits (every masked-in position of row 0 and row 1).
    eps = 1e-6
    base = s_logits.detach().double()
    for b, t in [(0, 0), (0, 3), (1, 2), (4, 6)]:
        if mask[b, t] == 0:
            assert (s_logits.grad[b, t] == 0).all()
            continue
        for v in range(0, V, 4):
            plus, minus = base.clone(), base.clone()
            plus[b, t, v] += eps
            minus[b, t, v] -= eps
            fd = (_naive_topk_loss(kind, plus, t_ids, t_top_lp.double(), mask, normalize, tail, beta)
                  - _naive_topk_loss(kind, minus, t_ids, t_top_lp.double(), mask, normalize, tail, beta)) / (2 * eps)
            g = float(s_logits.grad[b, t, v])
            assert abs(g - fd) <= (1e-6 if dtype == torch.float64 else 1e-4) * max(1.0, abs(fd)) + 1e-8, (b, t, v, g, fd)
    assert (s_logits.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_jsd_beta_limits(tail):
    """beta = 0 / 1 are exactly forward / reverse KL, and the scaled JSD is
    continuous at both ends."""
    s_logits, t_ids, t_top_lp, mask = _topk_inputs(torch.float64, seed=5)
    s_top = torch.log_softmax(s_logits, dim=-1).gather(-1, t_ids)
    fkl = losses.forward_kl_topk(s_top, t_top_lp, tail=tail)
    rkl = losses.reverse_kl_topk(s_top, t_top_lp, tail=tail)
    torch.testing.assert_close(losses.jsd_topk(s_top, t_top_lp, beta=0.0, tail=tail), fkl, rtol=0, atol=0)
    torch.testing.assert_close(losses.jsd_topk(s_top, t_top_lp, beta=1.0, tail=tail), rkl, rtol=0, atol=0)
    torch.testing.assert_close(losses.jsd_topk(s_top, t_top_lp, beta=1e-9, tail=tail), fkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.jsd_topk(s_top, t_top_lp, beta=1 - 1e-9, tail=tail), rkl, rtol=1e-5, atol=1e-6)
    assert bool((fkl - rkl).abs().max() > 0.1)  # the two ends really differ


def test_topk_zero_when_student_matches_teacher():
    _, t_ids, t_top_lp, _ = _topk_inputs(torch.float64, seed=7)
    for tail in ("renormalize", "bucket"):
        for fn in (losses.forward_kl_topk, losses.reverse_kl_topk):
            assert float(fn(t_top_lp, t_top_lp, tail=tail).abs().max()) < 1e-12
        assert float(losses.jsd_topk(t_top_lp, t_top_lp, beta=0.4, tail=tail).abs().max()) < 1e-12


def test_split_sums_to_whole_batch():
    """Summing micro-batch losses with the global denominator gives the
    whole-batch loss (what makes world size and micro-batching invisible)."""
    learner, sampler, teacher, mask = _sampled_inputs(torch.float64, seed=2)
    for normalize in ("token", "sequence"):
        cfg = _cfg(normalize=normalize, discount=0.5)
        denom = losses.loss_denominator(mask, normalize)

        def loss_of(rows):
            i = losses.LossInputs(mask_B_T=mask[rows], learner_lp_B_T=learner[rows], sampler_lp_B_T=sampler[rows],
                                  teacher_lp_B_T=teacher[rows])
            return float(losses.compute_loss(i, cfg, denom)[0])

        whole = loss_of(list(range(B)))
        parts = loss_of([0, 3]) + loss_of([1]) + loss_of([2, 4])
        assert abs(whole - parts) < 1e-12


def test_errors_name_the_problem():
    _, sampler, _, mask = _sampled_inputs(torch.float64)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=sampler, sampler_lp_B_T=sampler)
    with pytest.raises(ValueError, match="teacher_logprobs_B_T=None"):
        losses.compute_loss(inputs, _cfg(kind="reverse_kl"), 1.0)
    with pytest.raises(ValueError, match="teacher.top_k"):
        losses.compute_loss(inputs, _cfg(kind="jsd"), 1.0)
    with pytest.raises(ValueError, match="normalize='tokens'"):
        losses.compute_loss(inputs, _cfg(kind="sft", normalize="tokens"), 1.0)
