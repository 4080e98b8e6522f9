"""Weight-sync contract (rollout/weight_sync.py) and the sender's pure logic
(learner/weight_sender.py): bucket planning, pack/unpack, spec checks, the
gloo bucket protocol between two ranks in this process (no vLLM:
tests/e2e/test_weight_sync.py runs it into real samplers), pickling.

    .venv/bin/python -m pytest tests/unit/test_weight_sync.py -q
"""

import dataclasses
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.weight_sender import GlooWeightSender, _checked, make_sender, specs_from_named
from rollout.host import free_port
from rollout.weight_sync import (
    HEADER_OK,
    GlooUpdateInfo,
    ParamSpec,
    WeightSyncError,
    check_update_specs,
    gloo_allreduce_sum,
    gloo_broadcast,
    open_gloo_group,
    plan_buckets,
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
    flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])  # as the sender packs
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
        gloo_allreduce_sum(self.group, torch.zeros(1, dtype=torch.int64), "vote")
        header = torch.zeros(2, dtype=torch.int64)
        for b, specs in enumerate(info.buckets()):
            gloo_broadcast(self.group, header, "header")
            if header[0] != HEADER_OK:
                self.error = "aborted"
                raise WeightSyncError("sender aborted")
            flat = torch.empty(int(header[1]), dtype=torch.uint8)
            gloo_broadcast(self.group, flat, "bucket")
            self.received += [(n, t.clone()) for n, t in unpack_bucket(flat, specs)]

    def finish_weight_update(self, weight_version=None):
        self.version = weight_version


def test_sender_streams_buckets_and_aborts_cleanly():
    """The CPU sender against an in-process receiver over a real gloo group:
    every tensor arrives in order, a failing gather aborts the receivers, and
    the group stays usable."""
    port = free_port()
    rx = _Receiver(port)
    sender = GlooWeightSender(rx, "127.0.0.1", port, world_size=2, bucket_bytes=100, timeout_s=30)
    sender.connect()
    named = [(f"p{i}", torch.randn(i + 3)) for i in range(10)]
    sender.send(4, specs_from_named(named), iter(named))
    assert rx.version == 4 and [n for n, _ in rx.received] == [n for n, _ in named]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rx.received, named, strict=True))
    assert sender.last_stats["sync/buckets"] > 2

    def dying():
        yield from named[:5]
        raise RuntimeError("gather failed")

    rx.version = None
    with pytest.raises(RuntimeError, match="gather failed"):
        sender.send(5, specs_from_named(named), dying())
    assert rx.error == "aborted" and rx.version is None
    # The group is still usable afterwards.
    named2 = [(n, t + 1) for n, t in named]
    sender.send(6, specs_from_named(named2), iter(named2))
    assert rx.version == 6
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rx.received, named2, strict=True))
    sender.shutdown()


def test_make_sender_resolves_auto_on_cpu(monkeypatch):
    import learner.weight_sender

    monkeypatch.setattr(learner.weight_sender.torch.cuda, "is_available", lambda: False)
    assert type(make_sender(None, "auto", "127.0.0.1", 1)) is GlooWeightSender
    assert type(make_sender(None, "gloo", "127.0.0.1", 1)) is GlooWeightSender
    with pytest.raises(ValueError, match="not valid"):
        make_sender(None, "tcp", "127.0.0.1", 1)
