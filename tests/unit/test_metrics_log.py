"""cluster.metrics_log.MetricsLogger with a real offline wandb run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Two driver runs in one process (as the recipes do), then an error: its
# traceback must print once. wandb.init replaces sys.excepthook with a hook
# that prints the traceback and then calls the hook it replaced, and
# run.finish() does not put the old one back.
SCRIPT = textwrap.dedent("""
    import sys
    from cluster.config import WandbConfig
    from cluster.metrics_log import MetricsLogger

    hooks = (sys.excepthook, sys.exit)
    for name in ("a", "b"):
        m = MetricsLogger(sys.argv[1] + "/" + name, WandbConfig(mode="offline", project="t"), {"x": 1})
        assert m.run is not None
        m.log(1, {"loss": 0.5})
        m.close()
    assert (sys.excepthook, sys.exit) == hooks, (sys.excepthook, sys.exit)
    raise ValueError("boom after two runs")
""")


def test_an_error_after_two_wandb_runs_prints_one_traceback(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "WANDB_SILENT": "true"})
    assert p.returncode == 1, p.stderr[-3000:]
    assert "ValueError: boom after two runs" in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("Traceback (most recent call last)") == 1, p.stderr[-3000:]
    for name in ("a", "b"):
        assert (tmp_path / name / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 0.5}'
        assert list((tmp_path / name / "wandb").glob("offline-run-*")), name
