"""bench/e2e.py's accounting: the steps an opd run takes (the async drain
step is run, not measured). The FLOP floor reuses recipes/report.py's
step_flops and recipes.sft.flop_params (tests/unit/test_recipes.py)."""

from pathlib import Path

import pytest

from bench.e2e import Workload, drain_steps, opd_overrides


@pytest.mark.parametrize("mode,total", [("sync", 7), ("sync:c2", 7), ("async", 8), ("async:c2", 8)])
def test_an_async_run_takes_its_drain_step_after_the_measured_ones(mode, total):
    w = Workload(pair="small", student="tiny:student", teacher="tiny:teacher", prompts_per_step=2,
                 samples_per_prompt=2, max_new_tokens=4, lr=1e-3, warmup=3, steps=4)
    assert f"train.steps={total}" in opd_overrides(w, mode, Path("/tmp/x"), [])
    assert drain_steps(mode.split(":")[0]) == total - 7
