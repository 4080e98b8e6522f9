"""SFT on the carry-trace addition task (recipes/carry_task.py): the teacher
(ground truth + recovery traces), teacher traces (sequence-level KD data) and
the student's SFT curve on them, with an evaluation that also breaks errors
down (wrong carries, recoveries, compounding) and a teacher-forced recovery
probe. In-process torch (recipes.sft.sft_loop), for choosing sizes and N0.

    python -m recipes.carry_sft teacher                      # build (or reuse) the teacher, print its evals
    python -m recipes.carry_sft student --n0 16384 --spec student-4l   # + the student init and its SFT curve
    python -m recipes.carry_sft student --n0 16384 --points 1 --epochs 2   # a longer SFT on the same traces

Used by `python -m recipes.compare`, which builds the pair through these.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

from cluster.tiny_data import _write_jsonl_atomic, read_jsonl
from cluster.tiny_models import build_model, cache_dir, publish_dir, save_tokenizer
from recipes.carry_task import (DEFAULT_DIGITS, carry_trace, encode_trace, format_prompt, held_out_problems,
                                held_out_records, mapped_operand, parse_operator, trace_errors, train_records)
from recipes.sft import flop_params, recipe_key, set_threads, sft_loop


def fresh_model(spec: str, seed: int, init_std: float = 0.02):
    """A tiny_models architecture with a fresh N(0, init_std) init (as recipes.sft)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_model(spec)
    tok = AutoTokenizer.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    return model, tok


def encode_record(tok, r: dict):
    return encode_trace(tok, r["prompt"], r["answer"], r.get("no_loss", []))


def generate(model, tok, prompts: list[str], *, n: int, temperature: float, seed: int,
             batch_size: int = 500, log=None, log_every_s: float = 30.0) -> list[str]:
    """One completion per prompt (greedy at temperature 0, else sampled from the
    raw distribution), decoded without special tokens. With `log`, a progress
    line every `log_every_s` seconds."""
    import torch

    model.eval()
    out_text: list[str] = []
    t0 = last = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = [tok.encode(p, add_special_tokens=False) for p in prompts[i: i + batch_size]]
            T = max(len(p) for p in chunk)
            ids = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in chunk])
            attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in chunk])
            kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature,
                                                                     top_k=0, top_p=1.0)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=3 * n + 1,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
            out_text += [tok.decode(row, skip_special_tokens=True) for row in out[:, T:].tolist()]
            if log is not None and time.monotonic() - last >= log_every_s:
                last = time.monotonic()
                log(f"[generate] {len(out_text):,}/{len(prompts):,} completions, {last - t0:.0f}s")
    return out_text


# The long-tail variant's "head": its 8 most frequent operators (Zipf(1)
# over 52: 60% of the problems); the other operators are the "tail".
HEAD_OPERATORS = 8


def evaluate(model, tok, records: list[dict], *, n: int, temperature: float = 1.0, seed: int = 0) -> dict:
    """Accuracy and the error breakdown over `records` (one sample each)."""
    comps = generate(model, tok, [r["prompt"] for r in records], n=n, temperature=temperature, seed=seed)
    errs = [trace_errors(c, r["prompt"]) for c, r in zip(comps, records, strict=True)]
    wc = sum(e.wrong_carries for e in errs)
    out = {}
    ops = [parse_operator(r["prompt"])[0] for r in records]
    if ops and ops[0] is not None:   # the long-tail variant: the 8 most frequent operators vs the rest
        for name, keep in (("head", lambda k: k < HEAD_OPERATORS), ("tail", lambda k: k >= HEAD_OPERATORS)):
            sel = [e.correct for e, k in zip(errs, ops, strict=True) if keep(k)]
            out[f"{name}_accuracy"] = sum(sel) / len(sel) if sel else None
    return {**out, "accuracy": sum(e.correct for e in errs) / len(errs),
            "well_formed": sum(e.well_formed for e in errs) / len(errs),
            "wrong_carries_per_completion": wc / len(errs),
            "recovered_share": (sum(e.recovered for e in errs) / wc) if wc else None,
            "compounded_share": (sum(e.compounded for e in errs) / wc) if wc else None}


def recovery_probe(model, tok, n: int, count: int = 500, seed: int = 0, layout: str = "plain",
                   operators: int = 0) -> dict:
    """Teacher-forced: the clean trace with step j's carry flipped (j uniform in
    [0, n-2]), up to the next step's digit. Returns the share of problems whose
    greedy next digit is the true one (recovers) or the one the wrong carry
    implies (compounds), and the mean log-probability of the true digit."""
    import torch

    model.eval()
    rng = random.Random(seed)
    probs = held_out_problems(n, "test", count, operators)
    rec = comp = 0
    lp_sum = 0.0
    by_j: dict[int, list[tuple[list[int], int, int]]] = {}
    for a, b, op in probs:
        j = rng.randrange(n - 1)
        bm = mapped_operand(b, n, op)   # what the trace adds
        wrong, _ = carry_trace(a, bm, n, wrong_carry_at=j)
        clean, _ = carry_trace(a, bm, n)
        prefix = format_prompt(a, b, n, layout, op) + wrong[: 3 * (j + 1)]   # up to and including the space after step j
        true_d = int(clean[3 * (j + 1)])
        wc = int(wrong[3 * j + 1])
        comp_d = ((a // 10 ** (j + 1)) % 10 + (bm // 10 ** (j + 1)) % 10 + wc) % 10
        by_j.setdefault(j, []).append((tok.encode(prefix, add_special_tokens=False), true_d, comp_d))
    digit_ids = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    with torch.no_grad():
        for items in by_j.values():
            ids = torch.tensor([x[0] for x in items])
            lp = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
            pred = lp.argmax(-1).tolist()
            for (_, td, cd), p, row in zip(items, pred, lp, strict=True):
                rec += p == digit_ids[td]
                comp += p == digit_ids[cd]
                lp_sum += float(row[digit_ids[td]])
    return {"recovers": rec / len(probs), "compounds": comp / len(probs), "true_digit_logprob": lp_sum / len(probs)}


def teacher_traces(model, tok, prompts: list[str], *, n: int, temperature: float = 1.0, seed: int = 0,
                   log=None) -> list[dict]:
    """Sequence-level KD data: the teacher's sampled completions as answers
    (unfiltered, as a teacher-generated SFT set is)."""
    comps = generate(model, tok, prompts, n=n, temperature=temperature, seed=seed, log=log)
    return [{"prompt": p, "answer": c.strip()} for p, c in zip(prompts, comps, strict=True)]


def cached_traces(path: Path, sample, log=print) -> tuple[list[dict], float]:
    """Teacher traces from `path` (JSONL, first record {"gen_s": ...}), or
    `sample()`d and written there atomically: inits that differ only in the
    student (spec, lr, schedule, epochs) train on the same traces, which cost
    more to sample than to train on. Returns (traces, sampling seconds)."""
    if path.exists():
        meta, *data = read_jsonl(path)
        log(f"[carry student] {len(data):,} cached teacher traces from {path}")
        return data, meta["gen_s"]
    t0 = time.monotonic()
    data = sample()
    gen_s = time.monotonic() - t0
    _write_jsonl_atomic(path, [{"gen_s": gen_s}, *data])
    return data, gen_s


def lr_fn_constant(lr: float, warmup: int):
    return lambda s: lr * min(1.0, (s + 1) / warmup)


def lr_fn_cosine(lr: float, warmup: int, steps: int, floor: float = 0.1):
    def f(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        frac = min(1.0, (s - warmup) / max(1, steps - warmup))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
    return f


# Bump when the training code changes in a way that changes the result.
CARRY_RECIPE_VERSION = 1


def _key(obj, **extra) -> str:
    recipe = dataclasses.asdict(obj)
    if recipe.get("schedule") == "constant":   # keys of recipes from before `schedule` existed
        del recipe["schedule"]
    if recipe.get("operators") == 0:           # ... and before `operators`
        del recipe["operators"]
    elif "operators" in recipe:                 # the variant's operator-name format is part of its key
        extra = {**extra, "operator_names": "letter"}
    if recipe.get("epochs") == 1:              # ... and before `epochs`
        del recipe["epochs"]
    return recipe_key(recipe, obj.spec, CARRY_RECIPE_VERSION, **extra)


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    """The teacher: SFT on ground-truth traces, a `recovery_frac` share of
    them recovery traces (recipes.carry_task.train_records), cosine lr."""

    spec: str = "teacher"
    n_digits: int = DEFAULT_DIGITS
    layout: str = "columns"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    recovery_frac: float = 0.25
    seed: int = 0
    # The long-tail variant (recipes.carry_task): K operators, drawn uniformly
    # in the teacher's data (so it learns the tail); 0 = the plain task.
    operators: int = 0

    def key(self) -> str:
        return _key(self)


@dataclasses.dataclass(frozen=True)
class StudentRecipe:
    """The student init: SFT on `n0` fresh teacher traces (teacher sampled at
    `temperature`, unfiltered), one pass, evaluated at n0 / 2^k for k <
    `points` (the SFT curve that chooses N0 and that the compute ratio
    extrapolates). `schedule`: "constant" (lr after warmup; one run whose
    checkpoints are the curve) or "cosine" (one run per point, each decayed
    to 0.1 x lr over its own data: every point is a finished SFT run on that
    much data, as a data-scaling curve is measured)."""

    spec: str = "student-4l"
    n0: int = 16384
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    temperature: float = 1.0
    points: int = 3
    seed: int = 0
    schedule: str = "constant"
    # Passes over each point's traces (>1: a longer SFT on the same data,
    # which separates a student's capacity from its data).
    epochs: int = 1

    def key(self, teacher_key: str) -> str:
        return _key(self, teacher=teacher_key)

    def traces_key(self, teacher_key: str) -> str:
        """The key of the teacher traces this init trains on: the same for
        every student spec, lr, schedule and epoch count."""
        payload = {"teacher": teacher_key, "n0": self.n0, "seed": self.seed, "temperature": self.temperature,
                   "v": CARRY_RECIPE_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _save(model, tok, out: Path, summary: dict) -> None:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2))


def _eval_row(model, tok, held, n, layout, count, step, operators: int = 0) -> dict:
    greedy = evaluate(model, tok, held, n=n, temperature=0)
    return {"greedy": greedy["accuracy"],
            **{f"greedy_{k}": greedy[k] for k in ("head_accuracy", "tail_accuracy") if k in greedy},
            **evaluate(model, tok, held, n=n, temperature=1.0, seed=step),
            "probe": recovery_probe(model, tok, n, count=count, layout=layout, operators=operators)}


def train_teacher(r: TeacherRecipe, out: Path, *, eval_every: int = 250, eval_count: int = 500, log=print) -> dict:
    """Train the teacher from a fresh init into `out`; returns its summary."""
    import torch

    set_threads()
    n = r.n_digits
    model, tok = fresh_model(r.spec, r.seed)
    held = held_out_records(n, "test", eval_count, layout=r.layout, operators=r.operators)
    recs = train_records(r.steps * r.batch_size, n, seed=r.seed + 100, recovery_frac=r.recovery_frac,
                         layout=r.layout, operators=r.operators, op_dist="uniform")
    curve, t0, eval_s = [], time.monotonic(), 0.0

    def cb(step, tokens):
        nonlocal eval_s
        if (eval_every and step % eval_every == 0) or step == r.steps:
            te = time.monotonic()
            row = {"step": step, "tokens": tokens, "train_s": te - t0 - eval_s,
                   **_eval_row(model, tok, held, n, r.layout, eval_count, step, r.operators)}
            eval_s += time.monotonic() - te
            curve.append(row)
            log(json.dumps(row))
        return False

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        tokens = sft_loop(model, tok, recs, steps=r.steps, batch_size=r.batch_size,
                          lr_fn=lr_fn_cosine(r.lr, r.warmup_steps, r.steps), seed=r.seed, callback=cb,
                          encode=encode_record, name=f"carry-teacher-{r.spec}", log=log)
    fp = flop_params(model)
    summary = {"recipe": dataclasses.asdict(r), "key": r.key(), "curve": curve, "final": curve[-1],
               "flop_params": fp, "trained_tokens": tokens, "train_flops": 6 * fp * tokens,
               "train_s": time.monotonic() - t0 - eval_s}
    _save(model, tok, out, summary)
    return summary


def train_student(r: StudentRecipe, teacher_dir: Path, out: Path, *, eval_count: int = 500, log=print) -> dict:
    """The student init from `n0` teacher traces into `out`; returns its summary
    (the curve, the traces' own accuracy, training and generation FLOPs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Checked before the traces are sampled (minutes on the long-tail variant).
    if r.schedule not in ("constant", "cosine"):
        raise ValueError(f"StudentRecipe.schedule={r.schedule!r}: use 'constant' or 'cosine'")
    if r.epochs < 1:
        raise ValueError(f"StudentRecipe.epochs={r.epochs}: use 1 or more passes over the traces")
    set_threads()
    t_sum = json.loads((Path(teacher_dir) / "sft_summary.json").read_text())
    n, layout = t_sum["recipe"]["n_digits"], t_sum["recipe"]["layout"]
    ops = t_sum["recipe"].get("operators", 0)   # the student's data: Zipf over the teacher's operators
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    ttok = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = [x["prompt"] for x in train_records(r.n0, n, seed=r.seed + 1000, layout=layout, operators=ops)]
    data, gen_s = cached_traces(cache_dir() / "recipes" / f"carry-traces-{r.traces_key(t_sum['key'])}.jsonl",
                                lambda: teacher_traces(teacher, ttok, prompts, n=n, temperature=r.temperature,
                                                       seed=r.seed, log=log), log=log)
    if [x["prompt"] for x in data] != prompts:
        raise RuntimeError("cached teacher traces do not match this init's prompts: delete the carry-traces-* "
                           f"files under {cache_dir() / 'recipes'} and rerun")
    trace_acc = sum(trace_errors(x["answer"], x["prompt"]).correct for x in data) / len(data)
    log(f"[carry student] {len(data)} teacher traces in {gen_s:.0f}s, {trace_acc:.3f} of them correct")
    held = held_out_records(n, "test", eval_count, layout=layout, operators=ops)
    steps = r.n0 * r.epochs // r.batch_size
    marks = {r.n0 * r.epochs // 2 ** k // r.batch_size for k in range(r.points)}
    curve, t1, eval_s = [], time.monotonic(), 0.0

    def cb(step, tokens):
        nonlocal eval_s
        if step in marks:
            te = time.monotonic()
            # The loss before each update, over the point's last 50 steps: on a
            # first pass every batch is unseen, so this is a held-out loss.
            # Exact-match accuracy lags it: a falling loss under a flat
            # accuracy means the curve has not flattened yet.
            row = {"step": step, "traces": step * r.batch_size // r.epochs, "tokens": tokens,
                   "train_loss": sum(step_losses[-50:]) / len(step_losses[-50:]), "train_s": te - t1 - eval_s,
                   **_eval_row(model, tok, held, n, layout, eval_count, step, ops)}
            eval_s += time.monotonic() - te
            curve.append(row)
            log(json.dumps(row))
        return False

    # constant: one run, its checkpoints are the curve; cosine: one decayed
    # run per point, on the first traces of the same stream (the last is the init).
    runs = [steps] if r.schedule == "constant" else sorted(marks)
    for run_steps in runs:
        step_losses: list[float] = []
        model, tok = fresh_model(r.spec, r.seed)
        lr_fn = (lr_fn_constant(r.lr, r.warmup_steps) if r.schedule == "constant"
                 else lr_fn_cosine(r.lr, r.warmup_steps, run_steps))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.seed)
            # `epochs` passes over the point's traces (sft_loop reshuffles each pass).
            tokens = sft_loop(model, tok, data[: run_steps * r.batch_size // r.epochs], steps=run_steps,
                              batch_size=r.batch_size, lr_fn=lr_fn, seed=r.seed,
                              callback=cb if r.schedule == "constant" else
                              (lambda step, tk, _n=run_steps: cb(step, tk) if step == _n else False),
                              encode=encode_record, name=f"carry-student-{r.spec}", log=log, losses=step_losses)
    fp, fp_t = flop_params(model), t_sum["flop_params"]
    gen_tokens = sum(len(encode_record(tok, x)[0]) for x in data)   # prompt + completion + EOS
    summary = {"recipe": dataclasses.asdict(r), "key": r.key(t_sum["key"]), "teacher": str(teacher_dir),
               "teacher_key": t_sum["key"], "n_digits": n, "layout": layout, "operators": ops, "curve": curve, "final": curve[-1],
               "trace_accuracy": trace_acc, "gen_s": gen_s, "flop_params": fp, "trained_tokens": tokens,
               "train_flops": 6 * fp * tokens, "teacher_gen_flops": 2 * fp_t * gen_tokens,
               "train_s": time.monotonic() - t1 - eval_s}
    _save(model, tok, out, summary)
    return summary


def _load(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def sampled_accuracy(model, tok, records: list[dict], n: int, *, samples: int = 1, seed: int = 0) -> float:
    """Accuracy of `samples` T = 1 samples per record (the driver's eval
    draws the same way: raw distribution, no top-k/top-p)."""
    return sum(evaluate(model, tok, records, n=n, temperature=1.0, seed=seed + i)["accuracy"]
               for i in range(samples)) / samples


def held_out_accuracy(model_dir, n: int, split: str, *, seed: int = 0, layout: str = "columns",
                      operators: int = 0) -> float:
    """Sampled accuracy of a checkpoint, 2 samples per problem (as the
    recipes' driver evaluation), on the "test" problems or the "validation"
    ones (disjoint from test, for choosing learning rates)."""
    records = held_out_records(n, split, layout=layout, operators=operators)
    model, tok = _load(model_dir)
    return sampled_accuracy(model, tok, records, n, samples=2, seed=seed)


def diagnose(model_dir, n: int, *, count: int = 500, layout: str = "columns", operators: int = 0) -> dict:
    """Where a checkpoint's errors come from, on the test problems: greedy and
    sampled (T = 1) accuracy (on the long-tail variant also per head and tail
    operators), wrong carries per sampled completion, the share of them that
    compound into a wrong digit, and the teacher-forced recovery probe (see
    `recovery_probe`)."""
    model, tok = _load(model_dir)
    held = held_out_records(n, "test", count, layout=layout, operators=operators)
    return _eval_row(model, tok, held, n, layout, count, 0, operators)


def truth_sft_run(init_dir, n: int, *, steps: int, batch_size: int, lr: float, eval_every: int, seed: int,
                  layout: str = "columns", operators: int = 0, log=print) -> list[dict]:
    """Ground-truth SFT from a checkpoint, in-process (the comparison's
    reference row): `steps` x `batch_size` fresh clean traces at constant
    `lr` (on the long-tail variant, Zipf-drawn operators as the student's
    data); [{step, accuracy}] on the test set every `eval_every` steps."""
    import torch

    model, tok = _load(init_dir)
    held = held_out_records(n, "test", layout=layout, operators=operators)
    curve = [{"step": 0, "accuracy": sampled_accuracy(model, tok, held, n, samples=2, seed=seed)}]

    def cb(step, tokens):
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "accuracy": sampled_accuracy(model, tok, held, n, samples=2,
                                                                     seed=seed + step)})
            log(f"[truth sft] step {step}: test accuracy {curve[-1]['accuracy']:.3f}")
        return False

    recs = train_records(steps * batch_size, n, seed=seed + 5000, layout=layout, operators=operators)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sft_loop(model, tok, recs, steps=steps, batch_size=batch_size, lr_fn=lr_fn_constant(lr, 2), seed=seed,
                 callback=cb, encode=encode_record, name="carry-truth-sft", log=log)
    return curve


def build_teacher(r: TeacherRecipe, use_cache: bool = True, log=print, **kw) -> Path:
    """Train (or reuse, cached under $OPD_CACHE_DIR/recipes/) the teacher."""
    final = cache_dir() / "recipes" / f"carry-teacher-{r.key()}"
    if use_cache and (final / "sft_summary.json").exists():
        return final
    return publish_dir(final, lambda tmp: train_teacher(r, tmp, log=log, **kw), done_marker="sft_summary.json",
                       replace=not use_cache)


def build_student(r: StudentRecipe, teacher_dir: Path, use_cache: bool = True, log=print, **kw) -> Path:
    """Train (or reuse) the student init on `teacher_dir`'s traces."""
    t_key = json.loads((Path(teacher_dir) / "sft_summary.json").read_text())["key"]
    final = cache_dir() / "recipes" / f"carry-student-{r.key(t_key)}"
    if use_cache and (final / "sft_summary.json").exists():
        return final
    return publish_dir(final, lambda tmp: train_student(r, teacher_dir, tmp, log=log, **kw),
                       done_marker="sft_summary.json", replace=not use_cache)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.carry_sft", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="build (or reuse) the teacher")
    c = sub.add_parser("student", help="build (or reuse) the teacher, then the student init and its SFT curve")
    for p in (t, c):
        p.add_argument("--teacher-spec", default=TeacherRecipe.spec)
        p.add_argument("--teacher-steps", type=int, default=TeacherRecipe.steps)
        p.add_argument("--teacher-batch-size", type=int, default=TeacherRecipe.batch_size)
        p.add_argument("--teacher-lr", type=float, default=TeacherRecipe.lr, help="peak lr (cosine decay to 0.1x)")
        p.add_argument("--recovery-frac", type=float, default=TeacherRecipe.recovery_frac)
        p.add_argument("--digits", type=int, default=DEFAULT_DIGITS)
        p.add_argument("--layout", default=TeacherRecipe.layout, choices=["plain", "columns"])
        p.add_argument("--operators", type=int, default=0,
                       help="the long-tail variant: K operators (uniform in the teacher's data, Zipf in the student's)")
        p.add_argument("--eval-every", type=int, default=250)
        p.add_argument("--eval-count", type=int, default=500)
        p.add_argument("--no-cache", action="store_true")
    c.add_argument("--spec", default=StudentRecipe.spec)
    c.add_argument("--n0", type=int, default=StudentRecipe.n0)
    c.add_argument("--points", type=int, default=StudentRecipe.points)
    c.add_argument("--lr", type=float, default=StudentRecipe.lr)
    c.add_argument("--batch-size", type=int, default=StudentRecipe.batch_size)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--schedule", default=StudentRecipe.schedule, choices=["constant", "cosine"])
    c.add_argument("--epochs", type=int, default=StudentRecipe.epochs,
                   help="passes over each point's traces (a longer SFT on the same data)")
    args = ap.parse_args(argv)
    tr = TeacherRecipe(spec=args.teacher_spec, steps=args.teacher_steps, batch_size=args.teacher_batch_size,
                       lr=args.teacher_lr, recovery_frac=args.recovery_frac,
                       n_digits=args.digits, layout=args.layout, operators=args.operators)
    tdir = build_teacher(tr, use_cache=not args.no_cache, eval_every=args.eval_every, eval_count=args.eval_count)
    ts = json.loads((tdir / "sft_summary.json").read_text())
    print(f"teacher {tdir}: {json.dumps(ts['final'])}")
    if args.cmd == "student":
        sr = StudentRecipe(spec=args.spec, n0=args.n0, points=args.points, lr=args.lr, batch_size=args.batch_size,
                           seed=args.seed, schedule=args.schedule, epochs=args.epochs)
        sdir = build_student(sr, tdir, use_cache=not args.no_cache, eval_count=args.eval_count)
        ss = json.loads((sdir / "sft_summary.json").read_text())
        print(f"student {sdir}: traces {ss['trace_accuracy']:.3f} correct")
        for row in ss["curve"]:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
