"""learner/logprobs.gathered_logprobs against float64 log_softmax: values and
gradients, with temperature, repeated rows and ids, several chunks, bf16."""

from __future__ import annotations

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
