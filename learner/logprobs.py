"""Log-probs of chosen token ids, without full-vocabulary float32 copies.

The learner needs, at each completion position, log softmax(logits / T) at a
few ids: the sampled token (every loss) and the teacher's top-k ids (the top-k
divergences). The plain way (index the completion rows out of the logits,
`.float()`, `log_softmax`, `gather`) materialises the (positions x vocabulary)
block several times: the indexed bf16 copy, its float32 copy, the float32
log-softmax that autograd saves, and in backward a float32 gradient of each.
Measured on an H200 (bench/logprob_memory.py): 41.7 GiB on top of the 9.3 GiB
of bf16 logits of a 32768-token micro-batch at Qwen's 151936 vocabulary.

`gathered_logprobs` computes the same numbers in row chunks: forward keeps a
few values per position (the log-normaliser, and with truncation the
threshold below); backward recomputes the softmax a chunk at a time and
writes d logits straight into a gradient of the model's own logits (their
dtype, the one block autograd needs anyway). Extra memory: one float32 chunk
(`chunk_bytes`, `CHUNK_BYTES` by device; a few chunks' worth with
truncation, which sorts) and a few values per position: 9.4 GiB, nearly all
of it the logits' own gradient, instead of 41.7 GiB in that measurement.
Values are float32 log-probs equal to the plain path's to float32 rounding;
tests/unit/test_logprobs.py checks values and gradients against float64
references; bench/logprob_memory.py measures both paths.

Two options serve the losses:

* Truncated sampling (`top_k` > 0, `top_p` < 1): the log-prob of the sampled
  token under the distribution vLLM sampled it from with
  `logprobs_mode="processed_logprobs"`, so that the importance ratio
  exp(lp_learner - lp_sampler) compares like with like. vLLM 0.32's sampler
  (vllm/v1/sample/sampler.py `Sampler.sample`, and the V2 GPU runner's
  `Sampler.apply_sampling_params`) divides the float32 logits by the
  temperature, then masks them to the top-k and the nucleus
  (vllm/v1/sample/ops/topk_topp_sampler.py `apply_top_k_top_p_pytorch` on
  CPU): top-k keeps every logit >= the k-th largest (ties at the k-th value
  all kept); top-p sorts the (top-k masked) logits ascending, takes their
  float32 softmax and its cumulative sum, drops every position whose
  cumulative sum is <= 1 - p and never the last (the top token), so the
  boundary token that crosses p stays in; the logprob is log_softmax of the
  masked logits. `_truncation` repeats exactly those operations on the
  learner's logits, so the learner's log-prob equals the sampler's up to the
  difference between the two engines' logits (float32 rounding:
  tests/e2e/test_on_policy_exactness.py). Two corners, both handled:
  - Ties at the nucleus boundary: vLLM keeps some of the tokens whose logit
    equals the boundary value, by their (unspecified) order in its sort. All
    tied tokens have the same logit, so only their number matters for the
    normaliser: each gets weight n_kept / n_tied, which gives vLLM's
    normaliser exactly (and spreads the gradient evenly over them).
  - A sampled token that the learner's own mask drops (its logits differ from
    the sampler's by ~1e-6, which can move a token whose cumulative sum sits
    within ~1e-6 of 1 - p across the boundary): the token was in the
    sampler's set (it was sampled from it), so it is added to the learner's.
    The normaliser can still differ by that one boundary token when the
    sampled token is another one. How often: with logits perturbed by 1e-6
    (relative) against each other, on synthetic 32k-vocabulary rows (logits
    N(0, 3^2) and N(0, 6^2); p = 0.8 and 0.95) the set differed on 0.01-0.9%
    of positions, by at most 2e-2 in that position's log-prob (a peaked row)
    and 2e-6 on average over all positions. In the e2e runs here (float32,
    CPU) the mean |lp_learner - lp_sampler| stays ~5e-7. In async runs a
    lagged sample's token can also be outside the current policy's set for
    real (the weights moved); it is kept in the set too, with its small
    probability, where the truncated policy would give it ratio 0.
  The mask is a constant: the gradient flows through the renormalised
  truncated distribution. On GPU, vLLM masks with a Triton kernel
  (`apply_top_k_top_p_triton`, a pivot search) that keeps exactly k tokens
  on ties at the k-th value and finds the nucleus by a bisection over
  probabilities (at most 18 halvings); its set equals this one except in
  those tie and near-tie cases (read in vllm/v1/sample/ops/
  topk_topp_triton.py, not run here: no GPU).
  Greedy sampling (temperature 0) has no distribution; vLLM then reports the
  raw log-softmax, and so does this (temperature 1, no truncation).
* The tail (`tail_from`): one more output column, the log of the probability
  outside ids[:, tail_from:] (the teacher's top-k), summed over the whole
  vocabulary's other tokens, not 1 - sum(exp), so it stays exact (and keeps
  its gradient) when it is tiny.
"""

from __future__ import annotations

import torch

# Float32 bytes per chunk. Measured (bench/logprob_memory.py, 151936 vocab):
# on CPU 16 MiB chunks ran 1.6-3x faster than 64-256 MiB ones (they stay in
# cache); on an H200 64, 256 and 1024 MiB took the same time and 64 used the
# least memory.
CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 64 << 20}


def _scaled_rows(logits_M_V: torch.Tensor, rows_n: torch.Tensor, acc: torch.dtype, temperature: float) -> torch.Tensor:
    """logits[rows] / temperature in `acc`, as vLLM computes it (float32
    true division by the temperature, not a multiplication by 1/T).
    index_select copies the rows (and .to the float32 copy); nothing here
    aliases the logits, so callers may work in place."""
    x = logits_M_V.index_select(0, rows_n).to(acc)
    if temperature != 1.0:
        x = x.div_(torch.full((1, 1), temperature, dtype=acc, device=x.device))
    return x


def _truncation(x_n_V: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's top-k / top-p mask of each row of `x_n_V` (tempered logits) as
    (tau_n, frac_n): token v is kept with weight 1 if x_v > tau, frac if
    x_v == tau (ties at the boundary, see the module docstring), 0 below."""
    n, V = x_n_V.shape
    ones = torch.ones(n, dtype=x_n_V.dtype, device=x_n_V.device)
    k = top_k if 0 < top_k < V else 0
    if top_p >= 1.0:
        # apply_top_k_only: keep every logit >= the k-th largest.
        return x_n_V.topk(k, dim=-1).values[:, -1], ones
    xs = x_n_V.sort(dim=-1).values  # ascending, as vLLM sorts
    if k:
        xs.masked_fill_(xs < xs[:, V - k:V - k + 1], float("-inf"))
    probs = xs.softmax(dim=-1)
    cum = torch.cumsum(probs, dim=-1, out=probs)
    # vLLM: p is a float32 tensor, and `1 - p` is computed in float32.
    drop = cum <= 1 - torch.tensor(top_p, dtype=torch.float32, device=x_n_V.device)
    drop[:, -1] = False
    m = drop.sum(dim=-1)  # the cumulative sum is monotone: the dropped set is a prefix
    tau = xs.gather(-1, m[:, None])[:, 0]
    n_gt = (x_n_V > tau[:, None]).sum(dim=-1)
    n_eq = (x_n_V == tau[:, None]).sum(dim=-1)
    frac = ((V - m) - n_gt).to(x_n_V.dtype) / n_eq.to(x_n_V.dtype)
    return tau, torch.minimum(frac, ones)


def _kept_exp(x_n_V: torch.Tensor, tau_n: torch.Tensor, frac_n: torch.Tensor, shift_n: torch.Tensor) -> torch.Tensor:
    """w_v * exp(x_v - shift) with the truncation weights w of (tau, frac)."""
    e = (x_n_V - shift_n[:, None]).exp_()
    t = tau_n[:, None]
    e.mul_(x_n_V >= t)
    if bool((frac_n < 1).any()):
        e = torch.where(x_n_V == t, e * frac_n[:, None], e)
    return e


class _GatheredLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_M_V, rows_N, ids_N_K, temperature: float, chunk_rows: int, top_k: int, top_p: float,
                tail_from: int | None):
        n, k = ids_N_K.shape
        truncate = top_k > 0 or top_p < 1.0
        acc = torch.promote_types(logits_M_V.dtype, torch.float32)  # float32, or float64 for float64 logits
        dev = logits_M_V.device
        out_N_K = torch.empty((n, k + (tail_from is not None)), dtype=acc, device=dev)
        lse_N = torch.empty((n,), dtype=acc, device=dev)
        # Truncation: the threshold and tie weight per row; tail: log of the
        # mass outside the tail set (log-normaliser of the rest).
        tau_N = torch.empty((n,), dtype=acc, device=dev) if truncate else None
        frac_N = torch.empty((n,), dtype=acc, device=dev) if truncate else None
        tail_lse_N = torch.empty((n,), dtype=acc, device=dev) if tail_from is not None else None
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            x = _scaled_rows(logits_M_V, rows_N[s:e], acc, temperature)
            picked = x.gather(-1, ids_N_K[s:e])
            if truncate:
                tau, frac = _truncation(x, top_k, top_p)
                mx = x.max(dim=-1).values  # the top token is always kept
                total = _kept_exp(x, tau, frac, mx).sum(dim=-1)
                # A sampled token below the learner's threshold was in the
                # sampler's set: add it (ids is the sampled token, K == 1).
                forced = picked[:, 0] < tau
                total = total + torch.where(forced, (picked[:, 0] - mx).exp(), torch.zeros_like(mx))
                lse = mx + total.log()
                tau_N[s:e], frac_N[s:e] = tau, frac
            else:
                lse = torch.logsumexp(x, dim=-1)
            out_N_K[s:e, :k] = picked - lse[:, None]
            lse_N[s:e] = lse
            if tail_from is not None:
                tail_lse = torch.logsumexp(x.scatter_(-1, ids_N_K[s:e, tail_from:], float("-inf")), dim=-1)
                out_N_K[s:e, k] = tail_lse - lse
                tail_lse_N[s:e] = tail_lse
        ctx.save_for_backward(logits_M_V, rows_N, ids_N_K, lse_N, tau_N, frac_N, tail_lse_N)
        ctx.temperature, ctx.chunk_rows, ctx.tail_from = temperature, chunk_rows, tail_from
        return out_N_K

    @staticmethod
    def backward(ctx, grad_N_K):
        logits_M_V, rows_N, ids_N_K, lse_N, tau_N, frac_N, tail_lse_N = ctx.saved_tensors
        t, chunk_rows, tail_from = ctx.temperature, ctx.chunk_rows, ctx.tail_from
        grad_M_V = torch.zeros_like(logits_M_V)
        n, k = ids_N_K.shape
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            x = _scaled_rows(logits_M_V, rows_N[s:e], lse_N.dtype, t)
            g_K = grad_N_K[s:e, :k].to(lse_N.dtype)
            g_sum = g_K.sum(-1, keepdim=True)
            # d/dz_v [z_id - lse(z)] = 1[v = id] - w_v softmax(z)_v, summed over
            # the K ids (w = the truncation weights, 1 without truncation).
            if tau_N is not None:
                d = _kept_exp(x, tau_N[s:e], frac_N[s:e], lse_N[s:e]).mul_(-g_sum)
                # A forced sampled token: its own term of the normaliser.
                forced = x.gather(-1, ids_N_K[s:e, :1]) < tau_N[s:e, None]
                w_forced = (x.gather(-1, ids_N_K[s:e, :1]) - lse_N[s:e, None]).exp() * forced
                d.scatter_add_(-1, ids_N_K[s:e, :1], -g_sum * w_forced)
            elif tail_from is None:
                d = x.sub_(lse_N[s:e, None]).exp_().mul_(-g_sum)
            else:
                # tail = lse_rest(z) - lse(z): d/dz_v = 1[v not in set] p_rest_v - p_v.
                g_tail = grad_N_K[s:e, k:k + 1].to(lse_N.dtype)
                p = (x - lse_N[s:e, None]).exp_()
                tail_lse = tail_lse_N[s:e, None]
                # An empty rest (every id in the set) has no gradient of its own.
                rest = x.scatter_(-1, ids_N_K[s:e, tail_from:], float("-inf")).sub_(
                    torch.where(torch.isfinite(tail_lse), tail_lse, torch.zeros_like(tail_lse))).exp_()
                d = p.mul_(-(g_sum + g_tail)).add_(rest.mul_(g_tail))
            d.scatter_add_(-1, ids_N_K[s:e], g_K)
            if t != 1.0:
                d.mul_(1.0 / t)
            # index_add_: a row listed twice (padding positions all point at a
            # sequence's row 0) gets both contributions, as autograd would give.
            grad_M_V.index_add_(0, rows_N[s:e], d.to(grad_M_V.dtype))
        return grad_M_V, None, None, None, None, None, None, None


def sampling_truncation(temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) of the distribution vLLM samples from and
    reports processed logprobs of: greedy (temperature <= 0) is the raw
    distribution (temperature 1, no truncation); top_k <= 0 is off."""
    if not temperature or temperature <= 0:
        return 1.0, 0, 1.0
    return float(temperature), max(0, int(top_k or 0)), float(top_p)


def gathered_logprobs(logits_M_V: torch.Tensor, rows_N: torch.Tensor, ids_N_K: torch.Tensor,
                      temperature: float = 1.0, chunk_bytes: int | None = None, *, top_k: int = 0,
                      top_p: float = 1.0, tail_from: int | None = None) -> torch.Tensor:
    """out[n, j] = log_softmax(logits_M_V[rows_N[n]] / temperature)[ids_N_K[n, j]]
    in float32 (float64 for float64 logits), differentiable in `logits_M_V`
    (any float dtype). `rows_N` and `ids_N_K` may repeat. Temperature <= 0
    means 1 and no truncation (greedy sampling has no distribution to
    correct for).

    `top_k` > 0 / `top_p` < 1: the log-softmax is over vLLM's top-k / nucleus
    set of each row (module docstring); `ids_N_K` must then be the sampled
    token, one column. `tail_from=j` appends a column: the log-probability
    of every token outside ids_N_K[n, j:] (distinct ids or not: a set);
    -inf when that set is the whole vocabulary. Not with truncation."""
    if logits_M_V.dim() != 2 or rows_N.dim() != 1 or ids_N_K.dim() != 2 or ids_N_K.shape[0] != rows_N.shape[0]:
        raise ValueError(f"gathered_logprobs wants logits (M, V), rows (N,), ids (N, K); got "
                         f"{tuple(logits_M_V.shape)}, {tuple(rows_N.shape)}, {tuple(ids_N_K.shape)}")
    t, top_k, top_p = sampling_truncation(temperature, top_k, top_p)
    if top_k >= logits_M_V.shape[1]:
        top_k = 0  # vLLM: top_k >= the vocabulary is off
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is outside (0, 1]")
    truncate = top_k > 0 or top_p < 1.0
    if truncate and ids_N_K.shape[1] != 1:
        raise ValueError(f"with top_k/top_p truncation ids must be the sampled token, one column; got "
                         f"{ids_N_K.shape[1]} columns")
    if tail_from is not None and (truncate or not 0 <= tail_from < ids_N_K.shape[1]):
        raise ValueError(f"tail_from={tail_from} needs 0 <= tail_from < K={ids_N_K.shape[1]} and no truncation")
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(logits_M_V.device.type, 64 << 20)
    # Truncation sorts a chunk (values and int64 indices) and keeps a few
    # float copies of it: smaller chunks keep the peak near one chunk's bytes.
    per_row = 4 * max(1, logits_M_V.shape[1]) * (4 if truncate else 1)
    chunk_rows = max(1, int(chunk_bytes // per_row))
    return _GatheredLogprobs.apply(logits_M_V, rows_N, ids_N_K, t, chunk_rows, top_k, top_p, tail_from)


def completion_logprobs(logits_B_L_V: torch.Tensor, predict_pos_B_T: torch.Tensor, ids_B_T_K: torch.Tensor,
                        temperature: float = 1.0, first: int = 0, chunk_bytes: int | None = None, *,
                        top_k: int = 0, top_p: float = 1.0, tail_from: int | None = None) -> torch.Tensor:
    """(B, T, K) log-probs of `ids_B_T_K` at each completion position of a
    padded micro-batch: row b's logits at sequence position
    `predict_pos_B_T[b, t]`, where `logits_B_L_V` starts at position `first`
    (the model was asked for logits from there on). `top_k`, `top_p`,
    `tail_from` as in `gathered_logprobs` ((B, T, K + 1) with a tail)."""
    B, L, V = logits_B_L_V.shape
    T = predict_pos_B_T.shape[1]
    rows_N = (torch.arange(B, device=logits_B_L_V.device)[:, None] * L + (predict_pos_B_T - first)).reshape(-1)
    return gathered_logprobs(logits_B_L_V.reshape(B * L, V), rows_N, ids_B_T_K.reshape(B * T, -1), temperature,
                             chunk_bytes, top_k=top_k, top_p=top_p, tail_from=tail_from).view(B, T, -1)
