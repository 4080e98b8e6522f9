"""Model references -> local directories, resolved once by the driver.

`student.model` and `teacher.model` take three forms:

- `tiny:NAME`: a tiny model built locally (cluster/tiny_models.py);
- a local Hugging Face directory (relative paths are made absolute);
- a hub id (`Qwen/Qwen3-8B`), resolved through `huggingface_hub.snapshot_download`,
  which honours `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN` and `HF_HUB_OFFLINE=1`
  (then only the local cache is read, nothing is downloaded).

The driver calls `resolve_models(cfg)` before Ray or any actor starts: a model
that is neither an existing directory nor a resolvable id is a ConfigError
(exit 2) naming `student.model` / `teacher.model`, what was tried and how to
fix it. From then on only the resolved local directory is passed around
(samplers, learners, the self-started teacher, the tokenizer check, the
export), so every process loads exactly the snapshot the driver resolved and
no actor contacts the hub.

Several nodes: the samplers and learners load the student from that same
path on their own node. `check_student_on_nodes` runs `ensure_local` in one
small Ray task on every other node the placement uses, before any actor
starts (a driver-started teacher's actor runs it for the teacher, see
cluster/teacher_proc.py): a node that lacks the directory downloads the same
snapshot (the commit the driver resolved) into its own Hugging Face cache,
which must then land at the same path, i.e. the same `HF_HOME` on every node
(the driver forwards its `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
`HF_ENDPOINT` to the actors). A shared `HF_HOME` (one download for all nodes)
is the simplest setup; a local directory given as `student.model` must exist
at that path on every node.

    python -m cluster.models Qwen/Qwen3-8B      # resolve one reference, print its directory
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from cluster.config import ConfigError
from cluster.tiny_models import TINY_PREFIX, build_model

# Files a model snapshot needs (weights, configs, tokenizer, chat template,
# custom code); the `original/` folder and consolidated checkpoints that some
# repos add (a second copy of the weights in another format) are left out.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
IGNORE_PATTERNS = ["original/*", "consolidated*"]
# Hub variables the actors get from the driver (never HF_TOKEN: a token in a
# Ray runtime_env is visible to every job on the cluster; nodes that download
# a gated model read their own HF_TOKEN or $HF_HOME/token).
HF_ENV_KEYS = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A model reference and the local directory it resolved to."""

    key: str  # config key it came from, e.g. "student.model"
    spec: str  # what the user wrote
    path: str  # absolute local directory holding config.json
    repo_id: str | None = None  # set for hub ids
    revision: str | None = None  # the snapshot's commit hash (hub ids)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..") or spec.count("/") > 1 \
        or os.sep != "/" and os.sep in spec


def _hub_env() -> str:
    from huggingface_hub import constants

    return f"HF_HUB_CACHE={constants.HF_HUB_CACHE}" + (", HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "")


def snapshot(repo_id: str, revision: str | None = None) -> str:
    """Local directory of `repo_id` at `revision` (default: main), downloading
    what is missing unless HF_HUB_OFFLINE is set. Falls back to `*.bin`
    weights when the repo has no safetensors."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                             ignore_patterns=IGNORE_PATTERNS)
    if not any(Path(path).glob("*.safetensors")):
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS + ["*.bin"],
                                 ignore_patterns=IGNORE_PATTERNS)
    return path


def _hub_problem(key: str, spec: str, e: Exception) -> str:
    """One line saying why hub id `spec` did not resolve, and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{key}: {spec!r} is not a local directory (no such path: {Path(spec).absolute()})"
    if isinstance(e, HFValidationError):
        return f"{where} and not a valid hub id ({e}); give a model directory or an id like Qwen/Qwen3-8B"
    if isinstance(e, GatedRepoError):
        return (f"{where}, and the hub model {spec} is gated: accept its license on huggingface.co and set "
                f"HF_TOKEN (or run `hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return (f"{where}, and the hub has no model {spec} you can access (a typo, or a private repo: set "
                f"HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return f"{where}, and the hub model {spec} has no 'main' revision"
    if isinstance(e, LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return (f"{where}, and the hub id {spec} is not in the local Hugging Face cache ({_hub_env()}): "
                    f"download it first (`hf download {spec}` with network access, into this HF_HOME) or "
                    f"unset HF_HUB_OFFLINE")
        return (f"{where}, and the hub id {spec} could not be downloaded and is not cached ({_hub_env()}): "
                f"check the network and the hub (HF_ENDPOINT), or download it beforehand and set "
                f"HF_HUB_OFFLINE=1. Cause: {str(e).splitlines()[0][:300]}")
    return f"{where}, and resolving it as a hub id failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"


def resolve_model(spec: str, key: str) -> ResolvedModel:
    """`tiny:NAME`, a local directory or a hub id -> a local directory.
    Raises ConfigError naming `key` when it is none of them."""
    if spec.startswith(TINY_PREFIX):
        try:
            return ResolvedModel(key, spec, str(build_model(spec[len(TINY_PREFIX):])))
        except ValueError as e:
            raise ConfigError([f"{key}: {e}"]) from e
    local = Path(spec).expanduser()
    if local.exists() or _looks_like_path(spec):
        if not local.is_dir():
            why = "does not exist" if not local.exists() else "is a file, not a directory"
            raise ConfigError([f"{key}: {spec!r} {why} ({local.absolute()}); give a Hugging Face model "
                               f"directory (config.json, weights, tokenizer) or a hub id like Qwen/Qwen3-8B"])
        found = ResolvedModel(key, spec, str(local.resolve()))
    else:
        try:
            path = snapshot(spec)
        except Exception as e:  # noqa: BLE001 - every failure becomes one config problem
            raise ConfigError([_hub_problem(key, spec, e)]) from e
        found = ResolvedModel(key, spec, str(Path(path).resolve()), repo_id=spec, revision=Path(path).name)
    if not (Path(found.path) / "config.json").is_file():
        raise ConfigError([f"{key}: {spec!r} resolved to {found.path}, which has no config.json: it is not a "
                           f"Hugging Face model directory"])
    return found


def resolve_models(student: str, teacher: str | None) -> tuple[ResolvedModel, ResolvedModel | None]:
    """Resolve `student.model` and (when the driver serves it) `teacher.model`;
    every problem of both is reported in one ConfigError."""
    problems: list[str] = []
    out: list[ResolvedModel | None] = []
    for key, spec in (("student.model", student), ("teacher.model", teacher)):
        if spec is None:
            out.append(None)
            continue
        try:
            out.append(resolve_model(spec, key))
        except ConfigError as e:
            problems += e.problems
            out.append(None)
    if problems:
        raise ConfigError(problems)
    return out[0], out[1]


def hf_env() -> dict[str, str]:
    """The hub variables of this process that every actor should share."""
    return {k: os.environ[k] for k in HF_ENV_KEYS if k in os.environ}


def ensure_local(model: ResolvedModel) -> str | None:
    """On one node: make `model.path` present there. Returns None when it is
    (after downloading the driver's snapshot into this node's cache when it
    was missing), else a problem line naming the key and the fix."""
    if (Path(model.path) / "config.json").is_file():
        return None
    if model.repo_id is None:
        return (f"{model.key}: {model.path} does not exist on this node: put the model on a filesystem every "
                f"node sees, or copy it to the same path on each node")
    try:
        got = str(Path(snapshot(model.repo_id, model.revision)).resolve())
    except Exception as e:  # noqa: BLE001
        return _hub_problem(model.key, model.repo_id, e) + " (on this node)"
    if got != model.path:
        return (f"{model.key}: {model.repo_id} resolves to {got} on this node but to {model.path} on the driver's "
                f"node: set HF_HOME to the same directory on every node (a shared filesystem is simplest)")
    return None


def check_student_on_nodes(model: ResolvedModel, node_ids: list[str]) -> None:
    """Before any sampler or learner starts: run `ensure_local` on each node
    in `node_ids` (the nodes the placement put bundles on), in parallel; raise
    one ConfigError listing the nodes where the student is not loadable."""
    nodes = sorted({n for n in node_ids if n})
    if not nodes:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(ensure_local)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(model)
            for n in nodes]
    problems = [f"{p} (node {n})" for n, p in zip(nodes, ray.get(refs), strict=True) if p]
    if problems:
        raise ConfigError(problems)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m cluster.models MODEL", file=sys.stderr)
        sys.exit(2)
    try:
        print(resolve_model(sys.argv[1], "model").path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
