"""The weight-sync contract between the learner (sender) and the samplers
(receivers), in the manner of vLLM's weight-transfer API
(`vllm/distributed/weight_transfer/base.py`).

Two transports share this contract (`rollout.weight_sync_backend`; see
`choose_backend`):

* `nccl` (GPU): vLLM's official `NCCLWeightTransferEngine` on the sampler
  workers and `NCCLTrainerWeightTransferEngine` on learner rank 0.
* `gloo` (CPU, any node): `rollout/weight_receiver.py` registers
  `GlooWeightTransferEngine` in vLLM's `WeightTransferEngineFactory` under
  "opd_gloo"; learner rank 0 broadcasts over a gloo process group of
  (rank 0 = learner, ranks 1.. = every sampler worker).

The sampler side is always driven through vLLM's four control-plane calls
(init_weight_transfer_engine / start_weight_update / update_weights /
finish_weight_update), exposed by each sampler actor; `WeightSyncClient` is
what the sender holds to call them on all samplers at once. A client with
`fused_updates` (rollout.pool.SamplerPool) runs start and finish inside its
update_weights call on each sampler (two Ray round trips less per push); a
sampler that cannot start still joins the accept vote, with a reject.

Wire format: the parameters of one update, in the order of
`GlooUpdateInfo.names`, are cut into buckets at `bucket_ends`; a bucket is its
tensors back-to-back (each contiguous, in its own dtype, no padding), cut up
on the workers with `unpack_bucket`. Before the first bucket every rank joins
one all-reduce of a reject flag (the workers validate names/shapes against
their model first: any reject and all raise before a weight is touched), and
each bucket is preceded by a broadcast int64 header [status, nbytes] (status
HEADER_ABORT: the sender failed mid-stream, the workers raise instead of
waiting). The bucket's bytes follow as one broadcast uint8 tensor (memory:
one bucket on either side).

This module imports torch only (no vllm, no deepspeed): both sides use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

GLOO_BACKEND_NAME = "opd_gloo"
# Values of rollout.weight_sync_backend.
BACKENDS = ("auto", "nccl", "gloo")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter as it travels: Hugging Face checkpoint name, dtype, full shape."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in a weight update (expected e.g. 'float32', 'bfloat16')")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def concrete_dtype(name: str, on_gpu: bool) -> str:
    """A config dtype with "auto" (the default of student.dtype, teacher.dtype
    and learner.dtype) made concrete: bfloat16 on GPU, float32 on CPU."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return name


@dataclasses.dataclass
class GlooInitInfo:
    """Sent to every worker of every sampler by init_weight_transfer_engine
    (as a dict: vLLM builds this with `GlooInitInfo(**dict)`)."""

    master_address: str  # learner rank 0's host, where the TCPStore listens
    master_port: int
    rank_offset: int  # the group rank of this sampler's worker 0 (learner is rank 0)
    world_size: int  # 1 + the total number of sampler workers
    timeout_s: float = 600.0
    group_name: str = "opd_weight_sync"


@dataclasses.dataclass
class GlooUpdateInfo:
    """One whole update (all parameters), sent to every worker with
    update_weights (as a dict)."""

    version: int
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    # bucket b holds params [bucket_ends[b-1], bucket_ends[b]) (bucket_ends[-1] == len(names))
    bucket_ends: list[int]

    def specs(self) -> list[ParamSpec]:
        return [ParamSpec(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes, strict=True)]

    def buckets(self) -> list[list[ParamSpec]]:
        specs = self.specs()
        out, start = [], 0
        for end in self.bucket_ends:
            out.append(specs[start:end])
            start = end
        return out

    def validate(self) -> None:
        n = len(self.names)
        if not (len(self.dtype_names) == len(self.shapes) == n):
            raise ValueError(f"weight update: {n} names, {len(self.dtype_names)} dtypes, {len(self.shapes)} shapes")
        if not self.bucket_ends or self.bucket_ends[-1] != n or any(
            b <= a for a, b in zip([0] + self.bucket_ends[:-1], self.bucket_ends, strict=True)
        ):
            raise ValueError(f"weight update: bad bucket_ends {self.bucket_ends} for {n} parameters")
        for d in self.dtype_names:
            dtype_from_name(d)

    @staticmethod
    def build(version: int, specs: Sequence[ParamSpec], bucket_bytes: int) -> "GlooUpdateInfo":
        return GlooUpdateInfo(
            version=version,
            names=[s.name for s in specs],
            dtype_names=[s.dtype for s in specs],
            shapes=[list(s.shape) for s in specs],
            bucket_ends=plan_buckets(specs, bucket_bytes),
        )

    def bucket_nbytes(self) -> list[int]:
        return [sum(s.nbytes for s in specs) for specs in self.buckets()]


def plan_buckets(specs: Sequence[ParamSpec], bucket_bytes: int) -> list[int]:
    """Greedy split of `specs` (in order) into buckets of at most
    `bucket_bytes` (a single larger tensor gets a bucket of its own).
    Returns the exclusive end index of each bucket."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    ends: list[int] = []
    size = 0
    for i, s in enumerate(specs):
        if size > 0 and size + s.nbytes > bucket_bytes:
            ends.append(i)
            size = 0
        size += s.nbytes
    if specs:
        ends.append(len(specs))
    return ends


def unpack_bucket(flat: torch.Tensor, specs: Sequence[ParamSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into `flat` (uint8) for each spec, in order (no copy, except
    for a tensor whose offset is not a multiple of its dtype's size)."""
    total = sum(s.nbytes for s in specs)
    if total != flat.numel():
        raise ValueError(f"weight bucket holds {flat.numel()} bytes, its specs describe {total}")
    off = 0
    for s in specs:
        n = s.nbytes
        raw = flat[off: off + n]
        if off % s.torch_dtype.itemsize:
            # Buckets are unpadded: a tensor after one of a smaller dtype
            # (e.g. fp32 after an odd-sized bf16) is misaligned for a view.
            raw = raw.clone()
        yield s.name, raw.view(s.torch_dtype).view(s.shape)
        off += n
    if off != flat.numel():
        raise ValueError(f"weight bucket holds {flat.numel()} bytes, its specs describe {off}")


@runtime_checkable
class WeightSyncClient(Protocol):
    """The sender's handle on all samplers' control plane; structurally the
    same four calls as vLLM's `VLLMWeightSyncClient`, so vLLM's own NCCL
    trainer engine can drive it. Each call runs on every sampler and returns
    when all have finished (raising if any failed)."""

    def init_weight_transfer_engine(self, init_info: dict) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict) -> None: ...
    # Optional: a client with `fused_updates = True` takes
    # update_weights(info, True, weight_version=v), which also starts the
    # update on every sampler (one that cannot votes reject, so the group
    # never waits for it) and finishes it on every sampler whose receive
    # succeeded: no start or finish call.

    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


class WeightSyncError(RuntimeError):
    """A weight update failed. `stage` says where ("init", "validate",
    "transfer", "finish", ...). Pickles (crosses Ray actor boundaries)."""

    def __init__(self, message: str, stage: str = "transfer"):
        self.message = message
        self.stage = stage
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.message, self.stage))


def check_update_specs(specs: Sequence[ParamSpec], expected: dict[str, tuple[int, ...]],
                       required: Iterable[str] = ()) -> list[str]:
    """Every problem of an update against the receiving model, one per line
    (empty list = valid). `expected` maps each loadable checkpoint name to its
    full shape; `required` names must all be present (a partial update would
    leave layers half-loaded)."""
    problems: list[str] = []
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            problems.append(f"parameter {s.name!r} appears twice in the update")
        seen.add(s.name)
        try:
            dt = s.torch_dtype
        except ValueError as e:
            problems.append(str(e))
            continue
        if not dt.is_floating_point:
            problems.append(f"parameter {s.name!r} has dtype {s.dtype}; weights must be floating point")
        if s.name not in expected:
            near = sorted(expected)[:3]
            problems.append(f"unknown parameter {s.name!r}: the sampler's model has no such checkpoint "
                            f"weight (send Hugging Face names, e.g. {near})")
        elif tuple(s.shape) != tuple(expected[s.name]):
            problems.append(f"parameter {s.name!r} has shape {list(s.shape)}, the sampler's model expects "
                            f"{list(expected[s.name])}")
    missing = [n for n in required if n not in seen]
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the update (a full update is required), "
                        f"e.g. {missing[:3]}")
    return problems


def open_gloo_group(master_address: str, master_port: int, rank: int, world_size: int,
                    timeout_s: float, group_name: str):
    """Join (rank 0: host) a private gloo process group over a TCPStore at
    `master_address:master_port`. It is NOT the default torch.distributed
    group (vLLM's workers and DeepSpeed's ranks own theirs). Blocks until all
    `world_size` ranks have joined, or raises after `timeout_s`.

    Returns (store, group); keep both alive as long as the group is used."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_address, master_port, world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(group_name, store)
    group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return store, group


def gloo_broadcast(group, tensor: torch.Tensor, what: str) -> None:
    """Broadcast `tensor` from rank 0 of `group` (in place on the others);
    raises WeightSyncError naming `what` on a failure or the group's timeout."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    try:
        group.broadcast([tensor], opts).wait()
    except RuntimeError as e:
        raise WeightSyncError(f"gloo broadcast of {what} failed: {e}", stage="transfer") from e


def gloo_allreduce_sum(group, tensor: torch.Tensor, what: str) -> None:
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    try:
        group.allreduce([tensor], opts).wait()
    except RuntimeError as e:
        raise WeightSyncError(f"gloo all-reduce of {what} failed: {e}", stage="transfer") from e


# Per-bucket header broadcast before each bucket's bytes: [status, nbytes].
# status != 0 tells receivers the sender aborted (they raise instead of
# waiting for bytes that never come).
HEADER_OK = 0
HEADER_ABORT = 1


def choose_backend(requested: str, has_gpu: bool) -> str:
    """The transport for `rollout.weight_sync_backend=requested`: "nccl" or
    "gloo". "auto": nccl when the samplers have GPUs, else gloo."""
    if requested not in BACKENDS:
        raise ValueError(f"rollout.weight_sync_backend={requested!r} is not valid; use one of {list(BACKENDS)}")
    if requested == "auto":
        return "nccl" if has_gpu else "gloo"
    if requested == "nccl" and not has_gpu:
        raise ValueError("rollout.weight_sync_backend=nccl needs GPU samplers; this sampler has no CUDA device "
                         "(use gloo or auto)")
    return requested


def engine_backend(requested: str, has_gpu: bool) -> str:
    """The vLLM `WeightTransferConfig.backend` a sampler starts with."""
    return {"nccl": "nccl", "gloo": GLOO_BACKEND_NAME}[choose_backend(requested, has_gpu)]


def write_adapter(directory, files: dict[str, bytes]):
    """Write a LoRA adapter's files (peft's format, as the learner sends them:
    learner/lora.py `adapter_files`) into `directory` (created); returns its
    Path. A sampler loads them from there (vLLM reads adapters from a
    directory only)."""
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"adapter file name {name!r} is not a plain file name")
        (d / name).write_bytes(data)
    return d
