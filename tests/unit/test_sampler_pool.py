"""SamplerPool's pure logic (rollout/pool.py, rollout/sampler.py): balanced
contiguous splits, per-prompt seeds, backend choice, rank-offset assignment,
error aggregation of the fan-out, and the sampler actors' GPUs (from the
placement plan, never the driver's hardware; the config's GPU placement
checks). No Ray cluster, no vLLM engine.

    .venv/bin/python -m pytest tests/unit/test_sampler_pool.py -q
"""

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.pool import SamplerPool, split_balanced
from rollout.sampler import bind_cpu_threads, engine_in_process, mix_seed
from rollout.weight_sync import GLOO_BACKEND_NAME, WeightSyncError, choose_backend, engine_backend


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
    # auto: nccl with GPUs, gloo on CPU; explicit choices are kept.
    assert choose_backend("auto", has_gpu=True) == "nccl"
    assert choose_backend("auto", has_gpu=False) == "gloo"
    assert choose_backend("gloo", has_gpu=True) == "gloo"
    with pytest.raises(ValueError, match="needs GPU samplers"):
        choose_backend("nccl", has_gpu=False)
    with pytest.raises(ValueError, match=r"weight_sync_backend='tcp' is not valid; use one of"):
        choose_backend("tcp", has_gpu=False)
    with pytest.raises(ValueError, match=r"weight_sync_backend='shm' is not valid; use one of"):
        choose_backend("shm", has_gpu=False)


def test_engine_backend():
    assert engine_backend("auto", has_gpu=False) == GLOO_BACKEND_NAME
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


# -- GPUs of sampler actors come from the placement plan ----------------------

def _plan(gpus_per_bundle: float):
    from cluster.placement import PlacementPlan

    return PlacementPlan(gpus_per_bundle=gpus_per_bundle, sampler_group=None, learner_group=None,
                         sampler_strategies=["bundle0", "bundle1"], learner_strategies=["lbundle0"])


@dataclasses.dataclass
class _FakeActor:
    started: int  # which .options() call made it
    sampler_index: int
    ready = None


class _RecordingRay:
    """Stands in for `ray` in SamplerPool.create/restart: records each actor's
    options instead of starting it."""

    def __init__(self):
        self.options: list[dict] = []
        self.killed: list = []

    def remote(self, cls):
        rec = self

        class _Handle:
            def options(self, **opts):
                rec.options.append(opts)
                return self

            def remote(self, *args, **kwargs):
                return _FakeActor(len(rec.options) - 1, kwargs["sampler_index"])

        return _Handle()

    def kill(self, actor):
        self.killed.append(actor)


@pytest.mark.parametrize("gpus_per_bundle,tp,want", [(1.0, 1, 1.0), (1.0, 2, 2.0), (0.5, 1, 0.5), (0.0, 1, 0.0)])
def test_sampler_actors_request_what_their_bundle_holds_on_a_gpu_less_driver(monkeypatch, gpus_per_bundle, tp,
                                                                              want):
    """Under `ray job submit` the driver usually runs on a GPU-less head node.
    The samplers' GPUs come from the placement plan, not from the driver's
    torch.cuda: the same number the sampler bundle reserves (an actor asking
    for more than its bundle is refused by Ray, "cannot fit into any bundles";
    one asking for 0 sees every GPU of its node), at create and at restart."""
    import ray
    import torch

    from cluster.config import LearnerConfig, PlacementConfig, RolloutConfig, StudentConfig
    from cluster.placement import bundles_for
    from rollout.sampler import SAMPLER_MAX_CONCURRENCY

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the driver has no GPU
    fake = _RecordingRay()
    monkeypatch.setattr(ray, "remote", fake.remote)
    monkeypatch.setattr(ray, "kill", fake.kill)
    monkeypatch.setattr(SamplerPool, "_fanout", lambda self, what, calls, timeout_s=None: [None] * len(calls))
    monkeypatch.setattr(SamplerPool, "_record_shm_files", lambda self, i: None)

    rcfg = RolloutConfig(num_samplers=2, tensor_parallel_size=tp, cpus_per_sampler=2.0)
    plan = _plan(gpus_per_bundle)
    s_bundles, l_bundles = bundles_for(PlacementConfig(gpus_per_bundle=gpus_per_bundle), rcfg,
                                       LearnerConfig(world_size=1), gpus_per_bundle)
    assert plan.gpus_per_sampler(rcfg) == want == s_bundles[0].get("GPU", 0.0)
    assert l_bundles[0].get("GPU", 0.0) == plan.gpus_per_bundle  # LearnerGroup's num_gpus_per_worker

    pool = SamplerPool.create("model", rcfg, StudentConfig(model="m"), scheduling_strategies=plan.sampler_strategies,
                              num_gpus_per_sampler=plan.gpus_per_sampler(rcfg))
    expected = [dict(max_concurrency=SAMPLER_MAX_CONCURRENCY, num_cpus=2.0, num_gpus=want,
                     scheduling_strategy=f"bundle{i}") for i in range(2)]
    assert fake.options == expected
    # A restarted sampler gets the same GPUs in the same bundle.
    pool.restart(1)
    assert fake.killed == [_FakeActor(1, 1)]
    assert fake.options[2] == expected[1]
    assert pool.samplers == [_FakeActor(0, 0), _FakeActor(2, 1)]


def test_sampler_actor_options_without_a_plan_or_strategy():
    from cluster.config import RolloutConfig
    from rollout.pool import sampler_actor_options

    opts = sampler_actor_options(RolloutConfig(cpus_per_sampler=1.0), 0.0)
    assert opts["num_gpus"] == 0.0 and "scheduling_strategy" not in opts
    with pytest.raises(ValueError, match="num_gpus of a sampler must be >= 0"):
        sampler_actor_options(RolloutConfig(), -1.0)


def _config_problems(overrides):
    from cluster.config import ConfigError, config_from_dict

    base = {"student": {"model": "org/s"}, "teacher": {"model": "org/t"}, "data": {"train": "p.jsonl"}}
    try:
        config_from_dict(base, overrides)
    except ConfigError as e:
        return e.problems
    return []


def test_gpu_placement_combinations_are_checked_before_anything_starts():
    assert _config_problems(["placement.gpus_per_bundle=1", "rollout.tensor_parallel_size=4"]) == []
    assert _config_problems(["placement.gpus_per_bundle=0.5", "rollout.gpu_memory_utilization=0.4"]) == []
    assert _config_problems(["placement.gpus_per_bundle=0", "rollout.tensor_parallel_size=2"]) == []
    (p,) = _config_problems(["placement.gpus_per_bundle=0.5", "rollout.tensor_parallel_size=2",
                             "rollout.gpu_memory_utilization=0.4"])
    assert "placement.gpus_per_bundle=0.5 with rollout.tensor_parallel_size=2" in p and "GPU of its own" in p
    (p,) = _config_problems(["placement.gpus_per_bundle=0.5", "rollout.gpu_memory_utilization=0.9"])
    assert p.startswith("rollout.gpu_memory_utilization (0.9) exceeds placement.gpus_per_bundle (0.5)")
    for g in ("2", "1.5"):
        (p,) = _config_problems([f"placement.gpus_per_bundle={g}"])
        assert p.startswith(f"placement.gpus_per_bundle: {float(g)} GPUs per bundle") and "use 1" in p
    (p,) = _config_problems(["placement.gpus_per_bundle=-1"])
    assert p.startswith("placement.gpus_per_bundle: -1.0 is negative")


def test_a_prefix_cache_that_cannot_be_reset_stops_sampling_until_a_full_update():
    """finish_weight_update resets vLLM's prefix cache (KV of the old weights
    must not serve a shared prefix). If vLLM refuses (blocks still held) or
    fails, the sampler refuses to sample rather than serve stale KV."""
    import threading

    from rollout.sampler import SamplerActor, SamplerNotReady

    class _LLM:
        def __init__(self, answer):
            self.answer, self.calls = answer, []

        def reset_prefix_cache(self, reset_running_requests=False):
            self.calls.append(reset_running_requests)
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    def sampler(answer):
        s = object.__new__(SamplerActor)
        s.index, s.llm, s.cfg = 0, _LLM(answer), type("C", (), {"weight_sync_timeout_s": 1.0})()
        s._cond, s._busy, s._update_open, s._needs_full_update = threading.Condition(), False, True, None
        return s

    ok = sampler(True)
    ok._reset_prefix_cache()
    assert ok.llm.calls == [True] and ok._needs_full_update is None
    for answer, why in ((False, "blocks still in use"), (RuntimeError("KV transfer pending"), "KV transfer pending")):
        s = sampler(answer)
        with pytest.raises(WeightSyncError, match="prefix cache could not be reset") as e:
            s._reset_prefix_cache()
        assert e.value.stage == "finish" and why in str(e.value)
        assert not s._update_open and why in s._needs_full_update
        with pytest.raises(SamplerNotReady, match="push a full weight update first"):
            s._acquire_engine()
