"""Addition written least-significant digit first with an explicit carry per
digit: a task where a student's errors compound and a teacher can correct them.

    prompt      "47291+83154="            (n = 5 digits per operand, zero-padded)
    completion  "50 41 40 01 31"          (+ EOS)

Step i (i = 0 is the units) writes two characters: the sum digit
d_i = (a_i + b_i + c_{i-1}) mod 10 and the carry c_i = (a_i + b_i + c_{i-1})
div 10; steps are separated by one space, so a completion is 3n - 1
characters (+ EOS: 3n tokens; the tiny tokenizer has one token per character,
15 tokens for n = 5, 18 for n = 6). The last carry is the result's top digit:
the answer is sum_i d_i 10^i + c_{n-1} 10^n.

Why this task. The written carry is the only state passed from one step to
the next, so a model that reads its own carry to compute the next digit turns
one wrong carry into a wrong answer: errors compound along the chain, and the
chain length is the knob (`n_digits`). A teacher trained also on *recovery
traces* (a carry deliberately written wrong, with no loss on that token, and
every later step computed with the true carry) puts its mass on the correct
next digit after a wrong carry: on the student's own mistakes it answers with
the correction, which on-policy distillation sees and SFT on the teacher's
clean traces never does ("On-Policy Distillation" (Thinking Machines Lab,
2025), section on compounding errors; GKD (Agarwal et al., 2024)).

Grading (`grade_record`, an `eval.grader`): the completion's first line must
have the trace format (n steps of two digits, separated by single spaces); its
value must equal a + b. The intermediate carries are scratch: a wrong carry
from which the next step recovers still scores 1. `trace_errors` breaks a
completion down (wrong carries, wrong digits, recoveries) for the report.

The long-tail variant (`operators=K`): a prompt starts with an operator name
("b:14 95 21="), and operator k maps every digit of b through its own fixed
permutation of 0-9 before the addition, so a model must learn K digit tables
besides the carry. Operators drawn Zipf(1) (`operator_weights`) make the
frequent tables cheap and the rare ones expensive: the long tail behind a
log-linear SFT curve in data, the premise of the compute comparison of
"On-Policy Distillation" (Thinking Machines Lab, 2025). A teacher is trained
with operators drawn uniformly, so it knows the tail.

Everything here is pure Python (no torch); the data files are written under
`$OPD_CACHE_DIR/data/` like cluster/tiny_data.py's.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from pathlib import Path

from cluster.tiny_data import _write_jsonl_atomic
from cluster.tiny_models import cache_dir

# Digits per operand of the default task (15 completion tokens with EOS).
DEFAULT_DIGITS = 5
# Held-out prompts of the default task (issue: "at least 500").
DEFAULT_EVAL = 500
# The held-out set's seed; training streams use other seeds and skip held-out pairs.
EVAL_SEED = 4242
# Held-out problems kept out of every training stream: the test set
# (`eval_problems(n, 500)`, what the driver evaluates) and the validation set
# after it (`validation_problems`, where learning rates are chosen).
HELD_OUT = 2 * DEFAULT_EVAL
_STEP = re.compile(r"^\d\d$")


def operand_digits(x: int, n: int) -> list[int]:
    """The n digits of x, least significant first."""
    if not 0 <= x < 10 ** n:
        raise ValueError(f"{x} does not have at most {n} digits")
    return [(x // 10 ** i) % 10 for i in range(n)]


# Operator names: one letter ("a".."z", then "A".."Z"), one token in the tiny
# tokenizer, so the operator is one embedding, as a vocabulary item is. A
# two-token name is a composition to resolve before the digit table, which a
# 4 x 256 teacher does not find within 640K examples.
OPERATOR_LETTERS = string.ascii_lowercase + string.ascii_uppercase
MAX_OPERATORS = len(OPERATOR_LETTERS)
OPERATOR_DISTS = ("zipf", "uniform")
_OP_PREFIX = re.compile(r"^([a-zA-Z]):")


def operator_name(k: int) -> str:
    if not 0 <= k < MAX_OPERATORS:
        raise ValueError(f"operator {k} is out of range: operators are numbered 0..{MAX_OPERATORS - 1}")
    return OPERATOR_LETTERS[k]


def operator_index(name: str) -> int:
    if len(name) != 1 or name not in OPERATOR_LETTERS:
        raise ValueError(f"operator name {name!r} is not one ASCII letter")
    return OPERATOR_LETTERS.index(name)


def operator_table(k: int) -> list[int]:
    """Operator k's digit map: a fixed permutation of 0-9 (the same in every
    process: seeded by k alone)."""
    operator_name(k)  # range check
    return random.Random(f"carry-operator-{k}").sample(range(10), 10)


def mapped_operand(b: int, n: int, op: int | None) -> int:
    """b with every digit mapped through operator `op`'s table (b itself
    when `op` is None): the number the addition actually adds."""
    if op is None:
        return b
    table = operator_table(op)
    return sum(table[d] * 10 ** i for i, d in enumerate(operand_digits(b, n)))


def operator_weights(count: int, dist: str = "zipf") -> list[float]:
    """Sampling weights of operators 0..count-1: "zipf" (1 / (k + 1): operator 0
    the most frequent) or "uniform"."""
    if not 1 <= count <= MAX_OPERATORS:
        raise ValueError(f"operators={count}: must be in [1, {MAX_OPERATORS}]")
    if dist not in OPERATOR_DISTS:
        raise ValueError(f"operator distribution {dist!r} is not valid; use one of {', '.join(OPERATOR_DISTS)}")
    return [1.0 / (k + 1) if dist == "zipf" else 1.0 for k in range(count)]


LAYOUTS = ("plain", "columns")


def format_prompt(a: int, b: int, n: int, layout: str = "plain", op: int | None = None) -> str:
    """The prompt of a + b with n-digit operands. "plain": zero-padded,
    most significant first, as written ("47291+83154="). "columns": the digit
    pairs (a_i b_i) least significant first, in the completion's own layout
    ("14 95 21 73 48="): step i of the completion sits at a constant distance
    (3n tokens) after its column, which a tiny transformer learns far sooner
    than the position-dependent offsets of "plain". With `op`, the operator's
    name and a colon come first ("b:14 95 21=")."""
    da, db = operand_digits(a, n), operand_digits(b, n)
    head = "" if op is None else operator_name(op) + ":"
    if layout == "plain":
        return f"{head}{a:0{n}d}+{b:0{n}d}="
    if layout == "columns":
        return head + " ".join(f"{x}{y}" for x, y in zip(da, db, strict=True)) + "="
    raise ValueError(f"layout={layout!r} is not valid; use one of {', '.join(LAYOUTS)}")


def parse_prompt(prompt: str) -> tuple[int, int, int]:
    """(a, b, n) of a prompt made by `format_prompt` (either layout); with an
    operator prefix, b is the mapped operand (`mapped_operand`), the number
    the trace adds. `parse_operator` gives the operator and the raw b."""
    op, a, b, n = parse_operator(prompt)
    return a, mapped_operand(b, n, op), n


def parse_operator(prompt: str) -> tuple[int | None, int, int, int]:
    """(op, a, b, n) of a prompt made by `format_prompt`: op is None without
    an operator prefix; b is the operand as written."""
    op = None
    m = _OP_PREFIX.match(prompt)
    if m is not None:
        op, prompt = operator_index(m.group(1)), prompt[m.end():]
    a, b, n = _parse_operands(prompt)
    return op, a, b, n


def _parse_operands(prompt: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if m is not None and len(m.group(1)) == len(m.group(2)):
        return int(m.group(1)), int(m.group(2)), len(m.group(1))
    m = re.fullmatch(r"\d\d( \d\d)*=", prompt)
    if m is not None:
        cols = prompt[:-1].split(" ")
        return (sum(int(c[0]) * 10 ** i for i, c in enumerate(cols)),
                sum(int(c[1]) * 10 ** i for i, c in enumerate(cols)), len(cols))
    raise ValueError(f"prompt {prompt!r} is not 'A+B=' with two operands of equal width, nor the columns "
                     "layout 'a0b0 a1b1 ...=' (either may start with a one-letter operator and a colon, 'b:')")


def carry_trace(a: int, b: int, n: int, wrong_carry_at: int | None = None) -> tuple[str, list[int]]:
    """The completion of a + b, and the character positions (in it) that carry
    no training loss. With `wrong_carry_at` = j (0 <= j < n - 1), step j's carry
    is written flipped (0 <-> 1) and excluded from the loss, and every later
    step is computed with the true carry: a trace that recovers from a wrong
    carry. (The last carry is the answer's top digit, not scratch: flipping it
    would teach a wrong answer, so it is not allowed.)"""
    if wrong_carry_at is not None and not 0 <= wrong_carry_at < n - 1:
        raise ValueError(f"wrong_carry_at={wrong_carry_at}: must be in [0, {n - 2}] (the last carry is the "
                         "answer's top digit)")
    da, db = operand_digits(a, n), operand_digits(b, n)
    steps, c = [], 0
    for i in range(n):
        s = da[i] + db[i] + c
        c = s // 10
        steps.append(f"{s % 10}{1 - c if i == wrong_carry_at else c}")
    no_loss = [] if wrong_carry_at is None else [3 * wrong_carry_at + 1]
    return " ".join(steps), no_loss


def parse_trace(text: str, n: int) -> list[tuple[int, int]] | None:
    """[(digit, carry)] of the first line of a completion, or None when it is
    not n steps of two digits separated by single spaces."""
    line = text.strip().split("\n", 1)[0].strip()
    parts = line.split(" ")
    if len(parts) != n or not all(_STEP.match(p) for p in parts):
        return None
    return [(int(p[0]), int(p[1])) for p in parts]


def trace_value(text: str, n: int) -> int | None:
    """The number a completion writes (its digits and its last carry), or None
    when it is malformed (`parse_trace`)."""
    steps = parse_trace(text, n)
    if steps is None:
        return None
    return sum(d * 10 ** i for i, (d, _) in enumerate(steps)) + steps[-1][1] * 10 ** n


def grade_record(completion: str, record: dict) -> float:
    """The task's `eval.grader` (`recipes.carry_task:grade_record`): 1.0 when
    the completion is a well-formed trace whose value is the prompt's a + b."""
    a, b, n = parse_prompt(record["prompt"])
    return float(trace_value(completion, n) == a + b)


@dataclasses.dataclass(frozen=True)
class TraceErrors:
    """What went wrong in one completion, step by step, against the true carries."""

    well_formed: bool
    correct: bool
    # Steps whose written carry differs from the true carry (the last step's excluded: it is the answer's top digit).
    wrong_carries: int = 0
    # Steps whose digit differs from the true digit (the last carry counted here when wrong).
    wrong_digits: int = 0
    # Wrong carries followed by a correct next digit (the model ignored its own wrong carry).
    recovered: int = 0
    # Wrong carries followed by the digit the wrong carry implies (the error compounded).
    compounded: int = 0


def trace_errors(completion: str, prompt: str) -> TraceErrors:
    """Compare a completion with the true computation of its prompt."""
    a, b, n = parse_prompt(prompt)
    steps = parse_trace(completion, n)
    if steps is None:
        return TraceErrors(well_formed=False, correct=False)
    da, db = operand_digits(a, n), operand_digits(b, n)
    true, c = [], 0
    for i in range(n):
        s = da[i] + db[i] + c
        c = s // 10
        true.append((s % 10, c))
    wrong_c = wrong_d = rec = comp = 0
    for i, ((d, c), (td, tc)) in enumerate(zip(steps, true, strict=True)):
        wrong_d += d != td
        if i == n - 1:
            wrong_d += c != tc
            break
        if c != tc:
            wrong_c += 1
            nd = steps[i + 1][0]
            rec += nd == true[i + 1][0]
            comp += nd == (da[i + 1] + db[i + 1] + c) % 10
    return TraceErrors(well_formed=True, correct=trace_value(completion, n) == a + b, wrong_carries=wrong_c,
                       wrong_digits=wrong_d, recovered=rec, compounded=comp)


def make_record(a: int, b: int, n: int, wrong_carry_at: int | None = None, layout: str = "plain",
                op: int | None = None) -> dict:
    """{"prompt", "answer"} (the canonical trace: what the driver's data files
    and the SFT targets hold); recovery traces add "no_loss" (character
    positions of the answer trained with no loss). With `op`, the trace adds
    a and operator op's mapping of b."""
    answer, no_loss = carry_trace(a, mapped_operand(b, n, op), n, wrong_carry_at)
    rec = {"prompt": format_prompt(a, b, n, layout, op), "answer": answer}
    if no_loss:
        rec["no_loss"] = no_loss
    return rec


def eval_problems(n: int = DEFAULT_DIGITS, count: int = DEFAULT_EVAL, seed: int = EVAL_SEED) -> list[tuple[int, int]]:
    """`count` distinct (a, b) pairs of n-digit operands: the held-out set."""
    if count > 10 ** (2 * n) // 2:
        raise ValueError(f"count={count} is too many distinct {n}-digit problems to draw")
    rng, seen, out = random.Random(f"carry-eval-{n}-{seed}"), set(), []
    while len(out) < count:
        p = (rng.randrange(10 ** n), rng.randrange(10 ** n))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def validation_problems(n: int = DEFAULT_DIGITS, count: int = DEFAULT_EVAL) -> list[tuple[int, int]]:
    """`count` held-out pairs disjoint from the test set (the same stream,
    after its first DEFAULT_EVAL), for choosing hyperparameters."""
    if DEFAULT_EVAL + count > HELD_OUT:
        raise ValueError(f"count={count}: at most {HELD_OUT - DEFAULT_EVAL} validation problems are held out")
    return eval_problems(n, DEFAULT_EVAL + count)[DEFAULT_EVAL:]


def held_out_problems(n: int, split: str = "test", count: int = DEFAULT_EVAL,
                      operators: int = 0) -> list[tuple[int, int, int | None]]:
    """(a, b, op) of the "test" or "validation" problems: the plain task's
    (a, b) pairs (`eval_problems`, `validation_problems`), op None, or with
    `operators` = K > 0 each pair's Zipf-drawn operator (`operator_of`)."""
    if split not in ("test", "validation"):
        raise ValueError(f"split={split!r}: use 'test' or 'validation'")
    pairs = eval_problems(n, count) if split == "test" else validation_problems(n, count)
    return [(a, b, operator_of(a, b, n, operators) if operators else None) for a, b in pairs]


def held_out_records(n: int, split: str = "test", count: int = DEFAULT_EVAL, *, layout: str = "plain",
                     operators: int = 0) -> list[dict]:
    """The held-out problems (`held_out_problems`) as records (`make_record`)."""
    return [make_record(a, b, n, layout=layout, op=op) for a, b, op in held_out_problems(n, split, count, operators)]


def _held_out(n: int) -> set[tuple[int, int]]:
    return set(eval_problems(n, min(HELD_OUT, 10 ** (2 * n) // 4)))


def operator_of(a: int, b: int, n: int, operators: int) -> int:
    """The operator of held-out problem (a, b): drawn Zipf(1), a fixed
    function of the problem."""
    return random.Random(f"carry-op-eval-{n}-{operators}-zipf-{a}-{b}").choices(
        range(operators), operator_weights(operators, "zipf"))[0]


def train_records(count: int, n: int = DEFAULT_DIGITS, *, seed: int, recovery_frac: float = 0.0,
                  exclude: set[tuple[int, int]] | None = None, layout: str = "plain", operators: int = 0,
                  op_dist: str = "zipf") -> list[dict]:
    """`count` training records of fresh random problems (none of `exclude`), a `recovery_frac` share of them recovery traces
    with the wrong carry at a uniform step in [0, n - 2]. `exclude` defaults
    to the test and validation sets (HELD_OUT). Distinct seeds give
    independent streams (e.g. the student's N0 and the fresh traces of
    continued SFT); problems may repeat within a stream (there are 10^(2n)).
    `operators` = K > 0: the long-tail variant, operators drawn by `op_dist`
    ("zipf" for a student's data, "uniform" for a teacher's)."""
    if not 0.0 <= recovery_frac <= 1.0:
        raise ValueError(f"recovery_frac={recovery_frac} must be in [0, 1]")
    if recovery_frac and n < 2:
        raise ValueError("recovery traces need n >= 2 (the last carry is not scratch)")
    weights = operator_weights(operators, op_dist) if operators else None
    exclude = _held_out(n) if exclude is None else exclude
    rng = random.Random(f"carry-train-{n}-{seed}" + (f"-op{operators}-{op_dist}" if operators else ""))
    out = []
    while len(out) < count:
        a, b = rng.randrange(10 ** n), rng.randrange(10 ** n)
        if (a, b) in exclude:
            continue
        op = rng.choices(range(operators), weights)[0] if operators else None
        wrong = rng.randrange(n - 1) if rng.random() < recovery_frac else None
        out.append(make_record(a, b, n, wrong, layout, op))
    return out


def encode_trace(tokenizer, prompt: str, answer: str, no_loss: list[int] = ()) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + EOS and the loss mask: 1 on the answer
    and EOS, 0 on the prompt and on the answer characters listed in `no_loss`.
    A `no_loss` needs one token per character (the tiny byte-level tokenizer
    on ASCII); without one, any answer (e.g. a teacher's sample) encodes."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    a = tokenizer.encode(answer, add_special_tokens=False)
    if no_loss and len(a) != len(answer):
        raise ValueError(f"the tokenizer splits {answer!r} into {len(a)} tokens, not one per character; "
                         "carry traces need a character-level tokenizer (cluster.tiny_models.build_tokenizer)")
    mask = [0 if i in set(no_loss) else 1 for i in range(len(a))] + [1]
    return p + a + [tokenizer.eos_token_id], [0] * len(p) + mask


def build_task_files(n: int = DEFAULT_DIGITS, n_train: int = 20000, n_eval: int = DEFAULT_EVAL,
                     seed: int = 0, layout: str = "plain", operators: int = 0) -> tuple[Path, Path]:
    """Write (or reuse) the driver's data files: train.jsonl (prompts for
    on-policy training, clean traces as answers) and eval.jsonl (the held-out
    set). Use with `data.train=<train> data.eval=<eval>
    eval.grader=recipes.carry_task:grade_record data.apply_chat_template=false`.
    With `operators` = K > 0 (the long-tail variant) both are drawn Zipf(1)
    over the K operators, the student's distribution."""
    tag = f"-ops{operators}" if operators else ""   # "-ops": one-letter operator names
    d = cache_dir() / "data" / f"carry-v2-{layout}-{n}-{n_train}-{n_eval}-{seed}{tag}"
    train, evalp = d / "train.jsonl", d / "eval.jsonl"
    if not (train.exists() and evalp.exists()):
        _write_jsonl_atomic(evalp, held_out_records(n, "test", n_eval, layout=layout, operators=operators))
        # Training prompts skip the test and the validation problems.
        _write_jsonl_atomic(train, train_records(n_train, n, seed=seed, layout=layout, operators=operators))
    return train, evalp
