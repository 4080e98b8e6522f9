"""The compute ratio of "On-Policy Distillation" (Thinking Machines Lab,
2025): how much more compute continued SFT on teacher traces needs than
on-policy distillation to reach the same accuracy, with the SFT curve
extrapolated log-linearly in data as the publication's "SFT-2M
(extrapolated)" row, in both of its accounting modes, and a seed-to-seed
interval. Pure functions (tests/unit/test_efficiency.py).

Accounting (the publication's table counts the increment from the common
init; its 9x and 30x are the two modes):

    "data_given"       SFT pays only its student training (6 N_s per token of
                       each trace); the traces are taken as given.
    "with_generation"  SFT also pays the teacher writing them (2 N_t per
                       token: prompt prefill + sampled completion).

On-policy distillation always pays its student sampling, its training and
the teacher's scoring (recipes/report.py: step_flops("on_policy")).
"""

from __future__ import annotations

import dataclasses
import math

MODES = ("data_given", "with_generation")

# Two-sided 95% Student t quantiles t(0.975, df), df = 1..30 (standard table).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def sft_flops_per_trace(*, n_student: int, n_teacher: int, prompt_tokens: float, completion_tokens: float,
                        mode: str) -> float:
    """FLOPs that continued SFT spends per teacher trace in `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; use one of {', '.join(MODES)}")
    tokens = prompt_tokens + completion_tokens
    return 6.0 * n_student * tokens + (2.0 * n_teacher * tokens if mode == "with_generation" else 0.0)


def fit_log_linear(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares acc = alpha + beta log2(N) over (N traces, accuracy)
    points (N > 0, at least two distinct N)."""
    if len({n for n, _ in points}) < 2 or any(n <= 0 for n, _ in points):
        raise ValueError(f"a log-linear fit needs at least two distinct positive data sizes, got {points}")
    xs = [math.log2(n) for n, _ in points]
    ys = [a for _, a in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - beta * mx, beta


def data_to_reach(alpha: float, beta: float, acc: float) -> float:
    """Traces N at which the fitted curve reaches `acc` (inf when the curve
    does not rise: beta <= 0 and acc above it)."""
    if beta <= 0:
        return math.inf if acc > alpha else 0.0
    return 2.0 ** ((acc - alpha) / beta)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """One seed's comparison at the target accuracy."""

    target: float
    # SFT traces (in total, the init's N0 included) where the fit reaches target.
    n_star: float
    # True when n_star lies beyond the SFT data actually run.
    extrapolated: bool
    sft_flops: float
    opd_flops: float | None

    @property
    def ratio(self) -> float | None:
        if self.opd_flops is None or self.opd_flops <= 0:
            return None
        return self.sft_flops / self.opd_flops


def compute_ratio(sft_points: list[tuple[float, float]], n0: float, opd_curve: list[tuple[float, float]],
                  target: float, flops_per_trace: float) -> Ratio:
    """SFT's compute from the init (N0 traces) to `target`, over on-policy
    distillation's compute to `target`. SFT's data to reach it is read off
    its measured points from N0 on (interpolated at the first crossing) when
    they reach it, else off the log-linear fit of all `sft_points`,
    extrapolated (`opd_curve`:
    (cumulative FLOPs from the init, accuracy), sorted; linearly interpolated
    at the first crossing; None when OPD never reaches it)."""
    from recipes.report import flops_to_reach

    measured = sorted((n, a) for n, a in sft_points if n >= n0)
    n_star = flops_to_reach(measured, target) if measured else None   # x = traces here
    extrapolated = n_star is None
    if extrapolated:
        alpha, beta = fit_log_linear(sft_points)
        n_star = max(n0, data_to_reach(alpha, beta, target))
    return Ratio(target=target, n_star=n_star, extrapolated=extrapolated,
                 sft_flops=(n_star - n0) * flops_per_trace, opd_flops=flops_to_reach(opd_curve, target))


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of per-seed compute ratios: a 95% Student t
    interval on log ratio (seed to seed). Needs >= 2 finite positive ratios;
    an infinite ratio (SFT never gets there) makes the interval (inf, inf, inf)
    only if all are; otherwise it is an error to average it."""
    if len(ratios) < 2:
        raise ValueError(f"a seed-to-seed interval needs at least 2 seeds, got {len(ratios)}")
    if any(not r > 0 for r in ratios):
        raise ValueError(f"ratios must be positive, got {ratios}")
    if any(math.isinf(r) for r in ratios):
        if all(math.isinf(r) for r in ratios):
            return math.inf, math.inf, math.inf
        raise ValueError(f"some seeds' SFT curves never reach the target (ratio inf): {ratios}; report them "
                         "per seed instead of an interval")
    logs = [math.log(r) for r in ratios]
    k = len(logs)
    m = sum(logs) / k
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / (k - 1))
    t = _T975[min(k - 1, len(_T975)) - 1]
    half = t * sd / math.sqrt(k)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def reproduced(interval: tuple[float, float, float]) -> bool:
    """The published claim (on-policy distillation needs less compute) holds
    when the whole interval lies above 1."""
    return interval[1] > 1.0
