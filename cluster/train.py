"""The opd training driver: the main job.

    python -m cluster.train --config configs/demo.yaml [--resume] [dotted.key=value ...]
    opd-train --config configs/demo.yaml learner.lr=1e-5        # console script

With no Ray address (placement.ray_address / RAY_ADDRESS) it starts a local Ray
cluster; under `ray job submit` it joins the cluster it was submitted to. When
`teacher.url` is null it starts teacher_server for `teacher.model` itself and
stops it at the end.

Order of work: validate the config (all problems at once, before anything
starts) -> run dir + resolved config -> models resolved to local directories
(hub ids through the Hugging Face cache, cluster/models.py) -> prompts ->
tokenizer check against the teacher -> Ray + placement groups -> teacher ->
samplers + learners -> (resume) -> the sync or async loop (Hugging Face
exports every run.export_every_steps) -> final checkpoint and Hugging Face
export -> teardown. SIGTERM (e.g. `ray job stop`) finishes the
current step, checkpoints and exits 0; `--resume` continues from there.

Exit codes: 0 done (or stopped by SIGTERM after checkpointing), 2 bad config
or input (a model that does not resolve, a teacher tokenizer that maps ids
differently, bad data), 3 the teacher stayed unavailable (a checkpoint was written), 4 a
learner worker died (every learner call has a timeout, so this never hangs),
1 other errors. A dead sampler is restarted, re-sent the current weights, and
its step retried (`rollout/sampler_restarts`).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

from cluster.checkpoint import LEARNER, clean_partial, latest_checkpoint, read_driver_state
from cluster.config import Config, ConfigError, load_config, to_dict
from cluster.loop import RunContext, actor_died, checkpoint, do_async_training, do_sync_training
from cluster.metrics_log import MetricsLogger
from cluster.models import check_student_on_nodes, hf_env, resolve_models
from cluster.task_fns import TaskFunctionError
from cluster.tiny_data import resolve_data
from rollout.host import GiB, kv_cache_size
from rollout.prompts import PromptDataError
from rollout.teacher_client import TeacherBackendError, TeacherUnavailableError, TokenizerMismatchError


class WorkerDied(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="opd-train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", default=None, help="YAML config (configs/demo.yaml is the embedded demo; student.model, "
                    "teacher.url or teacher.model, and data.train are required)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.dir")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5 train.steps=10")
    return ap.parse_args(argv)


def actor_env(cfg: Config) -> dict[str, str]:
    """Environment every actor gets (vLLM CPU settings, DeepSpeed accelerator)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for k in ("OPD_CACHE_DIR", "DS_ACCELERATOR", "VLLM_CPU_OMP_THREADS_BIND", "WANDB_MODE", "TORCH_EXTENSIONS_DIR"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.update(hf_env())  # the same Hugging Face cache settings on every node (cluster/models.py)
    return env


def batch_sequences(cfg: Config) -> int:
    """The most sequences the run generates or scores at once: a step's, or
    an eval's (a CPU engine's KV cache is sized to them)."""
    seqs = cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt
    if cfg.eval.every_steps > 0:
        seqs = max(seqs, cfg.eval.num_prompts * cfg.eval.samples_per_prompt)
    return seqs


def with_sampler_kv_cache(cfg: Config, student_path: str) -> Config:
    """`cfg` with cpu.sampler_kv_cache_gib "auto" made concrete: what one
    sampler's largest batch needs (batch_sequences), each
    data.max_prompt_tokens + rollout.max_new_tokens tokens long (the config
    check keeps that within student.max_model_len)."""
    kv = kv_cache_size(cfg.cpu.sampler_kv_cache_gib, student_path, cfg.student.dtype, seqs=batch_sequences(cfg),
                       seq_tokens=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                       max_model_len=cfg.student.max_model_len)
    print(f"[opd] sampler KV cache: {kv.bytes / 2**20:.0f} MiB per sampler ({kv.reason})", flush=True)
    return dataclasses.replace(cfg, cpu=dataclasses.replace(cfg.cpu, sampler_kv_cache_gib=kv.bytes / GiB))


def cpu_threads(cfg: Config, plan, layout: dict) -> dict:
    """Threads of the CPU roles: the placement plan's shares
    (cluster/placement.py cpu_thread_shares) where `cpu.*_threads` is
    "auto", else the override. {"samplers": [ThreadShare per sampler],
    "learners": [ThreadShare | count per rank], "teacher": ThreadShare |
    count | None}. A run with GPUs has no CPU roles: no shares."""
    from rollout.config import ThreadShare

    n_s, n_l = cfg.rollout.num_samplers, cfg.learner.world_size
    if plan.uses_gpus:
        return {"samplers": [None] * n_s, "learners": [0] * n_l, "teacher": None}
    overlap = cfg.train.rollout_chunks > 1 or cfg.train.sample_from == "teacher"
    shares = plan.cpu_threads(cfg.train.mode, overlap, cfg.rollout, cfg.learner, cfg.teacher.cpus, layout)
    c = cfg.cpu
    out = {"samplers": shares.samplers,
           "learners": shares.learners if c.learner_threads == "auto" else [c.learner_threads] * n_l,
           "teacher": shares.teacher if c.teacher_threads == "auto" else (c.teacher_threads or None)}

    def show(v, key: str, value) -> str:
        if value != "auto":
            return f"cpu.{key}={value}"
        return v.reason if isinstance(v, ThreadShare) else str(v)

    print(f"[opd] CPU threads: {show(out['samplers'][0], 'sampler_threads', c.sampler_threads)}; "
          f"{show(out['teacher'], 'teacher_threads', c.teacher_threads)}; "
          f"{show(out['learners'][0], 'learner_threads', c.learner_threads)}", flush=True)
    return out


def with_concrete_dtypes(cfg: Config, uses_gpus: bool) -> Config:
    """`cfg` with every "auto" dtype (student, teacher, learner) made
    concrete for the run's hardware: bfloat16 with GPUs, float32 on CPU."""
    from rollout.weight_sync import concrete_dtype

    def fix(section):
        return dataclasses.replace(section, dtype=concrete_dtype(section.dtype, uses_gpus))

    return dataclasses.replace(cfg, student=fix(cfg.student), teacher=fix(cfg.teacher), learner=fix(cfg.learner))


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    run_dir = Path(cfg.run.dir).resolve()
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError([f"run.dir {run_dir} already holds checkpoints of an earlier run: pass --resume "
                           f"(or run.resume=true) to continue it, or choose a new run.dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def build(cfg: Config, run_dir: Path, resume_state: dict | None, teardown: list):
    """Start everything the loop needs; returns the RunContext parts. Every
    started resource appends its stop function to `teardown` as soon as it
    exists, so a failure half-way still stops what was started."""
    from transformers import AutoTokenizer

    from cluster.placement import connect, make_placement
    from cluster.teacher_proc import start_teacher
    from cluster.teachers import TeacherPlan, default_needed
    from learner.group import LearnerGroup
    from rollout.prompts import load_prompt_sources
    from rollout.pool import SamplerPool
    from rollout.teacher_client import TeacherClient, check_tokenizers
    from teacher_server.protocol import load_tokenizer_info, tokenizer_info

    t_build = time.monotonic()
    ready_s: dict[str, float] = {}  # role -> seconds from the start of build() until it was ready

    def note_ready(role: str) -> None:
        ready_s[role] = time.monotonic() - t_build

    # Models first (tiny: builds, local directories, hub ids through the HF
    # cache), once: everything after gets the resolved local directories.
    # With teacher.routes the top-level teacher is served only when used (cluster/teachers.py).
    serve_default = default_needed(cfg.teacher)
    student, teacher_model = resolve_models(cfg.student.model, cfg.teacher.model if cfg.teacher.url is None
                                            and serve_default else None)
    student_path = student.path
    if cfg.learner.lora.rank > 0:
        # peft wraps the student on the meta device: a bad LoRA setting fails
        # here, before any actor starts (exit 2).
        from learner.lora import check_student

        lora_problems = check_student(student_path, cfg.learner.lora)
        if lora_problems:
            raise ConfigError(lora_problems)
    teacher_path = teacher_model.path if teacher_model is not None else None
    if student.repo_id or (teacher_model and teacher_model.repo_id):
        print(f"[opd] models: student {student_path}" + (f", teacher {teacher_path}" if teacher_path else ""),
              flush=True)
    train_path, eval_path = resolve_data(cfg.data.train, cfg.data.eval)
    data_cfg = dataclasses.replace(cfg.data, train=train_path, eval=eval_path)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    # Prompts next: bad data fails in seconds, before any actor starts.
    stream, eval_records = load_prompt_sources(data_cfg, tokenizer, seed=cfg.run.seed)
    if resume_state is not None:
        stream.load_state_dict(resume_state["stream"])
    student_tok = tokenizer_info(tokenizer)
    if teacher_path is not None:
        # The driver serves the teacher: compare the two tokenizers on disk
        # before anything starts (the server loads the same files).
        check_tokenizers(student_tok, load_tokenizer_info(teacher_path), student_path, cfg.teacher.model)
    # Several teachers / the teacher's own prompt: every record's teacher and
    # teacher prefix, the routes' models and running servers, checked now.
    tplan = TeacherPlan.prepare(cfg, student_tok, student_path, data_cfg.apply_chat_template,
                                stream.records + eval_records, run_dir)

    # A running teacher (teacher.url): wait for it and check its tokenizer
    # before Ray or any actor starts (only its hash travels unless they
    # differ). A teacher the driver serves starts below, on a side thread, in
    # its own Ray actor that books its GPUs (cluster/teacher_proc.py), while
    # the samplers and the learners start: each takes about a minute on CPU.
    # A teacher that fails to start fails the run at the next check.
    teacher_fut: cf.Future | None = None
    if cfg.teacher.url and serve_default:
        urls = cfg.teacher.url if isinstance(cfg.teacher.url, str) else ", ".join(cfg.teacher.url)
        print(f"[opd] starting teacher ({urls})", flush=True)
        teacher_fut = cf.Future()
        teacher_fut.set_result(start_teacher(cfg.teacher, None, run_dir))
        with TeacherClient.from_config(cfg.teacher, cfg.teacher.url) as probe:
            probe.check_tokenizer(student_tok, student_name=student_path)
            print(f"[opd] teacher: {probe.describe()}", flush=True)  # what teacher.backend found

    def stop_teacher() -> None:
        if teacher_fut is None:
            return  # never started
        try:
            handle = teacher_fut.result()
        except BaseException:  # noqa: BLE001 - it failed (start_teacher cleaned up)
            return
        handle.stop()

    def teacher_failed_fast() -> None:
        if teacher_fut is not None and teacher_fut.done() and teacher_fut.exception() is not None:
            teacher_fut.result()  # raises the teacher's start error
        tplan.failed_fast()

    info = connect(cfg.placement, env_vars=actor_env(cfg))
    import ray

    if info.started_local:
        teardown.append(ray.shutdown)
    teardown.append(stop_teacher)  # before ray.shutdown: the server is stopped through its actor
    plan = make_placement(cfg.placement, cfg.rollout, cfg.learner, info,
                          teacher_tensor_parallel_size=(0 if cfg.teacher.url or not serve_default
                                                        else cfg.teacher.tensor_parallel_size) + tplan.route_gpus(True))
    teardown.append(plan.remove)
    cfg = with_concrete_dtypes(cfg, plan.uses_gpus)
    if not plan.uses_gpus:
        cfg = with_sampler_kv_cache(cfg, student_path)
    layout = plan.describe()
    threads = cpu_threads(cfg, plan, layout)
    tplan.start(run_dir, plan.uses_gpus, teardown, kv_cache_gib=cfg.cpu.teacher_kv_cache_gib,
                kv_seqs=batch_sequences(cfg))
    if not cfg.teacher.url and serve_default:
        # After the groups are reserved: the teacher takes GPUs they left.
        print(f"[opd] starting teacher ({teacher_path})", flush=True)
        tex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher-start")

        def start_and_note():
            handle = start_teacher(cfg.teacher, teacher_path, run_dir,
                                   num_gpus=cfg.teacher.tensor_parallel_size if plan.uses_gpus else 0,
                                   model_ref=teacher_model, kv_cache_gib=cfg.cpu.teacher_kv_cache_gib,
                                   kv_seqs=batch_sequences(cfg), threads=threads["teacher"])
            note_ready("teacher")
            return handle

        teacher_fut = tex.submit(start_and_note)
        tex.shutdown(wait=False)
    (run_dir / "placement.json").write_text(json.dumps(layout, indent=1))
    # Every other node the samplers and learners landed on must see the
    # student's directory (or fetch the same hub snapshot) before they start.
    driver_node = ray.get_runtime_context().get_node_id()
    check_student_on_nodes(student, [n for role in ("samplers", "learners") for n in layout[role]["node_ids"]
                                     if n != driver_node])
    print(f"[opd] starting {cfg.rollout.num_samplers} sampler(s) and {cfg.learner.world_size} learner rank(s)"
          f" ({'GPU' if plan.uses_gpus else 'CPU'})", flush=True)
    teacher_failed_fast()
    pool = SamplerPool.create(student_path, cfg.rollout, cfg.student, num_samplers=cfg.rollout.num_samplers,
                              scheduling_strategies=plan.sampler_strategies,
                              num_gpus_per_sampler=plan.gpus_per_sampler(cfg.rollout), cpu_cfg=cfg.cpu,
                              lora_rank=cfg.learner.lora.rank, thread_shares=threads["samplers"])
    teardown.append(pool.shutdown)
    note_ready("samplers")
    teacher_failed_fast()
    learners = LearnerGroup.create(student_path, cfg.learner, cfg.loss, seed=cfg.run.seed,
                                   scheduling_strategies=plan.learner_strategies,
                                   num_gpus_per_worker=plan.gpus_per_bundle, total_steps=cfg.train.steps,
                                   cpu_threads=threads["learners"])
    teardown.append(learners.shutdown)
    note_ready("learners")
    teacher_proc = teacher_fut.result() if teacher_fut is not None else None
    teacher = None
    if teacher_proc is not None:
        # A driver-started server's key (teacher.api_key_file, or one made for the run).
        teacher = TeacherClient.from_config(dataclasses.replace(cfg.teacher, api_key_file=teacher_proc.api_key_file),
                                            teacher_proc.url)
        teardown.append(teacher.close)
    teacher = tplan.scorer(teacher, teacher_proc, teardown)  # the same client, or a TeacherSet
    backend = cfg.rollout.weight_sync_backend
    if backend == "auto":
        backend = "nccl" if plan.uses_gpus else "gloo"
    sync_kwargs = dict(backend=backend, bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20,
                       timeout_s=cfg.rollout.weight_sync_timeout_s, dtype=cfg.student.dtype)
    chosen = learners.init_weight_sync(pool, **sync_kwargs)
    print(f"[opd] weight sync over {chosen} (rollout.weight_sync_backend={cfg.rollout.weight_sync_backend})",
          flush=True)
    # Where start-up goes (the teacher starts on its side thread while the
    # samplers, then the learners, start here).
    print(f"[opd] started in {time.monotonic() - t_build:.1f}s; ready after: "
          + ", ".join(f"{role} {t:.1f}s" for role, t in sorted(ready_s.items(), key=lambda kv: kv[1])), flush=True)
    return dict(pool=pool, learners=learners, teacher=teacher, stream=stream, eval_records=eval_records,
                tokenizer=tokenizer, sync_kwargs=sync_kwargs)


def run(cfg: Config, resume: bool = False) -> int:
    run_dir = prepare_run_dir(cfg, resume)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume:
        clean_partial(run_dir)
    state = read_driver_state(ckpt) if ckpt is not None else None
    if resume and ckpt is None:
        print(f"[opd] --resume: no checkpoint in {run_dir}; starting from step 0", flush=True)
    teardown: list = []
    logger = None
    try:
        parts = build(cfg, run_dir, state, teardown)
        logger = MetricsLogger(run_dir, cfg.log.wandb, to_dict(cfg),
                               run_id=state.get("wandb_run_id") if state else None,
                               resume_from_step=state["step"] if state else None)
        ctx = RunContext(cfg=cfg, run_dir=run_dir, logger=logger, **parts)
        if state is not None:
            print(f"[opd] resuming from {ckpt.name} (step {state['step']})", flush=True)
            ctx.learners.load(str(ckpt / LEARNER))
            ctx.step = ctx.start_step = state["step"]
            ctx.trained_tokens = state.get("trained_tokens", 0)
            ctx.version = state["version"]
            # Samplers start from the base checkpoint: give them the restored policy.
            ctx.learners.push_weights(ctx.pool, ctx.version)
        if threading.current_thread() is threading.main_thread():
            # Python only lets the main thread install handlers; an embedding
            # program that runs `run()` in a thread stops it by setting
            # ctx.stop_requested itself.
            signal.signal(signal.SIGTERM, lambda *_: ctx.stop_requested.set())
        try:
            (do_async_training if cfg.train.mode == "async" else do_sync_training)(ctx)
        except Exception as e:
            if actor_died(e):
                # Dead samplers were restarted inside the loop; what reaches here
                # is a dead learner rank (its state is gone with it).
                last = latest_checkpoint(run_dir)
                raise WorkerDied(
                    f"a learner worker died ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the run stops "
                    f"instead of hanging. Last checkpoint: {last or 'none'}; rerun with --resume to continue "
                    f"from it") from e
            if isinstance(e, TeacherUnavailableError):
                # Keep what was trained: the learners hold a consistent state
                # for ctx.step (the failed step never reached them).
                path = checkpoint(ctx)
                print(f"[opd] teacher unavailable: checkpoint {path} written", file=sys.stderr, flush=True)
            raise
        path = checkpoint(ctx)
        if ctx.stop_requested.is_set():
            print(f"[opd] stopped by SIGTERM at step {ctx.step}; checkpoint {path}; rerun with --resume", flush=True)
            return 0
        if cfg.run.export_final:
            ctx.learners.export_hf(str(run_dir / "final"))
            print(f"[opd] done: {ctx.step} steps; student exported to {run_dir / 'final'}", flush=True)
        return 0
    finally:
        if logger is not None:
            logger.close()
        for fn in reversed(teardown):
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep tearing down the rest
                traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, resume=args.resume or cfg.run.resume)
    except ConfigError as e:
        print(f"[opd] {e}", file=sys.stderr)
        return 2
    except (PromptDataError, TokenizerMismatchError, TeacherBackendError, TaskFunctionError) as e:
        # Bad input found by the run itself: the data, the teacher's
        # tokenizer, the user's grader or reward on a record.
        print(f"[opd] {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - classify the known failure kinds for the exit code
        if isinstance(e, WorkerDied):
            print(f"[opd] {e}", file=sys.stderr)
            return 4
        if isinstance(e, TeacherUnavailableError):
            print(f"[opd] {e}\n[opd] the last checkpoint is intact; rerun with --resume once the teacher is up",
                  file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
