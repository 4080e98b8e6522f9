"""Atomic checkpoint directories.

Layout under a checkpoint root (e.g. `<run.dir>/checkpoints`):

    root/
      step_00000010/          a complete checkpoint (only ever appears whole)
        meta.json             written last inside the directory (step, world size, ...)
        engine/...            DeepSpeed's files (model, optimizer, scheduler; ZeRO partitions)
        rng_rank0.pt ...      per-rank RNG state
        client_state.json     the caller's own state (e.g. the driver's data position)
      latest                  name of the newest complete checkpoint, replaced last
      .staging-step_...-XXXX  an unfinished save (ignored, removed by the next save)

Protocol (LearnerGroup.save): every rank writes into the same staging
directory, then rank 0 `commit`s: fsync every file, write meta.json, rename the
staging directory to its final name (atomic on POSIX), fsync the root, then
replace `latest` (write a temp file, fsync, os.replace). A crash at any point
leaves the previous checkpoint and `latest` intact: `resolve(root)` only ever
returns a directory that `latest` names and that has its meta.json.

Multi-node: the root must be on a filesystem every learner rank sees.
Tests: tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

LATEST = "latest"
META = "meta.json"
STAGING_PREFIX = ".staging-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible. Pickles."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def new_staging_dir(root: str | os.PathLike, name: str) -> Path:
    """A fresh staging path (not created) for checkpoint `name` under `root`."""
    return Path(root) / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def _fsync_path(path: Path) -> None:
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
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def commit(staging: str | os.PathLike, root: str | os.PathLike, name: str, meta: dict) -> Path:
    """Make the fully written `staging` directory the checkpoint `root/name`
    and point `latest` at it. Called once, on rank 0, after every rank has
    finished writing into `staging`."""
    staging, root = Path(staging), Path(root)
    final = root / name
    write_atomic(staging / META, json.dumps(meta, indent=2, sort_keys=True).encode())
    fsync_tree(staging)
    if final.exists():
        # Re-saving the same step (e.g. after a resume): replace it. `latest`
        # still names it, so move it aside first, then swap.
        old = root / f"{STAGING_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync_path(root)
    write_atomic(root / LATEST, name.encode())
    return final


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory that `path` designates: a checkpoint root (its
    `latest`) or a checkpoint directory itself. Raises CheckpointError when
    there is no complete checkpoint there."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / META).is_file():
            return target
        raise CheckpointError(f"{latest} names {target.name!r}, but {target} is not a complete checkpoint "
                              f"(no {META}); the checkpoint root is damaged: point `latest` at an existing "
                              "step_* directory or remove it to start fresh")
    raise CheckpointError(f"no checkpoint at {path}: expected a checkpoint root with a `{LATEST}` file or a "
                          f"checkpoint directory with {META} (save one with LearnerGroup.save first)")


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    return json.loads((Path(ckpt_dir) / META).read_text())


def cleanup(root: str | os.PathLike, keep: int | None = None) -> list[Path]:
    """Remove leftover staging directories and, with `keep`, all but the
    newest `keep` complete checkpoints (never the one `latest` names).
    Returns the removed paths. Called by rank 0 after a commit."""
    root = Path(root)
    removed = []
    for p in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if keep is not None:
        latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
        done = sorted(p for p in root.glob("step_*") if (p / META).is_file())
        for p in done[:-keep] if keep > 0 else done:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
