"""The weight-sync contract between the learner (sender) and the samplers
(receivers), in the manner of vLLM's weight-transfer API
(`vllm/distributed/weight_transfer/base.py`).

Three transports share this contract (`rollout.weight_sync_backend`; see
`choose_backend`):

* `nccl` (GPU): vLLM's official `NCCLWeightTransferEngine` on the sampler
  workers and `NCCLTrainerWeightTransferEngine` on learner rank 0.
* `gloo` (CPU, any node): `rollout/weight_receiver.py` registers
  `GlooWeightTransferEngine` in vLLM's `WeightTransferEngineFactory` under
  "opd_gloo"; learner rank 0 broadcasts over a gloo process group of
  (rank 0 = learner, ranks 1.. = every sampler worker).
* `shm` (CPU, every sampler on learner rank 0's node): `ShmWeightTransferEngine`
  ("opd_shm"). The same gloo group carries only the control messages (vote,
  per-bucket headers); the bulk bytes go through one shared-memory region
  (a file under /dev/shm) that the sender packs each bucket into and every
  worker maps, so a byte is copied once by the sender and read in place by
  each receiver. An "opd_shm" engine also accepts plain gloo updates (no
  region named), so samplers built for "auto" serve either sender.

The sampler side is always driven through vLLM's four control-plane calls
(init_weight_transfer_engine / start_weight_update / update_weights /
finish_weight_update), exposed by each sampler actor; `WeightSyncClient` is
what the sender holds to call them on all samplers at once. A client with
`fused_updates` (rollout.pool.SamplerPool) runs start and finish inside its
update_weights call on each sampler (two Ray round trips less per push); a
sampler that cannot start still joins the accept vote, with a reject.

Shared mode (shm only, rollout.shm_shared_weights): once every worker has
recorded its in-place load as plain copies (rollout/copy_plan.py) and their
parameter layouts are equal, the sender creates a region laid out like those
parameters (`plan_param_region`, `param_slots`, `dest_views`), writes each
update straight to where the workers' copies would land, and the workers
adopt the region as their parameter memory at the end of the first such
update (`shm_layout` names the layout). One copy per push whatever the
number of samplers, one copy of the weights in RAM for all of them; the
header then comes once, after the last write.

Wire format: the parameters of one update, in the order of
`GlooUpdateInfo.names`, are cut into buckets at `bucket_ends`; a bucket is its
tensors back-to-back (each contiguous, in its own dtype, no padding), cut up
on the workers with `unpack_bucket`. Before the first bucket every rank joins
one all-reduce of a reject flag (the workers validate names/shapes against
their model, and for shm map the region, first: any reject and all raise
before a weight is touched), and each bucket is preceded by a broadcast int64
header [status, nbytes] (status HEADER_ABORT: the sender failed mid-stream,
the workers raise instead of waiting). Over gloo the bucket's bytes follow as
one broadcast uint8 tensor (memory: one bucket on either side); over shm the
header means "bucket b is in the region at `bucket_offsets[b]`" (memory: the
region holds the whole update, because vLLM's layerwise reload keeps views of
a bucket until the layer they belong to is complete; the sender rewrites it
only in the next update, after every worker finished this one).

This module imports torch only (no vllm, no deepspeed): both sides use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

GLOO_BACKEND_NAME = "opd_gloo"
SHM_BACKEND_NAME = "opd_shm"
# Values of rollout.weight_sync_backend.
BACKENDS = ("auto", "nccl", "gloo", "shm")


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
    # Shared-memory transport only (None/empty: the bytes come over gloo).
    shm_path: str | None = None  # the region's file (under /dev/shm) on the learner's node
    shm_token: str | None = None  # written at the region's start: proves the mapped file is the sender's
    shm_bytes: int = 0  # the region's size
    bucket_offsets: list[int] | None = None  # where bucket b starts in the region
    # Shared mode (shm only): the region is not a staging area but the
    # samplers' own parameter memory, laid out by the layout with this id
    # (`layout_id`, `plan_param_region`); the sender writes each tensor
    # straight into the slots its copies land in, the workers load nothing.
    shm_layout: str | None = None

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
        if self.shm_layout is not None and (self.shm_path is None or not self.shm_token):
            raise ValueError(f"weight update: shared layout {self.shm_layout} without a shared-memory region")
        if self.shm_path is not None and self.shm_layout is None:
            offsets = self.bucket_offsets or []
            if len(offsets) != len(self.bucket_ends) or not self.shm_token:
                raise ValueError(f"weight update: shared-memory region {self.shm_path} with {len(offsets)} bucket "
                                 f"offsets for {len(self.bucket_ends)} buckets (or no token)")
            end = SHM_DATA_OFFSET
            for b, (off, specs) in enumerate(zip(offsets, self.buckets(), strict=True)):
                if off < end:
                    raise ValueError(f"weight update: bucket {b} starts at {off} in the shared-memory region, "
                                     f"overlapping what comes before it (which ends at {end})")
                end = off + sum(s.nbytes for s in specs)
            if end > self.shm_bytes:
                raise ValueError(f"weight update: the buckets end at byte {end}, past the shared-memory region's "
                                 f"{self.shm_bytes} bytes")

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


def pack_bucket(tensors: Iterable[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate tensors' bytes into one flat uint8 tensor (CPU)."""
    views = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    total = sum(v.numel() for v in views)
    if out is None:
        out = torch.empty(total, dtype=torch.uint8)
    elif out.numel() < total:
        raise ValueError(f"pack buffer holds {out.numel()} bytes, bucket needs {total}")
    off = 0
    for v in views:
        out[off: off + v.numel()].copy_(v)
        off += v.numel()
    return out[:total]


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


class WeightSender(Protocol):
    """Learner side, held by learner rank 0 (learner/weight_sender.py).

    `specs` (names, dtypes, full shapes: known without gathering, e.g. from
    ZeRO-3's `ds_shape`) are declared up front; `tensors` then yields the full
    tensors (or `(name, tensor)` pairs) one by one in the same order. The
    iterator is what gathers ZeRO-3 parameters, so every learner rank iterates
    it in lockstep while only rank 0 transmits."""

    def send(self, version: int, specs: Sequence[ParamSpec], tensors: Iterable) -> None: ...

    def shutdown(self) -> None: ...


# --------------------------------------------------------------------------
# Added by the sampler/weight-sync component (additive).
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Shared-memory region of the shm transport (one per sender; both sides).
# Layout: [0, SHM_DATA_OFFSET) header (magic + the sender's token), then the
# buckets, each starting on a page boundary, tensors back-to-back inside.
# --------------------------------------------------------------------------

SHM_DIR = "/dev/shm"
SHM_MAGIC = b"opd-weight-region-v1\0"
SHM_DATA_OFFSET = 4096
SHM_ALIGN = 4096


def plan_region(bucket_nbytes: Sequence[int]) -> tuple[list[int], int]:
    """(start offset of each bucket, region size) for buckets of these sizes."""
    offsets, end = [], SHM_DATA_OFFSET
    for n in bucket_nbytes:
        offsets.append(end)
        end += -(-n // SHM_ALIGN) * SHM_ALIGN
    return offsets, max(end, SHM_DATA_OFFSET)


def region_header(token: str) -> bytes:
    return SHM_MAGIC + token.encode() + b"\0"


def map_region(fd: int, nbytes: int):
    """mmap `nbytes` of the open file `fd` shared and read-write, pages
    populated up front (the first touch is paid here, not inside an update).
    Returns (mmap, uint8 tensor over it). The tensor holds a reference to
    the mmap object, so the mapping lives while any view of it does (a
    region still referenced by a model's loader is never unmapped under it)
    as long as nobody calls `mmap.close()`: torch.frombuffer does not pin
    the buffer export, so close() would succeed and leave the views dangling."""
    import mmap
    import warnings

    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        region = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
    return mm, region


def open_region(path: str, token: str, nbytes: int):
    """Receiver side: map the sender's region `path` and check its token.
    Raises WeightSyncError (stage "init") saying what is wrong and the fix."""
    import os

    hint = ("the samplers must run on learner rank 0's node and see its /dev/shm; set "
            "rollout.weight_sync_backend=gloo otherwise")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise WeightSyncError(f"cannot open the weight-sync shared-memory region {path}: {e.strerror}; {hint}",
                              stage="init") from None
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise WeightSyncError(f"the weight-sync shared-memory region {path} holds {size} bytes, the update "
                                  f"says {nbytes}", stage="init")
        mm, region = map_region(fd, nbytes)
    finally:
        os.close(fd)
    want = region_header(token)
    if mm[:len(want)] != want:
        del region
        mm.close()
        raise WeightSyncError(f"{path} is not the learner's weight-sync region (its token differs): this sampler "
                              f"sees another /dev/shm than the learner; {hint}", stage="init")
    return mm, region


def layout_id(layout: dict) -> str:
    """A short digest of a shared-parameter layout (rollout.copy_plan.param_layout):
    equal for samplers that can share one region."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]


def plan_param_region(layout: dict) -> tuple[list[int], int]:
    """(start offset of each parameter slot, region size) of a shared-parameter
    region: the header, then the layout's parameters in order, each on a
    SHM_ALIGN boundary. Both sides compute it from the layout alone."""
    return plan_region([dtype_from_name(d).itemsize * math.prod(shape) for _, d, shape in layout["params"]])


def param_slots(region: torch.Tensor, layout: dict) -> list[torch.Tensor]:
    """The layout's parameters as tensors over `region` (uint8, the whole
    mapping): slot i has parameter i's dtype and shape."""
    offsets, _ = plan_param_region(layout)
    out = []
    for off, (_, d, shape) in zip(offsets, layout["params"], strict=True):
        dt = dtype_from_name(d)
        out.append(region[off: off + dt.itemsize * math.prod(shape)].view(dt).view(shape))
    return out


def dest_views(slots: Sequence[torch.Tensor], layout: dict) -> dict[str, list[torch.Tensor]]:
    """Checkpoint name -> the views of `slots` its tensor is copied into."""
    out = {}
    for name, (_, _, dests) in layout["dests"].items():
        views = []
        for i, off, shape, strides in dests:
            flat = slots[i].view(-1)
            views.append(flat.as_strided(shape, strides, flat.storage_offset() + off))
        out[name] = views
    return out


def tensor_over(buffer, dtype: torch.dtype, offset: int, shape: Sequence[int]) -> torch.Tensor:
    """A `dtype` tensor of `shape` at byte `offset` of `buffer` (an mmap) with
    its own storage, so torch.save and safetensors write only it, not the
    whole mapping; it keeps the mapping alive."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer on a writable mmap: nothing to warn about
        return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=offset).view(tuple(shape))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with at least `n` torch threads (a weight copy while the
    engine serves nothing). Uses torch._C.set_num_threads: vLLM replaces
    torch.set_num_threads with a no-op in a CPU engine after pinning it."""
    before = torch.get_num_threads()
    if n > before:
        torch._C.set_num_threads(n)
    try:
        yield
    finally:
        if n > before:
            torch._C.set_num_threads(before)


def choose_backend(requested: str, has_gpu: bool, same_node: bool | None = None) -> str:
    """The transport for `rollout.weight_sync_backend=requested`: "nccl",
    "gloo" or "shm". "auto": nccl when the samplers have GPUs; else shm when
    every sampler runs on learner rank 0's node (`same_node`; None = unknown,
    e.g. no Ray), so the bytes cross one shared-memory region instead of TCP;
    else gloo (works across nodes)."""
    if requested not in BACKENDS:
        raise ValueError(f"rollout.weight_sync_backend={requested!r} is not valid; use one of {list(BACKENDS)}")
    if requested == "auto":
        if has_gpu:
            return "nccl"
        return "shm" if same_node else "gloo"
    if requested == "nccl" and not has_gpu:
        raise ValueError("rollout.weight_sync_backend=nccl needs GPU samplers; this sampler has no CUDA device "
                         "(use gloo, shm or auto)")
    return requested


def engine_backend(requested: str, has_gpu: bool) -> str:
    """The vLLM `WeightTransferConfig.backend` a sampler starts with. The
    sampler cannot know where the learner runs, so for "auto" on CPU it takes
    "opd_shm", which also receives plain gloo updates: learner rank 0 then
    decides (choose_backend with the samplers' node ids) and the two sides
    agree by construction."""
    transport = choose_backend(requested, has_gpu, same_node=True)
    return {"nccl": "nccl", "gloo": GLOO_BACKEND_NAME, "shm": SHM_BACKEND_NAME}[transport]
