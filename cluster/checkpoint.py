"""Run checkpoints: the learners' full training state plus the driver's state
(step, weight version, prompt-stream position, wandb run id), committed as
one directory in one atomic step.

Layout:
    <run.dir>/checkpoints/
      step_00000010/
        learner/                every learner rank's shards and meta.json (learner/checkpoint.py)
        driver_state.json       the driver's state; a checkpoint is complete when it has this file
      latest                    text "step_00000010", replaced last
      .step_00000012.tmp-XXXX   an unfinished save: removed by the next save or by --resume

Protocol (save_checkpoint): the driver creates the staging directory, every
learner rank writes its shards into `<staging>/learner/`, the driver writes
driver_state.json, fsyncs the whole tree, renames the staging directory to
`step_NNNNNNNN` (atomic on POSIX), fsyncs the root, replaces `latest` (temp
file + fsync + os.replace), then prunes all but the newest `keep` complete
checkpoints (never the one `latest` names). A crash at any point, SIGKILL
included, leaves the previous checkpoint and `latest` intact.

This module owns the directory, the pointer and the retention; the learners
only write and read their own shards. Multi-node: run.dir must be on a
filesystem every learner rank sees. Tests: tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from learner.checkpoint import CheckpointError, fsync_path, fsync_tree, write_atomic

DRIVER_STATE = "driver_state.json"
LEARNER = "learner"
LATEST = "latest"
TMP = ".tmp-"  # in the name of every unfinished entry: `.step_N.tmp-XXXX`, `.latest.tmp-XXXX`


def ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return path.name.startswith("step_") and (path / DRIVER_STATE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    return sorted(p for p in root.iterdir() if is_complete(p)) if root.is_dir() else []


def clean_partial(run_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted save left behind (staging directories,
    temp pointer files); returns their names."""
    root = ckpt_root(run_dir)
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") and TMP in p.name:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def new_staging_dir(root: str | os.PathLike, step: int) -> Path:
    """A fresh, empty staging directory for the checkpoint of `step`."""
    staging = Path(root) / f".{step_name(step)}{TMP}{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def commit(staging: Path, root: Path, step: int, driver_state: dict) -> Path:
    """Make the staging directory, whose learner shards are written, the
    checkpoint `root/step_NNNNNNNN` and point `latest` at it."""
    (staging / DRIVER_STATE).write_text(json.dumps({"step": step, **driver_state}, indent=1))
    fsync_tree(staging)
    # Fault-injection hook for the reliability tests: widen the window in which
    # a SIGKILL finds a half-built checkpoint.
    delay = float(os.environ.get("OPD_FAULT_CHECKPOINT_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    final = root / step_name(step)
    if final.exists():
        # Re-saving the same step (e.g. SIGTERM right after a periodic save):
        # move the old one aside, then swap. A crash in between leaves
        # `latest` naming a missing directory: latest_checkpoint falls back to
        # the newest complete one.
        old = root / f".{final.name}{TMP}old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    fsync_path(root)
    write_atomic(root / LATEST, final.name.encode())
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints, never the one
    `latest` names; returns the removed paths."""
    ptr = root / LATEST
    latest = ptr.read_text().strip() if ptr.is_file() else None
    removed = []
    for p in complete_checkpoints(root)[:-keep] if keep > 0 else complete_checkpoints(root):
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def save_checkpoint(run_dir: str | os.PathLike, step: int, write_learner: Callable[[Path], None],
                    driver_state: dict, keep: int) -> Path:
    """Write the checkpoint of `step`: `write_learner(path)` has every learner
    rank write its shards into `path` (a fresh directory, e.g.
    LearnerGroup.save_shards); `driver_state` (JSON) is read back by
    read_driver_state. Returns the committed directory."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_partial(run_dir)
    staging = new_staging_dir(root, step)
    write_learner(staging / LEARNER)
    final = commit(staging, root, step, driver_state)
    prune(root, keep)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names (or, when it names none, the newest
    complete one), or None when the run has none."""
    root = ckpt_root(run_dir)
    done = complete_checkpoints(root)
    ptr = root / LATEST
    if ptr.is_file():
        target = root / ptr.read_text().strip()
        if is_complete(target):
            return target
        if not done:
            raise CheckpointError(f"{ptr} names {target.name!r}, but {target} is not a complete checkpoint (no "
                                  f"{DRIVER_STATE}) and there is no other: the checkpoint directory is damaged; "
                                  f"remove {root} to start the run afresh")
    return done[-1] if done else None


def read_driver_state(ckpt: Path) -> dict:
    return json.loads((ckpt / DRIVER_STATE).read_text())
