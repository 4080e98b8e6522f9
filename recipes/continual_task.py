"""The data of the continual-learning recipe (recipes/continual.py): a few
instruction-following tasks, and "internal documents" of synthetic facts.

Instructions (the post-trained behaviour; held-out exact match stands in
for IF-eval): a short instruction name, a colon, a lowercase string, "=":

    rev:kqbz=    -> zbqk        reverse
    up:kqbz=     -> KQBZ        upper-case
    sort:kqbz=   -> bkqz        letters in alphabetical order
    dup:kqbz=    -> kkqqbbzz    every letter twice

Documents (the new knowledge of mid-training): a fact is a 3-letter name
with a 2-digit code. A document states 1-3 facts ("the code of qzv is 47.
the code of abk is 12."); the knowledge eval asks each fact in question
form ("code qzv?" -> "47"), which mid-training also trains on (the question
form of a fact is learnt from its documents only by much larger models).

Grading (`grade_record`, an `eval.grader`): the completion's first line,
stripped, equals the record's answer. Records carry a "kind" ("rev", ...,
or "fact") so scores can be broken down.

Everything here is pure Python (no torch); the data files are written under
`$OPD_CACHE_DIR/data/` like cluster/tiny_data.py's.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from cluster.tiny_data import _write_jsonl_atomic, grade
from cluster.tiny_models import cache_dir

TRANSFORMS = {
    "rev": lambda s: s[::-1],
    "up": str.upper,
    "sort": lambda s: "".join(sorted(s)),
    "dup": lambda s: "".join(c + c for c in s),
}
KINDS = tuple(TRANSFORMS)
LETTERS = string.ascii_lowercase
# Length range of an instruction's string (inclusive).
MIN_LEN, MAX_LEN = 3, 6
# Longest prompt ("sort:" + 6 letters + "=") and answer ("dup" of 6: 12 letters) in tokens.
MAX_PROMPT_CHARS = len("sort:") + MAX_LEN + 1
MAX_ANSWER_CHARS = 2 * MAX_LEN
# The held-out instruction set's seed; training streams use other seeds and skip its strings.
EVAL_SEED = 4242


def instruction(kind: str, s: str) -> dict:
    """The record of instruction `kind` applied to `s`."""
    if kind not in TRANSFORMS:
        raise ValueError(f"instruction kind {kind!r} is not one of {', '.join(KINDS)}")
    if not s or any(c not in LETTERS for c in s):
        raise ValueError(f"instruction string {s!r} must be non-empty lowercase letters a-z")
    return {"prompt": f"{kind}:{s}=", "answer": TRANSFORMS[kind](s), "kind": kind}


def _random_string(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def eval_instructions(count: int = 400, seed: int = EVAL_SEED) -> list[dict]:
    """`count` held-out instruction records, the kinds in turn, distinct strings."""
    rng, seen, out = random.Random(f"continual-eval-{seed}"), set(), []
    while len(out) < count:
        s = _random_string(rng)
        if s not in seen:
            seen.add(s)
            out.append(instruction(KINDS[len(out) % len(KINDS)], s))
    return out


def _held_out_strings() -> set[str]:
    return {r["prompt"].split(":", 1)[1][:-1] for r in eval_instructions(1000)}


def train_instructions(count: int, *, seed: int) -> list[dict]:
    """`count` training instruction records (random kind and string, none of
    the held-out strings); distinct seeds give independent streams."""
    held = _held_out_strings()
    rng, out = random.Random(f"continual-train-{seed}"), []
    while len(out) < count:
        s = _random_string(rng)
        if s not in held:
            out.append(instruction(rng.choice(KINDS), s))
    return out


def make_facts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` facts (name, code): distinct 3-letter names, 2-digit codes."""
    if count > 26 ** 3:
        raise ValueError(f"count={count}: at most {26 ** 3} distinct 3-letter names")
    rng, seen, out = random.Random(f"continual-facts-{seed}"), set(), []
    while len(out) < count:
        name = "".join(rng.choice(LETTERS) for _ in range(3))
        if name not in seen:
            seen.add(name)
            out.append((name, f"{rng.randrange(100):02d}"))
    return out


def fact_question(name: str, code: str) -> dict:
    """The knowledge eval's record of one fact."""
    return {"prompt": f"code {name}?", "answer": code, "kind": "fact"}


def fact_sentence(name: str, code: str) -> str:
    return f"the code of {name} is {code}."


def documents(facts: list[tuple[str, str]], count: int, *, seed: int) -> list[dict]:
    """`count` documents, each 1-3 facts drawn at random, as SFT records with
    an empty prompt (the loss covers the whole text)."""
    rng = random.Random(f"continual-docs-{seed}")
    return [{"prompt": "", "answer": " ".join(fact_sentence(*f) for f in rng.sample(facts, rng.randint(1, 3))),
             "kind": "doc"} for _ in range(count)]


def midtrain_mix(facts: list[tuple[str, str]], count: int, *, instruction_frac: float, qa_frac: float,
                 seed: int) -> list[dict]:
    """The mid-training data: `count` records, an `instruction_frac` share
    instruction records (the "background chat data" of the mix), a `qa_frac`
    share fact questions, the rest documents; shuffled."""
    if not (0.0 <= instruction_frac <= 1.0 and 0.0 <= qa_frac <= 1.0 and instruction_frac + qa_frac <= 1.0):
        raise ValueError(f"instruction_frac={instruction_frac} and qa_frac={qa_frac} must be shares in [0, 1] "
                         "that sum to at most 1")
    n_inst = round(count * instruction_frac)
    n_qa = round(count * qa_frac)
    rng = random.Random(f"continual-mix-{seed}")
    qa = [fact_question(*facts[rng.randrange(len(facts))]) for _ in range(n_qa)]
    out = train_instructions(n_inst, seed=seed + 7000) + qa + documents(facts, count - n_inst - n_qa, seed=seed)
    rng.shuffle(out)
    return out


def grade_record(completion: str, record: dict) -> float:
    """The recipe's `eval.grader` (`recipes.continual_task:grade_record`): 1.0
    when the completion's first line, stripped, equals the record's answer."""
    return grade(completion, record["answer"])


def build_task_files(n_facts: int, n_train: int = 4000, n_eval: int = 400,
                     fact_seed: int = 0) -> dict[str, Path]:
    """Write (or reuse) the driver's data files: instruction prompts for
    training ("inst_train") and the held-out instruction set ("inst_eval"),
    and the fact questions ("facts": the knowledge eval and the negative
    control's prompts)."""
    d = cache_dir() / "data" / f"continual-v1-{n_facts}-{n_train}-{n_eval}-{fact_seed}"
    paths = {"inst_train": d / "inst_train.jsonl", "inst_eval": d / "inst_eval.jsonl", "facts": d / "facts.jsonl"}
    if not all(p.exists() for p in paths.values()):
        _write_jsonl_atomic(paths["inst_eval"], eval_instructions(n_eval))
        _write_jsonl_atomic(paths["inst_train"], train_instructions(n_train, seed=0))
        _write_jsonl_atomic(paths["facts"], [fact_question(*f) for f in make_facts(n_facts, fact_seed)])
    return paths
