"""learner/logprobs.gathered_logprobs against float64 references: values and
gradients, with temperature, repeated rows and ids, several chunks, bf16; the
truncated sampling distribution (top-k / top-p, vLLM's rule, its ties, a
sampled token outside the learner's mask; against vLLM's own code in
tests/e2e/test_on_policy_exactness.py); the tail column (mass outside a set
of ids).

    .venv/bin/python -m pytest tests/unit/test_logprobs.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from learner.logprobs import gathered_logprobs


def _reference(logits_M_V, rows_N, ids_N_K, temperature):
    x = logits_M_V.double()[rows_N] / temperature
    return torch.log_softmax(x, dim=-1).gather(-1, ids_N_K)


def _case(dtype, seed=0, M=13, V=37, N=9, K=4):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(M, V, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    rows = torch.randint(0, M, (N,), generator=g)
    rows[1] = rows[0]  # a repeated row (padding positions repeat a sequence's row 0)
    ids = torch.randint(0, V, (N, K), generator=g)
    ids[:, 1] = ids[:, 0]  # a repeated id within a row
    weights = torch.randn(N, K, generator=g, dtype=torch.float64)
    return logits, rows, ids, weights


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_bytes", [1, 4 * 37 * 4, 1 << 30])  # 1 row, 4 rows, one chunk
def test_values_and_gradients_match_float64_log_softmax(temperature, chunk_bytes):
    logits, rows, ids, w = _case(torch.float64)
    got = gathered_logprobs(logits, rows, ids, temperature, chunk_bytes=chunk_bytes)
    (grad,) = torch.autograd.grad((got * w).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = _reference(ref_logits, rows, ids, temperature)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_logits)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    untouched = torch.ones(logits.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert untouched.any() and (grad[untouched] == 0).all()


def test_float32_and_bfloat16_logits():
    """float32 logits give float32 log-probs within float32 rounding; bf16
    logits give float32 log-probs of the bf16 values and a bf16 gradient."""
    for dtype, tol, gtol in [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-5, 2e-2)]:
        logits, rows, ids, w = _case(dtype, seed=1)
        got = gathered_logprobs(logits, rows, ids, 0.9, chunk_bytes=64)
        (grad,) = torch.autograd.grad((got * w.to(got.dtype)).sum(), logits)
        ref_logits = logits.detach().double().requires_grad_()
        ref = _reference(ref_logits, rows, ids, 0.9)
        (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_logits)
        assert got.dtype == torch.float32 and grad.dtype == dtype
        assert (got.double() - ref).abs().max() < tol * max(1.0, ref.abs().max())
        assert (grad.double() - ref_grad).abs().max() < gtol * ref_grad.abs().max()


def test_no_grad_and_bad_shapes():
    logits, rows, ids, _ = _case(torch.float32)
    with torch.no_grad():
        out = gathered_logprobs(logits, rows, ids, 0.0)  # temperature 0 = 1
    assert not out.requires_grad
    assert torch.allclose(out.double(), _reference(logits.detach(), rows, ids, 1.0), atol=1e-5)
    with pytest.raises(ValueError, match=r"logits \(M, V\), rows \(N,\), ids \(N, K\)"):
        gathered_logprobs(logits, rows, ids[:-1])


# ------------------------------------------------- truncated sampling (top-k / top-p)

def _naive_kept(z_V, top_k: int, top_p: float) -> list[bool]:
    """vLLM's top-k / top-p rule on one row, in Python floats: top-k keeps
    every logit >= the k-th largest; top-p then keeps, from the top down,
    every token whose mass above it (over the top-k set) is < p (so the token
    that crosses p stays in; the top token always does)."""
    z = [float(v) for v in z_V]
    V = len(z)
    keep = [True] * V
    if 0 < top_k < V:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = [v >= kth for v in z]
    if top_p < 1.0:
        m = max(z)
        e = [math.exp(v - m) if k else 0.0 for v, k in zip(z, keep, strict=True)]
        total = sum(e)
        above = 0.0
        for i in sorted(range(V), key=lambda i: -z[i]):
            if not keep[i]:
                continue
            if above >= top_p and above > 0.0:
                keep[i] = False
            above += e[i] / total
    return keep


def _naive_truncated_lp(logits_M_V, rows_N, ids_N, temperature, top_k, top_p):
    """float64 log-probs of ids under the masked, renormalised distribution;
    the mask (from `_naive_kept`, plus the id itself) is a constant."""
    out = []
    for n in range(rows_N.shape[0]):
        z = logits_M_V[rows_N[n]] / temperature
        keep = _naive_kept(z.detach(), top_k, top_p)
        keep[int(ids_N[n])] = True
        mask = torch.tensor(keep)
        out.append(torch.log_softmax(z.masked_fill(~mask, float("-inf")), dim=-1)[ids_N[n]])
    return torch.stack(out)[:, None]


def _kept_id(logits_M_V, rows_N, temperature, top_k, top_p, seed):
    """A token drawn from each row's kept set (what a sampler could emit)."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for n in range(rows_N.shape[0]):
        keep = [i for i, k in enumerate(_naive_kept(logits_M_V[rows_N[n]].detach() / temperature, top_k, top_p))
                if k]
        ids.append(keep[int(torch.randint(len(keep), (1,), generator=g))])
    return torch.tensor(ids)[:, None]


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.8, 1.0), (5, 1.0, 0.7), (7, 0.6, 1.3), (1, 1.0, 1.0),
                                                     (0, 0.3, 0.5), (40, 0.9, 1.0)])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_truncated_values_and_gradients_match_float64_reference(top_k, top_p, temperature, chunk_bytes):
    """The sampled token's log-prob under the top-k / nucleus distribution,
    and its gradient through the renormalised truncated softmax (the mask a
    constant), against a Python-float mask and float64 autograd."""
    logits, rows, _, _ = _case(torch.float64, seed=2)
    ids = _kept_id(logits, rows, temperature, top_k, top_p, seed=3)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = gathered_logprobs(logits, rows, ids, temperature, chunk_bytes=chunk_bytes, top_k=top_k, top_p=top_p)
    (grad,) = torch.autograd.grad((got * w).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = _naive_truncated_lp(ref_logits, rows, ids[:, 0], temperature, top_k, top_p)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_logits)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    # Truncation is really in play: the untruncated log-probs are lower.
    if top_p < 1.0 or top_k < 37:
        full = gathered_logprobs(logits.detach(), rows, ids, temperature)
        assert float((got.detach() - full).min()) > 1e-3


def test_truncation_ties_and_a_sampled_token_outside_the_mask():
    """Ties at the nucleus boundary: vLLM keeps some of the tied tokens (by
    sort order); only their number enters the normaliser, which is exact.
    A sampled token below the learner's mask (engines' logits differ by
    ~1e-6) is added to the set instead of getting -inf."""
    # softmax of [2, 1, 1, 1, 1, -3]: 0.4, 0.15 x 4 ... p = 0.7 keeps the 2
    # and 2 of the four tied 1s (mass above the 3rd tied one = 0.7 >= p).
    z = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0, -3.0]], dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0])
    e = [math.exp(v) for v in (2.0, 1.0, 1.0, 1.0, 1.0, -3.0)]
    p_top = e[0] / sum(e)
    assert p_top + e[1] / sum(e) < 0.7 < p_top + 2 * e[1] / sum(e)
    lz = math.log(e[0] + 2 * e[1])  # the kept normaliser: the top token and two 1s
    for tok in (0, 1, 4):
        got = gathered_logprobs(z.detach(), rows, torch.tensor([[tok]]), top_p=0.7)
        assert abs(float(got) - (float(z.detach()[0, tok]) - lz)) < 1e-12
    # Gradient of the top token's log-prob: each tied token carries 2/4 of the
    # kept ties' weight (the normaliser's gradient spread evenly).
    got = gathered_logprobs(z, rows, torch.tensor([[0]]), top_p=0.7)
    (g,) = torch.autograd.grad(got.sum(), z)
    kept = e[0] + 2 * e[1]
    want = [1 - e[0] / kept] + [-0.5 * e[1] / kept] * 4 + [0.0]
    assert torch.allclose(g[0], torch.tensor(want, dtype=torch.float64), atol=1e-12)
    # The dropped token 5, as if sampled: its own mass joins the normaliser.
    got = gathered_logprobs(z, rows, torch.tensor([[5]]), top_p=0.7)
    assert abs(float(got.detach()) - (-3.0 - math.log(kept + e[5]))) < 1e-12
    (g,) = torch.autograd.grad(got.sum(), z)
    zz = kept + e[5]
    want = [-e[0] / zz] + [-0.5 * e[1] / zz] * 4 + [1 - e[5] / zz]
    assert torch.allclose(g[0], torch.tensor(want, dtype=torch.float64), atol=1e-12)
    # A cumulative sum exactly at 1 - p is dropped (vLLM's `cumsum <= 1 - p`):
    # two equal tokens (0.5 each, exact in float) at p = 0.5 keep one.
    for dtype in (torch.float64, torch.float32):
        got = gathered_logprobs(torch.zeros(1, 2, dtype=dtype), rows, torch.tensor([[1]]), top_p=0.5)
        assert float(got) == 0.0
    # Top-k keeps every tie at the k-th value (vLLM's `logits < k-th` mask).
    got = gathered_logprobs(z.detach(), rows, torch.tensor([[0]]), top_k=2)
    assert abs(float(got) - (2.0 - math.log(e[0] + 4 * e[1]))) < 1e-12


def test_greedy_and_off_switches_are_untruncated():
    logits, rows, ids, _ = _case(torch.float64, seed=5)
    ids = ids[:, :1]
    full = gathered_logprobs(logits, rows, ids, 1.0)
    for kw in (dict(top_k=0, top_p=1.0), dict(top_k=37, top_p=1.0), dict(top_k=1000)):
        assert torch.equal(gathered_logprobs(logits, rows, ids, 1.0, **kw), full)
    # Greedy (temperature 0): vLLM reports the raw distribution, truncation off.
    assert torch.equal(gathered_logprobs(logits, rows, ids, 0.0, top_k=3, top_p=0.5), full)
    with pytest.raises(ValueError, match="sampled token, one column"):
        gathered_logprobs(logits, rows, torch.zeros(rows.shape[0], 2, dtype=torch.long), top_p=0.9)
    with pytest.raises(ValueError, match=r"top_p=1.5"):
        gathered_logprobs(logits, rows, ids, top_p=1.5)


# ------------------------------------------------------------------ tail mass

def _naive_tail(logits_M_V, rows_N, ids_N_K, tail_from):
    out = []
    for n in range(rows_N.shape[0]):
        lp = torch.log_softmax(logits_M_V[rows_N[n]], dim=-1)
        inside = set(int(i) for i in ids_N_K[n, tail_from:])
        rest = [v for v in range(lp.shape[0]) if v not in inside]
        out.append(torch.logsumexp(lp[rest], dim=0) if rest else lp.new_tensor(float("-inf")))
    return torch.stack(out)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])
def test_tail_column_value_and_gradient(chunk_bytes):
    """The log-mass outside the teacher's ids is summed over the rest of the
    vocabulary (exact when tiny), with the gradient of that sum."""
    logits, rows, ids, _ = _case(torch.float64, seed=6)
    # One row whose rest holds 1e-12 of the mass: 1 - sum(exp) in float32 is 0 there.
    logits.data[rows[2]] = -30.0
    logits.data[rows[2], ids[2]] = 0.0
    w = torch.randn(ids.shape[0], ids.shape[1] + 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    got = gathered_logprobs(logits, rows, ids, chunk_bytes=chunk_bytes, tail_from=1)
    assert got.shape == (ids.shape[0], ids.shape[1] + 1)
    (grad,) = torch.autograd.grad((got * w).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = torch.cat([_reference(ref_logits, rows, ids, 1.0), _naive_tail(ref_logits, rows, ids, 1)[:, None]], -1)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_logits)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    got = got.detach()
    n_in = len(set(ids[2, 1:].tolist()))
    rest = (37 - n_in) * math.exp(-30.0)
    assert abs(float(got[2, -1]) - math.log(rest / (n_in + rest))) < 1e-9
    # float32 logits: the tail is still ~1e-12 (log ~ -27.6 to a few float32
    # ulp), where 1 - sum(exp) in float32 would be 0.
    got32 = gathered_logprobs(logits.detach().float(), rows, ids, tail_from=1)
    assert abs(float(got32[2, -1]) - float(got[2, -1])) < 8 * torch.finfo(torch.float32).eps * 32


def test_tail_of_the_whole_vocabulary_is_minus_inf_without_nan():
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 2, 3, 4], [1, 1, 2, 2, 3, 3]])
    got = gathered_logprobs(logits, torch.tensor([0, 1]), ids, tail_from=1)
    assert got[0, -1] == float("-inf") and torch.isfinite(got[1, -1])
    (g,) = torch.autograd.grad(got[:, :-1].sum() + got[1, -1], logits)
    assert torch.isfinite(g).all()
