"""The training driver end to end, everything real on CPU: vLLM CPU samplers
in Ray actors, the session's teacher_server over HTTP, DeepSpeed on gloo,
wandb offline.

- a sync run: every metric namespace in metrics.jsonl and an offline wandb
  run, eval/reverse_kl falls (the method works, not only the plumbing), the
  final export loads in transformers;
- a sync run on prompts sharing a prefix longer than a KV block: after every
  push the samplers' logprobs are the learner's (no stale prefix KV);
- an async run with a 2-chunk pipelined rollout: the same namespaces, policy lag
  within the bound, the chunks adding up to the whole step;
- SIGKILL while a checkpoint is being written, then --resume: the previous
  checkpoint is intact, the run continues at the right step with the same
  prompts as an uninterrupted stream, metrics continuous;
- `ray job submit` to a two-node Ray cluster the test starts: the job
  SUCCEEDs and samplers/learners land on the nodes the placement config names;
- both models as hub ids from an offline Hugging Face cache (a Base-style
  student, an Instruct-style teacher the driver serves), bfloat16 training with
  an export every step: the exports are bfloat16 and load in transformers and
  in vLLM;
- a LoRA student (ZeRO-3): the vLLM sampler serves each pushed adapter with
  the learner's logprobs, eval/reverse_kl falls, and the merged export loads
  as a plain model in transformers and vLLM, the adapter alone in peft.
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


def run_demo(run_dir: Path, teacher, steps: int, extra: list[str]) -> list[dict]:
    """A short demo run in this process (`base_overrides` + `extra`); it must
    exit 0. Returns its metrics.jsonl rows."""
    assert run_in_process(base_overrides(run_dir, teacher, steps) + extra) == 0
    return read_metrics(run_dir)


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
    rows = run_demo(run_dir, teacher_server, 6, ["eval.every_steps=6", "learner.lr=2e-3",
                                                 "train.prompts_per_step=16"])
    assert_namespaces(rows)
    assert [r["step"] for r in rows if "learner/loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = {r["step"]: r["eval/reverse_kl"] for r in rows if "eval/reverse_kl" in r}
    assert set(evals) == {0, 6}
    # The method works: the student's reverse KL to the teacher, measured on
    # its own held-out completions, falls.
    assert evals[6] < 0.9 * evals[0], evals
    # One push per step over gloo; the samplers serve exactly what the
    # learner trained (sampler vs learner logprobs of every step's tokens).
    steps = [r for r in rows if "sync/bytes" in r]
    assert len(steps) == 6 and all(r["sync/bytes"] > 0 for r in steps), steps
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


# Longer than one CPU KV block (128 tokens; 16 on GPU): with the chat
# template and the byte-level tiny tokenizer every prompt shares its first
# ~200 tokens, so vLLM's prefix cache has whole blocks of it to reuse.
SHARED_PREFIX = ("You are a careful calculator. Read the question, add the two numbers digit by digit from the "
                 "right, carry when a column exceeds nine, and answer with the sum only, no words, no spaces, "
                 "no units.")


@pytest.mark.slow
def test_samplers_serve_new_weights_on_a_shared_prefix(ray_session, teacher_server, tmp_path):
    """Prompts sharing a prefix longer than a KV block, several pushes: after
    every push the samplers recompute the prefix under the new weights (the
    prefix cache is reset in finish_weight_update), so their logprobs of every
    step's tokens are the learner's. Served from the old weights' KV (no
    reset), this run's difference was 5e-7 at step 1, then 0.15, 0.18, 0.21,
    0.18; with the reset it stays at ~4e-7."""
    data = tmp_path / "prefix.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{SHARED_PREFIX} {a}+{b}="}) + "\n"
                            for a, b in zip(range(11, 35), range(40, 88, 2), strict=True)))
    run_dir = tmp_path / "prefix"
    rows = run_demo(run_dir, teacher_server, 5,
                    [f"data.train={data}", "data.eval_size=0", "data.max_prompt_tokens=256", "student.max_model_len=320",
                     "eval.every_steps=0", "learner.lr=2e-3"])
    rows = [r for r in rows if "learner/logprob_abs_diff" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # float32 sampler vs float32 learner on the same weights: ~1e-7 (step 1
    # has no push before it); stale prefix KV gives 1e-2 and more.
    diffs = [r["learner/logprob_abs_diff"] for r in rows]
    assert max(diffs) < 1e-3, diffs


@pytest.mark.slow
def test_async_run(ray_session, teacher_server, tmp_path):
    run_dir = tmp_path / "async"
    rows = run_demo(run_dir, teacher_server, 3, ["train.mode=async", "eval.every_steps=3", "train.max_policy_lag=1",
                                                 "train.rollout_chunks=2"])
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
    with the same prompts an uninterrupted run would see."""
    run_dir = tmp_path / "resume"
    ov = base_overrides(run_dir, teacher_server, steps=3) + ["run.save_every_steps=1", "eval.every_steps=0"]
    # The fault-injection hook holds each checkpoint half-written for 5 s
    # (25x the 0.2 s this test polls at).
    env = dict(os.environ, OPD_FAULT_CHECKPOINT_DELAY_S="5")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.train", "--config", "configs/demo.yaml", *ov],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=open(tmp_path / "driver.log", "wb"), stderr=subprocess.STDOUT)
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + 600
    while not (root / "step_00000001").exists() or not list(root.glob(".step_00000002.tmp-*")):
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "driver never started writing checkpoint 2"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole driver (its local Ray cluster too)
    proc.wait()
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert list(root.glob(".step_00000002.tmp-*")), "the half-written checkpoint should be left behind"
    from cluster.checkpoint import latest_checkpoint, read_driver_state

    assert read_driver_state(latest_checkpoint(run_dir))["step"] == 1

    rc = run_in_process(ov + ["run.resume=true"])
    assert rc == 0
    assert not list(root.glob(".*.tmp-*")), "resume must clean up the partial checkpoint"
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows if "learner/loss" in r]
    assert steps == [1, 2, 3], steps  # continuous, nothing repeated or skipped
    cfg = load_config(REPO / "configs" / "demo.yaml", ov)
    got = [r["progress/prompts_digest"] for r in rows if "learner/loss" in r]
    assert got == _expected_digests(cfg, 3)


def _ports_below_ephemeral_range(k: int) -> list[int]:
    """`k` distinct TCP ports, free on every interface now, between Ray's
    worker ports (10002-19999) and the kernel's ephemeral range (32768+ here):
    no port-0 bind or outgoing connection, Ray's own or anyone's, can take
    them before the caller binds them. A `free_port()` port is ephemeral, so
    a Ray component starting in between can take it; if it is the dashboard
    agent's, the agent never comes up ("No available agent to submit job")."""
    import random
    import socket

    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for p in random.Random().sample(range(20000, max(lo, 20000 + 10 * k)), 10 * k):
        with socket.socket() as sock:
            try:
                sock.bind(("", p))
            except OSError:
                continue
        ports.append(p)
        if len(ports) == k:
            return ports
    raise RuntimeError(f"no {k} free ports in 20000-{lo}")


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
    # Own ports everywhere: the session's own Ray cluster already holds the
    # defaults (a dashboard agent that cannot bind leaves the job server with
    # "No available agent to submit job").
    dash_port, head_agent, head_metrics, node_agent, node_metrics = _ports_below_ephemeral_range(5)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 8, "resources": {"sampler_node": 1}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dash_port,
        "dashboard_agent_listen_port": head_agent, "metrics_export_port": head_metrics})
    try:
        cluster.add_node(num_cpus=8, resources={"learner_node": 1}, dashboard_agent_listen_port=node_agent,
                         metrics_export_port=node_metrics)
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


# Scores one token sequence with vLLM's offline engine (a fresh process, as a
# user would load the export) and prints the prompt logprobs as JSON.
VLLM_SCORE = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    ids = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))
    print("LOGPROBS " + json.dumps([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])]))
"""


def vllm_logprobs(model_dir, ids: list[int], tmp_path: Path) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from a fresh vLLM engine on
    `model_dir`, in its own process (VLLM_SCORE)."""
    script = tmp_path / "vllm_score.py"
    script.write_text(VLLM_SCORE)
    res = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(ids)], cwd=tmp_path,
                         env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"), capture_output=True, text=True,
                         timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("LOGPROBS ")]
    assert res.returncode == 0 and line, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(line[0][len("LOGPROBS "):])


@pytest.mark.slow
def test_hub_ids_from_offline_cache_and_bf16_exports(student_path, teacher_path, tmp_path):
    """The real command with both models given as hub ids that resolve from
    an offline Hugging Face cache (HF_HOME + HF_HUB_OFFLINE=1), the teacher
    started by the driver: a Base-style student under an Instruct-style
    teacher (same vocabulary, another chat template and eos_token). Training
    in bfloat16 with run.export_every_steps=1: the step-1 export and final/
    are bfloat16 safetensors that transformers loads, and vLLM serves final/
    with the same logprobs as transformers."""
    from tests.fixtures.models import INSTRUCT_TEMPLATE, edit_tokenizer, hub_cache

    home = tmp_path / "hf"
    s_snap = hub_cache(home, "opd-test/student-base", student_path)
    inst = edit_tokenizer(teacher_path, tmp_path / "instruct", chat_template=INSTRUCT_TEMPLATE,
                          eos_token="<|endoftext|>")
    t_snap = hub_cache(home, "opd-test/teacher-instruct", inst)
    run_dir = tmp_path / "hub"
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "cluster.train", "--config", str(REPO / "configs" / "demo.yaml"),
         "student.model=opd-test/student-base", "teacher.model=opd-test/teacher-instruct", f"run.dir={run_dir}",
         "log.wandb.mode=disabled", "train.steps=2", "train.prompts_per_step=4", "rollout.samples_per_prompt=2",
         "rollout.max_new_tokens=8", "eval.every_steps=0", "run.save_every_steps=0", "learner.dtype=bfloat16",
         "learner.warmup_steps=0", "run.export_every_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # Resolved once, from the cache; every process got the snapshot directories.
    assert f"[opd] models: student {s_snap.resolve()}, teacher {t_snap.resolve()}" in out.stdout
    assert f"[opd] starting teacher ({t_snap.resolve()})" in out.stdout
    assert [r["step"] for r in read_metrics(run_dir) if "learner/loss" in r] == [1, 2]
    # cpu.*_kv_cache_gib=auto: 4 x 2 sequences need about 1 MiB of KV, so
    # both CPU engines start with the 64 MiB floor instead of a GiB each, and
    # vLLM took that size (its log: the sampler's reaches the driver's stdout).
    assert "[opd] sampler KV cache: 64 MiB per sampler (cpu.sampler_kv_cache_gib=auto: 9 sequences" in out.stdout
    assert "[opd] teacher KV cache: 64 MiB (cpu.teacher_kv_cache_gib=auto: 9 sequences" in out.stdout
    assert "Explicitly set (0.06/" in out.stdout
    assert "Explicitly set (0.06/" in (run_dir / "teacher_server.log").read_text()

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step1, final = run_dir / "exports" / "step_00000001", run_dir / "final"
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["step_00000001"]  # step 2 is final/
    base = AutoTokenizer.from_pretrained(student_path)
    weights = {}
    for d in (step1, final):
        assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
        assert (d / "generation_config.json").is_file()
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.dtype == torch.bfloat16
        weights[d.name] = {n: p.detach().float() for n, p in model.named_parameters()}
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.get_vocab() == base.get_vocab() and tok.eos_token_id == base.eos_token_id
        assert tok.chat_template == base.chat_template  # the student's, not the teacher's
    init = {n: p.detach().float() for n, p in AutoModelForCausalLM.from_pretrained(student_path).named_parameters()}
    # Each export is its own step's model: training moved it (lr 1e-3 moves
    # every weight by ~1e-3, several bf16 ulps at this scale).
    assert any(not torch.equal(weights["step_00000001"][n], init[n].bfloat16().float()) for n in init)
    assert any(not torch.equal(weights["step_00000001"][n], weights["final"][n]) for n in init)

    # vLLM loads final/ and scores like transformers, in float32 on the same
    # (bf16-valued) weights. Not bit for bit: vLLM runs its own CPU kernels
    # (attention, RMSNorm, rotary, SiLU in vllm/_C), whose rounding is not
    # torch's. Usually the two agree to ~1e-6 (float32 rounding of these
    # short sums), but one CI run of this exact model saw vLLM off by 2e-5
    # to 1.6e-4 at most positions (a cause inside vLLM not found; the same
    # files scored 1e-6 apart on rerun). So the bound is set by what the test
    # must tell apart: a stale or wrong weight. One training step moves every
    # position's logprob by far more than 1e-3 (checked below on the step-1
    # export, the nearest wrong model there is), so 1e-3 separates them with
    # room on both sides.
    ids = base("12+34=46 and 7+8=15")["input_ids"]
    got = vllm_logprobs(final, ids, tmp_path)

    def hf_logprobs(model_dir) -> list[float]:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, :-1]
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    ref, stale = hf_logprobs(final), hf_logprobs(step1)
    tol = 1e-3
    assert min(abs(a - b) for a, b in zip(ref, stale, strict=True)) > 3 * tol, (ref, stale)
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < tol, (got, ref)


@pytest.mark.slow
def test_lora_student(ray_session, teacher_server, tmp_path, student_path, capsys):
    """A LoRA student (learner.lora.rank=8 on every linear layer of the blocks,
    ZeRO-3) through the real driver: the learner trains the adapters only
    (peft), each push carries the adapter alone and the vLLM sampler serves it
    as a new LoRA request; the samplers' logprobs are the learner's after
    every push; eval reverse KL falls; final/ (and the step-2 export) is a
    plain merged checkpoint that transformers and vLLM load without peft, with
    the adapter alone in final/adapter/ in peft's format."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "lora"
    rows = run_demo(run_dir, teacher_server, 6, ["learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=1e-2",
                                                 "learner.zero_stage=3", "eval.every_steps=6",
                                                 "train.prompts_per_step=16", "run.export_every_steps=2"])
    out = capsys.readouterr().out
    assert "weight sync over lora-adapter" in out, out[-3000:]
    trained = [r for r in rows if "learner/loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    evals = {r["step"]: r["eval/reverse_kl"] for r in rows if "eval/reverse_kl" in r}
    assert evals[6] < 0.9 * evals[0], evals
    # Step 1 samples the base (the adapter starts at B = 0), steps 2-6 the
    # pushed adapters: float32 on both sides, vLLM's separate LoRA matmuls vs
    # peft's differ by float32 rounding (~1e-6).
    diffs = [r["learner/logprob_abs_diff"] for r in trained]
    assert max(diffs) < 1e-3, diffs
    # Each push is the adapter alone: r x (in + out) per adapted layer, a
    # small fraction of the student's parameters.
    base = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    full_bytes = sum(p.numel() * 4 for p in base.parameters())
    pushes = [r["sync/bytes"] for r in trained]
    assert all(0 < b < 0.15 * full_bytes for b in pushes), (pushes, full_bytes)

    base_sd = base.state_dict()
    for export in (run_dir / "exports" / "step_00000002", run_dir / "final"):
        with safe_open(str(export / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys == set(base_sd), sorted(keys ^ set(base_sd))  # the base model's names, no adapter tensors
        assert json.loads((export / "config.json").read_text())["architectures"] == base.config.architectures
        assert not (export / "adapter_config.json").exists()  # transformers would hand the directory to peft
        assert (export / "adapter" / "adapter_config.json").is_file()
    final = run_dir / "final"
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    msd = merged.state_dict()
    # Only the adapted layers moved; embeddings, norms and the head are the base's.
    adapted = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
               "up_proj.weight", "down_proj.weight")
    for n, t in base_sd.items():
        if n.endswith(adapted):
            assert not torch.equal(msd[n], t), n
        else:
            assert torch.equal(msd[n], t), n
    # The adapter alone, in peft's format, on the base = the merged export.
    from peft import PeftModel

    ids = torch.tensor([list(range(30, 60))])
    with torch.no_grad():
        lp_merged = torch.log_softmax(merged(ids).logits.double(), -1)
        adapted_model = PeftModel.from_pretrained(base, str(final / "adapter")).eval()
        lp_peft = torch.log_softmax(adapted_model(ids).logits.double(), -1)
    assert (lp_merged - lp_peft).abs().max() < 1e-4

    # vLLM loads final/ as a plain model (no LoRA) and scores like transformers.
    tok_ids = ids[0].tolist()
    got = vllm_logprobs(final, tok_ids, tmp_path)
    ref = lp_merged[0, :-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-4, (got, ref)
