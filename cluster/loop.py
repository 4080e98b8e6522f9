"""The training loops: one function per mode, each about a page.

    do_sync_training   sample (current weights) -> score -> train -> sync
    do_async_training  sampling + scoring of step k+1 overlap training of
                       step k; the batch trained at step k was sampled by the
                       policy one version behind, which the importance ratio
                       corrects; `train.max_policy_lag` bounds the lag

In both modes `train.rollout_chunks` > 1 pipelines the rollout itself: the
teacher scores chunk i while the samplers generate chunk i+1
(`rollout_and_score`).

Every stage is a named helper (cluster/stages.py); one metrics dict per step
is logged once (metrics.jsonl + wandb) by `finish_step`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Any

from cluster.checkpoint import save_checkpoint, step_name
from cluster.config import Config
from cluster.stages import completion_table, evaluate, reward_completions, sample_completions, score_completions
from rollout.types import RolloutBatch


@dataclasses.dataclass
class RunContext:
    """Everything a loop needs; built by cluster/train.py."""

    cfg: Config
    run_dir: Path
    pool: Any  # rollout SamplerPool
    learners: Any  # learner LearnerGroup
    teacher: Any  # rollout TeacherClient
    stream: Any  # rollout PromptStream (train)
    eval_records: list
    tokenizer: Any
    logger: Any  # cluster.metrics_log.MetricsLogger
    step: int = 0  # optimizer steps completed
    version: int = 0  # policy version the samplers serve
    stop_requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    start_step: int = 0
    trained_tokens: int = 0
    # The stream position before the prompts of a step that has not finished
    # training were drawn (async mode draws step k+1's prompts before step k
    # is checkpointed; a step can fail mid-way). A checkpoint records this one,
    # so a resumed run neither skips nor repeats prompts.
    uncommitted_stream_state: dict | None = None
    # Arguments of LearnerGroup.init_weight_sync, to rebuild the group after a
    # sampler restart.
    sync_kwargs: dict = dataclasses.field(default_factory=dict)


MAX_SAMPLER_RECOVERIES_PER_STEP = 3


def actor_died(e: BaseException) -> bool:
    """The call failed because its Ray actor is dead or unreachable (the
    driver restarts a dead sampler; a dead learner rank ends the run)."""
    import ray

    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def samplers_to_restart(pool, timeout_s: float = 60.0) -> dict[int, str]:
    """{sampler index: why} for every sampler that must be replaced: one that
    does not answer, and one stuck inside a weight receive its sender gave up
    (SamplerActor.stuck_in_weight_receive: an NCCL broadcast whose sender
    aborted never returns, and only a new process frees that worker)."""
    import ray

    refs = [(s.ready.remote(), s.stuck_in_weight_receive.remote() if hasattr(s, "stuck_in_weight_receive")
             else None) for s in pool.samplers]
    deadline = time.monotonic() + timeout_s
    out = {}
    for i, (ready, stuck) in enumerate(refs):
        try:
            ray.get(ready, timeout=max(0.0, deadline - time.monotonic()))
            why = None if stuck is None else ray.get(stuck, timeout=max(0.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - any failure to answer counts as dead
            out[i] = f"died ({type(e).__name__})"
            continue
        if why:
            out[i] = f"stuck in a weight receive ({why})"
    return out


def release_stuck_sampler(pool, i: int) -> None:
    """Kill the engine processes of sampler i (stuck in a receive) before the
    actor is replaced, so the GPU memory they hold is free for its successor
    (best effort: the restart goes ahead either way)."""
    import ray

    try:
        ray.get(pool.samplers[i].kill_engine_processes.remote(), timeout=60)
    except Exception as e:  # noqa: BLE001
        print(f"[opd] could not kill the engine processes of stuck sampler {i}: {e}", flush=True)


def weight_sync_timed_out(e: BaseException) -> bool:
    """The push failed because the weight-sync deadline passed: the sender
    aborted its transfer group (learner/weight_sender.NcclWeightSender), so the
    group must be re-formed even when every sampler is healthy."""
    from rollout.weight_sync import WeightSyncError

    cause = getattr(e, "cause", None) or e  # a RayTaskError carries the actor's exception
    return isinstance(cause, WeightSyncError) and cause.stage == "timeout"


def restart_dead_samplers(ctx: RunContext, cause: BaseException, next_push: str) -> dict:
    """Restart every sampler that died or is stuck in an abandoned weight
    receive (`samplers_to_restart`) and rebuild the weight-sync group over the
    pool; re-raise `cause` when no sampler needs it and the group is intact
    (the failure was something else, e.g. a dead learner rank). The caller
    pushes weights before anyone samples again."""
    t0 = time.monotonic()
    bad = samplers_to_restart(ctx.pool)
    if not bad and not weight_sync_timed_out(cause):
        raise cause  # not a dead sampler: nothing to recover
    if bad:
        why = "; ".join(f"{i}: {w}" for i, w in sorted(bad.items()))
        print(f"[opd] sampler(s) {sorted(bad)} need a restart ({why}; after {type(cause).__name__}); restarting "
              f"them and {next_push}", flush=True)
    else:
        first = str(cause).splitlines()[0][:300]
        print(f"[opd] the weight push timed out and its transfer group was aborted ({first}); re-forming the "
              f"group and {next_push}", flush=True)
    for i in sorted(bad):
        if bad[i].startswith("stuck"):
            release_stuck_sampler(ctx.pool, i)
        ctx.pool.restart(i)
    ctx.learners.init_weight_sync(ctx.pool, **ctx.sync_kwargs)
    return {"rollout/sampler_restarts": len(bad), "time/sampler_recovery_s": time.monotonic() - t0}


def recover_samplers(ctx: RunContext, cause: BaseException) -> dict:
    """Restart every dead sampler and push the current policy (same version)
    before anyone samples again. Called by the loop when a sampling call
    failed because an actor died."""
    m = restart_dead_samplers(ctx, cause, f"re-sending policy v{ctx.version}")
    t0 = time.monotonic()
    ctx.learners.push_weights(ctx.pool, ctx.version)
    m["time/sampler_recovery_s"] += time.monotonic() - t0
    return m


def with_sampler_recovery(ctx: RunContext, fn, *args, **kwargs):
    """fn(*args) retried after restarting dead samplers; returns (result, recovery metrics)."""
    metrics: dict = {}
    for attempt in range(MAX_SAMPLER_RECOVERIES_PER_STEP + 1):
        try:
            return fn(*args, **kwargs), metrics
        except Exception as e:  # noqa: BLE001 - only actor deaths are recovered
            if not actor_died(e) or attempt == MAX_SAMPLER_RECOVERIES_PER_STEP:
                raise
            for k, v in recover_samplers(ctx, e).items():
                metrics[k] = metrics.get(k, 0) + v
    raise AssertionError("unreachable")


def sampling_seed(ctx: RunContext, step: int) -> int:
    return ctx.cfg.run.seed * 1_000_003 + step


# ----------------------------------------------------------------- stages

def train_on(ctx: RunContext, batch) -> dict:
    t0 = time.monotonic()
    r = ctx.cfg.rollout
    # Student samples carry logprobs of the top-k / nucleus-truncated
    # distribution, which the learner then scores too; off-policy rows carry
    # the student's untruncated score (pool.score).
    truncated = ctx.cfg.train.sample_from == "student"
    m = ctx.learners.train_step(batch, step=ctx.step, temperature=r.temperature,
                                top_k=r.top_k if truncated else 0, top_p=r.top_p if truncated else 1.0)
    if ctx.cfg.train.sample_from == "teacher" and "learner/reverse_kl" in m:
        # On the teacher's samples mean(lp_student - lp_teacher) is minus the
        # sampled forward KL: log it under the name of what it estimates.
        m["learner/forward_kl"] = -m.pop("learner/reverse_kl")
    ctx.trained_tokens += batch.num_trained_tokens
    return {**m, "time/train_s": time.monotonic() - t0}


def sync_weights(ctx: RunContext) -> dict:
    """Push the learner's weights as the next version. A sampler that dies
    during the push (the push fails however it fails: a dead sampler shows up
    as a failed RPC inside the learner), or is left stuck in a receive the
    sender gave up (a push past rollout.weight_sync_timeout_s), is restarted,
    the group re-formed and the push redone to the whole pool, so no live
    sampler is left mid-update; any other failure (a dead learner rank) is
    raised."""
    t0 = time.monotonic()
    new_version = ctx.version + 1
    recovery: dict = {}
    for attempt in range(MAX_SAMPLER_RECOVERIES_PER_STEP + 1):
        try:
            stats = ctx.learners.push_weights(ctx.pool, new_version)
            break
        except Exception as e:  # noqa: BLE001 - restart_dead_samplers re-raises when no sampler died
            if attempt == MAX_SAMPLER_RECOVERIES_PER_STEP:
                raise
            for k, v in restart_dead_samplers(ctx, e, f"pushing policy v{new_version} again").items():
                recovery[k] = recovery.get(k, 0) + v
    ctx.version = new_version
    return {**stats, **recovery, "sync/version": new_version, "time/sync_s": time.monotonic() - t0}


def checkpoint(ctx: RunContext) -> Path:
    stream_state = ctx.uncommitted_stream_state or ctx.stream.state_dict()
    state = {"version": ctx.version, "stream": stream_state, "wandb_run_id": ctx.logger.run_id,
             "trained_tokens": ctx.trained_tokens}
    return save_checkpoint(ctx.run_dir, ctx.step, ctx.learners.save_shards, state, ctx.cfg.run.keep_checkpoints)


def export(ctx: RunContext) -> Path:
    """Hugging Face export of the current student to
    <run.dir>/exports/step_NNNNNNNN (run.export_every_steps); every learner
    rank takes part (a ZeRO-3 gather), rank 0 writes."""
    path = ctx.learners.export_hf(ctx.run_dir / "exports" / step_name(ctx.step))
    print(f"[opd] step {ctx.step}: student exported to {path}", flush=True)
    return path


def maybe_eval(ctx: RunContext, force: bool = False) -> dict:
    every = ctx.cfg.eval.every_steps
    if not ctx.eval_records or every == 0:
        return {}
    if not force and ctx.step % every != 0:
        return {}
    m, rec = with_sampler_recovery(ctx, evaluate, ctx.pool, ctx.teacher, ctx.eval_records, ctx.cfg.eval,
                                   ctx.tokenizer, seed=sampling_seed(ctx, 10_000_000 + ctx.step))
    return {**m, **rec}


def finish_step(ctx: RunContext, metrics: dict, t0: float, batch) -> None:
    """Eval, log, progress line, periodic checkpoint and export for the step just done."""
    cfg = ctx.cfg
    last = ctx.step >= cfg.train.steps
    metrics.update(maybe_eval(ctx, force=last))
    step_s = time.monotonic() - t0
    done = ctx.step - ctx.start_step
    elapsed = time.monotonic() - ctx.started_at
    eta_s = elapsed / max(1, done) * (cfg.train.steps - ctx.step)
    metrics.update({
        "time/step_s": step_s,
        "progress/step": ctx.step,
        "progress/trained_tokens": ctx.trained_tokens,
        "progress/tokens_per_s": metrics.get("learner/tokens", 0) / max(step_s, 1e-9),
        "progress/eta_s": eta_s,
    })
    wcfg = cfg.log.wandb
    if batch is not None and wcfg.table_every_steps and ctx.step % wcfg.table_every_steps == 0 \
            and batch.teacher_logprobs_B_T is not None:
        cols, rows = completion_table(batch, ctx.tokenizer, cfg.loss, wcfg.table_samples)
        ctx.logger.log_table(ctx.step, "rollout/samples", cols, rows)
    ctx.logger.log(ctx.step, metrics)
    if ctx.step % cfg.log.print_every_steps == 0 or last:
        ev = metrics.get("eval/reverse_kl")
        acc = metrics.get("eval/accuracy")
        kl_key = "teacher/forward_kl" if cfg.train.sample_from == "teacher" else "teacher/reverse_kl"
        print(f"[opd] step {ctx.step}/{cfg.train.steps} | {kl_key.split('/')[1]} "
              f"{metrics.get(kl_key, float('nan')):.4f}"
              + (f" | reward {metrics['reward/mean']:.4f}" if "reward/mean" in metrics else "")
              + (f" | eval_kl {ev:.4f}" if ev is not None else "")
              + (f" | eval_acc {acc:.3f}" if acc is not None else "")
              + f" | loss {metrics.get('learner/loss', float('nan')):.4f}"
              + f" | {metrics['progress/tokens_per_s']:.0f} tok/s | {step_s:.1f}s/step | ETA {eta_s:.0f}s",
              flush=True)
    if cfg.run.save_every_steps and ctx.step % cfg.run.save_every_steps == 0 and not last:
        checkpoint(ctx)
    if cfg.run.export_every_steps and ctx.step % cfg.run.export_every_steps == 0 \
            and not (last and cfg.run.export_final):  # then the driver writes final/
        export(ctx)


def log_baseline_eval(ctx: RunContext) -> None:
    m = maybe_eval(ctx, force=True)
    if m:
        ctx.logger.log(0, m)
        print(f"[opd] step 0 (before training) | eval_kl {m['eval/reverse_kl']:.4f}"
              + (f" | eval_acc {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""), flush=True)


def prompts_digest(records: list) -> str:
    """A short fingerprint of a step's prompts (logged, so a resumed run can be
    checked to see the same prompts as an uninterrupted one)."""
    import hashlib

    return hashlib.sha256(",".join(str(r.index) for r in records).encode()).hexdigest()[:12]


def chunk_seed(seed: int, i: int) -> int:
    """Sampling seed of chunk i of a step (chunk 0 keeps the step's seed, so
    `train.rollout_chunks=1` samples exactly as before)."""
    return seed if i == 0 else (seed + i * 1_000_000_007) % (2**31 - 1)


# Per-chunk metrics that are averages: merged weighted by (key of the weight).
_WEIGHTED = {"rollout/finished_frac": "rollout/completions", "teacher/reverse_kl": "teacher/tokens_scored",
             "teacher/forward_kl": "teacher/tokens_scored", "teacher/mean_logprob": "teacher/tokens_scored",
             "reward/mean": "rollout/completions"}
# Standard deviations: pooled from the chunks' (std, mean, count) as the std
# of all the values together.
_POOLED_STD = {"reward/std": ("reward/mean", "rollout/completions")}
# Rates: recomputed from merged totals as numerator / seconds.
_RATES = {"rollout/tokens_per_s": ("rollout/completion_tokens", "time/sample_s"),
          "teacher/tokens_per_s": ("teacher/tokens_scored", "time/teacher_s")}


def merge_chunk_metrics(parts: list[dict]) -> dict:
    """One step's metrics from its chunks' metrics: counts and seconds add up
    (time/sample_s and time/teacher_s are then busy times, which overlap),
    averages are weighted, rates recomputed."""
    out: dict = {}
    # Per-teacher reverse KL (teacher/<name>/reverse_kl): weighted by that teacher's tokens.
    weighted = {**_WEIGHTED, **{k: k[:-len("reverse_kl")] + "tokens" for m in parts for k in m
                                if k.startswith("teacher/") and k.endswith("/reverse_kl") and k.count("/") == 2}}
    for m in parts:
        for k, v in m.items():
            if k in weighted or k in _RATES or k in _POOLED_STD or k == "rollout/mean_completion_len":
                continue
            # A state, not a count (teacher/replica<i>/healthy): the last chunk's.
            out[k] = v if k.endswith("/healthy") else out.get(k, 0) + v
    for k, w in weighted.items():
        pairs = [(m[k], m.get(w, 0)) for m in parts if k in m]
        if pairs:
            tot = sum(x for _, x in pairs)
            out[k] = sum(v * x for v, x in pairs) / tot if tot else sum(v for v, _ in pairs) / len(pairs)
    for k, (mean_key, w) in _POOLED_STD.items():
        triples = [(m[k], m[mean_key], m.get(w, 0)) for m in parts if k in m]
        tot = sum(n for _, _, n in triples)
        if triples and tot:
            mu = sum(mu_i * n for _, mu_i, n in triples) / tot
            var = sum(n * (sd * sd + (mu_i - mu) ** 2) for sd, mu_i, n in triples) / tot
            out[k] = math.sqrt(max(var, 0.0))
    for k, (num, den) in _RATES.items():
        if any(k in m for m in parts):
            out[k] = out.get(num, 0) / max(out.get(den, 0), 1e-9)
    if "rollout/completions" in out:
        out["rollout/mean_completion_len"] = out.get("rollout/completion_tokens", 0) / max(1, out["rollout/completions"])
    return out


def split_records(records: list, chunks: int) -> list[list]:
    """`records` in `chunks` contiguous, near-equal, non-empty parts."""
    chunks = max(1, min(chunks, len(records)))
    q, r = divmod(len(records), chunks)
    out, i = [], 0
    for c in range(chunks):
        n = q + (1 if c < r else 0)
        out.append(records[i: i + n])
        i += n
    return out


def rollout_and_score(ctx: RunContext, records: list, seed: int, recover: bool = True) -> tuple[Any, dict]:
    """Sample the step's completions and score them on the teacher; returns
    (RolloutBatch or None, metrics). With `train.rollout_chunks` = C > 1 the
    prompts are split in C chunks and chunk i is scored (on a side thread)
    while the samplers generate chunk i+1: the rollout then takes about
    max(sample, score) + one chunk's score instead of sample + score, and
    `time/rollout_s` is that wall time. `recover` restarts dead samplers
    (main thread only: recovery drives the learners); without it an actor
    death propagates to the caller."""
    cfg = ctx.cfg
    scorer = ctx.pool.score if cfg.train.sample_from == "teacher" else None
    t0 = time.monotonic()

    def sample(part: list, s: int):
        """(completions, (rewards, reward advantages), metrics) of one chunk."""
        args = (ctx.pool, ctx.teacher, part, cfg.rollout, s, cfg.train.sample_from)
        if recover:
            (comps, m), rec = with_sampler_recovery(ctx, sample_completions, *args)
            m = {**m, **rec}
        else:
            comps, m = sample_completions(*args)
        rewards = (None, None)
        if cfg.reward.fn is not None:
            r, adv, m_reward = reward_completions(comps, part, cfg.reward, ctx.tokenizer)
            rewards = (r, adv)
            m.update(m_reward)
        return comps, rewards, m

    def score(comps: list, rewards: tuple, part: list):
        return score_completions(ctx.teacher, comps, part, cfg.teacher, cfg.loss, student_scorer=scorer,
                                 sample_from=cfg.train.sample_from, rewards=rewards[0],
                                 reward_advantages=rewards[1])

    parts = split_records(records, cfg.train.rollout_chunks)
    if len(parts) == 1:
        comps, rewards, m = sample(records, seed)
        batch, m2 = score(comps, rewards, records)
        return batch, {**m, **m2, "time/rollout_s": time.monotonic() - t0}
    ex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-score")
    futs, sample_metrics = [], []
    try:
        for i, part in enumerate(parts):
            comps, rewards, m = sample(part, chunk_seed(seed, i))
            sample_metrics.append(m)
            futs.append(ex.submit(score, comps, rewards, part))
        t_sampled = time.monotonic()
        scored = [f.result() for f in futs]
    finally:
        # Scoring threads never outlive the step (a failure above cancels the
        # chunks not yet started and waits for the one running).
        ex.shutdown(wait=True, cancel_futures=True)
    batches = [b for b, _ in scored if b is not None]
    metrics = merge_chunk_metrics(sample_metrics + [m for _, m in scored])
    metrics.update({"time/rollout_s": time.monotonic() - t0, "time/score_tail_s": time.monotonic() - t_sampled,
                    "rollout/chunks": len(parts)})
    return (RolloutBatch.concat(batches) if batches else None), metrics


# ----------------------------------------------------------------- loops

def do_sync_training(ctx: RunContext) -> None:
    cfg = ctx.cfg
    if ctx.step == 0:
        log_baseline_eval(ctx)
    while ctx.step < cfg.train.steps and not ctx.stop_requested.is_set():
        t0 = time.monotonic()
        ctx.uncommitted_stream_state = ctx.stream.state_dict()
        records = ctx.stream.next_batch(cfg.train.prompts_per_step)
        batch, metrics = rollout_and_score(ctx, records, sampling_seed(ctx, ctx.step))
        metrics["progress/prompts_digest"] = prompts_digest(records)
        if batch is not None:
            metrics.update(train_on(ctx, batch))
            metrics.update(sync_weights(ctx))
        ctx.step += 1
        ctx.uncommitted_stream_state = None
        finish_step(ctx, metrics, t0, batch)


def do_async_training(ctx: RunContext) -> None:
    cfg = ctx.cfg
    if ctx.step == 0:
        log_baseline_eval(ctx)
    # One background thread samples AND scores the next batch while this one
    # trains: the critical path is max(sample + score, train) + sync. Dead
    # samplers are recovered here on the main thread (recovery drives the
    # learners, which must not be called from two threads at once).
    ex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-rollout")

    def submit(step: int):
        ctx.uncommitted_stream_state = ctx.stream.state_dict()
        records = ctx.stream.next_batch(cfg.train.prompts_per_step)
        return records, ex.submit(rollout_and_score, ctx, records, sampling_seed(ctx, step), False)

    pending = None
    try:
        pending = submit(ctx.step)
        while ctx.step < cfg.train.steps and not ctx.stop_requested.is_set():
            t0 = time.monotonic()
            records, fut = pending
            t_wait = time.monotonic()
            try:
                batch, metrics = fut.result()
            except Exception as e:  # noqa: BLE001 - a dead sampler: restart, then redo the same prompts
                if not actor_died(e):
                    raise
                rec = recover_samplers(ctx, e)
                batch, metrics = rollout_and_score(ctx, records, sampling_seed(ctx, ctx.step), recover=True)
                for k, v in rec.items():
                    metrics[k] = metrics.get(k, 0) + v
            metrics["time/wait_rollout_s"] = time.monotonic() - t_wait
            metrics["progress/prompts_digest"] = prompts_digest(records)
            nxt = submit(ctx.step + 1) if ctx.step + 1 < cfg.train.steps else None
            if batch is not None:
                # Drop samples older than the lag bound (the learner is at ctx.version).
                lags = [ctx.version - v for v in batch.policy_versions_B]
                keep = [i for i, lag in enumerate(lags) if lag <= cfg.train.max_policy_lag]
                metrics["rollout/stale_dropped"] = len(lags) - len(keep)
                metrics["rollout/policy_lag_max"] = max(lags, default=0)
                metrics["rollout/policy_lag_mean"] = sum(lags) / max(1, len(lags))
                batch = batch.select(keep) if keep else None
            if batch is not None:
                metrics.update(train_on(ctx, batch))
                if nxt is not None:  # the samplers must finish step k+1 before weights change under them
                    t_w = time.monotonic()
                    cf.wait([nxt[1]])
                    metrics["time/wait_before_sync_s"] = time.monotonic() - t_w
                metrics.update(sync_weights(ctx))
            ctx.step += 1
            pending = nxt
            if pending is None:
                ctx.uncommitted_stream_state = None
            finish_step(ctx, metrics, t0, batch)
    finally:
        # A stop with a batch still pending keeps the pre-draw position, so a
        # resumed run samples those prompts again.
        ex.shutdown(wait=True, cancel_futures=True)
