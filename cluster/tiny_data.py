"""Built-in tiny datasets with exact answers and a grader, built locally.

`tiny:arithmetic` (the demo's default `data.train`): multi-digit addition
prompts such as "23+58=" with the answer "81". Records are JSONL lines
`{"prompt": ..., "answer": ...}`; the train and held-out sets are disjoint.
Graded by `first_line` (the first line of the completion equals the answer),
which configs/demo.yaml names as its `eval.grader`.

`tiny:arithmetic-fixed`: the same problems (same train/held-out split) written
at fixed width, operands zero-padded to 2 digits and the answer to 3:
"07+58=" -> "065". Every answer digit then sits at the same offset from the
operand digits it depends on, which a tiny transformer learns in a few hundred
SFT steps instead of thousands (recipes/ uses it for the demo).

    python -m cluster.tiny_data            # write the files, print their paths
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from cluster.tiny_models import cache_dir

TINY_DATA_PREFIX = "tiny:"
TASKS = ("arithmetic", "arithmetic-fixed")


def format_problem(a: int, b: int, max_digits: int = 2, fixed_width: bool = False) -> dict:
    """One record; fixed width zero-pads operands to `max_digits` digits and
    the answer to `max_digits + 1`."""
    if fixed_width:
        return {"prompt": f"{a:0{max_digits}d}+{b:0{max_digits}d}=", "answer": f"{a + b:0{max_digits + 1}d}"}
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def arithmetic_records(n: int, seed: int, max_digits: int = 2, fixed_width: bool = False) -> list[dict]:
    """`n` distinct addition problems of up to `max_digits` digits per operand
    (the same problems, in the same order, for either format)."""
    rng = random.Random(seed)
    seen, out = set(), []
    hi = 10 ** max_digits - 1
    while len(out) < n:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append(format_problem(a, b, max_digits, fixed_width))
    return out


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file written by `_write_jsonl_atomic`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_task(name: str, n_train: int = 4000, n_eval: int = 200, seed: int = 1234) -> tuple[Path, Path]:
    """Write (or reuse) the train and eval JSONL files of a built-in task."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in dataset tiny:{name}; valid: {', '.join('tiny:' + t for t in TASKS)}")
    d = cache_dir() / "data" / f"{name}-{n_train}-{n_eval}-{seed}"
    train, evalp = d / "train.jsonl", d / "eval.jsonl"
    if train.exists() and evalp.exists():
        return train, evalp
    recs = arithmetic_records(n_train + n_eval, seed, fixed_width=name == "arithmetic-fixed")
    _write_jsonl_atomic(evalp, recs[n_train:])
    _write_jsonl_atomic(train, recs[:n_train])
    return train, evalp


def resolve_data(train: str, eval_: str | None) -> tuple[str, str | None]:
    """Resolve `tiny:TASK` data references to files; paths pass through. A
    `tiny:` train set with no eval set gets the task's own held-out file."""
    if train.startswith(TINY_DATA_PREFIX):
        tr, ev = build_task(train[len(TINY_DATA_PREFIX):])
        train = str(tr)
        if eval_ is None:
            eval_ = str(ev)
    if eval_ is not None and eval_.startswith(TINY_DATA_PREFIX):
        eval_ = str(build_task(eval_[len(TINY_DATA_PREFIX):])[1])
    return train, eval_


def grade(completion_text: str, answer) -> float:
    """Exact match of the completion's first line (stripped) with the answer."""
    if answer is None:
        raise ValueError("grade() needs an answer")
    first = completion_text.strip().split("\n", 1)[0].strip()
    return float(first == str(answer).strip())


def first_line(completion: str, record: dict) -> float:
    """The arithmetic tasks' grader as an `eval.grader` (configs/demo.yaml:
    `eval.grader: cluster.tiny_data:first_line`): `grade` against the record's
    `answer`."""
    return grade(completion, record["answer"])


if __name__ == "__main__":
    print(*build_task("arithmetic"), sep="\n")
