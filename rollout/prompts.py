"""Prompt sources: load, validate and tokenize prompts, and stream them in a
deterministic, resumable order.

Formats (`data.train` / `data.eval`):
  * `*.jsonl` / `*.json` with one JSON object per line,
  * `*.parquet`,
  * a directory written by `datasets.Dataset.save_to_disk` (needs the
    `datasets` package); for a saved `DatasetDict` name the split as `DIR:SPLIT`
    (e.g. `data/gsm8k:test`), or leave it off when there is only one split.

Each record holds either `prompt` (text) or `messages` (a chat: a list of
`{"role", "content"}`), optionally `answer` (any value, e.g. a reference for a
reward or an eval metric), and any other fields, which travel along in
`PromptRecord.metadata`. Every problem in a file is collected and raised at once
as a `PromptDataError` that names the file, the line (JSONL, 1-based) or row
(Parquet / datasets, 0-based) and the field, before any actor starts.

Rendering: with `data.apply_chat_template` (the default), `messages`, and
`prompt` wrapped as one user message, go through the tokenizer's chat template
with the generation prompt appended; without it, `prompt` text is tokenized as is
(with the tokenizer's own special tokens, e.g. a BOS).

`PromptStream` serves the training prompts epoch by epoch, each epoch in an order
fixed by (seed, epoch) alone; `state_dict()` / `load_state_dict()` save and
restore the position, so a resumed run draws exactly the prompts the original
would have drawn next, none repeated and none skipped.

The driver calls `load_prompt_sources(cfg.data, tokenizer, cfg.run.seed)` once,
then `train_stream.next_batch(cfg.train.prompts_per_step)` each step, and puts
`train_stream.state_dict()` in every checkpoint.

    python -m rollout.prompts data/train.jsonl MODEL_DIR   # validate and summarize a file
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rollout.config import DataConfig

# At most this many problems are spelled out in one PromptDataError.
_MAX_SHOWN_PROBLEMS = 20
# Fields with a meaning of their own; every other field goes to `metadata`.
_RESERVED = ("prompt", "messages", "answer")


class PromptDataError(ValueError):
    """Bad prompt data: one line per problem, each naming file, line/row and
    field. Pickles (it can be raised inside a Ray actor)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        shown = self.problems[:_MAX_SHOWN_PROBLEMS]
        lines = [f"{len(self.problems)} problems in the prompt data:"] + [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)

    def __reduce__(self):
        return (PromptDataError, (self.problems,))


@dataclasses.dataclass
class PromptRecord:
    """One tokenized prompt. Pickles (sent to sampler actors)."""

    index: int  # row of the record in its source (0-based, in file order); stable across runs
    prompt_ids: list[int]  # what the sampler continues (chat template applied when configured)
    text: str | None = None  # the `prompt` field, when the record had one
    messages: list[dict[str, str]] | None = None  # the `messages` field, when the record had one
    answer: Any = None  # the `answer` field, carried through untouched
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # every other field
    where: str = ""  # "FILE line N" / "FILE row N", for messages about this record
    # Set by the driver from teacher.routes / teacher.prompt (rollout/teacher_routes.py,
    # assign_teachers): the teacher that scores this record (None: the only one),
    # and the ids it scores the completion after (None: `prompt_ids`).
    teacher: str | None = None
    teacher_prefix_ids: list[int] | None = None


# --------------------------------------------------------------------------
# Reading raw rows
# --------------------------------------------------------------------------

def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _read_jsonl(path: Path, problems: list[str]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are allowed
            where = f"{path} line {lineno}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not valid JSON: {e.msg} at column {e.colno}")
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _split_dataset_ref(ref: str) -> tuple[Path, str | None]:
    """`DIR` or `DIR:SPLIT` (the latter only when `DIR:SPLIT` is not itself a path)."""
    p = Path(ref)
    if not p.exists() and ":" in ref:
        base, split = ref.rsplit(":", 1)
        if Path(base).is_dir():
            return Path(base), split
    return p, None


def _read_saved_dataset(path: Path, split: str | None, ref: str) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise PromptDataError([
            f"{ref}: a directory written by datasets' save_to_disk needs the `datasets` package, "
            f"which is not installed: pip install datasets (or export the data to JSONL/Parquet)"]) from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises many types; we name the path
        raise PromptDataError([f"{ref}: not a dataset saved with save_to_disk ({type(e).__name__}: {e}); "
                               f"use a JSONL file, a Parquet file or a save_to_disk directory"]) from e
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            what = f"has no split {split!r}" if split is not None else "holds several splits"
            raise PromptDataError([f"{ref}: the saved DatasetDict {what}; valid splits are {splits}: "
                                   f"name one as {path}:{splits[0]}"])
        ds = ds[split]
        label = f"{path}:{split}"
    elif split is not None:
        raise PromptDataError([f"{ref}: {path} holds a single Dataset, not a DatasetDict with split "
                               f"{split!r}; use {path} without ':{split}'"])
    else:
        label = str(path)
    return [(f"{label} row {i}", row) for i, row in enumerate(ds.to_list())]


def read_rows(ref: str) -> list[tuple[str, Any]]:
    """The raw rows of a source as (location, row) pairs, in file order."""
    path, split = _split_dataset_ref(ref)
    if not path.exists():
        raise PromptDataError([f"{ref}: no such file or directory (relative paths start at {Path.cwd()}); "
                               f"data.train / data.eval take a .jsonl or .parquet file or a datasets "
                               f"save_to_disk directory"])
    problems: list[str] = []
    if path.is_dir():
        rows = _read_saved_dataset(path, split, ref)
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path, problems)
    elif path.suffix == ".parquet":
        try:
            rows = _read_parquet(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors vary; name the file
            raise PromptDataError([f"{path}: cannot read as Parquet ({type(e).__name__}: {e})"]) from e
    else:
        raise PromptDataError([f"{path}: unknown prompt file type {path.suffix!r}; valid are .jsonl, "
                               f".json (one object per line), .parquet, or a datasets save_to_disk directory"])
    if problems:
        raise PromptDataError(problems)
    return rows


# --------------------------------------------------------------------------
# Validating rows and tokenizing them
# --------------------------------------------------------------------------

def _check_messages(where: str, messages: Any, problems: list[str]) -> bool:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else _type_name(messages)
        problems.append(f"{where}: field 'messages' must be a non-empty list of "
                        f"{{'role': str, 'content': str}} objects, got {got}")
        return False
    ok = True
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"{where}: field 'messages[{j}]' must be an object with 'role' and 'content', "
                            f"got {_type_name(m)}")
            ok = False
            continue
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else f"got {_type_name(m[key])}"
                problems.append(f"{where}: field 'messages[{j}].{key}' must be a string, {got}")
                ok = False
    return ok


def _check_row(where: str, row: Any, apply_chat_template: bool, problems: list[str]) -> bool:
    """Append every problem of one row; True when it is usable."""
    if not isinstance(row, dict):
        problems.append(f"{where}: expected an object with a 'prompt' or 'messages' field, got {_type_name(row)}")
        return False
    # A null counts as absent: a Parquet file that mixes both forms has nulls.
    has_prompt = row.get("prompt") is not None
    has_messages = row.get("messages") is not None
    if has_prompt and has_messages:
        problems.append(f"{where}: has both 'prompt' and 'messages'; give exactly one")
        return False
    if not has_prompt and not has_messages:
        present = sorted(k for k, v in row.items() if v is not None)
        problems.append(f"{where}: no 'prompt' (text) or 'messages' (chat) field; non-null fields present: "
                        f"{present or 'none'}")
        return False
    if has_prompt:
        if not isinstance(row["prompt"], str):
            problems.append(f"{where}: field 'prompt' must be a string, got {_type_name(row['prompt'])}")
            return False
        if not row["prompt"]:
            problems.append(f"{where}: field 'prompt' is an empty string")
            return False
        return True
    if not apply_chat_template:
        problems.append(f"{where}: field 'messages' needs a chat template, but data.apply_chat_template is "
                        f"false; set data.apply_chat_template=true or give 'prompt' text instead")
        return False
    return _check_messages(where, row["messages"], problems)


def _render(rows: list[tuple[str, dict]], tokenizer, apply_chat_template: bool,
            problems: list[str]) -> list[list[int] | None]:
    """Token ids of each valid row (None where rendering failed).

    With a chat template, each row is rendered to text and the texts are then
    tokenized in one batch with add_special_tokens=False: exactly what
    `apply_chat_template(..., tokenize=True)` does (the template writes the
    special tokens itself), but batched."""
    if apply_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise PromptDataError([
                f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template, but "
                f"data.apply_chat_template is true; set data.apply_chat_template=false to tokenize "
                f"'prompt' text as is"])
        texts: list[str | None] = []
        for where, row in rows:
            msgs = row["messages"] if row.get("messages") is not None else [{"role": "user", "content": row["prompt"]}]
            try:
                texts.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
            except Exception as e:  # noqa: BLE001 - jinja templates raise anything (e.g. role order)
                problems.append(f"{where}: the chat template failed on this record: {type(e).__name__}: {e}")
                texts.append(None)
        good = [t for t in texts if t is not None]
        enc = iter(tokenizer(good, add_special_tokens=False)["input_ids"]) if good else iter(())
        return [None if t is None else list(next(enc)) for t in texts]
    texts = [row["prompt"] for _, row in rows]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []


def records_from_rows(rows: Sequence[tuple[str, Any]], tokenizer, *, apply_chat_template: bool,
                      max_prompt_tokens: int) -> list[PromptRecord]:
    """Validate and tokenize (location, row) pairs; raise one PromptDataError
    listing every bad record. Also the entry point for prompts built in code
    (e.g. a `tiny:` task): pass `(f"tiny:task row {i}", {"prompt": ...})`."""
    problems: list[str] = []
    good = [(i, where, row) for i, (where, row) in enumerate(rows)
            if _check_row(where, row, apply_chat_template, problems)]
    ids_list = _render([(w, r) for _, w, r in good], tokenizer, apply_chat_template, problems)
    out: list[PromptRecord] = []
    for (i, where, row), ids in zip(good, ids_list, strict=True):
        if ids is None:
            continue
        if not ids:
            problems.append(f"{where}: the prompt tokenizes to no tokens")
            continue
        if len(ids) > max_prompt_tokens:
            problems.append(f"{where}: prompt is {len(ids)} tokens, more than data.max_prompt_tokens="
                            f"{max_prompt_tokens}; shorten or drop the record, or raise data.max_prompt_tokens "
                            f"(and student.max_model_len with it)")
            continue
        out.append(PromptRecord(
            index=i, prompt_ids=ids, text=row.get("prompt"), messages=row.get("messages"),
            answer=row.get("answer"), metadata={k: v for k, v in row.items() if k not in _RESERVED},
            where=where))
    if problems:
        raise PromptDataError(problems)
    return out


def load_records(ref: str, tokenizer, data_cfg: DataConfig) -> list[PromptRecord]:
    """Read, validate and tokenize one source (a path, see the module docstring)."""
    rows = read_rows(ref)
    if not rows:
        raise PromptDataError([f"{ref}: holds no records"])
    return records_from_rows(rows, tokenizer, apply_chat_template=data_cfg.apply_chat_template,
                             max_prompt_tokens=data_cfg.max_prompt_tokens)


# --------------------------------------------------------------------------
# The resumable stream
# --------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of epoch `epoch`: a permutation of range(n) fixed by (seed, epoch).

    Fisher-Yates driven by `random.Random.random()`, whose sequence for a given
    seed Python guarantees across versions (unlike `shuffle`/`randrange`, whose
    algorithms may change): a run resumed under another Python continues in the
    same order."""
    order = list(range(n))
    if not shuffle:
        return order
    rng = random.Random(f"opd-prompts:{seed}:{epoch}")
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def records_fingerprint(records: Sequence[PromptRecord]) -> str:
    """sha256 (first 16 hex) of the records' ids and tokens: a resumed run checks
    it to make sure it streams the same data it checkpointed."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.index}:{','.join(map(str, r.prompt_ids))};".encode())
    return h.hexdigest()[:16]


class PromptStream:
    """Training prompts, epoch after epoch, in a deterministic order.

    Position (epoch, position) means: the next prompt is entry `position` of
    epoch `epoch`'s order. A batch may span an epoch boundary. Not thread-safe:
    the driver alone draws from it."""

    def __init__(self, records: Sequence[PromptRecord], seed: int, shuffle: bool = True):
        if not records:
            raise PromptDataError(["the training prompt stream is empty: no records left to train on"])
        self.records = list(records)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order = epoch_order(len(self.records), self.seed, 0, self.shuffle)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = records_fingerprint(self.records)
        return self._fingerprint

    @property
    def progress_epochs(self) -> float:
        """Epochs consumed so far, fractional (the `progress/epoch` metric)."""
        return self.epoch + self.position / len(self.records)

    def next_batch(self, k: int) -> list[PromptRecord]:
        """The next `k` prompts (k may exceed an epoch: it wraps into the next)."""
        if k <= 0:
            raise ValueError(f"next_batch: k={k} must be > 0")
        out: list[PromptRecord] = []
        while len(out) < k:
            if self.position == len(self.records):
                self.epoch += 1
                self.position = 0
                self._order = epoch_order(len(self.records), self.seed, self.epoch, self.shuffle)
            take = min(k - len(out), len(self.records) - self.position)
            out.extend(self.records[i] for i in self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (JSON-serializable)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where `state` left off. The saved seed and shuffle flag win
        over this stream's (the position is only meaningful in the saved order);
        different data is refused, since the position would then point at other
        prompts and the run would repeat or skip some."""
        missing = [k for k in ("epoch", "position", "seed") if k not in state]
        if missing:
            raise ValueError(f"prompt stream state lacks {missing}; got keys {sorted(state)}")
        n = len(self.records)
        if "num_records" in state and state["num_records"] != n:
            raise ValueError(f"cannot resume the prompt stream: the checkpoint streamed {state['num_records']} "
                             f"training prompts, the data now holds {n}; resume with the same data.train "
                             f"and data.eval/eval_size, or start a new run")
        if "fingerprint" in state and state["fingerprint"] != self.fingerprint:
            raise ValueError(f"cannot resume the prompt stream: the training prompts differ from the "
                             f"checkpoint's (fingerprint {state['fingerprint']} vs {self.fingerprint}: same "
                             f"count, other content or tokenizer); resume with the same data and tokenizer, "
                             f"or start a new run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= n:
            raise ValueError(f"prompt stream state out of range: epoch {epoch}, position {position} "
                             f"(valid: epoch >= 0, 0 <= position <= {n})")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch, self.position = epoch, position
        self._order = epoch_order(n, self.seed, self.epoch, self.shuffle)


# --------------------------------------------------------------------------
# Train + eval
# --------------------------------------------------------------------------

RowBuilder = Callable[[], list[dict[str, Any]]]


def load_prompt_sources(data_cfg: DataConfig, tokenizer, seed: int,
                        builtin: Mapping[str, RowBuilder] | None = None
                        ) -> tuple[PromptStream, list[PromptRecord]]:
    """(training stream, held-out records) from `data_cfg`.

    `builtin` maps names such as "tiny:arithmetic" to functions returning rows
    (dicts in the file format); any other name is a path. With `data.eval`
    null, the last `data.eval_size` records of train (in file order, before any
    shuffle) are held out."""
    def load(ref: str) -> list[PromptRecord]:
        if builtin is not None and ref in builtin:
            rows = [(f"{ref} row {i}", r) for i, r in enumerate(builtin[ref]())]
            return records_from_rows(rows, tokenizer, apply_chat_template=data_cfg.apply_chat_template,
                                     max_prompt_tokens=data_cfg.max_prompt_tokens)
        if ref.startswith("tiny:"):
            raise PromptDataError([f"data source {ref!r} is a built-in name that is not available here"
                                   f"{' (known: ' + ', '.join(sorted(builtin)) + ')' if builtin else ''}; "
                                   f"give a path to a .jsonl/.parquet file or a save_to_disk directory"])
        return load_records(ref, tokenizer, data_cfg)

    train = load(data_cfg.train)
    if data_cfg.eval is not None:
        eval_records = load(data_cfg.eval)
    elif data_cfg.eval_size == 0:
        eval_records = []
    else:
        if data_cfg.eval_size >= len(train):
            raise PromptDataError([f"data.eval_size={data_cfg.eval_size} would hold out all {len(train)} "
                                   f"records of {data_cfg.train}, leaving none to train on; lower "
                                   f"data.eval_size or give a separate data.eval"])
        train, eval_records = train[:-data_cfg.eval_size], train[-data_cfg.eval_size:]
    return PromptStream(train, seed=seed, shuffle=data_cfg.shuffle), eval_records


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m rollout.prompts DATA MODEL_DIR", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(argv[1])
    try:
        records = load_records(argv[0], tok, DataConfig(train=argv[0]))
    except PromptDataError as e:
        print(e, file=sys.stderr)
        return 1
    lengths = sorted(len(r.prompt_ids) for r in records)
    print(f"{argv[0]}: {len(records)} records, prompt tokens min {lengths[0]} median "
          f"{lengths[len(lengths) // 2]} max {lengths[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
