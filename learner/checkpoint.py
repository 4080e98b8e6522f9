"""The learners' part of a checkpoint: one directory of shards, plus the file
helpers (fsync, atomic write) that the run's checkpoint protocol shares.

A learner checkpoint directory (written by LearnerWorker.save_checkpoint on
every rank, read by LearnerWorker.load_checkpoint):

    learner/
      engine/...            DeepSpeed's files (model, optimizer, scheduler; ZeRO partitions)
      rng_rank0.pt ...      per-rank RNG state
      meta.json             what load checks and restores: steps_done, world_size, zero_stage, dtype, ...

Nothing here commits, names or prunes checkpoints: the driver builds the
directory inside its staging directory and commits the whole checkpoint
atomically (cluster/checkpoint.py). Multi-node: the directory must be on a
filesystem every learner rank sees.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible. Pickles."""


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under `path` (and `path` itself)."""
    path = Path(path)
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_meta(ckpt_dir: str | os.PathLike, meta: dict) -> None:
    (Path(ckpt_dir) / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"no learner checkpoint at {ckpt_dir} (no {META}): pass the `learner` directory of a "
                              "complete run checkpoint, e.g. cluster.checkpoint.latest_checkpoint(run_dir) / 'learner'")
    return json.loads(path.read_text())
