"""The compute ratio (recipes/efficiency.py): log-linear SFT fit and its
extrapolation, the two accounting modes, the seed-to-seed interval.

    python -m pytest tests/unit/test_efficiency.py -q
"""

import math

import pytest

from recipes.efficiency import (compute_ratio, data_to_reach, fit_log_linear, ratio_interval, reproduced,
                                sft_flops_per_trace)


def test_fit_recovers_an_exact_log_linear_curve():
    pts = [(n, 0.2 + 0.05 * math.log2(n)) for n in (1000, 2000, 4000, 8000)]
    a, b = fit_log_linear(pts)
    assert a == pytest.approx(0.2) and b == pytest.approx(0.05)
    assert data_to_reach(a, b, 0.2 + 0.05 * 14) == pytest.approx(2 ** 14)
    with pytest.raises(ValueError, match="two distinct positive"):
        fit_log_linear([(1000, 0.5), (1000, 0.6)])


def test_flat_curve_never_reaches_a_higher_target():
    assert data_to_reach(0.5, 0.0, 0.6) == math.inf
    assert data_to_reach(0.5, -0.01, 0.4) == 0.0


def test_flops_per_trace_modes():
    kw = dict(n_student=10, n_teacher=40, prompt_tokens=12, completion_tokens=15)
    assert sft_flops_per_trace(mode="data_given", **kw) == 6 * 10 * 27
    assert sft_flops_per_trace(mode="with_generation", **kw) == 6 * 10 * 27 + 2 * 40 * 27
    with pytest.raises(ValueError, match="mode='both' is not valid"):
        sft_flops_per_trace(mode="both", **kw)


def test_ratio_against_the_publication_numbers():
    """The publication's table: init SFT-400K at 60%, SFT-2M extrapolated to
    ~70% (so 10 points per log2(5) of data), OPD 70% with 8.4e19 teacher +
    8.2e19 student FLOPs; SFT's 1.6M extra traces cost 1.5e21 student (9x
    mode) and 3.4e21 + 1.5e21 with the teacher's generation (30x mode)."""
    beta = 0.10 / math.log2(5)
    pts = [(n, 0.60 + beta * math.log2(n / 400e3)) for n in (100e3, 200e3, 400e3)]
    opd = [(0.0, 0.60), (1.66e20, 0.70)]
    per_trace_student = 3.8e20 / 400e3          # the init's student FLOPs per trace
    per_trace_teacher = 8.5e20 / 400e3
    r9 = compute_ratio(pts, 400e3, opd, 0.70, per_trace_student)
    r30 = compute_ratio(pts, 400e3, opd, 0.70, per_trace_student + per_trace_teacher)
    assert r9.n_star == pytest.approx(2e6) and r9.extrapolated
    assert r9.ratio == pytest.approx(1.52e21 / 1.66e20, rel=1e-9)      # ~9x
    assert r30.ratio == pytest.approx(4.92e21 / 1.66e20, rel=1e-9)     # ~30x


def test_ratio_interpolates_the_opd_crossing_and_handles_not_reaching():
    pts = [(1000, 0.5), (2000, 0.6)]
    r = compute_ratio(pts, 2000, [(0.0, 0.5), (100.0, 0.6), (200.0, 0.8)], 0.7, flops_per_trace=1.0)
    assert r.opd_flops == pytest.approx(150.0)
    assert r.n_star == pytest.approx(4000) and r.extrapolated and r.sft_flops == pytest.approx(2000)
    assert r.ratio == pytest.approx(2000 / 150)
    assert compute_ratio(pts, 2000, [(0.0, 0.5), (100.0, 0.6)], 0.7, 1.0).ratio is None
    # A target SFT already has at N0 costs it nothing.
    assert compute_ratio(pts, 2000, [(0.0, 0.5), (100.0, 0.6)], 0.55, 1.0).sft_flops == 0.0


def test_sft_reaching_the_target_in_its_run_is_read_off_its_measured_points():
    """Measured continued SFT beats the fit: an SFT run that jumps above its
    log-linear trend (e.g. when a lower lr anneals the init) is
    interpolated where it crosses, not extrapolated along the fit."""
    pts = [(1000, 0.5), (2000, 0.6), (2100, 0.8), (2200, 0.9)]   # N0 = 2000, then the run
    r = compute_ratio(pts, 2000, [(0.0, 0.6), (100.0, 0.7), (200.0, 0.9)], 0.7, flops_per_trace=1.0)
    assert not r.extrapolated and r.n_star == pytest.approx(2050)
    assert r.sft_flops == pytest.approx(50) and r.ratio == pytest.approx(0.5)


def test_interval_is_a_t_interval_on_log_ratios():
    g, lo, hi = ratio_interval([4.0, 9.0, 16.0])
    logs = [math.log(4), math.log(9), math.log(16)]
    m = sum(logs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 2)
    assert g == pytest.approx(math.exp(m))
    assert lo == pytest.approx(math.exp(m - 4.303 * sd / math.sqrt(3)))
    assert hi == pytest.approx(math.exp(m + 4.303 * sd / math.sqrt(3)))
    assert reproduced((g, lo, hi)) == (lo > 1)
    assert ratio_interval([2.0, 2.0]) == (pytest.approx(2.0),) * 3
    assert not reproduced(ratio_interval([0.5, 3.0, 1.2]))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ratio_interval([3.0])
    with pytest.raises(ValueError, match="never reach"):
        ratio_interval([3.0, math.inf])
    assert ratio_interval([math.inf, math.inf]) == (math.inf,) * 3


def test_carry_overrides_make_a_valid_driver_config(tmp_path, monkeypatch):
    """The driver config of the carry task validates (grader importable, token
    budgets consistent) without starting anything."""
    from cluster.tiny_models import build_model
    from cluster.tiny_data import read_jsonl
    from recipes.carry_task import parse_prompt
    from recipes.common import carry_overrides, driver_config

    m = str(build_model("student"))   # from the usual cache; the data files go to tmp_path
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    ov = carry_overrides(5, n_train=100, n_eval=500)
    cfg = driver_config(ov + [f"student.model={m}", f"teacher.model={m}"])
    assert cfg.eval.grader == "recipes.carry_task:grade_record" and cfg.eval.num_prompts == 500
    assert cfg.rollout.max_new_tokens == 16 and cfg.data.max_prompt_tokens == 15
    ev = read_jsonl(cfg.data.eval)
    assert len(ev) == 500 and all(len(r["prompt"]) == 15 and parse_prompt(r["prompt"])[2] == 5 for r in ev)
