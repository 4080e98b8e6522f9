"""Sending side of weight sync: learner rank 0 pushes full weights to every sampler.

`make_sender(client, backend, ...)` resolves `rollout.weight_sync_backend`
("auto": nccl with GPUs, else shm when every sampler runs on this process's
Ray node, else gloo; see rollout.weight_sync.choose_backend) and builds one of:

`GlooWeightSender` (CPU) is the counterpart of rollout/weight_receiver.py:
it hosts the TCPStore and is rank 0 of a private gloo group with every
sampler worker, and drives one update through the samplers' control plane
(a `WeightSyncClient`, e.g. rollout.pool.SamplerPool):

    client.start_weight_update()
    client.update_weights(info)    # on a side thread: the workers block in the receive
    all-reduce accept/reject vote  # receivers validated names/shapes; any reject -> raise, nothing sent
    per bucket: header [status, nbytes], then the packed bytes (broadcast from rank 0)
    join the side thread           # surfaces the receivers' errors
    client.finish_weight_update(version)

Memory: one packing buffer of the largest bucket plus the tensor being
packed; tensors are packed as they arrive from the iterator (which, under
ZeRO-3, gathers one parameter at a time on every learner rank in lockstep;
non-zero ranks just iterate it). A sender-side failure mid-stream (a tensor
that does not match its spec, a failing gather) broadcasts an abort header so
the receivers raise instead of waiting; transport failures raise after the
group's timeout, never hang forever.

`ShmWeightSender` (CPU, samplers on this node) runs the same protocol over the
same gloo group, but packs each bucket straight into a shared-memory region
(a file under /dev/shm, sized to the whole update, mapped by every sampler
worker) and broadcasts only the header: one copy of each byte on this side,
none over TCP, and the samplers load bucket b while it packs bucket b+1. The
region is created (after checking /dev/shm has room) at the first send,
unlinked as soon as every worker has mapped it (the accept vote), so it
disappears with the last mapping even if a process is killed, and replaced
by a new one on `connect`/`reconnect` (a restarted sampler maps the new
one). It is rewritten only by the next update, after every sampler finished
this one (vLLM's layerwise reload keeps views of it until then).

Shared mode (`share_weights`, rollout.shm_shared_weights): after a packed
update every sampler served, the sender asks each worker for its parameter
layout (`client.shared_weight_layouts`); when all are equal it creates one
region laid out like them and writes later updates straight into it: the
workers rebind their parameters to it at the end of the first one, so they
load nothing and share one copy of the weights (`_share`). A re-formed group
(`connect`) packs again.

With `adopt(named_parameters)` (learner rank 0 calls it after a push when
learner.shm_resident_weights applies: ZeRO-0, fp32, the parameters' own dtype
sent) the parameters move into their slots of the region and are trained
there in place; the next pushes find each tensor already at its slot and
pack nothing, so the samplers' loads are the only copy. Adopted tensors have
their own storage over the mapping (torch.save writes only them) and keep
the mapping alive after the region is replaced or the sender shut down.
In shared mode `adopt` moves them into a private mirror of the shared
layout instead, so a push starts with one bulk copy of the mirror.

`NcclWeightSender` (GPU) wraps vLLM's official `NCCLTrainerWeightTransferEngine`
behind the same `send(version, specs, tensors)`; it imports vllm lazily (the
learner never imports vllm otherwise). vLLM's engine has no timeout, so the
sender runs it under a deadline (`call_with_deadline`, `timeout_s`) and, past
it, aborts the NCCL group and the samplers' open updates (see the class).
It runs only on GPUs; its failure handling is unit-tested with a stand-in
engine (tests/unit/test_nccl_sender.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rollout.weight_sync import (
    HEADER_ABORT,
    HEADER_OK,
    SHM_DATA_OFFSET,
    SHM_DIR,
    GlooUpdateInfo,
    ParamSpec,
    WeightSyncClient,
    WeightSyncError,
    choose_backend,
    dest_views,
    dtype_name,
    gloo_allreduce_sum,
    gloo_broadcast,
    layout_id,
    map_region,
    open_gloo_group,
    param_slots,
    plan_param_region,
    plan_region,
    region_header,
    tensor_over,
    torch_threads,
)

logger = logging.getLogger(__name__)


def specs_from_named(named: Iterable[tuple[str, torch.Tensor]]) -> list[ParamSpec]:
    """ParamSpecs of plain (non-partitioned) named tensors; under ZeRO-3 build
    them from `p.ds_shape` instead (partitioned params report numel 0)."""
    return [ParamSpec(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in named]


def _checked(specs: Sequence[ParamSpec], tensors: Iterable) -> Iterator[torch.Tensor]:
    """Yield the tensors, checking each against its spec (and its name when the
    iterator yields (name, tensor) pairs); raise on any mismatch or count."""
    it = iter(tensors)
    for i, spec in enumerate(specs):
        try:
            item = next(it)
        except StopIteration:
            raise WeightSyncError(f"the weight iterator ended after {i} tensors; the specs declare {len(specs)}",
                                  "send") from None
        if isinstance(item, tuple):
            name, t = item
            if name != spec.name:
                raise WeightSyncError(f"tensor {i} is {name!r} but the specs declare {spec.name!r}: specs and "
                                      "tensors must be in the same order", "send")
        else:
            t = item
        if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.torch_dtype:
            raise WeightSyncError(f"tensor {i} ({spec.name!r}) is {dtype_name(t.dtype)} {list(t.shape)}, its spec "
                                  f"says {spec.dtype} {list(spec.shape)}", "send")
        yield t
    for extra in it:
        name = extra[0] if isinstance(extra, tuple) else "?"
        raise WeightSyncError(f"the weight iterator yields more tensors than the {len(specs)} specs "
                              f"(first extra: {name!r})", "send")


class GlooWeightSender:
    """Learner rank 0's gloo sender (CPU). Call `connect()` once (or let the
    first `send` do it), then `send(version, specs, tensors)` per update."""

    backend = "gloo"
    # `send` copies each tensor into its bucket before taking the next one
    # from the iterator (the learner may then hand it views that die early).
    copies_each_tensor_first = True

    def __init__(self, client: WeightSyncClient, master_address: str, master_port: int,
                 world_size: int | None = None, bucket_bytes: int = 64 << 20, timeout_s: float = 600.0,
                 group_name: str = "opd_weight_sync"):
        self.client = client
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = world_size
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = timeout_s
        self.group_name = group_name
        self._store = None
        self._group = None
        self._buffer: torch.Tensor | None = None
        self.last_stats: dict[str, float] = {}

    def connect(self) -> None:
        """Rendezvous with every sampler worker. The samplers' side is started
        first on a thread (their workers block connecting to our store), then
        we host the store and join as rank 0."""
        if self.world_size is None:
            total = getattr(self.client, "total_workers", None)
            if total is None:
                raise ValueError("GlooWeightSender: pass world_size (1 + the number of sampler workers)")
            self.world_size = 1 + total()
        info = dict(master_address=self.master_address, master_port=self.master_port, rank_offset=1,
                    world_size=self.world_size, timeout_s=self.timeout_s, group_name=self.group_name)
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            fut = exe.submit(self.client.init_weight_transfer_engine, info)
            try:
                self._store, self._group = open_gloo_group(self.master_address, self.master_port, 0,
                                                           self.world_size, self.timeout_s, self.group_name)
            except Exception as e:
                raise WeightSyncError(f"could not host the weight-sync group at {self.master_address}:"
                                      f"{self.master_port} for {self.world_size} ranks: {e}", "init") from e
            fut.result(timeout=self.timeout_s)
        finally:
            exe.shutdown(wait=False)

    def reconnect(self, master_port: int, world_size: int | None = None) -> None:
        """Form a new group (e.g. after `SamplerPool.restart`): every sampler
        worker re-joins at `master_port`; push the current weights next."""
        self.shutdown()
        self.master_port, self.world_size = master_port, world_size
        self.connect()

    def send(self, version: int, specs: Sequence[ParamSpec], tensors: Iterable) -> None:
        """Push one full update; returns once every sampler serves `version`.
        Raises WeightSyncError (samplers keep their previous weights when the
        update was rejected before any byte was loaded)."""
        if self._group is None:
            self.connect()
        t0 = time.perf_counter()
        info = self._plan(version, specs)
        buckets = info.buckets()

        # Two RPCs less per push when the client can open the update on each
        # sampler as its receive starts (a sampler that cannot start votes
        # reject) and finish it as its receive ends (`fused_updates`).
        fused = bool(getattr(self.client, "fused_updates", False))
        if not fused:
            try:
                self.client.start_weight_update()
            except BaseException:
                # Some samplers may have opened the update: close it there, or
                # they would refuse to sample until their timeout.
                self._abort_open_updates("a failed start")
                raise
        exe = ThreadPoolExecutor(max_workers=1)
        args = (dataclasses.asdict(info), True, version) if fused else (dataclasses.asdict(info),)
        fut = exe.submit(self.client.update_weights, *args)
        try:
            vote = torch.zeros(1, dtype=torch.int64)
            gloo_allreduce_sum(self._group, vote, "the update's accept/reject vote")
            t_vote = time.perf_counter()
            if vote.item() != 0:
                try:
                    fut.result(timeout=self.timeout_s)  # raises the samplers' reason
                finally:
                    if fused:  # e.g. a stale update left open on a sampler, which refused to start
                        self._abort_open_updates("a rejected update")
                raise WeightSyncError(f"weight update v{version} was rejected by a sampler", "validate")
            self._accepted(info)
            try:
                resident = self._stream(info, buckets, _checked(specs, tensors))
                t_stream = time.perf_counter()
            except BaseException:
                # We told the receivers to abort: let them record it (their
                # error is ours plus "aborted") before the caller looks at them.
                concurrent.futures.wait([fut], timeout=self.timeout_s)
                raise
            fut.result(timeout=self.timeout_s)
        finally:
            # Never join a thread that may be stuck in a dead transfer.
            exe.shutdown(wait=False)
        t1 = time.perf_counter()
        if not fused:
            self.client.finish_weight_update(version)
        t2 = time.perf_counter()
        # Phases: start RPC (none when fused) + vote (samplers validated),
        # streaming the buckets, waiting for the samplers' loads (and, fused,
        # their commit) to finish, the finish RPC (none when fused).
        self.last_stats = {"sync/start_vote_s": t_vote - t0, "sync/stream_s": t_stream - t_vote,
                           "sync/drain_s": t1 - t_stream, "sync/finish_s": t2 - t1, "sync/total_s": t2 - t0,
                           "sync/bytes": float(sum(s.nbytes for s in specs)), "sync/buckets": float(len(buckets)),
                           "sync/resident_bytes": float(resident)}

    def _abort_open_updates(self, after: str) -> None:
        abort_open_updates(self.client, after)

    def _plan(self, version: int, specs: Sequence[ParamSpec]) -> GlooUpdateInfo:
        """The update info of one send; makes sure the packing memory fits it."""
        info = GlooUpdateInfo.build(version, specs, self.bucket_bytes)
        cap = max(info.bucket_nbytes(), default=0)
        if self._buffer is None or self._buffer.numel() < cap:
            self._buffer = torch.empty(cap, dtype=torch.uint8)
        return info

    def _accepted(self, info: GlooUpdateInfo) -> None:
        """Every receiver voted to accept `info` (nothing is loaded yet)."""

    def _bucket_memory(self, info: GlooUpdateInfo, b: int) -> torch.Tensor:
        """Where bucket b is packed."""
        return self._buffer

    def _ship(self, b: int, packed: torch.Tensor) -> None:
        """After bucket b's header: move its packed bytes to the receivers."""
        gloo_broadcast(self._group, packed, f"bucket {b} ({packed.numel()} bytes)")

    def _stream(self, info: GlooUpdateInfo, buckets: list[list[ParamSpec]], tensors: Iterator[torch.Tensor]) -> int:
        """Pack and ship every bucket; returns the bytes that were already in
        their slot (nothing to pack)."""
        header = torch.zeros(2, dtype=torch.int64)
        resident = 0
        for b, bucket in enumerate(buckets):
            try:
                dest = self._bucket_memory(info, b)
                off = 0
                for _spec in bucket:
                    flat = next(tensors).detach().contiguous().reshape(-1).view(torch.uint8)
                    slot = dest[off: off + flat.numel()]
                    if flat.data_ptr() == slot.data_ptr():
                        resident += flat.numel()  # already lives in its slot (ShmWeightSender.adopt)
                    else:
                        slot.copy_(flat)
                    off += flat.numel()
                if b == len(buckets) - 1:
                    next(tensors, None)  # run the iterator's end check before the last bucket ships
            except BaseException:
                header[0], header[1] = HEADER_ABORT, 0
                gloo_broadcast(self._group, header, f"the abort header of bucket {b}")
                raise
            header[0], header[1] = HEADER_OK, off
            gloo_broadcast(self._group, header, f"the header of bucket {b}")
            self._ship(b, dest[:off])
        return resident

    def shutdown(self) -> None:
        self._group = None
        self._store = None
        self._buffer = None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ShmWeightSender(GlooWeightSender):
    """Learner rank 0's shared-memory sender (CPU, every sampler on this
    node; their engines must be "opd_shm"). Same calls as GlooWeightSender."""

    backend = "shm"

    def __init__(self, client: WeightSyncClient, master_address: str, master_port: int,
                 world_size: int | None = None, bucket_bytes: int = 64 << 20, timeout_s: float = 600.0,
                 group_name: str = "opd_weight_sync", shm_dir: str = SHM_DIR, share_weights: bool = True):
        super().__init__(client, master_address, master_port, world_size=world_size, bucket_bytes=bucket_bytes,
                         timeout_s=timeout_s, group_name=group_name)
        self.shm_dir = shm_dir
        # Shared mode (rollout.shm_shared_weights): see `_share`.
        self.share_weights = share_weights
        self._shared: _SharedRegion | None = None
        self.shared_refused: str | None = None  # why the samplers do not share a region (None: they do, or untried)
        self._mmap = None
        self._region: torch.Tensor | None = None
        self._path: str | None = None
        self._token: str | None = None
        self._unlink = None  # weakref.finalize that unlinks the file (until the vote did it)
        self._slots: dict[str, tuple[int, ParamSpec]] = {}  # name -> (region offset, spec) of the last plan

    def connect(self) -> None:
        # A new group means fresh receiver engines that have mapped nothing:
        # give them a new region (the old file may be unlinked already), and
        # pack again until every one of them has a layout to share.
        self._release_region()
        self._drop_shared()
        super().connect()

    def send(self, version: int, specs: Sequence[ParamSpec], tensors: Iterable) -> None:
        super().send(version, specs, tensors)
        self.last_stats["sync/shared"] = float(self._shared is not None and self._shared.covers(specs))
        if self._shared is None and self.share_weights and self.shared_refused is None:
            self._share(specs)

    def _share(self, specs: Sequence[ParamSpec]) -> None:
        """After a packed update every sampler served: ask each worker for the
        layout of its parameters (rollout.copy_plan.param_layout, known once
        its in-place load was replayed). When all are equal, create one region
        laid out like them: the next update is written straight into it and
        every worker adopts it as its parameter memory (shared mode). From
        then on a push is one copy of each byte, done here, whatever the
        number of samplers, and the samplers hold one copy of the weights
        between them. Samplers that load layerwise (rollout.cpu_gemm=onednn)
        or layouts that differ keep the packed path (`shared_refused` says
        why)."""
        ask = getattr(self.client, "shared_weight_layouts", None)
        if ask is None:
            self.shared_refused = "the sampler client cannot report parameter layouts"
            return
        try:
            answers = ask([s.name for s in specs])
        except Exception as e:  # the update itself went through: keep packing
            self.shared_refused = f"the samplers could not report their parameter layouts: {e}"
            logger.warning("weight sync: %s", self.shared_refused)
            return
        why = next((a["why"] for a in answers if a["layout"] is None), None)
        ids = {a["id"] for a in answers if a["layout"] is not None}
        if why is None and len(ids) > 1:
            why = f"the samplers' parameter layouts differ ({len(ids)} kinds)"
        if why is not None:
            # A sampler that has not replayed every name yet may after the next
            # update; anything else (onednn layout, refused replay) is final.
            if "not replayed yet" not in why:
                self.shared_refused = why
                logger.info("weight sync: samplers keep their own weights (%s)", why)
            return
        layout = answers[0]["layout"]
        self._shared = _SharedRegion(layout, *self._new_region(plan_param_region(layout)[1], "shared"))
        # Packed updates are over until the group is re-formed (`connect`):
        # free the packing region (weights adopted into it keep their slots).
        self._release_region()
        logger.info("weight sync: %d sampler workers share one region of parameters (%s, %.1f MiB)",
                    len(answers), self._shared.path, self._shared.region.numel() / 2**20)

    def _drop_shared(self) -> None:
        if self._shared is not None and self._shared.unlink.alive:
            self._shared.unlink()
        # The samplers' parameters keep the mapping alive until they unshare.
        self._shared = None
        self.shared_refused = None

    def _plan(self, version: int, specs: Sequence[ParamSpec]) -> GlooUpdateInfo:
        info = GlooUpdateInfo.build(version, specs, self.bucket_bytes)
        shared = self._shared
        if shared is not None and shared.covers(specs):
            return dataclasses.replace(info, shm_path=shared.path, shm_token=shared.token,
                                       shm_bytes=shared.region.numel(), shm_layout=shared.id)
        offsets, nbytes = plan_region(info.bucket_nbytes())
        if self._region is None or self._region.numel() < nbytes:
            self._create_region(nbytes)
        slots, start = {}, 0
        for b, end in enumerate(info.bucket_ends):
            off = offsets[b]
            for spec in specs[start:end]:
                slots[spec.name] = (off, spec)
                off += spec.nbytes
            start = end
        self._slots = slots
        return dataclasses.replace(info, shm_path=self._path, shm_token=self._token, shm_bytes=self._region.numel(),
                                   bucket_offsets=offsets)

    def slot(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor | None:
        """The region memory where the last planned update packs `name`, as a
        tensor of `dtype` and `shape` with its own storage (so torch.save and
        safetensors treat it as one tensor, not a view of the region); None
        when `name` is not in that update as `dtype` `shape`, or its offset
        is not aligned for `dtype`."""
        entry = self._slots.get(name) if self._mmap is not None else None
        if entry is None:
            return None
        off, spec = entry
        if spec.torch_dtype != dtype or tuple(spec.shape) != tuple(shape):
            return None
        if off % dtype.itemsize:
            return None
        return tensor_over(self._mmap, dtype, off, shape)

    def adopt(self, params: Iterable[tuple[str, torch.nn.Parameter]]) -> int:
        """Move each parameter's data into its slot of the region (copy, then
        `param.data = slot`), so later updates find it there and pack nothing:
        a push then costs the samplers' loads only. Call it only between
        updates (the samplers read the region during one), with the tensors
        the updates send as they are (same names, dtypes and shapes), and only
        when whatever trains them updates `param.data` in place (a plain
        torch optimizer, e.g. DeepSpeed ZeRO-0 in fp32; not optimizers that
        keep their own flat copy of the weights). The slots then belong to
        these parameters: sending other tensors under their names would
        overwrite them. Parameters without a slot are left alone. Returns the
        bytes now resident in the region.

        In shared mode the parameters move into a private mirror of the
        samplers' shared region instead (same layout, each tensor where the
        samplers' copy of it lies): a push then starts with one bulk copy of
        the mirror into the shared region."""
        if self._shared is not None:
            return self._shared.adopt(params)
        resident = 0
        with torch.no_grad():
            for name, p in params:
                view = self.slot(name, p.dtype, tuple(p.shape))
                if view is None:
                    continue
                if p.data_ptr() != view.data_ptr():
                    view.copy_(p.detach())
                    p.data = view
                resident += view.numel() * view.element_size()
        return resident

    def _create_region(self, nbytes: int) -> None:
        self._release_region()
        self._mmap, self._region, self._path, self._token, self._unlink = self._new_region(nbytes, "weights")

    def _new_region(self, nbytes: int, kind: str):
        """(mmap, uint8 tensor, path, token, finalizer that unlinks the file)
        of a new region under shm_dir holding `nbytes`, its header written."""
        st = os.statvfs(self.shm_dir)
        free = st.f_bavail * st.f_frsize
        if free < nbytes:
            raise self._no_room(nbytes, free)
        path = os.path.join(self.shm_dir, f"opd-{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        # Unlinked at the first accepted vote, or when this sender goes away.
        unlink = weakref.finalize(self, _unlink_quietly, path)
        try:
            try:
                # Reserve every page now: a full tmpfs then fails here, not as a
                # SIGBUS in the middle of packing.
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                unlink()
                raise self._no_room(nbytes, free, e) from e
            mm, region = map_region(fd, nbytes)
        finally:
            os.close(fd)
        token = uuid.uuid4().hex
        header = region_header(token)
        region[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        logger.info("weight sync: shared-memory region %s (%.1f MiB)", path, nbytes / 2**20)
        return mm, region, path, token, unlink

    def _no_room(self, nbytes: int, free: int, err: OSError | None = None) -> WeightSyncError:
        return WeightSyncError(
            f"{self.shm_dir} has {free / 2**20:.0f} MiB free, the shared-memory weight-sync region needs "
            f"{nbytes / 2**20:.0f} MiB (the whole update){f' ({err})' if err else ''}: set "
            f"rollout.weight_sync_backend=gloo, or give {self.shm_dir} more room (e.g. docker run --shm-size, "
            f"or `mount -o remount,size=... {self.shm_dir}`)", "init")

    def _accepted(self, info: GlooUpdateInfo) -> None:
        # Every worker has mapped the region (mapping is part of its vote):
        # drop the name, so the memory goes away with the last mapping.
        unlink = self._shared.unlink if info.shm_layout is not None else self._unlink
        if unlink is not None and unlink.alive:
            unlink()

    def _stream(self, info: GlooUpdateInfo, buckets: list[list[ParamSpec]], tensors: Iterator[torch.Tensor]) -> int:
        if info.shm_layout is None:
            return super()._stream(info, buckets, tensors)
        # Shared mode: every tensor goes straight to where the samplers' copies
        # would put it (their live parameters; they serve nothing until finish).
        # One header after the last tensor says all of it is written (the
        # workers load nothing, so waking them per bucket would only take
        # cores from the copy); an abort header if the stream fails.
        shared = self._shared
        dests = shared.dests
        resident = 0
        header = torch.zeros(2, dtype=torch.int64)
        # Every core: the learner's actor runs 1 thread, and the samplers are idle now.
        with torch_threads(len(os.sched_getaffinity(0))):
            with torch.no_grad():
                if shared.mirrored:
                    # Adopted weights are already laid out like the samplers':
                    # one copy of the whole region moves them (and anything
                    # else the mirror holds, which the loop below overwrites).
                    shared.region[SHM_DATA_OFFSET:].copy_(shared.mirror[SHM_DATA_OFFSET:])
                try:
                    for spec in (s for bucket in buckets for s in bucket):
                        t = next(tensors).detach()
                        if shared.mirrored and shared.in_mirror(spec.name, t):
                            resident += spec.nbytes
                            continue
                        for view in dests[spec.name]:
                            view.copy_(t)
                    next(tensors, None)  # the iterator's end check, before the header
                except BaseException:
                    header[0], header[1] = HEADER_ABORT, 0
                    gloo_broadcast(self._group, header, "the abort header of a shared update")
                    raise
                header[0], header[1] = HEADER_OK, sum(s.nbytes for bucket in buckets for s in bucket)
                gloo_broadcast(self._group, header, "the header of a shared update")
        return resident

    def _bucket_memory(self, info: GlooUpdateInfo, b: int) -> torch.Tensor:
        return self._region[info.bucket_offsets[b]:]

    def _ship(self, b: int, packed: torch.Tensor) -> None:
        pass  # the header told the workers: they read bucket b in place

    def _release_region(self) -> None:
        if self._unlink is not None:
            self._unlink()
            self._unlink = None
        # Never mmap.close(): torch.frombuffer tensors (the region, adopted
        # parameters) do not pin the buffer export, so close() would unmap
        # memory they still point to. They hold a reference to the mmap
        # object instead: it unmaps when the last of them is gone.
        self._region = None
        self._mmap = None
        self._path = self._token = None
        self._slots = {}

    def shutdown(self) -> None:
        super().shutdown()
        self._release_region()
        self._drop_shared()


@dataclasses.dataclass
class _SharedRegion:
    """The samplers' shared parameter memory (ShmWeightSender shared mode)."""

    layout: dict
    mmap: object
    region: torch.Tensor
    path: str
    token: str
    unlink: weakref.finalize
    id: str = ""
    dests: dict = dataclasses.field(default_factory=dict)
    # The learner's private copy of the layout (ShmWeightSender.adopt): its
    # parameters live there, each where the samplers' copy of it lies.
    mirror_mmap: object = None
    mirror: torch.Tensor | None = None
    mirror_dests: dict = dataclasses.field(default_factory=dict)
    mirrored: bool = False  # some parameter lives in the mirror

    def __post_init__(self) -> None:
        self.id = layout_id(self.layout)
        self.dests = dest_views(self._filled_slots(self.region), self.layout)

    def _filled_slots(self, region: torch.Tensor) -> list[torch.Tensor]:
        slots = param_slots(region, self.layout)
        for slot, value in zip(slots, self.layout["fill"], strict=True):
            if value is not None:
                slot.fill_(value)  # what no copy writes (e.g. vocabulary padding), as the samplers hold it
        return slots

    def adopt(self, params: Iterable[tuple[str, torch.nn.Parameter]]) -> int:
        """Move each parameter whose update is one whole contiguous copy into
        its place in the mirror (`param.data` = a tensor with its own storage
        over the mirror, as ShmWeightSender.slot gives); returns the bytes
        resident there."""
        import mmap

        if self.mirror is None:
            nbytes = self.region.numel()
            self.mirror_mmap = mmap.mmap(-1, nbytes)
            self.mirror = tensor_over(self.mirror_mmap, torch.uint8, 0, (nbytes,))
            self.mirror_dests = dest_views(self._filled_slots(self.mirror), self.layout)
        base, resident = self.mirror.data_ptr(), 0
        with torch.no_grad():
            for name, p in params:
                views = self.mirror_dests.get(name, [])
                if len(views) != 1 or not views[0].is_contiguous() or views[0].dtype != p.dtype \
                        or views[0].shape != p.shape:
                    continue
                v = views[0]
                if p.data_ptr() != v.data_ptr():
                    own = tensor_over(self.mirror_mmap, v.dtype, v.data_ptr() - base, v.shape)
                    own.copy_(p.detach())
                    p.data = own
                resident += v.numel() * v.element_size()
        self.mirrored = self.mirrored or resident > 0
        return resident

    def in_mirror(self, name: str, t: torch.Tensor) -> bool:
        views = self.mirror_dests.get(name, [])
        return len(views) == 1 and t.data_ptr() == views[0].data_ptr() and t.dtype == views[0].dtype

    def covers(self, specs: Sequence[ParamSpec]) -> bool:
        """Every tensor of `specs` has its place here, as it was recorded
        (same dtype and shape); else the update is packed."""
        d = self.layout["dests"]
        return all(s.name in d and d[s.name][0] == s.dtype and tuple(d[s.name][1]) == tuple(s.shape)
                   for s in specs)


class _VersionedClient:
    """vLLM's NCCL trainer engine calls `finish_weight_update()` without a
    version; this adapter supplies the version of the update in flight."""

    def __init__(self, client: WeightSyncClient):
        self.client = client
        self.version: int | None = None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.client.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.client.update_weights(update_info)

    def finish_weight_update(self, weight_version=None) -> None:
        self.client.finish_weight_update(self.version if weight_version is None else weight_version)


# How long a sender waits, after its deadline passed and it aborted the
# transfer, for the thread running it to end (vLLM's PyNcclCommunicator.destroy
# gives ncclCommAbort 5 s), and how much longer than `timeout_s` a whole
# send may then take (that wait plus the abort RPCs): the learner group waits
# that long for a push before it calls a rank dead (learner/group.py).
ABANDON_GRACE_S = 30.0
SEND_OVERRUN_S = 120.0


def call_with_deadline(fn, timeout_s: float, what: str, on_timeout=None, grace_s: float = ABANDON_GRACE_S):
    """Return `fn()`, run on a daemon thread, or raise what it raised. When it
    has not finished after `timeout_s`: call `on_timeout()` (which should make
    `fn` give up, e.g. abort its NCCL communicator), wait up to `grace_s` for
    the thread to end, and raise WeightSyncError(stage="timeout") naming
    `what`. The thread is a daemon: one left blocked in a dead transfer never
    holds up the process's exit (vLLM's own send thread would)."""
    import threading

    done = threading.Event()
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="opd-deadline", daemon=True).start()
    if not done.wait(timeout_s):
        if on_timeout is not None:
            try:
                on_timeout()
            except Exception as e:  # noqa: BLE001 - the timeout is the error to report
                logger.warning("aborting %s after its timeout failed: %s", what, e)
        ended = done.wait(grace_s)
        raise WeightSyncError(
            f"{what} did not finish within {timeout_s:g}s; it was aborted"
            + ("" if ended else f" (its thread was still blocked {grace_s:g}s after the abort)"), "timeout")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def abort_open_updates(client, after: str) -> None:
    """`client.abort_weight_update()` when the client has it: close the update
    on samplers that opened it and will not receive it (they would refuse to
    sample until their timeout); one still inside the receive marks itself
    for a restart instead (SamplerActor.abort_weight_update). Never raises:
    the failure that led here is the one to report."""
    abort = getattr(client, "abort_weight_update", None)
    if abort is not None:
        try:
            abort()
        except Exception as e:  # noqa: BLE001
            logger.warning("abort_weight_update after %s also failed: %s", after, e)


@functools.cache
def _round_source_cls():
    """vLLM's `WeightSource` for one update's specs and tensor stream
    (defined lazily: the learner imports vllm only for the NCCL sender)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class RoundSource(WeightSource):
        """The current round's specs and tensors. `started` turns True when
        vLLM's broadcast begins pulling tensors (from then on the NCCL
        group's state is unknown after a failure); `cancelled` makes the
        next pull raise (an abandoned send stops taking tensors from the
        learner's iterator, which the learner then drains itself)."""

        def __init__(self):
            self.specs: Sequence[ParamSpec] = ()
            self.tensors: Iterable = ()
            self.started = self.cancelled = False
            self.device: torch.device | None = None  # None: the current CUDA device

        def metadata(self):
            return [ParamMeta(s.name, s.torch_dtype, tuple(s.shape)) for s in self.specs]

        def __iter__(self):
            self.started = True
            device = self.device or torch.device("cuda", torch.cuda.current_device())
            for spec, t in zip(self.specs, _checked(self.specs, self.tensors), strict=True):
                if self.cancelled:
                    raise WeightSyncError("the send was abandoned (its deadline passed)", "timeout")
                yield spec.name, t.to(device, non_blocking=True)

    return RoundSource


class NcclWeightSender:
    """GPU sender on vLLM's official NCCL weight-transfer engine (samplers use
    `WeightTransferConfig(backend="nccl")`). Same `send` as GlooWeightSender.
    Tensors are moved to the current CUDA device as they stream.

    vLLM's trainer engine takes no timeout and NCCL kernels wait forever for
    a peer that never comes (a dead or stuck sampler): `connect` and `send`
    run it under `call_with_deadline(timeout_s)`. When the deadline passes,
    or the broadcast fails once it has begun, the sender aborts its NCCL
    communicator (vLLM's `shutdown` -> `PyNcclCommunicator.destroy` ->
    ncclCommAbort, which ends rank 0's pending kernels), closes the update
    on every sampler that is not inside the receive (`abort_open_updates`;
    vLLM's NCCL engine on those samplers leaves its layerwise reload open,
    rollout/weight_receiver.py rolls it back) and raises WeightSyncError:
    stage "timeout" for the deadline. Samplers still inside the receive are
    stuck (their kernels wait for rank 0): they report it
    (`SamplerActor.stuck_in_weight_receive`), and the driver restarts them
    and re-forms the group (cluster/loop.py `restart_dead_samplers`); the
    next `send` after a broken group re-connects by itself. Runs only on
    GPUs (tests/e2e/test_weight_sync.py::test_nccl_*); its failure
    orchestration is unit-tested with a stand-in engine."""

    backend = "nccl"
    copies_each_tensor_first = False  # vLLM's packer holds several tensors, then concatenates them

    def __init__(self, client: WeightSyncClient, master_address: str, master_port: int,
                 world_size: int | None = None, bucket_bytes: int = 64 << 20, timeout_s: float = 600.0):
        self.client = _VersionedClient(client)
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = world_size
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = timeout_s
        self._engine = None
        self._source = None
        self.last_stats: dict[str, float] = {}

    def connect(self) -> None:
        """vLLM's rendezvous (`trainer_init`: every sampler worker's
        init_weight_transfer_engine on a side thread, rank 0's endpoint
        here), within `timeout_s`."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if self.world_size is None:
            self.world_size = 1 + self.client.client.total_workers()
        info = NCCLTrainerInitInfo(master_address=self.master_address, master_port=self.master_port,
                                   world_size=self.world_size, rank=0, packed=True,
                                   packed_buffer_size_bytes=self.bucket_bytes)
        source = _round_source_cls()()
        try:
            self._engine = call_with_deadline(
                lambda: NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=source),
                self.timeout_s, f"the NCCL weight-sync rendezvous at {self.master_address}:{self.master_port} "
                f"with {self.world_size - 1} sampler workers (rollout.weight_sync_timeout_s)")
        except WeightSyncError as e:
            raise WeightSyncError(e.message, "init") from e
        except Exception as e:
            raise WeightSyncError(f"could not form the NCCL weight-sync group at {self.master_address}:"
                                  f"{self.master_port} for {self.world_size} ranks: {e}", "init") from e
        self._source = source

    def reconnect(self, master_port: int, world_size: int | None = None) -> None:
        """Form a new group (e.g. after `SamplerPool.restart`)."""
        self.shutdown()
        self.master_port, self.world_size = master_port, world_size
        self.connect()

    def send(self, version: int, specs: Sequence[ParamSpec], tensors: Iterable) -> None:
        """Push one full update within `timeout_s`; see the class docstring
        for what a failure leaves behind."""
        if self._engine is None:
            self.connect()
        t0 = time.perf_counter()
        # NCCL has no reject vote: pre-validate so a bad update fails before
        # any worker enters the broadcast.
        validate = getattr(self.client.client, "validate_update", None)
        if validate is not None:
            info = GlooUpdateInfo.build(version, specs, self.bucket_bytes)
            problems = validate(dataclasses.asdict(info))
            if problems:
                raise WeightSyncError(f"weight update v{version} rejected: " + "; ".join(problems), "validate")
        engine, source = self._engine, self._source
        source.specs, source.tensors = list(specs), tensors
        source.started = source.cancelled = False
        self.client.version = version

        def abandon() -> None:
            source.cancelled = True
            self._abort_group()

        try:
            call_with_deadline(engine.send_weights, self.timeout_s,
                               f"weight update v{version} over NCCL (rollout.weight_sync_timeout_s)", abandon)
        except BaseException as e:
            if source.started:
                # The broadcast began: rank 0's communicator may hold pending
                # kernels, and vLLM says the group is unusable (nccl_engine.py,
                # send_weights). A new one is formed at the next send.
                self._abort_group()
            abort_open_updates(self.client.client, f"a failed NCCL update v{version}")
            if isinstance(e, WeightSyncError) and e.stage == "timeout":
                raise WeightSyncError(
                    f"{e.message}. The NCCL group was aborted; samplers still inside the receive are stuck "
                    "there and must be restarted (the driver does), then the group re-formed", "timeout") from e
            raise
        self.last_stats = {"sync/total_s": time.perf_counter() - t0,
                           "sync/bytes": float(sum(s.nbytes for s in specs))}

    def _abort_group(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.shutdown()
            except Exception as e:  # noqa: BLE001 - a broken group may fail to tear down too
                logger.warning("tearing down the NCCL weight-sync group failed: %s", e)

    def shutdown(self) -> None:
        self._abort_group()


def samplers_on_this_node(client) -> bool | None:
    """True when every sampler of `client` runs on this process's Ray node;
    None when that cannot be told (no Ray, or a client without `node_ids`)."""
    node_ids = getattr(client, "node_ids", None)
    if node_ids is None:
        return None
    import ray

    if not ray.is_initialized():
        return None
    mine = ray.get_runtime_context().get_node_id()
    return all(n == mine for n in node_ids())


def make_sender(client: WeightSyncClient, backend: str, master_address: str, master_port: int,
                bucket_bytes: int = 64 << 20, timeout_s: float = 600.0, share_weights: bool = True):
    """The sender for `rollout.weight_sync_backend=backend` ("auto", "gloo",
    "shm", "nccl"); "auto" is resolved here, on learner rank 0, where the
    samplers' and our own node are known. `share_weights`:
    rollout.shm_shared_weights (shm only). Not connected yet."""
    if backend == "auto":
        has_gpu = torch.cuda.is_available()
        backend = choose_backend("auto", has_gpu, None if has_gpu else samplers_on_this_node(client))
    else:
        choose_backend(backend, has_gpu=True)  # validates the name
    if backend == "shm":
        return ShmWeightSender(client, master_address, master_port, bucket_bytes=bucket_bytes, timeout_s=timeout_s,
                               share_weights=share_weights)
    cls = {"gloo": GlooWeightSender, "nccl": NcclWeightSender}[backend]
    return cls(client, master_address, master_port, bucket_bytes=bucket_bytes, timeout_s=timeout_s)


__all__ = ["GlooWeightSender", "NcclWeightSender", "ShmWeightSender", "abort_open_updates", "call_with_deadline",
           "make_sender", "samplers_on_this_node", "specs_from_named"]
