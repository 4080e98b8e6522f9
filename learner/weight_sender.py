"""Sending side of weight sync: learner rank 0 pushes full weights to every sampler.

`make_sender(client, backend, ...)` resolves `rollout.weight_sync_backend`
("auto": nccl with GPUs, else gloo; see rollout.weight_sync.choose_backend)
and builds one of:

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
learner never imports vllm otherwise). vLLM's engine has no timeout, so the
sender runs it under a deadline (`call_with_deadline`, `timeout_s`) and, past
it, aborts the NCCL group and the samplers' open updates (see the class).
It runs only on GPUs; its failure handling is unit-tested with a stand-in
engine (tests/unit/test_weight_update_failure.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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
    choose_backend,
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
        info = GlooUpdateInfo.build(version, specs, self.bucket_bytes)
        cap = max(info.bucket_nbytes(), default=0)
        if self._buffer is None or self._buffer.numel() < cap:
            self._buffer = torch.empty(cap, dtype=torch.uint8)  # the packing memory
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
                abort_open_updates(self.client, "a failed start")
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
                        abort_open_updates(self.client, "a rejected update")
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
        if not fused:
            self.client.finish_weight_update(version)
        t2 = time.perf_counter()
        # Phases: start RPC (none when fused) + vote (samplers validated),
        # streaming the buckets, waiting for the samplers' loads (and, fused,
        # their commit) to finish, the finish RPC (none when fused).
        self.last_stats = {"sync/start_vote_s": t_vote - t0, "sync/stream_s": t_stream - t_vote,
                           "sync/drain_s": t1 - t_stream, "sync/finish_s": t2 - t1, "sync/total_s": t2 - t0,
                           "sync/bytes": float(sum(s.nbytes for s in specs)), "sync/buckets": float(len(buckets))}

    def _stream(self, buckets: list[list[ParamSpec]], tensors: Iterator[torch.Tensor]) -> None:
        """Pack and broadcast every bucket, each after its header."""
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


def make_sender(client: WeightSyncClient, backend: str, master_address: str, master_port: int,
                bucket_bytes: int = 64 << 20, timeout_s: float = 600.0):
    """The sender for `rollout.weight_sync_backend=backend` ("auto", "gloo",
    "nccl"); "auto" is resolved here, on learner rank 0. Not connected yet."""
    backend = choose_backend(backend, torch.cuda.is_available()) if backend == "auto" else backend
    choose_backend(backend, has_gpu=True)  # validates the name
    cls = {"gloo": GlooWeightSender, "nccl": NcclWeightSender}[backend]
    return cls(client, master_address, master_port, bucket_bytes=bucket_bytes, timeout_s=timeout_s)


__all__ = ["GlooWeightSender", "NcclWeightSender", "abort_open_updates", "call_with_deadline", "make_sender",
           "specs_from_named"]
