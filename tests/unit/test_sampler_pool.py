"""SamplerPool's pure logic (rollout/pool.py, rollout/sampler.py): balanced
contiguous splits, per-prompt seeds, backend choice, rank-offset assignment
and error aggregation of the fan-out. No Ray cluster, no vLLM engine.

    .venv/bin/python -m pytest tests/unit/test_sampler_pool.py -q
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.pool import SamplerPool, split_balanced
from rollout.sampler import bind_cpu_threads, choose_backend, engine_backend, engine_in_process, mix_seed
from rollout.weight_sync import GLOO_BACKEND_NAME, SHM_BACKEND_NAME, WeightSyncError


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(1, 1000), max_size=60), parts=st.integers(1, 8))
def test_split_balanced_covers_in_order(costs, parts):
    slices = split_balanced(costs, parts)
    assert len(slices) == parts
    assert slices[0][0] == 0 and slices[-1][1] == len(costs)
    for (a, b), (c, _) in zip(slices, slices[1:]):
        assert a <= b == c
    if len(costs) >= parts:
        assert all(b > a for a, b in slices), "a sampler got nothing while prompts were left"


def test_split_balanced_balances_cost():
    # One heavy prompt up front: it gets a sampler to itself.
    assert split_balanced([100, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    slices = split_balanced([10] * 100, 4)
    assert [b - a for a, b in slices] == [25, 25, 25, 25]
    with pytest.raises(ValueError, match="num_parts must be >= 1"):
        split_balanced([1], 0)


def test_mix_seed_is_deterministic_and_spreads():
    assert mix_seed(3, 7) == mix_seed(3, 7)
    seeds = {mix_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000  # neighbouring seeds/prompts do not collide
    assert all(0 <= x < 2**30 for x in seeds)


def test_choose_backend():
    # auto: nccl with GPUs; on CPU shm only when every sampler is on learner
    # rank 0's node, gloo when not or when that is unknown.
    assert choose_backend("auto", has_gpu=True, same_node=True) == "nccl"
    assert choose_backend("auto", has_gpu=True, same_node=False) == "nccl"
    assert choose_backend("auto", has_gpu=False, same_node=True) == "shm"
    assert choose_backend("auto", has_gpu=False, same_node=False) == "gloo"
    assert choose_backend("auto", has_gpu=False) == "gloo"
    # Explicit choices are kept (shm across nodes fails at the first push's
    # vote, with the fix in the message).
    assert choose_backend("gloo", has_gpu=True) == "gloo"
    assert choose_backend("shm", has_gpu=False, same_node=False) == "shm"
    with pytest.raises(ValueError, match="needs GPU samplers"):
        choose_backend("nccl", has_gpu=False)
    with pytest.raises(ValueError, match=r"weight_sync_backend='tcp' is not valid; use one of"):
        choose_backend("tcp", has_gpu=False)


def test_engine_backend_serves_every_cpu_sender():
    # The sampler cannot see the learner's node: for auto on CPU it starts the
    # shm engine, which also takes gloo updates.
    assert engine_backend("auto", has_gpu=False) == SHM_BACKEND_NAME
    assert engine_backend("shm", has_gpu=False) == SHM_BACKEND_NAME
    assert engine_backend("gloo", has_gpu=False) == GLOO_BACKEND_NAME
    assert engine_backend("auto", has_gpu=True) == "nccl"


def test_engine_in_process_on_cpu_only_by_default():
    assert engine_in_process("auto", has_gpu=False, tensor_parallel_size=1)
    assert not engine_in_process("auto", has_gpu=True, tensor_parallel_size=1)
    assert not engine_in_process("auto", has_gpu=False, tensor_parallel_size=2)
    assert engine_in_process("inprocess", has_gpu=True, tensor_parallel_size=1)
    assert not engine_in_process("multiprocess", has_gpu=False, tensor_parallel_size=1)


def test_bind_cpu_threads_pins_and_sets_torch_threads():
    import torch

    before_aff, before_n = os.sched_getaffinity(0), torch.get_num_threads()
    first = min(before_aff)
    try:
        assert bind_cpu_threads(str(first)) == 1
        assert os.sched_getaffinity(0) == {first} and torch.get_num_threads() == 1
        os.sched_setaffinity(0, before_aff)
        assert bind_cpu_threads("auto") == max(1, len(before_aff) - 1) == torch.get_num_threads()
    finally:
        os.sched_setaffinity(0, before_aff)
        torch.set_num_threads(before_n)


class _Call:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def remote(self, *args):
        self.log.append((self.name, args))
        return (self.name, args)


class _FakeSampler:
    def __init__(self, i, log):
        self.init_weight_transfer_engine = _Call(f"init{i}", log)


def test_init_assigns_consecutive_rank_offsets(monkeypatch):
    log = []
    pool = SamplerPool([_FakeSampler(i, log) for i in range(3)])
    pool._workers = [2, 1, 4]  # workers per sampler (e.g. tensor parallel sizes)
    monkeypatch.setattr(pool, "_fanout", lambda what, calls, timeout_s=None: [fn.remote(*a) for fn, a in calls])
    pool.init_weight_transfer_engine({"master_address": "h", "master_port": 1, "rank_offset": 1, "world_size": 8})
    assert [args[0]["rank_offset"] for _, args in log] == [1, 3, 4]
    assert all(args[0]["world_size"] == 8 for _, args in log)


def test_fanout_waits_for_all_and_names_every_failure(monkeypatch):
    import ray

    class Boom(Exception):
        pass

    results = {"a": 1, "b": Boom("bucket 2 timed out"), "c": Boom("bad shape")}
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (refs, []))

    def get(ref):
        if isinstance(results[ref], Exception):
            raise results[ref]
        return results[ref]

    monkeypatch.setattr(ray, "get", get)

    class Fn:
        def __init__(self, key):
            self.key = key

        def remote(self):
            return self.key

    pool = SamplerPool([object(), object(), object()])
    assert pool._fanout("start_weight_update", [(Fn("a"), ())]) == [1]
    with pytest.raises(WeightSyncError, match=r"update_weights failed on 2 of 3 samplers: sampler 1: Boom: "
                                              r"bucket 2 timed out \| sampler 2: Boom: bad shape") as e:
        pool._fanout("update_weights", [(Fn(k), ()) for k in "abc"])
    assert e.value.stage == "transfer"


def test_shm_segments_of_a_process_are_found_and_removed(tmp_path):
    """vLLM leaks its /dev/shm message-queue segments (psm_*) when its
    processes are killed; the pool finds a sampler's segments through
    /proc/<pid>/maps and removes them after the sampler is gone."""
    from multiprocessing import shared_memory

    from rollout.sampler import _mapped_shm_files, unlink_shm_files

    seg = shared_memory.SharedMemory(create=True, size=4096)
    try:
        path = f"/dev/shm/{seg.name.lstrip('/')}"
        assert path.startswith("/dev/shm/psm_")
        assert path in _mapped_shm_files()
        other = tmp_path / "not_shm"
        other.write_text("x")
        assert unlink_shm_files([path, str(other), "/dev/shm/psm_does_not_exist"]) == 1
        assert not os.path.exists(path)
        assert other.exists()  # only /dev/shm/psm_* files are ever removed
    finally:
        seg.close()
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
