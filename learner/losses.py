"""Distillation losses: pure torch functions on padded (B, T) tensors plus a mask.

Every function here is stateless and differentiable; the learner worker calls
`compute_loss` once per micro-batch. The naive float64 references these are
checked against live in tests/unit/test_losses.py
(`python -m pytest tests/unit/test_losses.py -q`).

Conventions: P = teacher, Q = student (GKD's notation, Agarwal et al., 2024). `lp` = log-prob.
Padded positions must be masked out by `mask_B_T` (1 = trained, 0 = not); the
values at masked positions may be anything finite.

Losses (`LossConfig.kind`):

* `reverse_kl` (the default; the method of "On-Policy Distillation" (Thinking Machines Lab, 2025)). The per-token
  advantage is the negative sampled reverse KL,
  `a_t = -kl_coef * (lp_sampler_t - lp_teacher_t)`, optionally summed over the
  future with discount gamma: `A_t = sum_{s >= t} gamma^(s-t) a_s` (within the
  sequence, masked tokens contribute 0). The loss is the importance-sampling
  policy-gradient surrogate `-w_t * A_t` with `r_t = exp(lp_learner_t - lp_sampler_t)`
  and the truncated weight `w_t = min(r_t, ratio_cap)` (truncated importance
  sampling): its value is `-min(r_t, cap) * A_t` and its gradient is
  `-min(r_t, cap) * A_t * grad lp_learner_t`, so a token whose ratio exceeds the
  cap still trains, with a bounded weight. On-policy with r = 1 the loss value
  equals the sampled reverse KL `kl_coef * mean(lp_sampler - lp_teacher)`.
  With a task reward (`reward.fn`, `reward.coef`) the advantage gains
  `reward.coef * (R - b)`: R the sample's reward, b the mean reward of its
  prompt's samples, the same for every token, undiscounted (see `reverse_kl`);
  `kl_coef = 0` is then plain RL with a group baseline.
* `reverse_kl_topk`, `forward_kl_topk`, `jsd`: exact divergences over the
  teacher's top-k support S_t (K ids per position from teacher_server). How the
  probability outside S_t (the tail) is handled is `topk_tail`:
    - "bucket" (default): a (K+1)-th category holds each side's tail mass
      (`1 - sum_{S_t} p`, `1 - sum_{S_t} q`), so student mass outside the
      teacher's top-k is penalised. This coarsening is a lower bound on the
      full-vocabulary divergence (data-processing inequality); it is exact
      when the tail is one token. The student's tail is exact: the learner
      sums its probability outside S_t over the whole vocabulary
      (`student_tail_lp_B_T`, learner/logprobs.py `tail_from`), which keeps
      its value and gradient however small it is (without it:
      `log(-expm1(logsumexp_{S_t} lp_q))` in float64). The teacher's tail is
      `log(-expm1(logsumexp_{S_t} lp_p))` in float64, never `1 - sum(exp)` in
      float32 (which cancels below ~1e-7), floored at the machine epsilon of
      the teacher log-probs' dtype (1.2e-7 for float32): log-probs rounded to
      that relative precision do not resolve a smaller remainder. Example: a
      student with 0.9 of its mass on one token that the teacher gives 1e-9
      (outside its top-k): the full-vocabulary reverse KL is 18.3 nats; the
      bucket gives 17.7 with float64 teacher log-probs and 14.0 at the float32
      floor, where "renormalize" gives ~0 (tests/unit/test_losses.py).
    - "renormalize": both P and Q are restricted to S_t and renormalised
      there; the divergence is between these conditionals. The tail is
      ignored: Q's mass outside S_t is neither rewarded nor penalised, so the
      student above scores ~0.
  `jsd` is the generalized JSD of GKD (Agarwal et al., 2024),
  `D(beta) = beta KL(P || M) + (1-beta) KL(Q || M)`, `M = beta P + (1-beta) Q`,
  divided by `beta (1-beta)`: D(beta) itself goes to 0 at both ends, while
  D(beta)/(beta(1-beta)) goes to KL(P||Q) (forward) as beta -> 0 and to
  KL(Q||P) (reverse) as beta -> 1, so beta = 0 and beta = 1 are exactly the
  forward and reverse KL and the loss scale stays comparable across beta.
* `sft`: cross-entropy `-lp_learner_t` on the given completions (the SFT
  baseline, and sequence-level KD when the completions are the teacher's).

The variants of GKD and "On-Policy Distillation" by config (train.sample_from x loss.kind):
  on-policy  + reverse KL : sample_from=student, kind=reverse_kl (or reverse_kl_topk)
  on-policy  + forward KL : sample_from=student, kind=forward_kl_topk (GKD)
  off-policy + forward KL : sample_from=teacher, kind=forward_kl_topk (supervised KD)
  off-policy + reverse KL : sample_from=teacher, kind=reverse_kl_topk
  either     + JSD(beta)  : kind=jsd;   sequence-level KD / SFT: kind=sft
`reverse_kl` itself needs the student's own samples (on teacher samples
lp_sampler is the teacher's and the advantage is 0): its entry in `LOSSES`
(learner/config.py) allows sample_from=student only, and cluster/config.py
rejects the rest.

Temperature: `reverse_kl` trains the distribution the sampler drew from
(learner logits / sampling temperature, for an unbiased ratio); `sft` and the
top-k divergences fit the model's own distribution (temperature 1) to the
target.

Truncated sampling (`rollout.top_p` < 1, `rollout.top_k` > 0): the sampler
draws from, and reports logprobs under, q_S = the (tempered) student
restricted to the top-k / nucleus set S_t and renormalised (vLLM's processed
logprobs). `lp_learner` is computed under the same truncation
(learner/logprobs.py repeats vLLM's mask on the learner's logits), so r_t
compares like with like and is 1 on-policy up to the two engines' float
rounding. (Scoring the untruncated q instead gives r_t = Z_t, the nucleus
mass, on every token, and shifts the advantage by log Z_t; the cap only
bounds r from above and would not notice.) What each loss trains toward:
`reverse_kl` trains q_S: with the mask a constant its gradient is the policy
gradient of -KL(q_S || p) against the untruncated teacher, which moves the
student's relative probabilities inside S_t toward the teacher's and puts
no gradient on its logits outside S_t (no token is sampled there); the
sampled KL it logs is KL(q_S || p) >= -log P_teacher(S_t), above 0 even for
a student equal to the teacher (whose expected gradient is then 0). `sft`
and the top-k divergences fit the untruncated student (temperature 1) and
use the truncated policy only to pick the states. The method's references
(tinker-cookbook's on-policy distillation, GKD) sample without truncation;
with it, opd trains the policy that actually samples.

Normalisation (`LossConfig.normalize`): "token" divides the masked sum over all
tokens of the GLOBAL batch by the global number of trained tokens; "sequence"
averages each sequence over its own trained tokens, then divides by the global
number of sequences with at least one trained token. The caller passes the
global denominator, so splitting a batch over ranks and micro-batches and
summing the pieces gives exactly the loss (and gradient) of the whole batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from learner.config import LOSSES, LossConfig

TOPK_TAIL_MODES = ("renormalize", "bucket")


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------

def loss_denominator(mask_B_T: torch.Tensor, normalize: str) -> float:
    """The denominator of `aggregate` for the batch `mask_B_T` (sum it over
    ranks and micro-batches to get the global one)."""
    if normalize == "token":
        return float(mask_B_T.sum().item())
    if normalize == "sequence":
        return float((mask_B_T.sum(dim=1) > 0).sum().item())
    raise ValueError(f"normalize={normalize!r} is not valid; use 'token' or 'sequence'")


def aggregate(loss_B_T: torch.Tensor, mask_B_T: torch.Tensor, normalize: str, denominator: float) -> torch.Tensor:
    """Masked reduction of per-token values to a scalar, divided by the
    caller's (global) `denominator` (see `loss_denominator`)."""
    mask = mask_B_T.to(loss_B_T.dtype)
    masked = torch.where(mask_B_T.bool(), loss_B_T, torch.zeros_like(loss_B_T))
    if normalize == "token":
        total = masked.sum()
    elif normalize == "sequence":
        n_B = mask.sum(dim=1)
        total = (masked.sum(dim=1) / n_B.clamp(min=1.0)).sum()
    else:
        raise ValueError(f"normalize={normalize!r} is not valid; use 'token' or 'sequence'")
    return total / max(float(denominator), 1.0)


# --------------------------------------------------------------------------
# Sampled-token losses
# --------------------------------------------------------------------------

def discounted_advantages(adv_B_T: torch.Tensor, mask_B_T: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = sum_{s >= t} discount^(s-t) a_s over the masked tokens of each row
    (discount 0 returns the masked input)."""
    adv = torch.where(mask_B_T.bool(), adv_B_T, torch.zeros_like(adv_B_T))
    if discount == 0.0:
        return adv
    out = torch.empty_like(adv)
    running = torch.zeros_like(adv[:, 0])
    for t in range(adv.shape[1] - 1, -1, -1):
        running = adv[:, t] + discount * running
        out[:, t] = running
    return out


def reverse_kl(
    learner_lp_B_T: torch.Tensor,
    sampler_lp_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    discount: float = 0.0,
    ratio_cap: float = 2.0,
    reward_advantage_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token importance-sampled reverse-KL loss (see the module docstring).

    `reward_advantage_B_T` (optional, reward.coef * (R - b) of each sample
    broadcast over its tokens) is added to the advantage:
    `A_t = kl_coef * (lp_teacher_t - lp_sampler_t) [discounted] + reward.coef * (R - b)`.
    The reward is a sequence-level return given whole to every token, NOT
    discounted by `discount` (GRPO's and tinker-cookbook's convention: one
    advantage per trajectory, broadcast per token), and it shares the KL
    term's truncated importance weight min(r_t, cap). None = exactly the
    distillation loss.

    Returns (loss_B_T, extras) where extras hold the per-token `advantage`,
    `ratio` (untruncated) and `truncated` (bool) for metrics. Only
    `learner_lp_B_T` carries gradient."""
    sampler_lp = sampler_lp_B_T.detach()
    adv_B_T = -kl_coef * (sampler_lp - teacher_lp_B_T.detach())
    adv_B_T = discounted_advantages(adv_B_T, mask_B_T, discount)
    if reward_advantage_B_T is not None:
        adv_B_T = adv_B_T + torch.where(mask_B_T.bool(), reward_advantage_B_T.detach().to(adv_B_T.dtype),
                                        torch.zeros_like(adv_B_T))
    log_ratio = torch.where(mask_B_T.bool(), learner_lp_B_T - sampler_lp, torch.zeros_like(learner_lp_B_T))
    ratio = torch.exp(log_ratio)
    # w = min(r, cap) in value, and d w = min(r, cap) d lp: r * sg(min(r, cap) / r).
    weight = ratio * (torch.clamp(ratio, max=ratio_cap) / ratio).detach()
    loss_B_T = -weight * adv_B_T
    return loss_B_T, {"advantage": adv_B_T, "ratio": ratio.detach(), "truncated": ratio.detach() > ratio_cap}


def sft(learner_lp_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy on given completions."""
    return -learner_lp_B_T


# --------------------------------------------------------------------------
# Top-k divergences
# --------------------------------------------------------------------------

def log_tail_mass(lp_B_T_K: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """log(1 - sum_k exp(lp_k)) computed as log(-expm1(logsumexp(lp))) in
    float64 (no cancellation in 1 - sum), clamped at `floor` (> 0: below it
    the inputs do not resolve the remainder; the gradient is 0 there).
    -inf entries are absent. Returns (B, T, 1) in the input dtype."""
    lse = torch.logsumexp(lp_B_T_K.double(), dim=-1, keepdim=True)
    mass = -torch.expm1(lse)
    return torch.log(torch.clamp(mass, min=max(floor, torch.finfo(torch.float64).tiny))).to(lp_B_T_K.dtype)


def _topk_categories(
    student_top_lp_B_T_K: torch.Tensor, teacher_top_lp_B_T_K: torch.Tensor, tail: str,
    student_tail_lp_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of teacher and student over the categories of `tail` mode,
    and a validity mask of the categories (teacher -inf entries = absent).

    Inputs are full-vocabulary log-probs gathered at the teacher's top-k ids;
    `student_tail_lp_B_T` is the student's exact log-mass outside the valid
    ids ("bucket"; computed from the top-k log-probs when None)."""
    valid = torch.isfinite(teacher_top_lp_B_T_K)
    neg_inf = torch.full_like(student_top_lp_B_T_K, float("-inf"))
    lp_t = torch.where(valid, teacher_top_lp_B_T_K, neg_inf)
    lp_s = torch.where(valid, student_top_lp_B_T_K, neg_inf)
    if tail == "renormalize":
        lp_t = lp_t - torch.logsumexp(lp_t, dim=-1, keepdim=True)
        lp_s = lp_s - torch.logsumexp(lp_s, dim=-1, keepdim=True)
        return lp_t, lp_s, valid
    if tail == "bucket":
        t_tail = log_tail_mass(lp_t, floor=torch.finfo(teacher_top_lp_B_T_K.dtype).eps).detach()
        if student_tail_lp_B_T is not None:
            s_tail = student_tail_lp_B_T[..., None].to(lp_s.dtype)
        else:
            s_tail = log_tail_mass(lp_s, floor=torch.finfo(student_top_lp_B_T_K.dtype).eps)
        ones = torch.ones_like(valid[..., :1])
        return (torch.cat([lp_t, t_tail.to(lp_t.dtype)], dim=-1), torch.cat([lp_s, s_tail], dim=-1),
                torch.cat([valid, ones], dim=-1))
    raise ValueError(f"topk_tail={tail!r} is not valid; use one of {TOPK_TAIL_MODES}")


def _kl(lp_a: torch.Tensor, lp_b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum_c a_c (lp_a_c - lp_b_c) over valid categories; 0 log 0 = 0 (an
    empty category, lp_a = -inf, adds 0 and no NaN gradient)."""
    zero = torch.zeros_like(lp_a)
    a = torch.where(valid, torch.exp(lp_a), zero)
    diff = torch.where(valid & (lp_a > float("-inf")), lp_a - lp_b, zero)
    return (a * diff).sum(dim=-1)


def forward_kl_topk(student_top_lp_B_T_K, teacher_top_lp_B_T_K, *, tail: str = "bucket",
                    student_tail_lp_B_T=None) -> torch.Tensor:
    """Per-token KL(P || Q) over the teacher's top-k support."""
    lp_t, lp_s, valid = _topk_categories(student_top_lp_B_T_K, teacher_top_lp_B_T_K, tail, student_tail_lp_B_T)
    return _kl(lp_t, lp_s, valid)


def reverse_kl_topk(student_top_lp_B_T_K, teacher_top_lp_B_T_K, *, tail: str = "bucket",
                    student_tail_lp_B_T=None) -> torch.Tensor:
    """Per-token KL(Q || P) over the teacher's top-k support."""
    lp_t, lp_s, valid = _topk_categories(student_top_lp_B_T_K, teacher_top_lp_B_T_K, tail, student_tail_lp_B_T)
    return _kl(lp_s, lp_t, valid)


def jsd_topk(student_top_lp_B_T_K, teacher_top_lp_B_T_K, *, beta: float = 0.5,
             tail: str = "bucket", student_tail_lp_B_T=None) -> torch.Tensor:
    """Per-token generalized JSD(beta) / (beta (1 - beta)) over the teacher's
    top-k support; exactly forward KL at beta = 0 and reverse KL at beta = 1."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta} is outside [0, 1]")
    lp_t, lp_s, valid = _topk_categories(student_top_lp_B_T_K, teacher_top_lp_B_T_K, tail, student_tail_lp_B_T)
    if beta == 0.0:
        return _kl(lp_t, lp_s, valid)
    if beta == 1.0:
        return _kl(lp_s, lp_t, valid)
    lp_m = torch.logsumexp(torch.stack([lp_t + math.log(beta), lp_s + math.log1p(-beta)]), dim=0)
    d = beta * _kl(lp_t, lp_m, valid) + (1.0 - beta) * _kl(lp_s, lp_m, valid)
    return d / (beta * (1.0 - beta))


# --------------------------------------------------------------------------
# Dispatch (what the worker calls per micro-batch)
# --------------------------------------------------------------------------

@dataclasses.dataclass
class LossInputs:
    """One micro-batch's tensors, all (B, T) or (B, T, K), padded, on one device."""

    mask_B_T: torch.Tensor
    learner_lp_B_T: torch.Tensor  # log p_learner of the completion tokens (reverse_kl: the sampling distribution)
    sampler_lp_B_T: torch.Tensor
    teacher_lp_B_T: torch.Tensor | None = None
    student_top_lp_B_T_K: torch.Tensor | None = None  # learner lp at the teacher's top-k ids
    teacher_top_lp_B_T_K: torch.Tensor | None = None
    # reward.coef * (R - group mean reward) of each row, broadcast over its
    # tokens (reverse_kl only); None = no reward term.
    reward_advantage_B_T: torch.Tensor | None = None
    # The learner's exact log-mass outside the teacher's valid top-k ids
    # (topk_tail="bucket"); None = computed from student_top_lp_B_T_K.
    student_tail_lp_B_T: torch.Tensor | None = None


def compute_loss(inputs: LossInputs, loss_cfg: LossConfig,
                 denominator: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar loss of a micro-batch (its share of the global loss) and
    per-token extras for metrics. `LOSSES[loss_cfg.kind]` (learner/config.py)
    says what the loss reads and names its per-token function here; its call
    follows from what it reads: the policy-gradient surrogate (teacher
    logprobs of the sampled tokens), a divergence over the teacher's top-k
    support, or the completion tokens alone (sft)."""
    kind = loss_cfg.kind
    spec = LOSSES.get(kind)
    fn = None if spec is None else globals()[spec.fn]
    mask = inputs.mask_B_T
    extras: dict[str, torch.Tensor] = {}
    if spec is not None and spec.needs_teacher_lp:
        if inputs.teacher_lp_B_T is None:
            raise ValueError(f"loss.kind={kind} needs teacher logprobs, but the batch has "
                             "teacher_logprobs_B_T=None; score the batch with the teacher or use loss.kind=sft")
        loss_B_T, extras = fn(inputs.learner_lp_B_T, inputs.sampler_lp_B_T, inputs.teacher_lp_B_T, mask,
                              kl_coef=loss_cfg.kl_coef, discount=loss_cfg.discount, ratio_cap=loss_cfg.ratio_cap,
                              reward_advantage_B_T=inputs.reward_advantage_B_T)
    elif inputs.reward_advantage_B_T is not None:
        raise ValueError(f"a reward advantage needs the policy-gradient loss (loss.kind=reverse_kl), not "
                         f"loss.kind={kind}; set reward.coef=0 or loss.kind=reverse_kl")
    elif spec is None:
        raise ValueError(f"loss.kind={kind!r} is not valid; use one of {', '.join(LOSSES)}")
    elif spec.needs_topk:
        if inputs.student_top_lp_B_T_K is None or inputs.teacher_top_lp_B_T_K is None:
            raise ValueError(f"loss.kind={kind} needs the teacher's top-k support, but the batch has "
                             "teacher_top_ids_B_T_K=None; set teacher.top_k > 0")
        kw = dict(tail=loss_cfg.topk_tail, student_tail_lp_B_T=inputs.student_tail_lp_B_T)
        if fn is jsd_topk:
            kw["beta"] = loss_cfg.jsd_beta
        loss_B_T = fn(inputs.student_top_lp_B_T_K, inputs.teacher_top_lp_B_T_K, **kw)
    else:
        loss_B_T = fn(inputs.learner_lp_B_T, mask)
    return aggregate(loss_B_T, mask, loss_cfg.normalize, denominator), extras
