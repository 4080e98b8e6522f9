"""Weight-sync contract (rollout/weight_sync.py) and the sender's pure logic
(learner/weight_sender.py): bucket planning, pack/unpack, spec checks, the
gloo and shared-memory bucket protocols between two ranks in this process
(no vLLM: tests/e2e/test_weight_sync.py runs both into real samplers), the
shm region's layout, token check and out-of-room error, pickling.

    .venv/bin/python -m pytest tests/unit/test_weight_sync.py -q
"""

import dataclasses
import os
import pickle
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.weight_sender import GlooWeightSender, ShmWeightSender, _checked, make_sender, specs_from_named
from rollout.weight_sync import (
    HEADER_OK,
    SHM_DATA_OFFSET,
    GlooUpdateInfo,
    ParamSpec,
    WeightSyncError,
    check_update_specs,
    gloo_allreduce_sum,
    gloo_broadcast,
    open_gloo_group,
    open_region,
    pack_bucket,
    plan_buckets,
    plan_region,
    unpack_bucket,
)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=0, max_size=30), cap=st.integers(1, 20000))
def test_plan_buckets_is_ordered_bounded_and_complete(sizes, cap):
    specs = [ParamSpec(f"p{i}", "uint8", (n,)) for i, n in enumerate(sizes)]
    ends = plan_buckets(specs, cap)
    assert (ends[-1] if ends else 0) == len(specs)
    start = 0
    for end in ends:
        assert end > start
        size = sum(sizes[start:end])
        # A bucket exceeds the cap only when it is one tensor larger than it.
        assert size <= cap or end - start == 1
        start = end


def test_plan_buckets_rejects_nonpositive_cap():
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        plan_buckets([], 0)


def test_pack_unpack_roundtrip_mixed_dtypes():
    tensors = [torch.randn(3, 4), torch.randn(5).to(torch.bfloat16), torch.arange(7, dtype=torch.int64),
               torch.randn(4, 6)[:, ::2]]  # non-contiguous
    specs = [ParamSpec(f"t{i}", str(t.dtype).removeprefix("torch."), tuple(t.shape)) for i, t in enumerate(tensors)]
    flat = pack_bucket(tensors)
    assert flat.numel() == sum(s.nbytes for s in specs)
    out = list(unpack_bucket(flat, specs))
    assert [n for n, _ in out] == [s.name for s in specs]
    for (_, got), want in zip(out, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError, match="its specs describe"):
        list(unpack_bucket(flat[:-1], specs))


def test_update_info_survives_the_dict_round_trip_and_validates():
    specs = [ParamSpec("a", "float32", (4, 4)), ParamSpec("b", "bfloat16", (8,)), ParamSpec("c", "float32", (2,))]
    info = GlooUpdateInfo.build(3, specs, bucket_bytes=64)
    again = GlooUpdateInfo(**dataclasses.asdict(info))
    again.validate()
    assert again.specs() == specs and again.bucket_ends == [1, 3]
    bad = dataclasses.replace(info, bucket_ends=[2, 1])
    with pytest.raises(ValueError, match="bad bucket_ends"):
        bad.validate()
    # Shared mode: a layout id names the region the samplers' weights live in;
    # no bucket offsets (nothing is packed), but a region it must have.
    shared = dataclasses.replace(info, shm_path="/dev/shm/x", shm_token="t", shm_bytes=1 << 20, shm_layout="abc")
    GlooUpdateInfo(**dataclasses.asdict(shared)).validate()
    with pytest.raises(ValueError, match="shared layout abc without a shared-memory region"):
        dataclasses.replace(info, shm_layout="abc").validate()


def test_check_update_specs_names_every_problem():
    expected = {"w": (4, 4), "b": (4,), "tied": (4, 4)}
    ok = [ParamSpec("w", "float32", (4, 4)), ParamSpec("b", "bfloat16", (4,))]
    assert check_update_specs(ok, expected, required=["w", "b"]) == []
    problems = check_update_specs(
        [ParamSpec("w", "float32", (4, 5)), ParamSpec("zz", "float32", (1,)), ParamSpec("w", "int64", (4, 4))],
        expected, required=["w", "b"])
    text = "\n".join(problems)
    assert "'w' has shape [4, 5], the sampler's model expects [4, 4]" in text
    assert "unknown parameter 'zz'" in text
    assert "'w' appears twice" in text
    assert "dtype int64; weights must be floating point" in text
    assert "1 parameter(s) missing" in text and "'b'" in text


def test_errors_that_cross_ray_pickle():
    from rollout.sampler import SamplerNotReady

    e = pickle.loads(pickle.dumps(WeightSyncError("bucket 3 failed", "transfer")))
    assert isinstance(e, WeightSyncError) and str(e) == "bucket 3 failed" and e.stage == "transfer"
    e2 = pickle.loads(pickle.dumps(SamplerNotReady("mixed weights")))
    assert str(e2) == "mixed weights"


def test_checked_iterator_names_the_mismatch():
    specs = [ParamSpec("a", "float32", (2,)), ParamSpec("b", "float32", (3,))]
    assert len(list(_checked(specs, [torch.zeros(2), torch.zeros(3)]))) == 2
    with pytest.raises(WeightSyncError, match=r"tensor 1 \('b'\) is float32 \[4\], its spec says float32 \[3\]"):
        list(_checked(specs, [torch.zeros(2), torch.zeros(4)]))
    with pytest.raises(WeightSyncError, match="tensor 0 is 'x' but the specs declare 'a'"):
        list(_checked(specs, [("x", torch.zeros(2))]))
    with pytest.raises(WeightSyncError, match="ended after 1 tensors"):
        list(_checked(specs, [torch.zeros(2)]))
    with pytest.raises(WeightSyncError, match="more tensors than the 2 specs"):
        list(_checked(specs, [torch.zeros(2), torch.zeros(3), ("c", torch.zeros(1))]))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Receiver:
    """A rank-1 stand-in for a sampler worker speaking the bucket protocol
    (vote, then per bucket a header and the bytes), without vLLM."""

    def __init__(self, port):
        self.port, self.received, self.error = port, [], None

    def init_weight_transfer_engine(self, info):
        self.store, self.group = open_gloo_group(info["master_address"], info["master_port"],
                                                 info["rank_offset"], info["world_size"], info["timeout_s"],
                                                 info["group_name"])

    def start_weight_update(self):
        self.received = []

    def update_weights(self, update_info):
        info = GlooUpdateInfo(**update_info)
        info.validate()
        region = None
        if info.shm_path is not None:
            # Map before the vote and keep the mapping while the region stays
            # the same, as the vLLM engine does (the sender unlinks the file
            # once every receiver voted).
            key = (info.shm_path, info.shm_token, info.shm_bytes)
            if getattr(self, "region_key", None) != key:
                self.region_key, self.region = key, open_region(*key)[1]
            self.shm_path, region = info.shm_path, self.region
        gloo_allreduce_sum(self.group, torch.zeros(1, dtype=torch.int64), "vote")
        header = torch.zeros(2, dtype=torch.int64)
        for b, specs in enumerate(info.buckets()):
            gloo_broadcast(self.group, header, "header")
            if header[0] != HEADER_OK:
                self.error = "aborted"
                raise WeightSyncError("sender aborted")
            if region is None:
                flat = torch.empty(int(header[1]), dtype=torch.uint8)
                gloo_broadcast(self.group, flat, "bucket")
            else:
                off = info.bucket_offsets[b]
                flat = region[off: off + int(header[1])]
            self.received += [(n, t.clone()) for n, t in unpack_bucket(flat, specs)]

    def finish_weight_update(self, weight_version=None):
        self.version = weight_version


def test_plan_region_aligns_buckets_after_the_header():
    offsets, total = plan_region([10, 4096, 1])
    assert offsets == [SHM_DATA_OFFSET, SHM_DATA_OFFSET + 4096, SHM_DATA_OFFSET + 2 * 4096]
    assert total == SHM_DATA_OFFSET + 3 * 4096
    specs = [ParamSpec("a", "float32", (4,)), ParamSpec("b", "float32", (2,))]
    info = dataclasses.replace(GlooUpdateInfo.build(1, specs, bucket_bytes=16), shm_path="/dev/shm/x",
                               shm_token="t", shm_bytes=SHM_DATA_OFFSET + 4096, bucket_offsets=[SHM_DATA_OFFSET, 0])
    with pytest.raises(ValueError, match="overlapping"):
        info.validate()
    with pytest.raises(ValueError, match="past the shared-memory region"):
        dataclasses.replace(info, bucket_offsets=[SHM_DATA_OFFSET, SHM_DATA_OFFSET + 4096]).validate()


@pytest.mark.parametrize("sender_cls", [GlooWeightSender, ShmWeightSender], ids=["gloo", "shm"])
def test_sender_streams_buckets_and_aborts_cleanly(sender_cls):
    """Both CPU senders against an in-process receiver over a real gloo group:
    every tensor arrives in order, a failing gather aborts the receivers, and
    the group (and, for shm, the region) stays usable."""
    shm = sender_cls is ShmWeightSender
    port = _port()
    rx = _Receiver(port)
    sender = sender_cls(rx, "127.0.0.1", port, world_size=2, bucket_bytes=100, timeout_s=30)
    sender.connect()
    named = [(f"p{i}", torch.randn(i + 3)) for i in range(10)]
    sender.send(4, specs_from_named(named), iter(named))
    assert rx.version == 4 and [n for n, _ in rx.received] == [n for n, _ in named]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rx.received, named, strict=True))
    assert sender.last_stats["sync/buckets"] > 2
    if shm:
        # Unlinked once the receiver had mapped it (its vote).
        path = rx.shm_path
        assert path.startswith("/dev/shm/opd-weights-") and not os.path.exists(path)

    def dying():
        yield from named[:5]
        raise RuntimeError("gather failed")

    rx.version = None
    with pytest.raises(RuntimeError, match="gather failed"):
        sender.send(5, specs_from_named(named), dying())
    assert rx.error == "aborted" and rx.version is None
    # The group (and the region) is still usable afterwards.
    named2 = [(n, t + 1) for n, t in named]
    sender.send(6, specs_from_named(named2), iter(named2))
    assert rx.version == 6
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rx.received, named2, strict=True))
    if shm:
        assert rx.shm_path == path
        # A reconnect (e.g. after a sampler restart) makes a new region.
        sender.reconnect(_port(), world_size=2)
        sender.send(7, specs_from_named(named), iter(named))
        assert rx.version == 7 and rx.shm_path != path and not os.path.exists(rx.shm_path)
    sender.shutdown()


def test_shm_adopted_weights_are_sent_without_packing_and_outlive_their_region():
    """ShmWeightSender.adopt (learner.shm_resident_weights): parameters move
    into their slots of the region, are updated there in place (as the
    optimizer does), and later pushes pack nothing yet deliver the new
    values. A new region (reconnect) packs them again until re-adopted;
    adopted tensors save as themselves and stay valid after the region is
    released (closing the mmap under them crashed the process)."""
    import io

    port = _port()
    rx = _Receiver(port)
    sender = ShmWeightSender(rx, "127.0.0.1", port, world_size=2, bucket_bytes=100, timeout_s=30)
    sender.connect()
    tail = torch.nn.Module()
    tail.odd = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))  # 6 bytes: what follows is misaligned for fp32
    tail.after = torch.nn.Parameter(torch.randn(2))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5), tail)

    def live():
        return [(n, p.detach()) for n, p in model.named_parameters()]

    specs = specs_from_named(live())
    total = sum(s.nbytes for s in specs)
    sender.send(1, specs, iter(live()))
    assert sender.last_stats["sync/resident_bytes"] == 0
    # Only slots aligned for their dtype, of the right dtype and shape, exist.
    assert sender.slot("0.weight", torch.float32, (3, 4)) is not None
    assert sender.slot("0.weight", torch.float16, (3, 4)) is None
    assert sender.slot("0.weight", torch.float32, (4, 3)) is None
    assert sender.slot("nope", torch.float32, (3, 4)) is None
    slots = sender._slots
    misaligned = [n for n, (off, spec) in slots.items() if off % spec.torch_dtype.itemsize]
    assert misaligned == ["2.after"], slots  # packed right after the 6-byte bf16 tensor in its bucket

    before = [t.clone() for _, t in live()]
    adopted = sender.adopt(model.named_parameters())
    assert adopted == total - 8  # all but the misaligned fp32 tensor
    lo = sender._region.data_ptr()
    hi = lo + sender._region.numel()
    for (n, p), b in zip(model.named_parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
        assert (lo <= p.data_ptr() < hi) == (n != "2.after"), n
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()  # its own storage, not the region's

    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.add_(1)
    sender.send(2, specs, iter(live()))
    assert sender.last_stats["sync/resident_bytes"] == total - 8
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rx.received, live(), strict=True))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert buf.tell() < total + 4096 < sender._region.numel()  # the tensors, not the region they live in

    sender.reconnect(_port(), world_size=2)  # a new region: the old one is still mapped by the parameters
    sender.send(3, specs, iter(live()))
    assert sender.last_stats["sync/resident_bytes"] == 0
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rx.received, live(), strict=True))
    assert sender.adopt(model.named_parameters()) == total - 8
    sender.send(4, specs, iter(live()))
    assert sender.last_stats["sync/resident_bytes"] == total - 8
    expected = [t.clone() for _, t in live()]
    sender.shutdown()
    # The region's name and the sender's handles are gone; the memory lives on with the parameters.
    assert all(torch.equal(t, e) for (_, t), e in zip(live(), expected, strict=True))
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert torch.equal(model[0].weight.detach(), expected[0] * 2)


def test_shm_region_token_and_missing_file_errors(tmp_path):
    sender = ShmWeightSender(None, "127.0.0.1", 1, world_size=2, shm_dir=str(tmp_path))
    sender._create_region(SHM_DATA_OFFSET + 4096)
    path, token = sender._path, sender._token
    mm, region = open_region(path, token, SHM_DATA_OFFSET + 4096)
    del region
    mm.close()
    with pytest.raises(WeightSyncError, match="is not the learner's weight-sync region"):
        open_region(path, "someone-else", SHM_DATA_OFFSET + 4096)
    sender.shutdown()
    assert not os.path.exists(path)  # shutdown unlinks a region no vote has unlinked yet
    with pytest.raises(WeightSyncError, match=r"cannot open .* No such file.*rollout.weight_sync_backend=gloo"):
        open_region(path, token, SHM_DATA_OFFSET + 4096)


def test_shm_sender_says_how_much_room_it_needs(tmp_path, monkeypatch):
    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda _: Full())
    sender = ShmWeightSender(None, "127.0.0.1", 1, world_size=2, shm_dir=str(tmp_path))
    with pytest.raises(WeightSyncError, match=r"has 0 MiB free, the shared-memory weight-sync region needs 97 MiB "
                                              r"\(the whole update\): set rollout.weight_sync_backend=gloo") as e:
        sender._create_region(97 << 20)
    assert e.value.stage == "init" and list(tmp_path.iterdir()) == []


def test_make_sender_resolves_auto_on_cpu(monkeypatch):
    import ray

    class Client:
        def __init__(self, same):
            self.same = same

        def node_ids(self):
            import ray

            mine = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "x"
            return [mine, mine if self.same else "elsewhere"]

    # No Ray in this process: where the samplers are is unknown -> gloo. (An
    # e2e test earlier in the same session may have initialised Ray here.)
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        assert type(make_sender(Client(True), "auto", "127.0.0.1", 1)) is GlooWeightSender
    assert type(make_sender(Client(True), "shm", "127.0.0.1", 1)) is ShmWeightSender
    assert type(make_sender(Client(True), "gloo", "127.0.0.1", 1)) is GlooWeightSender
    with pytest.raises(ValueError, match="not valid"):
        make_sender(Client(True), "tcp", "127.0.0.1", 1)
