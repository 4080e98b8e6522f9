"""The user's task functions: the eval grader (`eval.grader`) and the training
reward (`reward.fn`), and the group baseline that turns rewards into
advantages.

Both are called in the driver, once per completion, as

    fn(completion: str, record: dict) -> float

`completion` is the decoded completion (special tokens skipped); `record` is
the prompt's record as it is in the data file (`prompt` or `messages`,
`answer` when it has one, every other field). A grader returns a score in
[0, 1] (`eval/accuracy` is their mean); a reward returns any finite number.
A function that raises, or returns something else, stops the run with a
`TaskFunctionError` naming the config key, the function and the record
(file and line/row): a broken grader never reads as a score of 0.

Specs: a built-in grader name, or `"package.module:function"` (imported at
config validation, so a typo fails before any actor starts). Built-in graders
(the math conventions; each compares with the record's `answer`):

    exact        the stripped completion equals the stripped answer
    last_number  the last number in the completion equals the answer's
                 number (numeric compare; `1,000` and `1000.0` equal `1000`)
    boxed        the content of the last \\boxed{...} (nested braces allowed)
                 equals the stripped answer (string compare, numeric when
                 both are numbers)

With `eval.grader` null, records with an `answer` are graded by `exact`, and
without answers no accuracy is logged.

    python -c "from cluster.task_fns import resolve; print(resolve('boxed', 'eval.grader'))"
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

TaskFn = Callable[[str, dict], float]

# "package.module:function" (dotted module path, one attribute name).
_SPEC_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


class TaskFunctionError(ValueError):
    """A grader or reward function failed on a record. Pickles (crosses Ray)."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)

    def __reduce__(self):
        return (TaskFunctionError, (self.message,))


# --------------------------------------------------------------------------
# Built-in graders
# --------------------------------------------------------------------------

def _answer(record: dict, grader: str) -> str:
    if record.get("answer") is None:
        raise KeyError(f"the built-in grader {grader!r} compares with the record's 'answer' field, and this record "
                       "has none")
    return str(record["answer"]).strip()


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def exact(completion: str, record: dict) -> float:
    """1.0 when the stripped completion equals the stripped answer."""
    return float(completion.strip() == _answer(record, "exact"))


def last_number(completion: str, record: dict) -> float:
    """1.0 when the last number in the completion equals the answer's number."""
    answer = _answer(record, "last_number")
    want = _to_number(answer)
    if want is None:
        found = _NUMBER_RE.findall(answer)
        if not found:
            raise ValueError(f"the built-in grader 'last_number' needs a numeric answer, got {answer!r}")
        want = _to_number(found[-1])
    got = _NUMBER_RE.findall(completion)
    return float(bool(got) and _to_number(got[-1]) == want)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the completion was cut off inside the box


def boxed(completion: str, record: dict) -> float:
    """1.0 when the last \\boxed{...} of the completion holds the answer."""
    answer = _answer(record, "boxed")
    got = last_boxed(completion)
    if got is None:
        return 0.0
    got = got.strip()
    if got == answer:
        return 1.0
    a, b = _to_number(got), _to_number(answer)
    return float(a is not None and a == b)


BUILTIN_GRADERS: dict[str, TaskFn] = {"exact": exact, "last_number": last_number, "boxed": boxed}


# --------------------------------------------------------------------------
# Resolving specs
# --------------------------------------------------------------------------

def resolve(spec: str, key: str, builtins: dict[str, TaskFn] | None = None) -> TaskFn:
    """The function named by `spec` (a built-in name or "package.module:function").
    Raises ValueError naming the config `key`, the spec and the fix."""
    builtins = builtins or {}
    if spec in builtins:
        return builtins[spec]
    names = f"one of {', '.join(builtins)} or " if builtins else ""
    if not _SPEC_RE.match(spec):
        raise ValueError(f"{key}: {spec!r} is not {names}a \"package.module:function\" path (e.g. "
                         f"{key}=my_task.grading:score)")
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module: name it
        raise ValueError(f"{key}: cannot import module {mod_name!r} of {spec!r} ({type(e).__name__}: {e}); "
                         "make it importable from the driver (install it, or run from the directory that "
                         "holds it)") from e
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        what = "has no attribute" if fn is None else "has a non-callable"
        raise ValueError(f"{key}: module {mod_name!r} {what} {fn_name!r}; {key} must name a function "
                         "f(completion: str, record: dict) -> float")
    return fn


def resolve_grader(spec: str | None) -> TaskFn:
    """`eval.grader`'s function; null means `exact` (applied to records with an answer)."""
    return resolve(spec or "exact", "eval.grader", BUILTIN_GRADERS)


def resolve_reward(spec: str) -> TaskFn:
    return resolve(spec, "reward.fn")


# --------------------------------------------------------------------------
# Calling them
# --------------------------------------------------------------------------

def record_dict(rec) -> dict[str, Any]:
    """A `rollout.prompts.PromptRecord` as the row it was read from: every
    field of the data file, with `prompt`/`messages`/`answer` where present."""
    out = dict(rec.metadata)
    if rec.text is not None:
        out["prompt"] = rec.text
    if rec.messages is not None:
        out["messages"] = rec.messages
    if rec.answer is not None:
        out["answer"] = rec.answer
    return out


def call(fn: TaskFn, key: str, spec: str, completion: str, rec, *, unit_interval: bool) -> float:
    """fn(completion, record) as a float; any failure is a TaskFunctionError
    naming `key`, `spec` and the record."""
    where = getattr(rec, "where", "") or f"record {getattr(rec, 'index', '?')}"
    shown = completion if len(completion) <= 120 else completion[:120] + "..."
    try:
        value = fn(completion, record_dict(rec))
    except Exception as e:  # noqa: BLE001 - the user's code: report it with the record
        raise TaskFunctionError(f"{key} {spec!r} raised {type(e).__name__}: {e} on the record at {where} "
                                f"(completion {shown!r})") from e
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TaskFunctionError(f"{key} {spec!r} returned {value!r} ({type(value).__name__}) on the record at "
                                f"{where} (completion {shown!r}); it must return a finite number"
                                + (" in [0, 1]" if unit_interval else ""))
    value = float(value)
    if unit_interval and not 0.0 <= value <= 1.0:
        raise TaskFunctionError(f"{key} {spec!r} returned {value} on the record at {where} (completion "
                                f"{shown!r}); a grader's score must be in [0, 1]")
    return value


def group_advantages(rewards: Sequence[float], groups: Sequence[int], coef: float) -> list[float]:
    """coef * (R_i - mean of R over the samples of i's group): the reward
    advantage of each completion, with the group (same prompt) mean as the
    baseline (GRPO's and tinker-cookbook's baseline, without division by the
    group's std)."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for r, g in zip(rewards, groups, strict=True):
        total[g] = total.get(g, 0.0) + r
        count[g] = count.get(g, 0) + 1
    return [coef * (r - total[g] / count[g]) for r, g in zip(rewards, groups, strict=True)]
