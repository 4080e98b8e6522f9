"""Threads of the CPU roles from the placement plan (cluster/placement.py
cpu_thread_shares, cluster/train.py cpu_threads, rollout/config.py ThreadShare).

    .venv/bin/python -m pytest tests/unit/test_cpu_threads.py -q
"""

import os

import pytest

from cluster.config import config_from_dict
from cluster.placement import CpuThreads, cpu_thread_shares
from rollout.config import ThreadShare
from rollout.sampler import bind_cpu_threads

REQ = {"student": {"model": "org/student"}, "teacher": {"model": "org/teacher"}, "data": {"train": "p.jsonl"}}


def resolved(shares: CpuThreads, cores: int) -> tuple[list[int], list[int], int]:
    return ([s.threads(cores) for s in shares.samplers], [s.threads(cores) for s in shares.learners],
            shares.teacher.threads(cores))


def test_sync_on_one_node_every_role_gets_every_core():
    shares = cpu_thread_shares("sync", False, ["n1"], ["n1"], {"n1": 8.0}, 1.0, 1.0, 1.0)
    assert resolved(shares, 8) == ([8], [8], 8)
    # Ray's count of the node caps the cores a process sees (a node declared smaller than the machine).
    shares = cpu_thread_shares("sync", False, ["n1"], ["n1"], {"n1": 4.0}, 1.0, 1.0, 1.0)
    assert resolved(shares, 16) == ([4], [4], 4)


def test_sync_splits_a_node_among_a_roles_processes_on_it():
    shares = cpu_thread_shares("sync", False, ["a", "a", "b"], ["a", "b", "b", "b"],
                               {"a": 8.0, "b": 6.0}, 1.0, 1.0, 1.0)
    samplers, learners, _ = resolved(shares, 64)
    assert samplers == [4, 4, 6]  # two samplers share a's 8 cores; b's sampler has b's 6
    assert learners == [8, 2, 2, 2]  # rank 0 alone on a; three ranks share b
    # Never below one thread, even with more processes than cores.
    shares = cpu_thread_shares("sync", False, ["a"] * 3, ["a"], {"a": 2.0}, 1.0, 1.0, 1.0)
    assert [s.threads(2) for s in shares.samplers] == [1, 1, 1]


def test_async_and_overlap_keep_each_roles_own_share():
    shares = cpu_thread_shares("async", False, ["n1", "n1"], ["n1"], {"n1": 16.0}, 2.0, 3.0, 4.0)
    assert resolved(shares, 16) == ([2, 2], [3], 4)
    # Fractional or zero reservations still run one thread.
    shares = cpu_thread_shares("async", False, ["n1"], ["n1"], {"n1": 16.0}, 0.5, 0.0, 1.5)
    assert resolved(shares, 16) == ([1], [1], 1)
    # Sync with sampling and scoring overlapped: samplers and teacher keep
    # their shares, the learners (alone in the train phase) still get the node.
    shares = cpu_thread_shares("sync", True, ["n1"], ["n1"], {"n1": 16.0}, 2.0, 1.0, 3.0)
    assert resolved(shares, 16) == ([2], [16], 3)


def test_teacher_share_without_knowing_its_node():
    # Several nodes: the teacher's node is unknown at plan time, so only its own affinity caps it.
    shares = cpu_thread_shares("sync", False, ["a"], ["b"], {"a": 4.0, "b": 4.0}, 1.0, 1.0, 1.0)
    assert shares.teacher.threads(12) == 12 and shares.teacher.node_cpus == 0


def test_thread_share_defaults_to_this_process_affinity():
    assert ThreadShare().threads() == len(os.sched_getaffinity(0))
    assert ThreadShare(count=3, divisor=7).threads(100) == 3


class _Plan:
    uses_gpus = False

    def __init__(self, shares):
        self.shares, self.calls = shares, []

    def cpu_threads(self, mode, overlap, rcfg, lcfg, teacher_cpus, layout):
        self.calls.append((mode, overlap, teacher_cpus))
        return self.shares


@pytest.mark.parametrize("overrides,expect", [
    ([], ("plan", "plan", "plan")),
    (["cpu.learner_threads=3", "cpu.teacher_threads=5"], ("plan", [3], 5)),
    (["cpu.learner_threads=0", "cpu.teacher_threads=0"], ("plan", [0], None)),
])
def test_driver_takes_the_plan_unless_overridden(overrides, expect):
    from cluster.train import cpu_threads

    cfg = config_from_dict(REQ, overrides + ["train.rollout_chunks=2", "train.prompts_per_step=4"])
    plan_shares = cpu_thread_shares("sync", True, ["n"], ["n"], {"n": 2.0}, 1.0, 1.0, 1.0)
    plan = _Plan(plan_shares)
    out = cpu_threads(cfg, plan, {})
    assert plan.calls == [("sync", True, cfg.teacher.cpus)]  # rollout_chunks > 1: sampling and scoring overlap
    want = {"samplers": plan_shares.samplers, "learners": plan_shares.learners, "teacher": plan_shares.teacher}
    for key, e in zip(("samplers", "learners", "teacher"), expect, strict=True):
        assert out[key] == (want[key] if e == "plan" else e)


def test_config_accepts_auto_counts_and_refuses_the_rest():
    cfg = config_from_dict(REQ, [])
    assert (cfg.cpu.sampler_threads, cfg.cpu.learner_threads, cfg.cpu.teacher_threads) == ("auto",) * 3
    cfg = config_from_dict(REQ, ["cpu.teacher_threads=4", "cpu.learner_threads=auto"])
    assert (cfg.cpu.teacher_threads, cfg.cpu.learner_threads) == (4, "auto")
    from cluster.config import ConfigError

    with pytest.raises(ConfigError) as ei:
        config_from_dict(REQ, ["cpu.teacher_threads=-2", "cpu.learner_threads=all"])
    probs = ei.value.problems
    assert any(p.startswith("cpu.teacher_threads: -2 is not valid") for p in probs), probs
    assert any(p.startswith("cpu.learner_threads:") for p in probs), probs


def test_in_process_sampler_binds_the_plans_share():
    import torch

    before_aff, before_n = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        assert bind_cpu_threads("auto", ThreadShare(count=1)) == 1 == torch.get_num_threads()
        n = len(before_aff)
        assert bind_cpu_threads("auto", ThreadShare()) == n == torch.get_num_threads()
        # A core list overrides the plan.
        assert bind_cpu_threads(str(min(before_aff)), ThreadShare()) == 1
    finally:
        os.sched_setaffinity(0, before_aff)
        torch.set_num_threads(before_n)


def test_engine_thread_count_is_set_in_the_calling_thread():
    """A threaded actor's call runs on a thread whose OpenMP count starts at
    OMP_NUM_THREADS, not at the count torch.set_num_threads gave the actor's
    first thread; vLLM's CPU attention checks the two agree."""
    import ctypes
    import threading

    import torch

    from rollout.sampler import set_thread_num_threads

    omp_threads = ctypes.CDLL(None).omp_get_max_threads  # libgomp, loaded by torch
    want = (os.cpu_count() or 1) + 1  # differs from any thread's starting count
    before = torch.get_num_threads()
    seen = {}

    def call():
        seen["start"] = omp_threads()
        set_thread_num_threads(want)
        seen["after"] = omp_threads()

    try:
        th = threading.Thread(target=call)
        th.start()
        th.join()
    finally:
        torch.set_num_threads(before)
    assert seen["start"] != want and seen["after"] == want
