"""Sending side of weight sync: learner rank 0 pushes full weights to every sampler.

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

`NcclWeightSender` (GPU) wraps vLLM's official `NCCLTrainerWeightTransferEngine`
behind the same `send(version, specs, tensors)`; it imports vllm lazily (the
learner never imports vllm otherwise) and was not run on this CPU machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from rollout.weight_sync import (
    HEADER_ABORT,
    HEADER_OK,
    GlooUpdateInfo,
    ParamSpec,
    WeightSyncClient,
    WeightSyncError,
    dtype_name,
    gloo_allreduce_sum,
    gloo_broadcast,
    open_gloo_group,
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
        info = GlooUpdateInfo.build(version, specs, self.bucket_bytes)
        buckets = info.buckets()
        cap = max((sum(s.nbytes for s in b) for b in buckets), default=0)
        if self._buffer is None or self._buffer.numel() < cap:
            self._buffer = torch.empty(cap, dtype=torch.uint8)

        try:
            self.client.start_weight_update()
        except BaseException:
            # Some samplers may have opened the update: close it there, or
            # they would refuse to sample until their timeout.
            abort = getattr(self.client, "abort_weight_update", None)
            if abort is not None:
                try:
                    abort()
                except Exception as e:  # the start error is the one to report
                    logger.warning("abort_weight_update after a failed start also failed: %s", e)
            raise
        exe = ThreadPoolExecutor(max_workers=1)
        fut = exe.submit(self.client.update_weights, dataclasses.asdict(info))
        try:
            vote = torch.zeros(1, dtype=torch.int64)
            gloo_allreduce_sum(self._group, vote, "the update's accept/reject vote")
            t_vote = time.perf_counter()
            if vote.item() != 0:
                fut.result(timeout=self.timeout_s)  # raises the samplers' reason
                raise WeightSyncError(f"weight update v{version} was rejected by a sampler", "validate")
            try:
                self._stream(buckets, _checked(specs, tensors))
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
        self.client.finish_weight_update(version)
        t2 = time.perf_counter()
        # Phases: start RPC + vote (samplers validated), streaming the buckets,
        # waiting for the samplers' loads to finish, the finish RPC.
        self.last_stats = {"sync/start_vote_s": t_vote - t0, "sync/stream_s": t_stream - t_vote,
                           "sync/drain_s": t1 - t_stream, "sync/finish_s": t2 - t1, "sync/total_s": t2 - t0,
                           "sync/bytes": float(sum(s.nbytes for s in specs)), "sync/buckets": float(len(buckets))}

    def _stream(self, buckets: list[list[ParamSpec]], tensors: Iterator[torch.Tensor]) -> None:
        header = torch.zeros(2, dtype=torch.int64)
        for b, bucket in enumerate(buckets):
            try:
                off = 0
                for _spec in bucket:
                    flat = next(tensors).detach().contiguous().reshape(-1).view(torch.uint8)
                    self._buffer[off: off + flat.numel()].copy_(flat)
                    off += flat.numel()
                if b == len(buckets) - 1:
                    next(tensors, None)  # run the iterator's end check before the last bucket ships
            except BaseException:
                header[0], header[1] = HEADER_ABORT, 0
                gloo_broadcast(self._group, header, f"the abort header of bucket {b}")
                raise
            header[0], header[1] = HEADER_OK, off
            gloo_broadcast(self._group, header, f"the header of bucket {b}")
            gloo_broadcast(self._group, self._buffer[:off], f"bucket {b} ({off} bytes)")

    def shutdown(self) -> None:
        self._group = None
        self._store = None
        self._buffer = None


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


class NcclWeightSender:
    """GPU sender on vLLM's official NCCL weight-transfer engine (samplers use
    `WeightTransferConfig(backend="nccl")`). Same `send` as GlooWeightSender.
    Tensors are moved to the current CUDA device as they stream. Not run on
    the CPU machine (tests/e2e/test_weight_sync.py::test_nccl_* is gpu-marked)."""

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

    def connect(self) -> None:
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        class _RoundSource(WeightSource):
            """The current round's specs and tensor stream as a vLLM WeightSource."""

            specs: Sequence[ParamSpec] = ()
            tensors: Iterable = ()

            def metadata(self):
                return [ParamMeta(s.name, s.torch_dtype, tuple(s.shape)) for s in self.specs]

            def __iter__(self):
                device = torch.device("cuda", torch.cuda.current_device())
                for spec, t in zip(self.specs, _checked(self.specs, self.tensors), strict=True):
                    yield spec.name, t.to(device, non_blocking=True)

        if self.world_size is None:
            self.world_size = 1 + self.client.client.total_workers()
        self._source = _RoundSource()
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(
            NCCLTrainerInitInfo(master_address=self.master_address, master_port=self.master_port,
                                world_size=self.world_size, rank=0, packed=True,
                                packed_buffer_size_bytes=self.bucket_bytes),
            client=self.client, source=self._source)

    def send(self, version: int, specs: Sequence[ParamSpec], tensors: Iterable) -> None:
        if self._engine is None:
            self.connect()
        # NCCL has no reject vote: pre-validate so a bad update fails before
        # any worker enters the broadcast.
        validate = getattr(self.client.client, "validate_update", None)
        if validate is not None:
            info = GlooUpdateInfo.build(version, specs, self.bucket_bytes)
            problems = validate(dataclasses.asdict(info))
            if problems:
                raise WeightSyncError(f"weight update v{version} rejected: " + "; ".join(problems), "validate")
        self._source.specs, self._source.tensors = list(specs), tensors
        self.client.version = version
        self._engine.send_weights()

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


__all__ = ["GlooWeightSender", "NcclWeightSender", "specs_from_named"]
