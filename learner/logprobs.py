"""Log-probs of chosen token ids, without full-vocabulary float32 copies.

The learner needs, at each completion position, log softmax(logits / T) at a
few ids: the sampled token (every loss) and the teacher's top-k ids (the top-k
divergences). The plain way (index the completion rows out of the logits,
`.float()`, `log_softmax`, `gather`) materialises the (positions x vocabulary)
block several times: the indexed bf16 copy, its float32 copy, the float32
log-softmax that autograd saves, and in backward a float32 gradient of each.
Measured on an H200 (bench/logprob_memory.py): 41.7 GiB on top of the 9.3 GiB
of bf16 logits of a 32768-token micro-batch at Qwen's 151936 vocabulary.

`gathered_logprobs` computes the same numbers in row chunks: forward keeps one
logsumexp per position; backward recomputes the softmax a chunk at a time and
writes d logits straight into a gradient of the model's own logits (their
dtype, the one block autograd needs anyway). Extra memory: one float32 chunk
(`chunk_bytes`, `CHUNK_BYTES` by device) and one value per position: 9.4 GiB,
nearly all of it the logits' own gradient, instead of 41.7 GiB in that
measurement. Values are float32 log-probs equal to the plain path's to
float32 rounding; tests/unit/test_logprobs.py checks values and gradients
against float64 `log_softmax`; bench/logprob_memory.py measures both paths.
"""

from __future__ import annotations

import torch

# Float32 bytes per chunk. Measured (bench/logprob_memory.py, 151936 vocab):
# on CPU 16 MiB chunks ran 1.6-3x faster than 64-256 MiB ones (they stay in
# cache); on an H200 64, 256 and 1024 MiB took the same time and 64 used the
# least memory.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 64 << 20}


class _GatheredLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_M_V, rows_N, ids_N_K, inv_temperature: float, chunk_rows: int):
        n, k = ids_N_K.shape
        acc = torch.promote_types(logits_M_V.dtype, torch.float32)  # float32, or float64 for float64 logits
        out_N_K = torch.empty((n, k), dtype=acc, device=logits_M_V.device)
        lse_N = torch.empty((n,), dtype=acc, device=logits_M_V.device)
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            # index_select copies this chunk's rows (then .to makes the float32
            # copy); nothing here aliases the logits, so the in-place ops are safe.
            x = logits_M_V.index_select(0, rows_N[s:e]).to(acc)
            if inv_temperature != 1.0:
                x = x.mul_(inv_temperature)
            lse = torch.logsumexp(x, dim=-1)
            out_N_K[s:e] = x.gather(-1, ids_N_K[s:e]) - lse[:, None]
            lse_N[s:e] = lse
        ctx.save_for_backward(logits_M_V, rows_N, ids_N_K, lse_N)
        ctx.inv_temperature, ctx.chunk_rows = inv_temperature, chunk_rows
        return out_N_K

    @staticmethod
    def backward(ctx, grad_N_K):
        logits_M_V, rows_N, ids_N_K, lse_N = ctx.saved_tensors
        inv_t, chunk_rows = ctx.inv_temperature, ctx.chunk_rows
        grad_M_V = torch.zeros_like(logits_M_V)
        n = ids_N_K.shape[0]
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            x = logits_M_V.index_select(0, rows_N[s:e]).to(lse_N.dtype)
            if inv_t != 1.0:
                x = x.mul_(inv_t)
            # d/dz_v [z_id - lse(z)] = 1[v = id] - softmax(z)_v, summed over the K ids.
            g_K = grad_N_K[s:e].to(lse_N.dtype)
            d = x.sub_(lse_N[s:e, None]).exp_().mul_(-g_K.sum(-1, keepdim=True))
            d.scatter_add_(-1, ids_N_K[s:e], g_K)
            if inv_t != 1.0:
                d.mul_(inv_t)
            # index_add_: a row listed twice (padding positions all point at a
            # sequence's row 0) gets both contributions, as autograd would give.
            grad_M_V.index_add_(0, rows_N[s:e], d.to(grad_M_V.dtype))
        return grad_M_V, None, None, None, None


def gathered_logprobs(logits_M_V: torch.Tensor, rows_N: torch.Tensor, ids_N_K: torch.Tensor,
                      temperature: float = 1.0, chunk_bytes: int | None = None) -> torch.Tensor:
    """out[n, j] = log_softmax(logits_M_V[rows_N[n]] / temperature)[ids_N_K[n, j]]
    in float32 (float64 for float64 logits), differentiable in `logits_M_V`
    (any float dtype). `rows_N` and `ids_N_K` may repeat. Temperature <= 0
    means 1 (greedy sampling has no distribution to correct for)."""
    if logits_M_V.dim() != 2 or rows_N.dim() != 1 or ids_N_K.dim() != 2 or ids_N_K.shape[0] != rows_N.shape[0]:
        raise ValueError(f"gathered_logprobs wants logits (M, V), rows (N,), ids (N, K); got "
                         f"{tuple(logits_M_V.shape)}, {tuple(rows_N.shape)}, {tuple(ids_N_K.shape)}")
    t = temperature if temperature and temperature > 0 else 1.0
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(logits_M_V.device.type, 64 << 20)
    chunk_rows = max(1, int(chunk_bytes // (4 * max(1, logits_M_V.shape[1]))))
    return _GatheredLogprobs.apply(logits_M_V, rows_N, ids_N_K, 1.0 / t, chunk_rows)


def completion_logprobs(logits_B_L_V: torch.Tensor, predict_pos_B_T: torch.Tensor, ids_B_T_K: torch.Tensor,
                        temperature: float = 1.0, first: int = 0, chunk_bytes: int | None = None) -> torch.Tensor:
    """(B, T, K) log-probs of `ids_B_T_K` at each completion position of a
    padded micro-batch: row b's logits at sequence position
    `predict_pos_B_T[b, t]`, where `logits_B_L_V` starts at position `first`
    (the model was asked for logits from there on)."""
    B, L, V = logits_B_L_V.shape
    T = predict_pos_B_T.shape[1]
    rows_N = (torch.arange(B, device=logits_B_L_V.device)[:, None] * L + (predict_pos_B_T - first)).reshape(-1)
    return gathered_logprobs(logits_B_L_V.reshape(B * L, V), rows_N, ids_B_T_K.reshape(B * T, -1), temperature,
                             chunk_bytes).view(B, T, -1)
