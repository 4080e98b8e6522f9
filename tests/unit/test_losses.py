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
from learner.config import LossConfig

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
    with pytest.raises(ValueError, match="loss.kind='kl' is not valid; use one of reverse_kl, reverse_kl_topk"):
        losses.compute_loss(inputs, _cfg(kind="kl"), 1.0)


def test_the_table_of_losses_is_the_config_s_and_names_functions_here():
    """learner/config.py's LOSSES is the one list of loss kinds: the config's
    valid values, and each names its per-token function in learner/losses.py."""
    import typing

    from learner.config import LOSSES

    assert typing.get_args(typing.get_type_hints(LossConfig)["kind"]) == tuple(LOSSES)
    for kind, spec in LOSSES.items():
        assert callable(getattr(losses, spec.fn)), kind
        assert set(spec.sample_from) <= {"student", "teacher"} and spec.sample_from, kind


# ------------------------------------------------------- the top-k tail (bucket)

def _full_vocab_kl(q, p):
    return math.fsum(a * (math.log(a) - math.log(b)) for a, b in zip(q, p, strict=True) if a > 0)


def _tail_case():
    """V = 8, the teacher's top-4 S holds all but 2e-9 of its mass; token 4
    (outside S) has teacher probability 1e-9 and 0.9 of the student's."""
    p = [0.4, 0.3, 0.2, 0.1 - 2e-9, 1e-9, 1e-9 - 1e-12, 5e-13, 5e-13]
    q = [0.04, 0.03, 0.02, 0.01 - 1e-6, 0.9, 1e-6 - 2e-12, 1e-12, 1e-12]
    assert abs(math.fsum(p) - 1) < 1e-15 and abs(math.fsum(q) - 1) < 1e-15
    ids = torch.tensor([[[0, 1, 2, 3]]])
    lp_t = torch.tensor([[[math.log(x) for x in p[:4]]]], dtype=torch.float64)
    s_logits = torch.tensor([[[math.log(x) for x in q]]], dtype=torch.float64)
    return p, q, ids, lp_t, s_logits


def test_bucket_penalises_student_mass_the_teacher_lacks():
    """A student with 0.9 of its mass on a token the teacher gives 1e-9,
    against the full-vocabulary float64 reverse KL (18.3 nats): the bucket (a
    lower bound, exact up to merging the two tail tokens) gives 17.7,
    renormalize ~0; with float32 teacher log-probs the teacher's tail is
    floored at float32 eps (it is not resolved): 14.0."""
    p, q, ids, lp_t, s_logits = _tail_case()
    full = _full_vocab_kl(q, p)
    assert 18.0 < full < 19.0
    s_lp = torch.log_softmax(s_logits, dim=-1)
    s_top = s_lp.gather(-1, ids)
    s_tail = torch.logsumexp(s_lp[..., 4:], dim=-1)  # the learner's exact tail (what the worker passes)
    p_tail, q_tail = math.fsum(p[4:]), math.fsum(q[4:])
    bucket_ref = _full_vocab_kl(q[:4] + [q_tail], p[:4] + [p_tail])
    for tail_lp in (s_tail, None):  # exact tail, and the float64 fallback from the top-k
        got = float(losses.reverse_kl_topk(s_top, lp_t, tail="bucket", student_tail_lp_B_T=tail_lp))
        assert abs(got - bucket_ref) < 1e-6 * bucket_ref, (got, bucket_ref)
        assert 17.5 < got <= full + 1e-9
    assert float(losses.reverse_kl_topk(s_top, lp_t, tail="renormalize")) < 1e-9
    # The default (the typed config's) is the bucket.
    cfg = LossConfig(kind="reverse_kl_topk")
    inputs = losses.LossInputs(mask_B_T=torch.ones(1, 1, dtype=torch.float64), learner_lp_B_T=torch.zeros(1, 1),
                               sampler_lp_B_T=torch.zeros(1, 1), student_top_lp_B_T_K=s_top,
                               teacher_top_lp_B_T_K=lp_t, student_tail_lp_B_T=s_tail)
    assert abs(float(losses.compute_loss(inputs, cfg, 1.0)[0]) - bucket_ref) < 1e-6 * bucket_ref
    # float32 teacher log-probs: 1 - sum of their exp is below float32's
    # resolution, so the teacher's tail is eps32 (never 0, never negative).
    eps32 = torch.finfo(torch.float32).eps
    got32 = float(losses.reverse_kl_topk(s_top.float(), lp_t.float(), tail="bucket",
                                         student_tail_lp_B_T=s_tail.float()))
    floor_ref = _full_vocab_kl(q[:4] + [q_tail], [math.exp(float(x)) for x in lp_t.float()[0, 0]] + [eps32])
    assert abs(got32 - floor_ref) < 1e-5 * floor_ref and 14.0 < got32 < full


def test_log_tail_mass_is_stable():
    """log(-expm1(logsumexp)) keeps tails far below float32's 1 - sum(exp)."""
    for tail in (0.3, 1e-5, 1e-9, 1e-14):
        lp = torch.tensor([[math.log(0.6 * (1 - tail)), math.log(0.4 * (1 - tail)), float("-inf")]],
                          dtype=torch.float64)
        assert abs(float(losses.log_tail_mass(lp)) - math.log(tail)) < 1e-6 * abs(math.log(tail)) + 1e-3 * (
            tail < 1e-12)
    # An (over-)complete top-k: the floor, not -inf or NaN.
    lp = torch.log(torch.tensor([[0.5, 0.5 + 1e-12]], dtype=torch.float64))
    assert float(losses.log_tail_mass(lp, floor=1e-10)) == pytest.approx(math.log(1e-10))


@pytest.mark.parametrize("kind,beta", [("forward_kl_topk", 0.5), ("reverse_kl_topk", 0.5), ("jsd", 0.3)])
def test_bucket_with_exact_student_tail_value_and_gradient(kind, beta):
    """The worker's path: the student's top-k log-probs AND its exact tail
    come from the learner's logits (learner/logprobs.py, tail_from), through
    the loss, back to the logits. Reference: float64 autograd of the naive
    bucket divergence with the student's tail summed over the vocabulary.
    One position's student tail is ~1e-13 while the teacher's is ~0.5: forward
    KL's -p_tail log q_tail then dominates, and its gradient (which a
    1 - sum(exp) tail clamped at tiny would zero) must be right."""
    from learner.logprobs import completion_logprobs

    s_logits, t_ids, t_top_lp, mask = _topk_inputs(torch.float64, seed=11)
    s_logits[0, 0] = -30.0
    s_logits[0, 0].scatter_(-1, t_ids[0, 0], 0.0)
    logits = s_logits.clone().requires_grad_(True)
    pos = torch.arange(T_MAX)[None, :].expand(B, T_MAX)  # position t's logits predict token t here
    lp = completion_logprobs(logits, pos, t_ids, tail_from=0)
    cfg = _cfg(kind=kind, topk_tail="bucket", jsd_beta=beta)
    inputs = losses.LossInputs(mask_B_T=mask, learner_lp_B_T=torch.zeros_like(mask),
                               sampler_lp_B_T=torch.zeros_like(mask), student_top_lp_B_T_K=lp[..., :K],
                               teacher_top_lp_B_T_K=t_top_lp, student_tail_lp_B_T=lp[..., K])
    loss, _ = losses.compute_loss(inputs, cfg, losses.loss_denominator(mask, "token"))
    (grad,) = torch.autograd.grad(loss, logits)

    ref_logits = s_logits.clone().requires_grad_(True)
    per = []
    for b in range(B):
        for t in range(T_MAX):
            if mask[b, t] == 0:
                continue
            q = torch.softmax(ref_logits[b, t], dim=-1)
            inside = torch.zeros(V, dtype=torch.bool)
            inside[t_ids[b, t]] = True
            q_cat = torch.cat([q[t_ids[b, t]], q[~inside].sum()[None]])
            p_top = t_top_lp[b, t].exp()
            p_cat = torch.cat([p_top, (1 - p_top.sum())[None]])
            if kind == "forward_kl_topk":
                d = (p_cat * (p_cat.log() - q_cat.log())).sum()
            elif kind == "reverse_kl_topk":
                d = (q_cat * (q_cat.log() - p_cat.log())).sum()
            else:
                m = beta * p_cat + (1 - beta) * q_cat
                d = (beta * (p_cat * (p_cat.log() - m.log())).sum()
                     + (1 - beta) * (q_cat * (q_cat.log() - m.log())).sum()) / (beta * (1 - beta))
            per.append(d)
    ref = torch.stack(per).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert _rel_err(loss.detach(), ref.detach()) < 1e-10
    assert _rel_err(grad, ref_grad) < 1e-8
    assert float(grad[0, 0].abs().max()) > 1e-3  # the tiny-tail position does train
