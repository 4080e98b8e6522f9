"""Run checkpoints: the learners' full training state plus the driver's state
(step, weight version, prompt-stream position, wandb run id), written
atomically.

Layout:
    <run.dir>/checkpoints/step_00000010/{learner/, driver_state.json}
    <run.dir>/checkpoints/latest          (text: "step_00000010")

A checkpoint is built in a hidden temp directory and renamed into place only
when complete; `latest` is replaced (os.replace) after that. A crash at any
point (even SIGKILL mid-save) leaves the previous checkpoint and pointer
intact; leftover temp directories are removed by the next save or resume.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from learner.checkpoint import _fsync_path as _fsync_dir  # one fsync/atomic-write implementation
from learner.checkpoint import write_atomic

DRIVER_STATE = "driver_state.json"
LATEST = "latest"


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def clean_partial(run_dir: Path) -> list[str]:
    """Remove temp dirs left by an interrupted save; returns their names."""
    root = ckpt_root(run_dir)
    removed = []
    if root.exists():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def save_checkpoint(run_dir: Path, step: int, save_learner, driver_state: dict, keep: int) -> Path:
    """`save_learner(path)` writes the learners' state into `path` (a fresh dir)."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_partial(run_dir)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    save_learner(tmp / "learner")
    with open(tmp / DRIVER_STATE, "w") as f:
        json.dump({"step": step, **driver_state}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    # Fault-injection hook for the reliability tests: widen the window in which
    # a SIGKILL finds a half-built checkpoint.
    delay = float(os.environ.get("OPD_FAULT_CHECKPOINT_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    final = root / name
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_atomic(root / LATEST, name.encode())
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / DRIVER_STATE).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = ckpt_root(run_dir)
    ptr = root / LATEST
    if ptr.exists():
        cand = root / ptr.read_text().strip()
        if (cand / DRIVER_STATE).exists():
            return cand
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / DRIVER_STATE).exists()) \
        if root.exists() else []
    return complete[-1] if complete else None


def read_driver_state(ckpt: Path) -> dict:
    return json.loads((ckpt / DRIVER_STATE).read_text())
