"""One place that records a step's metrics: `<run.dir>/metrics.jsonl` (one JSON
object per step, with a `step` field) and wandb (online, offline or disabled).

wandb mode "auto" is online when an API key is available (WANDB_API_KEY or a
`wandb login`), else offline: the run is written under `<run.dir>/wandb/` and
uploaded later with `wandb sync <run.dir>/wandb/offline-run-*`.

A resumed run reopens the same wandb run id (kept in the driver checkpoint) and
appends to metrics.jsonl after dropping lines of steps past the checkpoint, so
the series stay continuous.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from cluster.config import WandbConfig


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, wcfg: WandbConfig, config_dict: dict, run_id: str | None = None,
                 resume_from_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_from_step is not None and self.path.exists():
            # Drop lines for steps the resumed run will redo (after the checkpoint).
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) <= resume_from_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")
        self.mode = resolve_wandb_mode(wcfg.mode)
        self.run = None
        # wandb.init replaces sys.excepthook and sys.exit with its run's hooks
        # and finish() leaves them there: in a process that runs the driver
        # more than once (the recipes) they would stack, and an error would
        # print its traceback once per earlier run. close() puts these back.
        self._sys_hooks = (sys.excepthook, sys.exit)
        if self.mode != "disabled":
            import wandb

            kwargs = dict(project=wcfg.project, entity=wcfg.entity, name=wcfg.name or self.run_dir.name,
                          dir=str(self.run_dir), config=config_dict, mode=self.mode, reinit="finish_previous")
            try:
                self.run = wandb.init(id=run_id, resume="allow" if run_id else None, **kwargs)
            except Exception as e:  # noqa: BLE001 - wandb raises its own server errors
                if not run_id or "in use" not in str(e):
                    raise
                # The killed driver's wandb service still holds the id (it can
                # outlive a SIGKILLed driver): continue in a new wandb run;
                # metrics.jsonl stays continuous either way.
                print(f"[opd] wandb run {run_id} is still held by a previous process; logging this resumed "
                      f"run as a new wandb run", flush=True)
                self.run = wandb.init(**kwargs)
        self.run_id = self.run.id if self.run is not None else run_id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.run is not None:
            # wandb charts numbers; strings (e.g. digests) stay in metrics.jsonl only.
            self.run.log({k: v for k, v in row.items()
                          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self._f.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
            sys.excepthook, sys.exit = self._sys_hooks
