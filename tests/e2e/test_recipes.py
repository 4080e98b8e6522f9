"""`python -m recipes.compare` end to end at toy scale, everything real: a
carry teacher and a student init trained here, then one driver run per method
(Ray, vLLM sampler, the teacher server the driver starts, DeepSpeed), the
analysis, the report and the plot.

The numbers are meaningless at this scale (a 40-step teacher, 2 steps per
run); what is checked is that the recipe's parts fit: each run is a real
driver run of its method, the compute ratios and the report are built from
them, and a rerun into the same --out reuses the finished runs.
"""

from __future__ import annotations

import json

import pytest

from recipes import compare
from recipes.report import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")

METHODS = ("seq_kd", "reverse_kl_topk")
ARGS = ["--quick", "--digits", "3", "--teacher-spec", "student-1l", "--teacher-steps", "40",
        "--student-spec", "student-1l-32", "--n0", "1024", "--steps", "2", "--eval-every", "1",
        "--prompts-per-step", "8", "--samples-per-prompt", "2", "--methods", ",".join(METHODS),
        "--top-k", "4", "eval.num_prompts=64"]


def test_compare_runs_each_method_through_the_driver_and_reuses_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    run_dirs = {m: out / compare.run_name(m, 1e-3, 0) for m in METHODS}
    assert compare.main(ARGS + ["--out", str(out)]) == 0

    res = json.loads((out / "compare.json").read_text())
    assert set(res["methods"]) == set(METHODS)
    assert all(info["lr"] == 1e-3 for info in res["methods"].values())
    trained = {}
    for m, run_dir in run_dirs.items():
        rows = read_metrics(run_dir)
        steps = [r["step"] for r in rows if "eval/accuracy" in r]
        assert steps == [0, 1, 2], (m, steps)
        trained[m] = [r for r in rows if "learner/loss" in r]
        assert [r["step"] for r in trained[m]] == [1, 2], m
        # The teacher the driver started scored every trained step.
        assert all(r["teacher/tokens_scored"] > 0 for r in trained[m]), m
        assert (run_dir / "final" / "config.json").is_file(), m
        result = json.loads((run_dir / "result.json").read_text())
        assert 0.0 <= result["validation_accuracy"] <= 1.0
        assert set(result["diagnosis"]) >= {"greedy", "accuracy", "probe"}
    # (a) trains on completions the teacher wrote; (c) on the student's own,
    # which the teacher only scores.
    assert all(r["teacher/tokens_generated"] > 0 and "teacher/forward_kl" in r for r in trained["seq_kd"])
    assert all(r.get("teacher/tokens_generated", 0) == 0 and "teacher/reverse_kl" in r
               for r in trained["reverse_kl_topk"])

    # Ratios in both of the publication's modes, one seed: per-seed only.
    assert set(res["ratios"]) == {"reverse_kl_topk"}
    for mode in ("data_given", "with_generation"):
        e = res["ratios"]["reverse_kl_topk"][mode]
        assert len(e["per_seed"]) == 1 and "interval" not in e
    assert len(res["truth_sft"]["curves"]) == 1 and [r["step"] for r in res["truth_sft"]["curves"][0]] == [0, 1, 2]
    md = (out / "compare.md").read_text()
    for part in ("SFT curve of the student init", "Compute ratio", "Where the errors come from", "Run time"):
        assert part in md, part
    assert (out / "compare.png").stat().st_size > 10_000

    # A rerun into the same --out reads the finished runs back: no driver run.
    def no_driver(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare, "run_driver", no_driver)
    before = {m: (d / "result.json").stat().st_mtime_ns for m, d in run_dirs.items()}
    assert compare.main(ARGS + ["--out", str(out), "--no-truth-ref"]) == 0
    assert before == {m: (d / "result.json").stat().st_mtime_ns for m, d in run_dirs.items()}
    assert json.loads((out / "compare.json").read_text())["methods"]["seq_kd"]["final_accuracy"] == \
        res["methods"]["seq_kd"]["final_accuracy"]
