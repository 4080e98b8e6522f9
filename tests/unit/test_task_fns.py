"""The user's task functions and the temperature rule: built-in graders,
resolving "package.module:function" specs, the errors a broken grader or
reward raises (naming the function and the record), config
validation (importability, the temperature rule, the reward's requirements;
exit code 2 before anything starts), and what the held-out evaluation samples
and scores at which temperature (cluster/stages.py `evaluate`, with a fake
pool and teacher that record the calls).

    .venv/bin/python -m pytest tests/unit/test_task_fns.py -q
"""

from __future__ import annotations

import pickle
import types

import pytest

from cluster.config import ConfigError, EvalConfig, config_from_dict
from cluster.task_fns import (BUILTIN_GRADERS, TaskFunctionError, boxed, call, exact, last_boxed, last_number,
                              record_dict, resolve_grader, resolve_reward)
from rollout.prompts import PromptRecord

REQUIRED = {"student": {"model": "org/student"}, "teacher": {"model": "org/teacher"}, "data": {"train": "p.jsonl"}}


def _cfg(*overrides):
    import copy

    return config_from_dict(copy.deepcopy(REQUIRED), list(overrides))


def _problems(*overrides):
    with pytest.raises(ConfigError) as ei:
        _cfg(*overrides)
    return ei.value.problems


# ------------------------------------------------------------ built-in graders

@pytest.mark.parametrize("completion,answer,want", [
    ("81", "81", 1.0), ("  81\n", " 81 ", 1.0), ("81\nmore", "81", 0.0), ("<think>x</think>81", "81", 0.0),
    ("", "0", 0.0), ("42", 42, 1.0),
])
def test_exact(completion, answer, want):
    assert exact(completion, {"answer": answer}) == want


@pytest.mark.parametrize("completion,answer,want", [
    ("<think>2+2 is 4, no 5</think> The answer is 4.", "4", 1.0),
    ("so 1,000 apples", "1000", 1.0), ("x = 12.50", "12.5", 1.0), ("-3 degrees", "-3", 1.0),
    ("7 then 8", "7", 0.0), ("no digits here", "3", 0.0), ("", "3", 0.0),
    ("answer: 81", "#### 81", 1.0),  # GSM8K-style answers: their last number
])
def test_last_number(completion, answer, want):
    assert last_number(completion, {"answer": answer}) == want


@pytest.mark.parametrize("completion,answer,want", [
    ("so \\boxed{42}.", "42", 1.0), ("\\boxed{1} then \\boxed{2}", "2", 1.0), ("\\boxed{1} then \\boxed{2}", "1", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0), ("\\boxed{ 3.0 }", "3", 1.0), ("42", "42", 0.0),
    ("\\boxed{4", "4", 0.0),  # cut off inside the box
])
def test_boxed(completion, answer, want):
    assert boxed(completion, {"answer": answer}) == want


def test_last_boxed_keeps_nested_braces():
    assert last_boxed("a \\boxed{x^{2}+\\sqrt{y}} b") == "x^{2}+\\sqrt{y}"
    assert last_boxed("none") is None


def test_builtin_graders_need_an_answer():
    for name, fn in BUILTIN_GRADERS.items():
        with pytest.raises(KeyError, match=f"'{name}'.*'answer'"):
            fn("1", {"prompt": "q"})


# ------------------------------------------------------------------- resolving

def test_resolve_builtins_and_dotted_paths():
    from tests.fixtures import user_task

    assert resolve_grader(None) is exact  # null grades answers by exact match
    assert resolve_grader("boxed") is boxed
    assert resolve_grader("tests.fixtures.user_task:answer_width") is user_task.answer_width
    assert resolve_reward("tests.fixtures.user_task:digit_fraction") is user_task.digit_fraction
    from cluster.tiny_data import first_line

    assert resolve_grader("cluster.tiny_data:first_line") is first_line


@pytest.mark.parametrize("spec,match", [
    ("exactly", "is not one of exact, last_number, boxed or a \"package.module:function\""),
    ("mod.fn", "package.module:function"), ("a:b:c", "package.module:function"), (": :", "package.module:function"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
    ("tests.fixtures.user_task:nope", "has no attribute 'nope'"),
    ("tests.fixtures.user_task:NOT_A_FUNCTION", "non-callable 'NOT_A_FUNCTION'"),
])
def test_resolve_errors_name_the_key_and_the_fix(spec, match):
    with pytest.raises(ValueError, match=match) as ei:
        resolve_grader(spec)
    assert str(ei.value).startswith("eval.grader: ")


def test_reward_has_no_builtins():
    with pytest.raises(ValueError, match=r"^reward.fn: 'exact' is not a \"package.module:function\""):
        resolve_reward("exact")


# --------------------------------------------------------------------- calling

def _rec(**kw):
    base = dict(index=3, prompt_ids=[1, 2], text="2+2=", answer="4", metadata={"source": "gsm"},
                where="data/eval.jsonl line 4")
    base.update(kw)
    return PromptRecord(**base)


def test_record_dict_is_the_data_row():
    assert record_dict(_rec()) == {"prompt": "2+2=", "answer": "4", "source": "gsm"}
    chat = _rec(text=None, messages=[{"role": "user", "content": "hi"}], answer=None, metadata={})
    assert record_dict(chat) == {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("fn_name,match", [
    ("needs_missing_field", "raised KeyError: 'solution' on the record at data/eval.jsonl line 4"),
    ("returns_text",
     "returned 'correct' \\(str\\) on the record at data/eval.jsonl line 4.*a finite number in \\[0, 1\\]"),
    ("returns_two", "returned 2.0 on the record at data/eval.jsonl line 4.*must be in \\[0, 1\\]"),
])
def test_a_broken_grader_is_an_error_naming_grader_and_record(fn_name, match):
    spec = f"tests.fixtures.user_task:{fn_name}"
    with pytest.raises(TaskFunctionError, match=match) as ei:
        call(resolve_grader(spec), "eval.grader", spec, "4", _rec(), unit_interval=True)
    assert str(ei.value).startswith(f"eval.grader {spec!r}")
    again = pickle.loads(pickle.dumps(ei.value))  # may cross a Ray actor boundary
    assert str(again) == str(ei.value)


def test_reward_values_any_finite_number_but_not_nan():
    spec = "tests.fixtures.user_task:returns_two"
    assert call(resolve_reward(spec), "reward.fn", spec, "x", _rec(), unit_interval=False) == 2.0
    assert call(lambda c, r: True, "reward.fn", "m:f", "x", _rec(), unit_interval=False) == 1.0
    with pytest.raises(TaskFunctionError, match="returned nan"):
        call(lambda c, r: float("nan"), "reward.fn", "m:f", "x", _rec(), unit_interval=False)
    with pytest.raises(TaskFunctionError, match="returned None"):
        call(lambda c, r: None, "reward.fn", "m:f", "x", _rec(), unit_interval=False)


# ---------------------------------------------------------------------- config

def test_demo_config_names_the_arithmetic_grader():
    from pathlib import Path

    from cluster.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    assert cfg.eval.grader == "cluster.tiny_data:first_line"
    assert cfg.reward.fn is None and cfg.reward.coef == 0.0


def test_config_checks_importability_of_grader_and_reward():
    probs = _problems("eval.grader=no_such_module_xyz:grade", "reward.fn=tests.fixtures.user_task:nope")
    assert any(p.startswith("eval.grader: cannot import module 'no_such_module_xyz'") for p in probs)
    assert any(p.startswith("reward.fn: module 'tests.fixtures.user_task' has no attribute 'nope'") for p in probs)
    cfg = _cfg("eval.grader=last_number", "reward.fn=tests.fixtures.user_task:digit_fraction", "reward.coef=0.5")
    assert cfg.eval.grader == "last_number" and cfg.reward.coef == 0.5


def test_reward_requirements():
    assert any(p.startswith("reward.coef: 1.0 but reward.fn is null") for p in _problems("reward.coef=1"))
    fn = "reward.fn=tests.fixtures.user_task:digit_fraction"
    probs = _problems(fn, "reward.coef=1", "loss.kind=forward_kl_topk", "teacher.top_k=4")
    assert any("with loss.kind=forward_kl_topk: the reward advantage enters the policy-gradient loss only" in p
               for p in probs)
    probs = _problems(fn, "reward.coef=1", "rollout.samples_per_prompt=1")
    assert any("rollout.samples_per_prompt=1" in p and ">= 2" in p for p in probs)
    # Logged only (coef 0): any loss, any number of samples.
    _cfg(fn, "loss.kind=sft", "rollout.samples_per_prompt=1")
    # Plain RL.
    assert _cfg(fn, "reward.coef=1", "loss.kl_coef=0").loss.kl_coef == 0.0


def test_temperature_rule():
    # reverse_kl: the teacher is scored at the sampling temperature.
    probs = _problems("rollout.temperature=0.7")
    assert any(p.startswith("teacher.temperature (1.0) differs from rollout.temperature (0.7) with "
                            "loss.kind=reverse_kl") and "teacher.temperature=0.7" in p for p in probs)
    assert _cfg("rollout.temperature=0.7", "teacher.temperature=0.7").teacher.temperature == 0.7
    # Greedy sampling has no density to distil on.
    assert any(p.startswith("rollout.temperature: 0 (greedy) with loss.kind=reverse_kl") for p in
               _problems("rollout.temperature=0", "teacher.temperature=1"))
    # The top-k losses and sft fit the student at T=1: the sampling
    # temperature only picks the states (greedy included), and a tempered
    # teacher is a deliberate target.
    _cfg("loss.kind=forward_kl_topk", "teacher.top_k=4", "rollout.temperature=0", "teacher.temperature=0.5")
    _cfg("loss.kind=sft", "rollout.temperature=0.6")
    # eval.temperature is the accuracy temperature: greedy is fine, negative is not.
    assert _cfg("eval.temperature=0").eval.temperature == 0.0
    assert any(p.startswith("eval.temperature: -1.0 must be >= 0") for p in _problems("eval.temperature=-1"))


def test_bad_task_fns_exit_2_before_anything_starts(tmp_path, capsys):
    from cluster.train import main

    rc = main(["--config", "configs/demo.yaml", f"run.dir={tmp_path / 'run'}", "eval.grader=no_such_module_xyz:f",
               "rollout.temperature=0.5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "eval.grader: cannot import module 'no_such_module_xyz'" in err and "teacher.temperature (1.0)" in err
    assert not (tmp_path / "run").exists()  # nothing was started or written


# ------------------------------------------------------------ the eval stage

class _FakePool:
    """Records generate() calls; completion = the prompt's answer digits
    (prompt_ids carry them), sampler logprobs -1 per token."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, n, seed, temperature, top_p, top_k):
        from rollout.types import Completion

        self.calls.append(dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k))
        return [[Completion(prompt_index=p, sample_index=s, prompt_ids=[1], completion_ids=list(ids[1:]),
                            sampler_logprobs=[-1.0] * (len(ids) - 1), finish_reason="stop", policy_version=0)
                 for s in range(n)] for p, ids in enumerate(prompts)]


class _FakeTeacher:
    def __init__(self):
        self.calls = []

    def score(self, seqs, top_k, temperature):
        self.calls.append(dict(top_k=top_k, temperature=temperature))
        return types.SimpleNamespace(logprobs=[[-1.5] * (len(ids) - start) for ids, start in seqs])


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i) for i in ids)


def _eval_records(answers):
    # prompt_ids = [1, *digits of the "model's" completion]
    return [PromptRecord(index=i, prompt_ids=[1, *[int(ch) for ch in out]], text=f"q{i}", answer=ans,
                         where=f"e.jsonl line {i + 1}") for i, (out, ans) in enumerate(answers)]


def test_eval_kl_is_at_temperature_1_and_accuracy_at_eval_temperature():
    from cluster.stages import evaluate

    recs = _eval_records([("12", "12"), ("7", "8"), ("30", "30")])
    pool, teacher = _FakePool(), _FakeTeacher()
    m = evaluate(pool, teacher, recs, EvalConfig(num_prompts=3, samples_per_prompt=2, temperature=0.0), _Tok(), seed=1)
    # KL pass: the student's own distribution at T=1 (no truncation), the
    # teacher at T=1; then a greedy pass (one sample per prompt) for accuracy.
    assert pool.calls == [dict(n=2, temperature=1.0, top_p=1.0, top_k=0),
                          dict(n=1, temperature=0.0, top_p=1.0, top_k=0)]
    assert teacher.calls == [dict(top_k=0, temperature=1.0)]
    assert m["eval/reverse_kl"] == pytest.approx(-1.0 - -1.5)
    assert m["eval/accuracy"] == pytest.approx(2 / 3) and m["eval/graded"] == 3

    # eval.temperature 1: the KL completions are the graded ones (one pass).
    pool = _FakePool()
    m = evaluate(pool, _FakeTeacher(), recs, EvalConfig(num_prompts=3, samples_per_prompt=2), _Tok(), seed=1)
    assert len(pool.calls) == 1 and m["eval/graded"] == 6 and m["eval/accuracy"] == pytest.approx(2 / 3)


def test_eval_accuracy_only_with_answers_or_a_grader():
    from cluster.stages import evaluate

    recs = _eval_records([("12", None), ("7", None)])
    m = evaluate(_FakePool(), _FakeTeacher(), recs, EvalConfig(num_prompts=2), _Tok(), seed=0)
    assert "eval/accuracy" not in m and "eval/reverse_kl" in m
    # A grader of its own scores every record (this one needs no answer... but
    # reads it: a KeyError naming the grader and the record).
    with pytest.raises(TaskFunctionError, match="eval.grader 'tests.fixtures.user_task:answer_width' raised "
                                                "KeyError: 'answer' on the record at e.jsonl line 1"):
        evaluate(_FakePool(), _FakeTeacher(), recs, EvalConfig(num_prompts=2,
                 grader="tests.fixtures.user_task:answer_width"), _Tok(), seed=0)
    # Mixed: only the records with an answer are graded by the default.
    recs = _eval_records([("12", "12"), ("7", None), ("5", "6")])
    m = evaluate(_FakePool(), _FakeTeacher(), recs, EvalConfig(num_prompts=3), _Tok(), seed=0)
    assert m["eval/graded"] == 2 and m["eval/accuracy"] == pytest.approx(0.5)
