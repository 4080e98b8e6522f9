"""The user's own task through the real driver:
vLLM CPU samplers in Ray actors, the session's teacher_server over HTTP,
DeepSpeed on gloo.

- plain RL (loss.kl_coef=0, reward.coef=1) with a reward and a grader that
  the driver imports by dotted path from a user module
  (tests/fixtures/user_task.py): the reward rises, and eval/accuracy is the
  user grader's mean over a greedy pass;
- reward.coef=0 with a reward.fn set is bitwise the run without a reward
  section: the same losses, gradient norms and final weights, and the
  reward is logged beside them.

    flock /tmp/opd-heavy.lock .venv/bin/pytest tests/e2e/test_task.py -q
"""

from __future__ import annotations

import json
import math

import pytest

from tests.e2e.test_cluster import run_demo

REWARD = "reward.fn=tests.fixtures.user_task:digit_fraction"


def _heldout_answers(n: int) -> list[str]:
    """The answers of the first n held-out records of the demo's data, in the order the driver evaluates them."""
    from cluster.tiny_data import resolve_data

    _, eval_path = resolve_data("tiny:arithmetic", None)
    with open(eval_path) as f:
        return [json.loads(line)["answer"] for line in f if line.strip()][:n]


@pytest.mark.slow
def test_reward_rises_under_plain_rl_with_a_user_grader(ray_session, teacher_server, tmp_path):
    run_dir = tmp_path / "rl"
    steps, n_eval = 8, 16
    rows = run_demo(run_dir, teacher_server, steps,
                    [REWARD, "reward.coef=1", "loss.kl_coef=0", "learner.lr=5e-3", f"eval.every_steps={steps}",
                     f"eval.num_prompts={n_eval}", "eval.samples_per_prompt=2", "eval.temperature=0",
                     "eval.grader=tests.fixtures.user_task:answer_width"])
    trained = [r for r in rows if "learner/loss" in r]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    mean = [r["reward/mean"] for r in trained]
    std = [r["reward/std"] for r in trained]
    n = trained[0]["rollout/completions"]  # 8 prompts x 4 samples per step
    # The reward rises: the last two steps' mean reward beats the first two's
    # by more than 4 standard errors of that difference (each side a mean
    # over 2n completions with the logged per-completion std).
    first, last = (mean[0] + mean[1]) / 2, (mean[-2] + mean[-1]) / 2
    se = math.sqrt((std[0] ** 2 + std[1] ** 2) / 2 / (2 * n) + (std[-2] ** 2 + std[-1] ** 2) / 2 / (2 * n))
    assert last - first > 4 * se, (mean, std)
    # The user's grader, imported by dotted path, scored every held-out
    # completion of a greedy pass (one per prompt at eval.temperature=0,
    # whatever eval.samples_per_prompt): its score is the answer's width / 4.
    answers = _heldout_answers(n_eval)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, steps]
    for r in evals:
        assert r["eval/graded"] == n_eval
        assert r["eval/accuracy"] == pytest.approx(sum(len(a) / 4 for a in answers) / n_eval, abs=1e-12)
        assert r["eval/reverse_kl"] > 0  # measured on T=1 samples, apart from the greedy pass


@pytest.mark.slow
def test_reward_coef_0_is_bitwise_the_run_without_a_reward(ray_session, teacher_server, tmp_path):
    """Two runs from the same seed: without a reward section, and with a
    reward.fn at reward.coef=0. Sampling (seeded per prompt), teacher scoring
    and training are deterministic on this stack, so the runs are equal bit
    for bit: every step's loss and gradient norm, and the exported weights."""
    from safetensors.torch import load_file

    common = ["learner.lr=2e-3", "eval.every_steps=0"]
    runs = {}
    for name, extra in (("plain", []), ("reward0", [REWARD, "reward.coef=0"])):
        run_dir = tmp_path / name
        runs[name] = ([r for r in run_demo(run_dir, teacher_server, 3, common + extra) if "learner/loss" in r],
                      load_file(run_dir / "final" / "model.safetensors"))
    (rows_a, w_a), (rows_b, w_b) = runs["plain"], runs["reward0"]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    for a, b in zip(rows_a, rows_b, strict=True):
        for key in ("teacher/reverse_kl", "learner/loss", "learner/grad_norm", "learner/student_logprob"):
            assert a[key] == b[key], (key, a["step"], a[key], b[key])
        assert "reward/mean" not in a and 0.0 <= b["reward/mean"] <= 1.0 and "reward/std" in b
    assert w_a.keys() == w_b.keys()
    import torch

    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
