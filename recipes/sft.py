"""Plain supervised fine-tuning on the arithmetic task: builds the demo's
teacher and the student's initial checkpoint.

The demo needs a teacher that actually solves the task and a smaller student
that solves it sometimes (on-policy distillation learns from the student's own
samples, so they must sometimes be right). Both are made here by the project's
own SFT, in minutes on a CPU: a plain torch loop (AdamW, cosine schedule) with
a completion-only loss on the answer digits and the EOS token `<|im_end|>`.
The prompt is the raw record text ("23+58="), no chat template, so the driver
runs these models with `data.apply_chat_template=false`.

Checkpoints are saved with `save_pretrained` (tokenizer included), cached under
`$OPD_CACHE_DIR/recipes/<name>-<hash of the recipe>` and written atomically
(temp dir, then rename), so a rerun reuses them and a crash leaves nothing
half-written. Next to the weights, `sft_summary.json` records the held-out
greedy accuracy, the wall time and the training FLOPs (the post's table counts
the initialisation's FLOPs too).

The SFT prompts exclude the task's held-out set (`build_task("arithmetic")`'s
eval.jsonl), which is what the driver evaluates on, so held-out numbers stay
held out for the teacher and the student alike.

    python -m recipes.sft                    # build (or reuse) teacher + student, print accuracies
    python -m recipes.sft student --steps 300 --no-cache   # try other settings
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from cluster.tiny_data import TASKS, build_task, format_problem, grade
from cluster.tiny_models import SPECS, build_model, cache_dir, publish_dir, save_tokenizer

# Bump when the training code changes in a way that changes the result.
RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SFTRecipe:
    """One SFT run: architecture, data and optimisation. The cache key is a
    hash of all of it."""

    # Name of the result (cache directory prefix).
    name: str
    # Architecture: a key of cluster.tiny_models.SPECS.
    spec: str
    # Optimizer steps.
    steps: int
    # Sequences per step.
    batch_size: int = 128
    # Peak AdamW learning rate (linear warmup, then cosine to lr * min_lr_ratio).
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    # Std of the fresh normal init of weight matrices (the random tiny models
    # of cluster/tiny_models use 0.08, which is meant for distinct random
    # distributions, not for training).
    init_std: float = 0.02
    # Built-in task (cluster/tiny_data.py): "arithmetic-fixed" (zero-padded,
    # fixed width: learnt in hundreds of steps) or "arithmetic" ("7+58=").
    task: str = "arithmetic-fixed"
    # Number of SFT problems drawn (without replacement) from all problems
    # that are not in the task's held-out set; 0 = all of them.
    num_train_problems: int = 0
    seed: int = 0
    # Early stop: > 0 evaluates held-out greedy accuracy every `stop_check_every`
    # steps and stops at the first evaluation reaching this accuracy (the lr
    # schedule stays that of `steps`). SFT on this task learns through a sharp
    # phase transition whose step moves with the machine's float rounding
    # (the same 900-step recipe gave 0.78 on one machine and 0.065 on
    # another), so a student init defined by its accuracy is reproducible
    # where one defined by a step count is not.
    stop_at_accuracy: float = 0.0
    stop_check_every: int = 25

    def key(self) -> str:
        recipe = dataclasses.asdict(self)
        if not self.stop_at_accuracy:  # keys of recipes without an early stop stay what they were
            del recipe["stop_at_accuracy"], recipe["stop_check_every"]
        return recipe_key(recipe, self.spec, RECIPE_VERSION)


def recipe_key(recipe: dict, spec: str, version: int, **extra) -> str:
    """The cache key of a trained model: a hash of its recipe (as a dict),
    its architecture (cluster.tiny_models.SPECS[spec]), the recipe code's
    version and any `extra` (e.g. the key of the teacher it learned from)."""
    payload = json.dumps({"recipe": recipe, "spec": dataclasses.asdict(SPECS[spec]), "v": version, **extra},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# The demo pair. The teacher is the 4-layer x 256 `tiny:teacher` architecture
# trained to convergence; the student is the 4-layer x 128 `student-4l`
# architecture (a quarter of the parameters), trained at a constant lr until
# its held-out greedy accuracy first reaches 0.6: past the task's phase
# transition (it has the algorithm, it makes mistakes), clearly weaker than the
# teacher. The stop makes the init reproducible across machines; a fixed step
# count did not (see stop_at_accuracy).
TEACHER_RECIPE = SFTRecipe(name="teacher-sft", spec="teacher", steps=1500, batch_size=64, lr=3e-3, seed=0)
STUDENT_RECIPE = SFTRecipe(name="student-sft", spec="student-4l", steps=3000, batch_size=64, lr=3e-3,
                           min_lr_ratio=1.0, stop_at_accuracy=0.6, seed=0)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def set_threads() -> int:
    """torch intra-op threads for SFT and evaluation: $OPD_SFT_THREADS, default
    2 (the machine's cores). On a machine shared with other busy processes,
    use 1: two OpenMP threads that wait on each other at every op were up to
    40x slower than one thread for these tiny models (measured: one student
    step 0.10 s with 1 thread vs 4 s with 2 at load average 20)."""
    import torch

    n = int(os.environ.get("OPD_SFT_THREADS", "2"))
    torch.set_num_threads(n)
    return n


def heldout_records(task: str = "arithmetic-fixed") -> list[dict]:
    """The task's held-out records (what the driver's eval uses for
    `data.train=tiny:<task>`)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a built-in task; valid: {', '.join(TASKS)}")
    _, eval_path = build_task(task)
    return [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]


def train_problems(recipe: SFTRecipe) -> list[dict]:
    """All 2-digit problems of the task minus the held-out ones, shuffled by
    the recipe's seed (optionally the first `num_train_problems`)."""
    held = {r["prompt"] for r in heldout_records(recipe.task)}
    fixed = recipe.task == "arithmetic-fixed"
    recs = [format_problem(a, b, 2, fixed) for a in range(100) for b in range(100)]
    recs = [r for r in recs if r["prompt"] not in held]
    random.Random(recipe.seed).shuffle(recs)
    if recipe.num_train_problems:
        recs = recs[: recipe.num_train_problems]
    return recs


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + EOS, and the loss mask (1 on the answer
    and EOS tokens: completion-only loss)."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return p + a, [0] * len(p) + [1] * len(a)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (B, T) input ids, attention mask and loss mask."""
    import torch

    T = max(len(ids) for ids, _ in examples)
    ids_B_T = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn_B_T = torch.zeros((len(examples), T), dtype=torch.long)
    loss_mask_B_T = torch.zeros((len(examples), T), dtype=torch.float32)
    for b, (ids, m) in enumerate(examples):
        ids_B_T[b, : len(ids)] = torch.tensor(ids)
        attn_B_T[b, : len(ids)] = 1
        loss_mask_B_T[b, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids_B_T, attn_B_T, loss_mask_B_T


def lr_at(step: int, recipe: SFTRecipe) -> float:
    """Linear warmup to recipe.lr, then cosine down to lr * min_lr_ratio."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cos)


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

def greedy_accuracy(model, tokenizer, records: list[dict], batch_size: int = 256,
                    max_new_tokens: int = 5) -> float:
    """Held-out accuracy of greedy decoding (left-padded batched generate),
    graded with the task's grader."""
    import torch

    model.eval()
    correct = 0.0
    for i in range(0, len(records), batch_size):
        chunk = records[i: i + batch_size]
        prompts = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in chunk]
        T = max(len(p) for p in prompts)
        ids_B_T = torch.tensor([[tokenizer.pad_token_id] * (T - len(p)) + p for p in prompts])
        attn_B_T = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids_B_T, attention_mask=attn_B_T, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for r, row in zip(chunk, out[:, T:].tolist(), strict=True):
            correct += grade(tokenizer.decode(row, skip_special_tokens=True), r["answer"])
    return correct / max(1, len(records))


def flop_params(model) -> int:
    """Parameters that cost matmul FLOPs per token: all of them except the
    input embedding table (a lookup). The LM head counts."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb) + (
        emb.numel() if model.config.tie_word_embeddings else 0)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

def sft_loop(model, tokenizer, records: list[dict], *, steps: int, batch_size: int, lr_fn, seed: int,
             weight_decay: float = 0.01, log=print, name: str = "sft", callback=None, encode=None,
             losses: list[float] | None = None) -> int:
    """Completion-only SFT of `model` on `records` for `steps` AdamW steps at
    learning rate `lr_fn(step)`; returns the tokens processed (prompt +
    answer + EOS, no padding). `callback(step, tokens_so_far)` runs after
    every step (evaluation curves); the model is in train mode again after it;
    a callback returning True stops training after that step. `encode(tokenizer,
    record) -> (ids, loss_mask)` replaces `encode_example` (e.g. masks that
    leave some answer tokens untrained). `losses`, if given, gets every step's
    loss (nats per trained token, computed before that step's update)."""
    import torch

    set_threads()
    model.train()
    if encode is None:
        examples = [encode_example(tokenizer, r["prompt"], r["answer"]) for r in records]
    else:
        examples = [encode(tokenizer, r) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=lr_fn(0), weight_decay=weight_decay, betas=(0.9, 0.98))
    rng = random.Random(seed + 1)
    order: list[int] = []
    tokens = 0
    t0 = time.monotonic()
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        ids_B_T, attn_B_T, mask_B_T = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_fn(step)
        logits_B_T_V = model(input_ids=ids_B_T, attention_mask=attn_B_T).logits
        # Position t predicts token t+1; train only where token t+1 is answer/EOS.
        lp_B_T = torch.log_softmax(logits_B_T_V[:, :-1].float(), dim=-1).gather(
            -1, ids_B_T[:, 1:, None]).squeeze(-1)
        m_B_T = mask_B_T[:, 1:]
        loss = -(lp_B_T * m_B_T).sum() / m_B_T.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if losses is not None:
            losses.append(loss.item())
        tokens += int(attn_B_T.sum())
        if (step + 1) % 50 == 0 or step == 0:
            log(f"[sft {name}] step {step + 1}/{steps} loss {loss.item():.4f} {time.monotonic() - t0:.0f}s")
        if callback is not None:
            stop = callback(step + 1, tokens)
            model.train()
            if stop:
                log(f"[sft {name}] stopped early after step {step + 1}")
                break
    return tokens


def train_sft(recipe: SFTRecipe, out_dir: Path, log=print, eval_every: int = 0) -> dict:
    """Train `recipe` from a fresh init and save the model + tokenizer in
    `out_dir` (which must not exist yet). Returns the summary dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads()
    base = build_model(recipe.spec)  # config + tokenizer of the architecture
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, recipe.init_std)
    problems = train_problems(recipe)
    held = heldout_records(recipe.task)
    curve = []
    eval_s = 0.0
    t0 = time.monotonic()

    stopped_at = None

    def on_step(step: int, tokens: int) -> bool:
        nonlocal eval_s, stopped_at
        check = recipe.stop_at_accuracy > 0 and step % recipe.stop_check_every == 0
        if (check or (eval_every and step % eval_every == 0)) and step < recipe.steps:
            te = time.monotonic()
            acc = greedy_accuracy(model, tokenizer, held)
            eval_s += time.monotonic() - te
            curve.append({"step": step, "heldout_greedy_accuracy": acc, "train_s": te - t0 - eval_s})
            log(f"[sft {recipe.name}] step {step} held-out greedy accuracy {acc:.3f}")
            if check and acc >= recipe.stop_at_accuracy:
                stopped_at = step
                return True
        return False

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        trained_tokens = sft_loop(model, tokenizer, problems, steps=recipe.steps, batch_size=recipe.batch_size,
                                  lr_fn=lambda s: lr_at(s, recipe), seed=recipe.seed,
                                  weight_decay=recipe.weight_decay, log=log, name=recipe.name, callback=on_step)
    train_s = time.monotonic() - t0 - eval_s  # without the curve's evaluations
    acc = greedy_accuracy(model, tokenizer, held)
    n_flop_params = flop_params(model)
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "key": recipe.key(),
        "heldout_greedy_accuracy": acc,
        "heldout_problems": len(held),
        "train_problems": len(problems),
        "train_s": train_s,
        "trained_tokens": trained_tokens,
        "stopped_at_step": stopped_at,
        "flop_params": n_flop_params,
        "num_params": sum(p.numel() for p in model.parameters()),
        # 6 N D: forward (2 N) + backward (4 N) per processed token.
        "train_flops": 6 * n_flop_params * trained_tokens,
        "curve": curve,
    }
    log(f"[sft {recipe.name}] done in {train_s:.0f}s: held-out greedy accuracy {acc:.3f}")
    if recipe.stop_at_accuracy and stopped_at is None:
        log(f"[sft {recipe.name}] WARNING: never reached the target held-out accuracy {recipe.stop_at_accuracy} "
            f"in {recipe.steps} steps; the model is the last step's ({acc:.3f})")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(out_dir)
    (out_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def recipe_dir(recipe: SFTRecipe) -> Path:
    return cache_dir() / "recipes" / f"{recipe.name}-{recipe.key()}"


def build_sft_model(recipe: SFTRecipe, log=print, use_cache: bool = True, eval_every: int = 0) -> Path:
    """Train (or reuse from the cache) `recipe`; returns the checkpoint dir.
    `eval_every` > 0 records a held-out accuracy curve in the summary."""
    final = recipe_dir(recipe)
    if use_cache and (final / "sft_summary.json").exists():
        return final
    return publish_dir(final, lambda tmp: train_sft(recipe, tmp, log=log, eval_every=eval_every),
                       done_marker="sft_summary.json", replace=not use_cache)


def read_summary(model_dir: str | os.PathLike) -> dict:
    """The `sft_summary.json` written next to an SFT checkpoint."""
    p = Path(model_dir) / "sft_summary.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: {model_dir} is not a checkpoint built by recipes.sft "
                                f"(build one with `python -m recipes.sft`)")
    return json.loads(p.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.sft", description=__doc__.split("\n\n")[0])
    ap.add_argument("which", nargs="?", default="both", choices=["teacher", "student", "both"])
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's lr")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=0, help="print held-out accuracy every N steps "
                    "(exploration; implies --no-cache semantics for the curve only)")
    ap.add_argument("--build-eval-every", type=int, default=0, help="when building, record a held-out "
                    "accuracy curve every N steps in sft_summary.json")
    ap.add_argument("--no-cache", action="store_true", help="retrain even if a cached copy exists")
    args = ap.parse_args(argv)
    todo = {"teacher": [TEACHER_RECIPE], "student": [STUDENT_RECIPE],
            "both": [TEACHER_RECIPE, STUDENT_RECIPE]}[args.which]
    for r in todo:
        changes = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size))
                   if v is not None}
        r = dataclasses.replace(r, **changes)
        if args.eval_every:
            with tempfile.TemporaryDirectory() as d:
                s = train_sft(r, Path(d) / "m", eval_every=args.eval_every)
        else:
            path = build_sft_model(r, use_cache=not args.no_cache, eval_every=args.build_eval_every)
            s = read_summary(path)
            print(f"{r.name}: {path}")
        print(f"{r.name}: held-out greedy accuracy {s['heldout_greedy_accuracy']:.3f} "
              f"({s['heldout_problems']} problems), SFT {s['train_s']:.0f}s, {s['num_params']:,} params, "
              f"{s['train_flops']:.2e} FLOPs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
