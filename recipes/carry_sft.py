"""SFT on the carry-trace addition task (recipes/carry_task.py): the teacher
(ground truth + recovery traces), teacher traces (sequence-level KD data) and
the student's SFT curve on them, with an evaluation that also breaks errors
down (wrong carries, recoveries, compounding) and a teacher-forced recovery
probe. In-process torch (recipes.sft.sft_loop), for choosing sizes and N0.

    python -m recipes.carry_sft teacher --steps 1500 --eval-every 250
    python -m recipes.carry_sft curve --teacher DIR --n0 16384 --spec student-4l

WIP (#24): the cached pair and the driver recipes build on these pieces.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from cluster.tiny_models import build_model, save_tokenizer
from recipes.carry_task import (DEFAULT_DIGITS, carry_trace, encode_trace, eval_problems, format_prompt, make_record,
                                trace_errors, train_records)
from recipes.sft import flop_params, set_threads, sft_loop


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


def generate(model, tok, prompts: list[str], *, n: int, temperature: float, seed: int, batch_size: int = 500) -> list[str]:
    """One completion per prompt (greedy at temperature 0, else sampled from the
    raw distribution), decoded without special tokens."""
    import torch

    model.eval()
    out_text: list[str] = []
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
    return out_text


def evaluate(model, tok, records: list[dict], *, n: int, temperature: float = 1.0, seed: int = 0) -> dict:
    """Accuracy and the error breakdown over `records` (one sample each)."""
    comps = generate(model, tok, [r["prompt"] for r in records], n=n, temperature=temperature, seed=seed)
    errs = [trace_errors(c, r["prompt"]) for c, r in zip(comps, records, strict=True)]
    wc = sum(e.wrong_carries for e in errs)
    return {"accuracy": sum(e.correct for e in errs) / len(errs),
            "well_formed": sum(e.well_formed for e in errs) / len(errs),
            "wrong_carries_per_completion": wc / len(errs),
            "recovered_share": (sum(e.recovered for e in errs) / wc) if wc else None,
            "compounded_share": (sum(e.compounded for e in errs) / wc) if wc else None}


def recovery_probe(model, tok, n: int, count: int = 500, seed: int = 0, layout: str = "plain") -> dict:
    """Teacher-forced: the clean trace with step j's carry flipped (j uniform in
    [0, n-2]), up to the next step's digit. Returns the share of problems whose
    greedy next digit is the true one (recovers) or the one the wrong carry
    implies (compounds), and the mean log-probability of the true digit."""
    import torch

    model.eval()
    rng = random.Random(seed)
    probs = eval_problems(n, count)
    rec = comp = 0
    lp_sum = 0.0
    by_j: dict[int, list[tuple[list[int], int, int]]] = {}
    for a, b in probs:
        j = rng.randrange(n - 1)
        wrong, _ = carry_trace(a, b, n, wrong_carry_at=j)
        clean, _ = carry_trace(a, b, n)
        prefix = format_prompt(a, b, n, layout) + wrong[: 3 * (j + 1)]   # up to and including the space after step j
        true_d = int(clean[3 * (j + 1)])
        wc = int(wrong[3 * j + 1])
        comp_d = ((a // 10 ** (j + 1)) % 10 + (b // 10 ** (j + 1)) % 10 + wc) % 10
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


def teacher_traces(model, tok, prompts: list[str], *, n: int, temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Sequence-level KD data: the teacher's sampled completions as answers
    (unfiltered, as a teacher-generated SFT set is)."""
    comps = generate(model, tok, prompts, n=n, temperature=temperature, seed=seed)
    return [{"prompt": p, "answer": c.strip()} for p, c in zip(prompts, comps, strict=True)]


def lr_fn_constant(lr: float, warmup: int):
    return lambda s: lr * min(1.0, (s + 1) / warmup)


def lr_fn_cosine(lr: float, warmup: int, steps: int, floor: float = 0.1):
    def f(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        frac = min(1.0, (s - warmup) / max(1, steps - warmup))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
    return f


def train_teacher(args) -> int:
    import torch

    set_threads()
    n = args.digits
    model, tok = fresh_model(args.spec, args.seed)
    held = [make_record(a, b, n, layout=args.layout) for a, b in eval_problems(n, args.eval_count)]
    recs = train_records(args.steps * args.batch_size, n, seed=args.seed + 100, recovery_frac=args.recovery_frac,
                         layout=args.layout)
    curve, t0, eval_s = [], time.monotonic(), 0.0

    def cb(step, tokens):
        nonlocal eval_s
        if step % args.eval_every == 0 or step == args.steps:
            te = time.monotonic()
            row = {"step": step, "tokens": tokens, "train_s": te - t0 - eval_s,
                   "greedy": evaluate(model, tok, held, n=n, temperature=0)["accuracy"],
                   **evaluate(model, tok, held, n=n, temperature=1.0, seed=step),
                   "probe": recovery_probe(model, tok, n, count=args.eval_count, layout=args.layout)}
            eval_s += time.monotonic() - te
            curve.append(row)
            print(json.dumps(row), flush=True)
        return False

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        tokens = sft_loop(model, tok, recs, steps=args.steps, batch_size=args.batch_size,
                          lr_fn=lr_fn_cosine(args.lr, 20, args.steps), seed=args.seed, callback=cb,
                          encode=encode_record, name=f"carry-{args.spec}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "sft_summary.json").write_text(json.dumps({
        "args": vars(args), "curve": curve, "flop_params": flop_params(model), "trained_tokens": tokens,
        "train_flops": 6 * flop_params(model) * tokens}, indent=2))
    print(f"saved {out}")
    return 0


def curve(args) -> int:
    """Student SFT on one stream of fresh teacher traces (one pass, constant lr
    after warmup): held-out accuracy at log-spaced amounts of data, N0/8 .. N0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads()
    n = args.digits
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    ttok = AutoTokenizer.from_pretrained(args.teacher)
    steps = args.n0 // args.batch_size
    prompts = [r["prompt"] for r in train_records(args.n0, n, seed=args.seed + 1000, layout=args.layout)]
    t0 = time.monotonic()
    data = teacher_traces(teacher, ttok, prompts, n=n, seed=args.seed)
    gen_s = time.monotonic() - t0
    print(json.dumps({"teacher_traces": len(data), "gen_s": gen_s,
                      "trace_accuracy": sum(trace_errors(r["answer"], r["prompt"]).correct for r in data) / len(data)}),
          flush=True)
    model, tok = fresh_model(args.spec, args.seed)
    held = [make_record(a, b, n, layout=args.layout) for a, b in eval_problems(n, args.eval_count)]
    marks = {args.n0 // 2 ** k // args.batch_size for k in range(args.points)}
    t1 = time.monotonic()

    def cb(step, tokens):
        if step in marks:
            row = {"step": step, "traces": step * args.batch_size, "train_s": time.monotonic() - t1,
                   "greedy": evaluate(model, tok, held, n=n, temperature=0)["accuracy"],
                   **evaluate(model, tok, held, n=n, temperature=1.0, seed=step),
                   "probe": recovery_probe(model, tok, n, count=args.eval_count, layout=args.layout)}
            print(json.dumps(row), flush=True)
        return False

    # Records in order, one pass: sft_loop shuffles within its single epoch.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        sft_loop(model, tok, data, steps=steps, batch_size=args.batch_size, lr_fn=lr_fn_constant(args.lr, 20),
                 seed=args.seed, callback=cb, encode=encode_record, name=f"curve-{args.spec}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.carry_sft", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--spec", default="teacher")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--recovery-frac", type=float, default=0.25)
    t.add_argument("--out", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--teacher", required=True)
    c.add_argument("--spec", default="student-4l")
    c.add_argument("--n0", type=int, default=16384)
    c.add_argument("--points", type=int, default=4)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=3e-3)
    for p in (t, c):
        p.add_argument("--digits", type=int, default=DEFAULT_DIGITS)
        p.add_argument("--layout", default="plain", choices=["plain", "columns"])
        p.add_argument("--eval-every", type=int, default=250)
        p.add_argument("--eval-count", type=int, default=500)
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return train_teacher(args) if args.cmd == "teacher" else curve(args)


if __name__ == "__main__":
    sys.exit(main())
