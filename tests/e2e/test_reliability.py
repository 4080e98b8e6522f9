"""Faults that clusters inflict, injected into real runs on this machine
(SIGKILL during a checkpoint is in test_cluster.py):

- a sampler actor's process is SIGKILLed mid-run: the driver restarts it,
  re-sends the current weights before it samples again (the learner/sampler
  logprob gap proves it serves the trained policy, not the base model), and
  the step is retried, not lost; later a learner worker is SIGKILLed: the run
  stops with a clear error and exit code 4 instead of hanging;
- teacher_server is SIGKILLed and restarted on the same port mid-run: the
  client backs off and the run waits and continues with no made-up score;
  then it is killed for good: the run checkpoints and exits with code 3;
- one of two teacher replicas (`teacher.url` as a list) is SIGKILLed mid-run:
  its requests go at once to the other one, the run finishes with no failed
  sequence, and the per-replica metrics show which one scored what.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_cluster import REPO, base_overrides, read_metrics
from cluster.teacher_proc import wait_healthy


def wait_for_step(run_dir: Path, step: int, thread: threading.Thread, box: dict, timeout_s: float = 600) -> None:
    """Wait until `step` is logged; fail at once if the driver thread ended first."""
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise AssertionError(f"the driver ended before step {step}: {box!r}")
        if path.exists() and any(json.loads(ln).get("step") == step and "learner/loss" in json.loads(ln)
                                 for ln in path.read_text().splitlines() if ln.strip()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} never logged in {path}")


def actor_pids(class_name: str) -> list[int]:
    """PIDs of this test process's Ray actors of `class_name` (descendants of
    this process only: other Ray clusters on the machine are never touched)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith(f"ray::{class_name}"):
            out.append(p.pid)
    return out


def run_main_in_thread(argv: list[str]) -> tuple[threading.Thread, dict]:
    from cluster.train import main

    box: dict = {}

    def target():
        t0 = time.monotonic()
        try:
            box["rc"] = main(argv)
        except BaseException as e:  # noqa: BLE001 - surfaced by the test
            box["exc"] = e
        box["elapsed_s"] = time.monotonic() - t0

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


@pytest.mark.slow
def test_sampler_killed_is_restarted_then_learner_death_fails_loudly(ray_session, teacher_server, tmp_path,
                                                                       capfd):
    run_dir = tmp_path / "faults"
    ov = base_overrides(run_dir, teacher_server, steps=6) + [
        "eval.every_steps=0", "run.save_every_steps=1", "learner.lr=2e-3", "learner.collective_timeout_s=120"]
    # Actors other tests of the session keep alive (the session sampler) are not this run's.
    others = {name: set(actor_pids(name)) for name in ("SamplerActor", "LearnerWorker")}
    t, box = run_main_in_thread(["--config", str(REPO / "configs/demo.yaml"), *ov])

    wait_for_step(run_dir, 1, t, box)
    pids = [p for p in actor_pids("SamplerActor") if p not in others["SamplerActor"]]
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)

    wait_for_step(run_dir, 3, t, box)
    lpids = [p for p in actor_pids("LearnerWorker") if p not in others["LearnerWorker"]]
    assert len(lpids) == 1, lpids
    os.kill(lpids[0], signal.SIGKILL)

    t.join(timeout=600)
    assert not t.is_alive(), "the driver hung after a learner worker died"
    assert "exc" not in box, repr(box.get("exc"))
    assert box["rc"] == 4
    err = capfd.readouterr().err
    assert "a learner worker died" in err and "--resume" in err

    rows = [r for r in read_metrics(run_dir) if "learner/loss" in r]
    steps = [r["step"] for r in rows]
    assert steps[:3] == [1, 2, 3], steps
    restarts = {r["step"]: r.get("rollout/sampler_restarts", 0) for r in rows}
    assert sum(restarts.values()) == 1, restarts
    restart_step = next(s for s, n in restarts.items() if n)
    # The kill lands in sampling (the step is redone after the restart) or in
    # the weight push after training (the push is redone to the restarted
    # pool). Either way the restarted sampler serves the trained policy: from
    # the restart on, its logprobs match the learner's (a base-model sampler
    # would differ by far more after 1+ steps at lr 2e-3), and every step
    # trained normally.
    after = [r for r in rows if r["step"] >= restart_step]
    assert after and all(r["learner/logprob_abs_diff"] < 1e-3 for r in after), \
        [(r["step"], r["learner/logprob_abs_diff"]) for r in after]
    assert all(r["teacher/failed_sequences"] == 0 for r in after)


def _launch_teacher(model_path: str, port: int, api_key_file: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen([sys.executable, "-m", "teacher_server", "--model", model_path, "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", "float32", "--api-key-file", api_key_file],
                            cwd=REPO, env=env, start_new_session=True, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{port}", timeout_s=300, proc=proc, log_path=log)
    return proc


@pytest.mark.slow
def test_teacher_killed_restarted_then_down_for_good(ray_session, teacher_path, tmp_path, capfd):
    from rollout.host import free_port

    key = tmp_path / "key"
    key.write_text("reliability-key\n")
    port = free_port()
    log = tmp_path / "teacher.log"
    t0 = time.monotonic()
    proc = _launch_teacher(teacher_path, port, str(key), log)
    launch_s = time.monotonic() - t0
    run_dir = tmp_path / "teacher_faults"
    # Patience: 2x this box's own measured launch-to-healthy time (the restart
    # below is the same command with the files already in the page cache: 0.8x
    # the first launch here), at least 30 s; short, so that "down for good"
    # ends the run soon after the second kill.
    patience = max(30.0, 2.0 * launch_s)
    ov = [f"run.dir={run_dir}", f"teacher.url=http://127.0.0.1:{port}", f"teacher.api_key_file={key}",
          "teacher.model=null", "log.wandb.mode=offline", "train.steps=4", "train.prompts_per_step=8",
          "rollout.max_new_tokens=16", "eval.every_steps=0", "run.save_every_steps=0",
          f"teacher.unavailable_timeout_s={patience:.0f}", "teacher.request_timeout_s=20"]
    try:
        t, box = run_main_in_thread(["--config", str(REPO / "configs/demo.yaml"), *ov])
        wait_for_step(run_dir, 1, t, box)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(3)  # the driver is now retrying against a dead port
        t0 = time.monotonic()
        proc = _launch_teacher(teacher_path, port, str(key), log)
        relaunch_s = time.monotonic() - t0
        assert relaunch_s + 3 < patience, f"the restart took {relaunch_s:.0f} s, past the run's patience"

        wait_for_step(run_dir, 2, t, box)
        os.killpg(proc.pid, signal.SIGKILL)  # down for good
        proc.wait()
        t.join(timeout=900)
        assert not t.is_alive(), "the driver hung with the teacher down"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "exc" not in box, repr(box.get("exc"))
    assert box["rc"] == 3
    err = capfd.readouterr().err
    assert "teacher" in err and "--resume" in err
    rows = [r for r in read_metrics(run_dir) if "learner/loss" in r]
    assert [r["step"] for r in rows][:2] == [1, 2]
    # Waited out the restart: retries happened and no sequence went unscored.
    assert sum(r.get("teacher/retries", 0) for r in rows) > 0
    assert all(r["teacher/failed_sequences"] == 0 for r in rows)
    # The run checkpointed what it had trained before exiting.
    from cluster.checkpoint import latest_checkpoint, read_driver_state

    ck = latest_checkpoint(run_dir)
    assert ck is not None and read_driver_state(ck)["step"] == rows[-1]["step"]


@pytest.mark.slow
def test_one_of_two_teacher_replicas_killed_mid_run(ray_session, teacher_server, teacher_path, tmp_path):
    """teacher.url lists two real teacher_servers: the session's and one
    started here (same tiny teacher, same key). Once step 1 is logged the
    second one's process group is SIGKILLed. The run ends normally: every
    sequence scored, the dead replica out of rotation, the live one taking
    its requests at once (no backoff wait)."""
    from tests.fixtures.teacher import start_teacher_server, stop_teacher_server

    second = start_teacher_server(teacher_path, "--max-queue", "256", api_key=teacher_server.api_key,
                                  workdir=str(tmp_path))
    run_dir = tmp_path / "replicas"
    # Steps take ~0.3 s here: the kill lands a step or two after step 1, and
    # several steps follow it.
    ov = base_overrides(run_dir, teacher_server, steps=8) + [
        f"teacher.url=[{teacher_server.url}, {second.url}]",
        # Several requests per step, in flight together: both replicas get a share.
        "teacher.max_tokens_per_request=256", "eval.every_steps=0"]
    try:
        t, box = run_main_in_thread(["--config", str(REPO / "configs/demo.yaml"), *ov])
        wait_for_step(run_dir, 1, t, box)
        os.killpg(second.proc.pid, signal.SIGKILL)  # the server and its engine core
        second.proc.wait()
        t.join(timeout=600)
        assert not t.is_alive(), "the driver hung after a teacher replica died"
    finally:
        stop_teacher_server(second)
    assert "exc" not in box, repr(box.get("exc"))
    assert box["rc"] == 0
    rows = [r for r in read_metrics(run_dir) if "learner/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["teacher/failed_sequences"] == 0 and r["teacher/scored_sequences"] > 0 for r in rows)
    assert all(r["teacher/backoff_wait_s"] == 0 for r in rows)  # resent at once, never a backoff
    assert all(r["teacher/replica0/healthy"] == 1 and r["teacher/replica0/failures"] == 0
               and r["teacher/replica0/tokens"] > 0 for r in rows)
    assert all(r["teacher/retries"] == r["teacher/replica1/failures"] for r in rows)
    # Before the kill both replicas scored part of every step.
    hit = next(i for i, r in enumerate(rows) if r["teacher/replica1/failures"] > 0)
    assert hit >= 1 and all(r["teacher/replica1/healthy"] == 1 and r["teacher/replica1/tokens"] > 0
                            for r in rows[:hit])
    # From the first failure on, the killed replica is out of rotation (its
    # probes fail too) and the other one scores everything.
    assert hit < len(rows) - 2, [r["teacher/replica1/failures"] for r in rows]
    assert all(r["teacher/replica1/healthy"] == 0 for r in rows[hit:])
    assert all(r["teacher/replica1/tokens"] == 0 for r in rows[hit + 1:])


def test_sampler_dying_during_a_weight_push_is_restarted_and_the_push_redone(ray_session):
    """cluster.loop.sync_weights, deterministically: a sampler actor dies right
    before a push, the push fails the way it does for real (an error raised
    by the learner's RPC, not an actor error of the sampler itself), the dead
    sampler is restarted, the group rebuilt and the SAME new version pushed to
    the whole pool; a push failing with every sampler alive (e.g. a dead
    learner rank) is raised unchanged. Real Ray actors play the samplers; the
    learner group is a recorder (the full path runs in the test above)."""
    import ray

    from cluster.loop import RunContext, sync_weights

    @ray.remote(num_cpus=0)
    class Sampler:
        def ready(self):
            return True

    class Pool:
        def __init__(self):
            self.samplers = [Sampler.remote(), Sampler.remote()]
            self.restarted = []

        def restart(self, i):
            self.samplers[i] = Sampler.remote()
            self.restarted.append(i)

    class Learners:
        def __init__(self, fail_with):
            self.fail_with, self.calls = list(fail_with), []

        def push_weights(self, pool, version):
            self.calls.append(("push", version))
            if self.fail_with:
                raise self.fail_with.pop(0)
            return {"sync/total_s": 0.0}

        def init_weight_sync(self, pool, **kw):
            self.calls.append(("init", len(pool.samplers)))

    pool = Pool()
    ray.kill(pool.samplers[1])
    learners = Learners([RuntimeError("start_weight_update failed on 1 of 2 samplers: sampler 1: ActorDiedError")])
    ctx = RunContext(cfg=None, run_dir=Path("."), pool=pool, learners=learners, teacher=None, stream=None,
                     eval_records=[], tokenizer=None, logger=None, version=4)
    m = sync_weights(ctx)
    assert pool.restarted == [1]
    assert learners.calls == [("push", 5), ("init", 2), ("push", 5)]
    assert ctx.version == 5 and m["sync/version"] == 5 and m["rollout/sampler_restarts"] == 1

    # Every sampler alive: the failure is not theirs; nothing restarted, version unchanged.
    learners2 = Learners([RuntimeError("learner rank 0 died")])
    ctx.learners = learners2
    with pytest.raises(RuntimeError, match="learner rank 0 died"):
        sync_weights(ctx)
    assert pool.restarted == [1] and learners2.calls == [("push", 6)] and ctx.version == 5
