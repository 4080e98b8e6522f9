"""Restore post-trained behaviour after mid-training, as in "On-Policy Distillation" (Thinking
Machines Lab, 2025): its continual-learning experiment in miniature.

    python -m recipes.continual
    python -m recipes.continual --steps 40 --lr 1e-3
    python -m recipes.continual --post-steps 300 --mid-steps 200 --steps 10   # a quick look: smaller in-process SFT

The publication mid-trains a post-trained model (Qwen3-8B) on internal
documents: its knowledge of them rises, its instruction following (IF-eval)
drops, even with a share of chat data in the mix. On-policy distillation on
chat prompts only, with the model from before mid-training as the teacher,
then restores instruction following and keeps the new knowledge. In miniature:

  post-trained   `student-4l` trained from scratch on four string
                 instructions (recipes/continual_task.py: "rev:kqbz=" ->
                 "zbqk", up, sort, dup); it knows none of the facts.
  mid-trained    that model trained further (in-process SFT) on documents of
                 synthetic facts ("the code of qzv is 47.") and their question
                 form ("code qzv?" -> "47"): once on those only (the
                 publication's "midtrain (100%)"), once with 30% of the mix
                 instruction data ("midtrain (70%)").
  + distill      on-policy distillation of the 70% model on instruction
                 prompts only, teacher = the post-trained model (loss.kind=
                 reverse_kl), through the real driver.
  + SFT on teacher samples   the baseline: SFT on the teacher's completions
                 of the same prompts (loss.kind=sft train.sample_from=teacher).
  control        on-policy distillation on the fact questions with the same
                 teacher, which knows none of the facts: it pulls the student
                 to the teacher's answers and erases the facts.

Scores, on exported checkpoints (in-process transformers): knowledge = exact
match on every mid-trained fact's question (greedy); instruction score =
exact match on 400 held-out instruction prompts (greedy, and sampled at T = 1
as the driver samples). Output in runs/continual-<time>/ (or --out): the
driver run dirs, `continual.md` (the table), `continual.json`, `continual.png`
(the driver's held-out evals over steps).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from cluster.tiny_data import read_jsonl
from cluster.tiny_models import cache_dir, publish_dir, save_tokenizer
from recipes.common import default_run_dir, driver_config, one_ray_for_runs, run_driver, run_parser, write_json
from recipes.continual_task import (MAX_ANSWER_CHARS, MAX_PROMPT_CHARS, build_task_files, eval_instructions,
                                    fact_question, make_facts, midtrain_mix, train_instructions)
from recipes.report import format_table, read_metrics, save_figure, series, subplots
from recipes.sft import recipe_key

# Bump when the training code changes in a way that changes the result.
CONTINUAL_RECIPE_VERSION = 1
# Held-out instruction prompts (the "IF-eval").
N_EVAL = 400


def _key(obj, **extra) -> str:
    return recipe_key(dataclasses.asdict(obj), obj.spec, CONTINUAL_RECIPE_VERSION, **extra)


@dataclasses.dataclass(frozen=True)
class PostRecipe:
    """Post-training: SFT from a fresh init on steps x batch_size fresh
    instruction records, cosine lr to 0.1x."""

    spec: str = "student-4l"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0

    def key(self) -> str:
        return _key(self)


@dataclasses.dataclass(frozen=True)
class MidRecipe:
    """Mid-training of the post-trained model: SFT on steps x batch_size
    records of `midtrain_mix` (documents, fact questions, an
    `instruction_frac` share of fresh instruction records) at a constant lr
    after warmup, the way continued pre-training runs before any final
    anneal. (Annealed to 0.1x over 1500 steps, the 70% mix cost only 2 points of
    greedy instruction score: the decay re-sharpens what the mix still trains.)"""

    spec: str = "student-4l"
    n_facts: int = 200
    instruction_frac: float = 0.3
    qa_frac: float = 0.35
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0

    def key(self, post_key: str) -> str:
        return _key(self, post=post_key)


POST = PostRecipe()
MID = MidRecipe()


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def scores(model, tok, facts: list[tuple[str, str]], *, seed: int = 0) -> dict:
    """Knowledge (greedy exact match on every fact's question) and
    instruction scores (held-out exact match, greedy and sampled at T = 1)."""
    from recipes.common import model_accuracy

    ev = eval_instructions(N_EVAL)
    return {"knowledge": model_accuracy(model, tok, [fact_question(*f) for f in facts], max_new_tokens=4),
            "instruction": model_accuracy(model, tok, ev, max_new_tokens=MAX_ANSWER_CHARS + 1),
            "instruction_sampled": model_accuracy(model, tok, ev, temperature=1.0, samples_per_prompt=2, seed=seed,
                                                  max_new_tokens=MAX_ANSWER_CHARS + 1)}


def checkpoint_scores(model_dir, facts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.sft import set_threads

    set_threads()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return scores(model, AutoTokenizer.from_pretrained(model_dir), facts)


# --------------------------------------------------------------------------
# In-process SFT: post-training and mid-training (cached)
# --------------------------------------------------------------------------


def _save(model, tok, out: Path, summary: dict) -> None:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2))


def train_post(r: PostRecipe, out: Path, log=print) -> dict:
    import torch

    from recipes.carry_sft import fresh_model, lr_fn_cosine
    from recipes.sft import set_threads, sft_loop

    set_threads()
    model, tok = fresh_model(r.spec, r.seed)
    t0 = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        sft_loop(model, tok, train_instructions(r.steps * r.batch_size, seed=r.seed), steps=r.steps,
                 batch_size=r.batch_size, lr_fn=lr_fn_cosine(r.lr, r.warmup_steps, r.steps), seed=r.seed,
                 name="continual-post", log=log)
    summary = {"recipe": dataclasses.asdict(r), "key": r.key(), "train_s": time.monotonic() - t0}
    log(f"[continual post] done in {summary['train_s']:.0f}s")
    _save(model, tok, out, summary)
    return summary


def train_mid(r: MidRecipe, post_dir: Path, out: Path, log=print) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.carry_sft import lr_fn_constant
    from recipes.sft import set_threads, sft_loop

    set_threads()
    model = AutoModelForCausalLM.from_pretrained(post_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(post_dir)
    facts = make_facts(r.n_facts, r.seed)
    t0 = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        sft_loop(model, tok, midtrain_mix(facts, r.steps * r.batch_size, instruction_frac=r.instruction_frac,
                                          qa_frac=r.qa_frac, seed=r.seed),
                 steps=r.steps, batch_size=r.batch_size, lr_fn=lr_fn_constant(r.lr, r.warmup_steps),
                 seed=r.seed, name=f"continual-mid-{r.instruction_frac}", log=log)
    post_key = json.loads((Path(post_dir) / "sft_summary.json").read_text())["key"]
    summary = {"recipe": dataclasses.asdict(r), "key": r.key(post_key), "post": str(post_dir),
               "train_s": time.monotonic() - t0, "scores": scores(model, tok, facts)}
    log(f"[continual mid {r.instruction_frac}] {json.dumps(summary['scores'])}")
    _save(model, tok, out, summary)
    return summary


def build_post(r: PostRecipe = POST, log=print) -> Path:
    """Train (or reuse, cached under $OPD_CACHE_DIR/recipes/) the post-trained model."""
    final = cache_dir() / "recipes" / f"continual-post-{r.key()}"
    if (final / "sft_summary.json").exists():
        return final
    return publish_dir(final, lambda tmp: train_post(r, tmp, log=log), done_marker="sft_summary.json")


def build_mid(r: MidRecipe, post_dir: Path, log=print) -> Path:
    """Train (or reuse) the mid-trained model from `post_dir`."""
    post_key = json.loads((Path(post_dir) / "sft_summary.json").read_text())["key"]
    final = cache_dir() / "recipes" / f"continual-mid-{r.key(post_key)}"
    if (final / "sft_summary.json").exists():
        return final
    return publish_dir(final, lambda tmp: train_mid(r, post_dir, tmp, log=log), done_marker="sft_summary.json")


# --------------------------------------------------------------------------
# Driver runs
# --------------------------------------------------------------------------

# name -> (training prompts, driver overrides)
RUNS: dict[str, tuple[str, list[str]]] = {
    "distill": ("inst_train", ["loss.kind=reverse_kl"]),
    "sft_teacher_samples": ("inst_train", ["loss.kind=sft", "train.sample_from=teacher"]),
    "control_distill_facts": ("facts", ["loss.kind=reverse_kl"]),
}
LABELS = {
    "post": "post-trained (the teacher)",
    "mid100": "+ mid-train (100% documents)",
    "mid70": "+ mid-train (70% documents, 30% instructions)",
    "distill": "+ mid-train (70%) + on-policy distillation (instruction prompts)",
    "sft_teacher_samples": "+ mid-train (70%) + SFT on the teacher's samples (instruction prompts)",
    "control_distill_facts": "control: + mid-train (70%) + on-policy distillation on fact prompts",
}


def task_overrides(files: dict[str, Path], train: str) -> list[str]:
    """The driver on this recipe's data: `train` prompts ("inst_train" or
    "facts"), evaluated on the same kind of held-out prompts (instructions,
    or the fact questions), graded by exact match."""
    ev = files["inst_eval"] if train == "inst_train" else files["facts"]
    n_eval = len(read_jsonl(ev))
    return [f"data.train={files[train]}", f"data.eval={ev}", "eval.grader=recipes.continual_task:grade_record",
            "data.apply_chat_template=false", f"data.max_prompt_tokens={MAX_PROMPT_CHARS + 2}",
            f"rollout.max_new_tokens={MAX_ANSWER_CHARS + 1}", f"eval.num_prompts={n_eval}",
            "eval.samples_per_prompt=1", "student.max_model_len=64", "teacher.max_model_len=64"]


def continual_table(rows: dict[str, dict]) -> str:
    return format_table(["model", "knowledge (fact QA, greedy)", "instruction (held-out, greedy)",
                         "instruction (held-out, sampled T=1)"],
                        [[LABELS.get(k, k), s["knowledge"], s["instruction"], s["instruction_sampled"]]
                         for k, s in rows.items()])


def plot_runs(results: dict[str, list[dict]], scores_by_row: dict[str, dict], out_png: Path) -> Path:
    """The driver's held-out evals over steps: instruction prompts (the
    restoring runs) and fact questions (the control)."""
    fig, (ax1, ax2) = subplots(2, figsize=(10, 4))
    for name, rows in results.items():
        acc = series(rows, "eval/accuracy")
        if acc:
            (ax2 if RUNS[name][0] == "facts" else ax1).plot(*zip(*acc), marker="o", label=LABELS.get(name, name))
    ax1.axhline(scores_by_row["post"]["instruction_sampled"], color="gray", linestyle=":",
                label="post-trained teacher")
    ax1.set_ylabel("held-out instruction accuracy (sampled, T=1)")
    ax2.set_ylabel("fact QA accuracy (sampled, T=1)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6)
    fig.suptitle("restoring instruction following after mid-training")
    return save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    ap = run_parser("continual", __doc__, steps=30, prompts_per_step=32, lr=1e-3, eval_every=10,
                    lr_help="the learning rate of the three driver runs",
                    overrides_help="driver overrides applied to the three driver runs")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"driver runs to do (of {', '.join(RUNS)})")
    ap.add_argument("--post-steps", type=int, default=POST.steps, help="SFT steps of the post-trained model")
    ap.add_argument("--mid-steps", type=int, default=MID.steps, help="SFT steps of each mid-trained model")
    args = ap.parse_args(argv)
    if args.post_steps < 1 or args.mid_steps < 1:
        ap.error(f"--post-steps and --mid-steps must be >= 1, got {args.post_steps} and {args.mid_steps}")
    post_recipe = dataclasses.replace(POST, steps=args.post_steps)
    mid_recipe = dataclasses.replace(MID, steps=args.mid_steps)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if bad := [r for r in runs if r not in RUNS]:
        ap.error(f"--runs: unknown {bad}; valid: {', '.join(RUNS)}")
    out = Path(args.out or default_run_dir("continual")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    post = build_post(post_recipe)
    mids = {"mid100": build_mid(dataclasses.replace(mid_recipe, instruction_frac=0.0), post),
            "mid70": build_mid(mid_recipe, post)}
    facts = make_facts(mid_recipe.n_facts, mid_recipe.seed)
    files = build_task_files(mid_recipe.n_facts, fact_seed=mid_recipe.seed)
    rows = {k: checkpoint_scores(d, facts) for k, d in {"post": post, **mids}.items()}
    print(f"[continual] in-process SFT done ({(time.monotonic() - t_start) / 60:.1f} min)", flush=True)

    common = [f"student.model={mids['mid70']}", f"teacher.model={post}", f"eval.every_steps={args.eval_every}",
              f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts_per_step}",
              f"rollout.samples_per_prompt={args.samples_per_prompt}", f"learner.lr={args.lr}",
              "learner.warmup_steps=2", "run.export_final=true"]
    results: dict[str, list[dict]] = {}
    with one_ray_for_runs(driver_config(common + task_overrides(files, "inst_train"))):
        for name in runs:
            train, ov = RUNS[name]
            cfg = driver_config(common + task_overrides(files, train) + ov + list(args.overrides)
                                + [f"run.dir={out / name}"])
            run_dir = run_driver(cfg)
            results[name] = read_metrics(run_dir)
            rows[name] = checkpoint_scores(run_dir / "final", facts)
            print(f"[continual] {name}: {json.dumps(rows[name])}", flush=True)

    wall = time.monotonic() - t_start
    table = continual_table(rows)
    header = (f"# recipes.continual: {len(facts)} facts; in-process SFT {post_recipe.steps} steps (post-training), "
              f"{mid_recipe.steps} (each mid-training); driver runs {args.steps} steps x {args.prompts_per_step} "
              f"prompts x {args.samples_per_prompt} samples, lr {args.lr}; teacher = the post-trained model\n\n")
    md = header + table + f"\n\nRun time: {wall / 60:.1f} min (`python -m recipes.continual " \
                          f"{' '.join(argv if argv is not None else sys.argv[1:])}`).\n"
    (out / "continual.md").write_text(md)
    write_json(out / "continual.json", {"args": vars(args), "post": str(post), "mid": {k: str(v) for k, v in
                                        mids.items()}, "scores": rows, "runs": results, "wall_s": wall})
    png = plot_runs(results, rows, out / "continual.png") if results else None
    print("\n" + md)
    print(f"{out / 'continual.md'}, plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
