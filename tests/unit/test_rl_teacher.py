"""recipes.rl_teacher's pure pieces: the target accuracy, steps to reach it,
their ratio and the report tables, on synthetic metrics rows (no Ray).

    python -m pytest tests/unit/test_rl_teacher.py -q
"""

import pytest

from recipes.rl_teacher import curve_table, step_ratio, steps_table, steps_to_reach, summarize, target_accuracy


def test_target_is_a_fraction_of_the_gain():
    assert target_accuracy(0.4, 0.8, 0.5) == pytest.approx(0.6)
    assert target_accuracy(0.4, 0.8, 1.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="target-fraction"):
        target_accuracy(0.4, 0.8, 0.0)
    with pytest.raises(ValueError, match="target-fraction"):
        target_accuracy(0.4, 0.8, 1.5)
    with pytest.raises(ValueError, match="not above the init"):
        target_accuracy(0.4, 0.4, 0.5)


def test_steps_to_reach_interpolates_the_first_crossing():
    curve = [(0, 0.4), (10, 0.5), (20, 0.7), (30, 0.65), (40, 0.8)]
    # 0.6 lies halfway between step 10 (0.5) and step 20 (0.7).
    assert steps_to_reach(curve, 0.6) == pytest.approx(15.0)
    # The first crossing counts, not a later dip and recrossing.
    assert steps_to_reach(curve, 0.7) == pytest.approx(20.0)
    assert steps_to_reach(curve, 0.4) == 0.0  # already there at the start
    assert steps_to_reach(curve, 0.81) is None


def test_step_ratio():
    assert step_ratio(40.0, 5.0) == pytest.approx(8.0)
    assert step_ratio(None, 5.0) is None
    assert step_ratio(40.0, None) is None
    assert step_ratio(40.0, 0.0) is None


def _rows(curve):
    return [{"step": s, "eval/accuracy": a, "eval/reverse_kl": 0.1} for s, a in curve]


def test_summarize_uses_one_target_for_both_runs():
    results = {"rl": _rows([(0, 0.4), (20, 0.5), (40, 0.6), (60, 0.7), (80, 0.8)]),
               "distill": _rows([(0, 0.4), (2, 0.6), (4, 0.76), (6, 0.78)])}
    s = summarize(results, 0.8, fractions=(0.5, 1.0))
    assert s["init_accuracy"] == 0.4 and s["teacher_accuracy"] == 0.8 and s["teacher_steps"] == 80
    assert s["target"] == pytest.approx(0.72)
    # RL: 0.72 between step 60 (0.7) and 80 (0.8) -> 64; distillation: between 2 (0.6) and 4 (0.76) -> 3.5.
    assert s["rl_steps"] == pytest.approx(64.0)
    assert s["distill_steps"] == pytest.approx(3.5)
    assert s["ratio"] == pytest.approx(64.0 / 3.5)
    by = {r["fraction"]: r for r in s["by_fraction"]}
    assert sorted(by) == [0.5, 0.8, 1.0]
    assert by[0.5]["rl_steps"] == pytest.approx(40.0) and by[0.5]["distill_steps"] == pytest.approx(2.0)
    # Distillation never reaches the teacher's own accuracy here: no ratio.
    assert by[1.0]["distill_steps"] is None and by[1.0]["ratio"] is None
    table = steps_table(s).splitlines()
    assert len(table) == 2 + 3
    assert table[3].replace(" ", "") == "|0.800|0.720|64.0|3.5|18.3x|"
    curves = curve_table(results).splitlines()
    assert len(curves) == 2 + 8  # steps 0, 2, 4, 6, 20, 40, 60, 80
    assert curves[2].replace(" ", "") == "|0|0.400|0.400|0.100|"
    assert curves[3].replace(" ", "") == "|2|-|0.600|0.100|"


def test_summarize_refuses_rl_that_did_not_improve():
    results = {"rl": _rows([(0, 0.4), (20, 0.35)]), "distill": _rows([(0, 0.4), (2, 0.4)])}
    with pytest.raises(ValueError, match="did not improve"):
        summarize(results, 0.8)


def test_distill_set_must_be_key_value(capsys):
    from recipes.rl_teacher import main

    with pytest.raises(SystemExit) as e:   # refused before any model is built
        main(["--distill-set", "loss.kind"])
    assert e.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
