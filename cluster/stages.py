"""The named stages of one training step, shared by the sync and async loops
(cluster/loop.py):

    sample_completions   prompts -> n completions each (student samplers, or
                         the teacher's /v1/generate for off-policy variants)
    reward_completions   completions -> task rewards (reward.fn) and their
                         group-baseline advantages
    score_completions    completions -> teacher logprobs -> RolloutBatch
    evaluate             held-out prompts -> eval/reverse_kl (T=1), eval/accuracy
    completion_table     a few samples with their per-token advantages (wandb)

Each returns its result plus a metrics dict with `stage/name` keys. A sample
whose teacher score finally failed is dropped from the batch and counted
(`teacher/failed_sequences`): it is never given a made-up score.
"""

from __future__ import annotations

import math
import time
from typing import Any

from cluster.config import EvalConfig, LossConfig, RewardConfig, RolloutConfig, TeacherConfig
from cluster.task_fns import call, group_advantages, resolve_grader, resolve_reward
from learner.config import LOSSES
from rollout.teacher_routes import per_teacher_kl
from rollout.types import Completion, RolloutBatch


def sample_completions(pool, teacher, records: list, rcfg: RolloutConfig, seed: int,
                       sample_from: str = "student") -> tuple[list[Completion], dict]:
    """n completions for each prompt record, in prompt order."""
    t0 = time.monotonic()
    prompts = [r.prompt_ids for r in records]
    extra: dict = {}
    if sample_from == "student":
        comps = [c for per_prompt in pool.generate(prompts, n=rcfg.samples_per_prompt, seed=seed)
                 for c in per_prompt]
    else:
        comps, extra = teacher_completions(teacher, prompts, rcfg, seed)
    dt = time.monotonic() - t0
    n_tok = sum(len(c.completion_ids) for c in comps)
    return comps, {
        "rollout/completions": len(comps),
        "rollout/completion_tokens": n_tok,
        "rollout/mean_completion_len": n_tok / max(1, len(comps)),
        "rollout/finished_frac": sum(c.finish_reason == "stop" for c in comps) / max(1, len(comps)),
        "rollout/tokens_per_s": n_tok / max(dt, 1e-9),
        "time/sample_s": dt,
        **extra,
    }


def teacher_completions(teacher, prompts: list[list[int]], rcfg: RolloutConfig, seed: int) -> tuple[list[Completion], dict]:
    """Off-policy completions written by the teacher (/v1/generate). Their
    logprobs are the teacher's sampling distribution; the policy version is -1
    (no student policy wrote them). Prompts whose generation failed are counted
    and skipped."""
    out = teacher.generate(prompts, n=rcfg.samples_per_prompt, max_new_tokens=rcfg.max_new_tokens,
                           temperature=rcfg.temperature, top_p=rcfg.top_p, seed=seed,
                           stop_token_ids=list(rcfg.stop_token_ids))
    comps = []
    for p, samples in enumerate(out.samples):
        if samples is None:
            continue
        for s, smp in enumerate(samples):
            comps.append(Completion(prompt_index=p, sample_index=s, prompt_ids=list(prompts[p]),
                                    completion_ids=list(smp.token_ids), sampler_logprobs=list(smp.logprobs),
                                    finish_reason=smp.finish_reason, policy_version=-1))
    return comps, dict(out.metrics)


def reward_completions(comps: list[Completion], records: list, rcfg: RewardConfig,
                       tokenizer) -> tuple[list[float], list[float] | None, dict]:
    """reward.fn on every completion -> (rewards R, reward advantages or None,
    metrics). The advantage of completion i is reward.coef * (R_i - b_i), b_i
    the mean reward of the samples of i's prompt (all of them, including any
    that teacher scoring later drops); None when reward.coef is 0 (the reward
    is then only logged). reward/mean and reward/std (population std) are
    over all the step's completions."""
    t0 = time.monotonic()
    fn = resolve_reward(rcfg.fn)
    rewards = [call(fn, "reward.fn", rcfg.fn, tokenizer.decode(c.completion_ids, skip_special_tokens=True),
                    records[c.prompt_index], unit_interval=False) for c in comps]
    advantages = (group_advantages(rewards, [c.prompt_index for c in comps], rcfg.coef)
                  if rcfg.coef != 0.0 else None)
    n = max(1, len(rewards))
    mean = sum(rewards) / n
    return rewards, advantages, {
        "reward/mean": mean,
        "reward/std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / n),
        "time/reward_s": time.monotonic() - t0,
    }


def score_completions(teacher, comps: list[Completion], records: list, tcfg: TeacherConfig,
                      loss_cfg: LossConfig, student_scorer=None, sample_from: str = "student",
                      rewards: list[float] | None = None,
                      reward_advantages: list[float] | None = None) -> tuple[RolloutBatch | None, dict]:
    """Teacher logprobs of every completion token -> the training batch.

    `records[c.prompt_index]` is the prompt record of completion c.
    `student_scorer(seqs) -> logprobs` fills sampler logprobs for off-policy
    completions (the teacher wrote them; the ratio's denominator is the
    student). `rewards` / `reward_advantages` (one per completion, from
    reward_completions) travel with the rows that are kept.

    The logged divergence is named for what it estimates: on the student's
    samples `teacher/reverse_kl` = mean over tokens of lp_sampler - lp_teacher
    (KL(student || teacher), a one-sample estimate per token); on the
    teacher's samples (`sample_from="teacher"`) `teacher/forward_kl` = mean of
    lp_teacher - lp_student (KL(teacher || student)).
    """
    t0 = time.monotonic()
    need_topk = LOSSES[loss_cfg.kind].needs_topk
    seqs = [(list(c.prompt_ids) + list(c.completion_ids), len(c.prompt_ids)) for c in comps]
    keep = [i for i, c in enumerate(comps) if len(c.completion_ids) > 0]
    t_seqs, names = teacher_sequences(comps, records)
    if t_seqs is None:  # one teacher, the student's prompt
        res = teacher.score([seqs[i] for i in keep], top_k=tcfg.top_k if need_topk else 0,
                            temperature=tcfg.temperature)
    else:  # a TeacherSet (rollout/teacher_routes.py): each teacher at its own temperature
        res = teacher.score([t_seqs[i] for i in keep], top_k=tcfg.top_k if need_topk else 0, temperature=None,
                            teachers=[names[i] for i in keep],
                            labels=[records[comps[i].prompt_index].where for i in keep])
    dt = time.monotonic() - t0
    rows: list[int] = []
    t_lp, t_ids, t_tlp = [], [], []
    for j, i in enumerate(keep):
        lp = res.logprobs[j]
        if lp is None:
            continue
        rows.append(i)
        t_lp.append(list(lp))
        if need_topk:
            t_ids.append(res.top_ids[j])
            t_tlp.append(res.top_logprobs[j])
    failed = len(keep) - len(rows)
    metrics = {
        "teacher/scored_sequences": len(rows),
        "teacher/failed_sequences": failed,
        "teacher/empty_completions": len(comps) - len(keep),
        "teacher/tokens_per_s": sum(len(t) for t in t_lp) / max(dt, 1e-9),
        "time/teacher_s": dt,
    }
    metrics.update(res.metrics)  # the client's own teacher/* counters (requests, retries, ...)
    if not rows:
        return None, metrics
    sel = [comps[i] for i in rows]
    sampler_lp = [list(c.sampler_logprobs) for c in sel]
    if student_scorer is not None:
        sampler_lp = student_scorer([seqs[i][0] for i in rows], [seqs[i][1] for i in rows])
    batch = RolloutBatch(
        prompt_ids_B_T=[list(c.prompt_ids) for c in sel],
        completion_ids_B_T=[list(c.completion_ids) for c in sel],
        sampler_logprobs_B_T=sampler_lp,
        loss_mask_B_T=[[1] * len(c.completion_ids) for c in sel],
        policy_versions_B=[c.policy_version for c in sel],
        prompt_index_B=[records[c.prompt_index].index for c in sel],
        finish_reasons_B=[c.finish_reason for c in sel],
        teacher_logprobs_B_T=t_lp,
        teacher_top_ids_B_T_K=t_ids if need_topk else None,
        teacher_top_logprobs_B_T_K=t_tlp if need_topk else None,
        answers_B=[records[c.prompt_index].answer for c in sel],
        rewards_B=None if rewards is None else [rewards[i] for i in rows],
        reward_advantages_B=None if reward_advantages is None else [reward_advantages[i] for i in rows],
    )
    # Sampled per-token KL: on student samples sum(lp_student - lp_teacher) /
    # tokens, the quantity on-policy distillation drives down; on teacher
    # samples the same sum is minus the forward KL, logged with its sign fixed.
    n = sum(len(t) for t in t_lp)
    s_minus_t = sum(s - t for sl, tl in zip(sampler_lp, t_lp, strict=True)
                    for s, t in zip(sl, tl, strict=True)) / max(1, n)
    if sample_from == "teacher":
        metrics["teacher/forward_kl"] = -s_minus_t
    else:
        metrics["teacher/reverse_kl"] = s_minus_t
        if names is not None and names[rows[0]] is not None:  # several teachers: each one's share
            metrics.update(per_teacher_kl([names[i] for i in rows], sampler_lp, t_lp))
    metrics["teacher/mean_logprob"] = sum(sum(t) for t in t_lp) / max(1, n)
    return batch, metrics


def evaluate(pool, teacher, records: list, ecfg: EvalConfig, tokenizer, seed: int) -> dict:
    """Held-out evaluation of the student.

    eval/reverse_kl: the student's completions sampled at temperature 1 with
    no top-p/top-k (its own distribution), scored by the teacher at
    temperature 1: sum(lp_student - lp_teacher) / tokens, a one-sample-per-
    token estimate of KL(student || teacher) at T = 1, whatever temperatures
    the run trains with (so runs at different settings compare).

    eval/accuracy: the mean eval.grader score (cluster/task_fns.py) of
    completions sampled at eval.temperature, no top-p/top-k: the same
    completions when it is 1, a second pass otherwise (greedy, one per
    prompt, at 0). Graded records: all of them with a grader set; with
    eval.grader null the records that have an `answer` (by `exact`), and no
    accuracy when none has one."""
    t0 = time.monotonic()
    recs = records[: ecfg.num_prompts]
    if not recs:
        return {}

    def sample(temperature: float, n: int) -> list[Completion]:
        return [c for per_prompt in pool.generate([r.prompt_ids for r in recs], n=n, seed=seed,
                                                  temperature=temperature, top_p=1.0, top_k=0)
                for c in per_prompt]

    comps = sample(1.0, ecfg.samples_per_prompt)
    scored = [c for c in comps if c.completion_ids]
    t_seqs, names = teacher_sequences(scored, recs)
    if t_seqs is None:
        res = teacher.score([(list(c.prompt_ids) + list(c.completion_ids), len(c.prompt_ids)) for c in scored],
                            top_k=0, temperature=1.0)
    else:
        res = teacher.score(t_seqs, top_k=0, temperature=1.0, teachers=names,
                            labels=[recs[c.prompt_index].where for c in scored])
    kl_sum, n_tok, seq_kls = 0.0, 0, []
    by_teacher: list[tuple[str, list[float], list[float]]] = []
    for j, (c, lp) in enumerate(zip(scored, res.logprobs, strict=True)):
        if lp is None:
            continue
        d = sum(s - t for s, t in zip(c.sampler_logprobs, lp, strict=True))
        kl_sum += d
        n_tok += len(lp)
        seq_kls.append(d)
        if names is not None and names[j] is not None:
            by_teacher.append((names[j], c.sampler_logprobs, lp))
    out: dict[str, Any] = {
        "eval/reverse_kl": kl_sum / max(1, n_tok),
        "eval/reverse_kl_per_seq": sum(seq_kls) / max(1, len(seq_kls)),
        "eval/mean_completion_len": sum(len(c.completion_ids) for c in comps) / max(1, len(comps)),
        "eval/prompts": len(recs),
    }
    if by_teacher:  # several teachers: each one's share, and the tokens it scored
        out.update(per_teacher_kl(*zip(*by_teacher, strict=True), prefix="eval/teacher"))
        for name, _, lp in by_teacher:
            out[f"eval/teacher/{name}/tokens"] = out.get(f"eval/teacher/{name}/tokens", 0) + len(lp)
    graded = [i for i, r in enumerate(recs) if ecfg.grader is not None or r.answer is not None]
    if graded:
        if ecfg.temperature != 1.0:
            comps = sample(ecfg.temperature, 1 if ecfg.temperature == 0 else ecfg.samples_per_prompt)
        grader = resolve_grader(ecfg.grader)
        spec = ecfg.grader or "exact"
        keep = set(graded)
        scores = [call(grader, "eval.grader", spec, tokenizer.decode(c.completion_ids, skip_special_tokens=True),
                       recs[c.prompt_index], unit_interval=True) for c in comps if c.prompt_index in keep]
        out["eval/accuracy"] = sum(scores) / len(scores)
        out["eval/graded"] = len(scores)
    out["time/eval_s"] = time.monotonic() - t0
    return out


def teacher_sequences(comps: list[Completion], records: list
                      ) -> tuple[list[tuple[list[int], int]] | None, list[str | None] | None]:
    """What the teacher scores for each completion, and which teacher
    (rollout/teacher_routes.py sets both on the records at start-up): the
    record's teacher prefix (`teacher_prefix_ids`, else the student's prompt)
    followed by the SAME completion ids, scored from start = len(prefix), so
    the logprobs align with the completion tokens unchanged; and the record's
    teacher (`teacher`, None with one teacher). (None, None) when every record
    has the one teacher and the student's prompt: the plain client call."""
    recs = [records[c.prompt_index] for c in comps]
    if all(getattr(r, "teacher", None) is None and getattr(r, "teacher_prefix_ids", None) is None for r in recs):
        return None, None
    seqs = []
    for c, r in zip(comps, recs, strict=True):
        prefix = r.teacher_prefix_ids if r.teacher_prefix_ids is not None else c.prompt_ids
        seqs.append((list(prefix) + list(c.completion_ids), len(prefix)))
    return seqs, [r.teacher for r in recs]


def completion_table(batch: RolloutBatch, tokenizer, loss_cfg: LossConfig, k: int) -> tuple[list[str], list[list]]:
    """A few samples with their per-token advantages
    A_t = -kl_coef (lp_s - lp_t) + reward.coef (R - b) (undiscounted), and
    their reward R when the run has one."""
    cols = ["prompt", "completion", "policy_version", "reward", "mean_advantage", "tokens_and_advantages"]
    rows = []
    for b in range(min(k, len(batch))):
        ids = batch.completion_ids_B_T[b]
        bonus = batch.reward_advantages_B[b] if batch.reward_advantages_B is not None else 0.0
        adv = [-loss_cfg.kl_coef * (s - t) + bonus for s, t in
               zip(batch.sampler_logprobs_B_T[b], batch.teacher_logprobs_B_T[b], strict=True)]
        toks = " ".join(f"{tokenizer.decode([i])!r}:{a:+.2f}" for i, a in zip(ids, adv, strict=True))
        rows.append([tokenizer.decode(batch.prompt_ids_B_T[b]), tokenizer.decode(ids), batch.policy_versions_B[b],
                     batch.rewards_B[b] if batch.rewards_B is not None else None, sum(adv) / max(1, len(adv)), toks])
    return cols, rows
