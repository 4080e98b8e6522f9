"""The training driver end to end, everything real on CPU: vLLM CPU samplers
in Ray actors, the session's teacher_server over HTTP, DeepSpeed on gloo,
wandb offline.

- a sync run: every metric namespace in metrics.jsonl and an offline wandb
  run, eval/reverse_kl falls (the method works, not only the plumbing), the
  final export loads in transformers;
- an async run with a 2-chunk pipelined rollout: the same namespaces, policy lag
  within the bound, the chunks adding up to the whole step;
- SIGKILL while a checkpoint is being written, then --resume: the previous
  checkpoint is intact, the run continues at the right step with the same
  prompts as an uninterrupted stream, metrics continuous;
- `ray job submit` to a two-node Ray cluster the test starts: the job
  SUCCEEDs and samplers/learners land on the nodes the placement config names.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.loop import prompts_digest

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = ("rollout/", "teacher/", "learner/", "sync/", "time/", "eval/", "progress/")


def base_overrides(run_dir: Path, teacher, steps: int) -> list[str]:
    """A short demo run against the session's teacher_server (which has an API key)."""
    return [
        f"run.dir={run_dir}",
        f"teacher.url={teacher.url}",
        f"teacher.api_key_file={teacher.api_key_file}",
        "teacher.model=null",
        "log.wandb.mode=offline",
        f"train.steps={steps}",
        "train.prompts_per_step=8",
        "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=16",
        "eval.num_prompts=16",
        "run.save_every_steps=0",
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def run_in_process(overrides: list[str]) -> int:
    from cluster.train import run

    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    return run(cfg, resume=cfg.run.resume)


def assert_namespaces(rows: list[dict]) -> None:
    keys = set().union(*rows)
    for ns in NAMESPACES:
        assert any(k.startswith(ns) for k in keys), f"no {ns}* metric in metrics.jsonl (keys: {sorted(keys)})"
    assert all("step" in r for r in rows)


def assert_offline_wandb(run_dir: Path) -> None:
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir / 'wandb'}"
    assert os.path.getsize(files[0]) > 0


@pytest.mark.slow
def test_sync_run_logs_everything_and_kl_falls(ray_session, teacher_server, tmp_path):
    run_dir = tmp_path / "sync"
    rc = run_in_process(base_overrides(run_dir, teacher_server, steps=6)
                        + ["eval.every_steps=6", "learner.lr=2e-3", "train.prompts_per_step=16",
                           "rollout.cpu_gemm=plain"])
    assert rc == 0
    rows = read_metrics(run_dir)
    assert_namespaces(rows)
    assert [r["step"] for r in rows if "learner/loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = {r["step"]: r["eval/reverse_kl"] for r in rows if "eval/reverse_kl" in r}
    assert set(evals) == {0, 6}
    # The method works: the student's reverse KL to the teacher, measured on
    # its own held-out completions, falls.
    assert evals[6] < 0.9 * evals[0], evals
    # ZeRO-0 fp32 over shm, plain-GEMM samplers: after the first (packed)
    # push the samplers keep their weights in one shared region
    # (rollout.shm_shared_weights) and learner rank 0 trains its own in a
    # mirror of it (learner.shm_resident_weights), so every later push is one
    # bulk copy into the samplers' weights; the samplers still serve exactly
    # what the learner trained (sampler vs learner logprobs of every step's
    # tokens). The async run below covers the default oneDNN layout.
    steps = [r for r in rows if "sync/bytes" in r]
    assert len(steps) == 6 and steps[0]["sync/adopted_bytes"] == steps[0]["sync/bytes"] > 0
    assert [r["sync/shared"] for r in steps] == [0.0] + [1.0] * 5, steps
    assert all(r["sync/resident_bytes"] == r["sync/bytes"] for r in steps[1:]), steps
    assert max(r["learner/logprob_abs_diff"] for r in rows if "learner/logprob_abs_diff" in r) < 1e-3
    assert_offline_wandb(run_dir)
    # Final Hugging Face export loads in transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    exported = AutoTokenizer.from_pretrained(run_dir / "final")
    from cluster.tiny_models import resolve_model

    original = AutoTokenizer.from_pretrained(resolve_model("tiny:student"))
    assert exported.eos_token_id == original.eos_token_id  # the tokenizer files travel with the export
    assert exported("12+34=").input_ids == original("12+34=").input_ids
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.slow
def test_async_run(ray_session, teacher_server, tmp_path):
    run_dir = tmp_path / "async"
    rc = run_in_process(base_overrides(run_dir, teacher_server, steps=3)
                        + ["train.mode=async", "eval.every_steps=3", "train.max_policy_lag=1",
                           "train.rollout_chunks=2"])
    assert rc == 0
    rows = read_metrics(run_dir)
    assert_namespaces(rows)
    trained = [r for r in rows if "learner/loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    # The rollout was pipelined in 2 chunks (chunk 1 sampled while chunk 0 was
    # scored) and the chunks together are the whole step: 8 prompts x 4.
    for r in trained:
        assert r["rollout/chunks"] == 2
        assert r["rollout/completions"] == 32
        assert r["teacher/scored_sequences"] + r["teacher/empty_completions"] + r["teacher/failed_sequences"] == 32
        assert r["time/rollout_s"] > 0
    assert all(r["rollout/policy_lag_max"] <= 1 for r in trained)
    # From the second step on the batch was sampled while the previous step
    # trained: one version behind.
    assert trained[-1]["rollout/policy_lag_max"] == 1
    assert_offline_wandb(run_dir)


def _expected_digests(cfg, n_steps: int) -> list[str]:
    """Prompt digests an uninterrupted run sees in its first n steps."""
    from transformers import AutoTokenizer

    from cluster.tiny_data import resolve_data
    from cluster.tiny_models import resolve_model
    from rollout.prompts import load_prompt_sources
    import dataclasses

    tok = AutoTokenizer.from_pretrained(resolve_model(cfg.student.model))
    tr, ev = resolve_data(cfg.data.train, cfg.data.eval)
    stream, _ = load_prompt_sources(dataclasses.replace(cfg.data, train=tr, eval=ev), tok, seed=cfg.run.seed)
    return [prompts_digest(stream.next_batch(cfg.train.prompts_per_step)) for _ in range(n_steps)]


@pytest.mark.slow
def test_sigkill_while_checkpointing_then_resume(ray_session, teacher_server, tmp_path):
    """The driver is SIGKILLed while it writes a checkpoint: the previous
    checkpoint stays intact and `--resume` continues from it at the right step
    with the same prompts an uninterrupted run would see (issue 6 and 9)."""
    run_dir = tmp_path / "resume"
    ov = base_overrides(run_dir, teacher_server, steps=3) + ["run.save_every_steps=1", "eval.every_steps=0"]
    # The fault-injection hook holds each checkpoint half-written for 20 s.
    env = dict(os.environ, OPD_FAULT_CHECKPOINT_DELAY_S="20")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.train", "--config", "configs/demo.yaml", *ov],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=open(tmp_path / "driver.log", "wb"), stderr=subprocess.STDOUT)
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 600
    while not (root / "step_00000001").exists() or not list(root.glob(".tmp-step_00000002*")):
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "driver never started writing checkpoint 2"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole driver (its local Ray cluster too)
    proc.wait()
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert list(root.glob(".tmp-step_00000002*")), "the half-written checkpoint should be left behind"
    from cluster.checkpoint import latest_checkpoint, read_driver_state

    assert read_driver_state(latest_checkpoint(run_dir))["step"] == 1

    rc = run_in_process(ov + ["run.resume=true"])
    assert rc == 0
    assert not list(root.glob(".tmp-*")), "resume must clean up the partial checkpoint"
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows if "learner/loss" in r]
    assert steps == [1, 2, 3], steps  # continuous, nothing repeated or skipped
    cfg = load_config(REPO / "configs" / "demo.yaml", ov)
    got = [r["progress/prompts_digest"] for r in rows if "learner/loss" in r]
    assert got == _expected_digests(cfg, 3)


@pytest.mark.slow
def test_ray_job_submit_two_nodes(teacher_server, tmp_path):
    """A real `ray job submit` to a two-node Ray cluster started here (Ray 2.60
    token auth on); the placement config pins samplers to one node and
    learners to the other."""
    from ray.cluster_utils import Cluster

    # Token auth (on by default in Ray 2.60, token in ~/.ray/auth_token): the
    # CLI needs RAY_AUTH_MODE=token to send it. Only the subprocess gets it:
    # this process's Ray client read its auth mode at import.
    env = dict(os.environ, RAY_AUTH_MODE="token")
    from tests.fixtures.teacher import free_port

    # Free ports everywhere: the session's own Ray cluster already holds the
    # defaults (a dashboard agent that cannot bind leaves the job server with
    # "No available agent to submit job").
    dash_port = free_port()
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 8, "resources": {"sampler_node": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dash_port,
        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()})
    try:
        cluster.add_node(num_cpus=8, resources={"learner_node": 1}, dashboard_agent_listen_port=free_port(),
                         metrics_export_port=free_port())
        run_dir = tmp_path / "job"
        ov = base_overrides(run_dir, teacher_server, steps=1) + [
            "eval.every_steps=0", "placement.sampler_resource=sampler_node",
            "placement.learner_resource=learner_node", "placement.strategy=SPREAD"]
        addr = f"http://127.0.0.1:{dash_port}"
        # opd is installed (editable) in the venv every node uses, so the job
        # needs no --working-dir upload; the config path is absolute.
        cmd = ["ray", "job", "submit", "--address", addr,
               "--", sys.executable, "-m", "cluster.train", "--config", str(REPO / "configs" / "demo.yaml"), *ov]
        ray_bin = str(Path(sys.executable).parent / "ray")
        # The head's dashboard agent takes a while to come up after the
        # cluster starts; until then the job server answers "No available
        # agent to submit job" (HTTP 500), which is Ray asking to retry.
        deadline = time.monotonic() + 180
        while True:
            out = subprocess.run([ray_bin, *cmd[1:]], env=env, capture_output=True, text=True, timeout=900)
            if out.returncode == 0 or "No available agent" not in out.stderr + out.stdout \
                    or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        import re

        # The CLI ends with "Job 'raysubmit_...' succeeded" (status SUCCEEDED).
        assert re.search(r"Job '[^']+' succeeded", out.stdout + out.stderr), out.stdout[-2000:]
        placement = json.loads((run_dir / "placement.json").read_text())
        s_nodes, l_nodes = set(placement["samplers"]["node_ids"]), set(placement["learners"]["node_ids"])
        head_id = cluster.head_node.node_id
        assert s_nodes == {head_id}
        assert l_nodes and head_id not in l_nodes
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows if "learner/loss" in r] == [1]
    finally:
        cluster.shutdown()
