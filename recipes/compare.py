"""The comparison of "On-Policy Distillation" (Thinking Machines Lab, 2025) in miniature: from one student initialisation, which
training signal reaches the teacher's accuracy for the least compute?

    python -m recipes.compare                       # all methods, default settings
    python -m recipes.compare --steps 20 --methods reverse_kl,seq_kd

Methods (all start from the same SFT student init, see recipes/sft.py, and
see the same number of prompts x samples per step):

  reverse_kl     on-policy distillation (the method of "On-Policy Distillation"): the student
                 samples, the teacher scores each sampled token, per-token
                 reverse-KL advantage (loss.kind=reverse_kl).
  forward_kl     on-policy forward KL over the teacher's top-k (GKD-style):
                 loss.kind=forward_kl_topk, teacher.top_k=K.
  seq_kd         off-policy sequence-level KD: the teacher writes the
                 completions, the student is trained by SFT on them
                 (loss.kind=sft, train.sample_from=teacher).
  sft            more SFT on ground-truth answers (the post's "SFT-2M" row:
                 continue the initialisation's recipe), plain torch
                 (recipes.sft.sft_loop), evaluated like the driver runs.

The first three run through the real driver (cluster.train.run). RL on the
task reward (the driver's reward.fn with loss.kl_coef=0) is not run here (the
post's RL row is reported as '-' there too).

Output, in runs/compare-<time>/ (or --out): one driver run directory per
method, `compare.md` (the tables), `compare.json`, `compare.png` (held-out
accuracy against student FLOPs and against total FLOPs). FLOPs are counted
as in recipes/report.py (6N per trained token, 2N per sampled or scored
token); the student init's own SFT FLOPs are the table's first row, as in the
seed. For seq_kd only what the method needs is counted (the teacher writes,
the student trains); the driver also scores the teacher's samples with the
teacher and the student for its metrics, which a dedicated SFT job would not.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from recipes.common import (accuracy, build_pair, default_run_dir, driver_config, mean_prompt_tokens,
                            model_accuracy, run_driver, run_parser, write_json)
from recipes.report import (FlopCounts, cumulative_flops, flops_to_reach, format_table, read_metrics, save_figure,
                            series, subplots)

# method -> (driver overrides, FLOP accounting of recipes.report.step_flops)
DRIVER_METHODS: dict[str, tuple[list[str], str]] = {
    "reverse_kl": (["loss.kind=reverse_kl"], "on_policy"),
    "forward_kl": (["loss.kind=forward_kl_topk", "teacher.top_k=16"], "on_policy"),
    "seq_kd": (["loss.kind=sft", "train.sample_from=teacher"], "seq_kd"),
}
ALL_METHODS = ("reverse_kl", "forward_kl", "seq_kd", "sft")
LABELS = {
    "reverse_kl": "on-policy distillation (reverse KL)",
    "forward_kl": "on-policy forward KL, top-16 (GKD-style)",
    "seq_kd": "sequence-level KD (SFT on teacher samples)",
    "sft": "more SFT on ground truth",
}


def run_sft_baseline(pair, *, steps: int, batch_size: int, lr: float, eval_every: int, eval_cfg, seed: int,
                     log=print) -> list[dict]:
    """Continue the student init's SFT on ground-truth answers; returns rows
    shaped like the driver's metrics (step, eval/accuracy, tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.sft import STUDENT_RECIPE, heldout_records, sft_loop, train_problems

    tok = AutoTokenizer.from_pretrained(pair.student)
    model = AutoModelForCausalLM.from_pretrained(pair.student, dtype=torch.float32)
    held = heldout_records()[: eval_cfg.num_prompts]

    def ev(step: int, tokens: int) -> dict:
        acc = model_accuracy(model, tok, held, temperature=eval_cfg.temperature,
                             samples_per_prompt=eval_cfg.samples_per_prompt, seed=seed + step)
        log(f"[compare sft] step {step}: held-out accuracy {acc:.3f}")
        return {"step": step, "eval/accuracy": acc, "sft/tokens": tokens}

    rows = [ev(0, 0)]

    def callback(step: int, tokens: int) -> None:
        if step % eval_every == 0 or step == steps:
            rows.append(ev(step, tokens))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sft_loop(model, tok, train_problems(STUDENT_RECIPE), steps=steps, batch_size=batch_size,
                 lr_fn=lambda s: lr, seed=seed + 17, log=log, name="compare-sft", callback=callback)
    return rows


def accuracy_vs_flops(rows: list[dict], flops: dict[int, FlopCounts], init_flops: float = 0.0,
                      which: str = "total") -> list[tuple[float, float]]:
    """(cumulative FLOPs incl. the init's, held-out accuracy) at every eval."""
    out = []
    for step, acc in series(rows, "eval/accuracy"):
        if step in flops:
            f = flops[step]
            out.append((init_flops + (f.total if which == "total" else f.student), acc))
    return out


def comparison_tables(results: dict[str, dict], init: dict, teacher_acc: float, targets: list[float]) -> str:
    """The table of "On-Policy Distillation" (one row per method) and the compute-to-target
    table. `results[m]` holds rows, flops (step -> FlopCounts); `init` holds
    the student init's accuracy and SFT FLOPs."""
    head = ["method", "held-out accuracy", "teacher FLOPs", "student FLOPs"]
    rows = [["initialisation: student SFT", init["accuracy"], 0.0, init["flops"]]]
    for m, r in results.items():
        acc = series(r["rows"], "eval/accuracy")
        last = max(r["flops"])
        f = r["flops"][last]
        rows.append([f"{LABELS.get(m, m)} ({last} steps)", acc[-1][1] if acc else None, f.teacher,
                     init["flops"] + f.student])
    rows.append(["teacher", teacher_acc, None, None])
    out = format_table(head, rows)
    head2 = ["method"] + [f"total FLOPs to reach {t:.2f}" for t in targets] + \
            [f"compute ratio vs {LABELS['sft'] if 'sft' in results else 'slowest'} at {t:.2f}" for t in targets]
    reach = {m: [flops_to_reach(accuracy_vs_flops(r["rows"], r["flops"]), t) for t in targets]
             for m, r in results.items()}
    rows2 = []
    for m in results:
        ratios = []
        for i in range(len(targets)):
            base = reach["sft"][i] if "sft" in reach else max((v[i] for v in reach.values() if v[i] is not None),
                                                              default=None)
            mine = reach[m][i]
            ratios.append(None if base is None or mine is None or mine == 0 else f"{base / mine:.1f}x")
        rows2.append([LABELS.get(m, m)] + reach[m] + ratios)
    out += "\n\n" + format_table(head2, rows2)
    out += ("\n\nFLOPs exclude the initialisation (it is common to all methods) and held-out evaluation; "
            "'-' = not reached within the run.")
    return out


def choose_targets(results: dict[str, dict], teacher_acc: float) -> tuple[float, list[float]]:
    """The init's accuracy (mean of the methods' step-0 evals) and the target
    accuracies of the compute table: the best accuracy that every method
    reaches (the post compares methods at one common accuracy), then half
    and three quarters of the init-to-teacher gap."""
    first = [series(r["rows"], "eval/accuracy")[0][1] for r in results.values()]
    init_acc = sum(first) / len(first)
    common = min(max(a for _, a in series(r["rows"], "eval/accuracy")) for r in results.values())
    gap = teacher_acc - init_acc
    return init_acc, [round(common, 3), round(init_acc + 0.5 * gap, 3), round(init_acc + 0.75 * gap, 3)]


def plot_compare(results: dict[str, dict], init_acc: float, teacher_acc: float, out_png: Path) -> Path:
    fig, axes = subplots(3, figsize=(15, 4))
    for m, r in results.items():
        for ax, which in ((axes[0], "student"), (axes[1], "total")):
            pts = accuracy_vs_flops(r["rows"], r["flops"], which=which)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS.get(m, m))
        acc = series(r["rows"], "eval/accuracy")
        axes[2].plot(*zip(*acc), marker="o", label=LABELS.get(m, m))
    for ax, xl in zip(axes, ("student FLOPs (sampling + training)", "total FLOPs (student + teacher)", "step"),
                      strict=True):
        ax.axhline(teacher_acc, color="gray", linestyle="--", label="teacher")
        ax.axhline(init_acc, color="gray", linestyle=":", label="student init")
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out accuracy (sampled, T=1)")
        ax.set_ylim(0, 1.02)
    axes[0].set_xscale("symlog", linthresh=1e9)
    axes[1].set_xscale("symlog", linthresh=1e9)
    axes[2].legend(fontsize=7)
    return save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    ap = run_parser("compare", __doc__, steps=60, prompts_per_step=64, lr=2e-4, eval_every=10,
                    lr_help="the same learning rate for every method",
                    overrides_help="driver overrides applied to every driver method")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {ALL_METHODS}")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; valid: {', '.join(ALL_METHODS)}")
    out = Path(args.out or default_run_dir("compare")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    pair = build_pair()
    t_sum, s_sum = pair.summaries()
    n_s, n_t = s_sum["flop_params"], t_sum["flop_params"]
    common = [f"student.model={pair.student}", f"teacher.model={pair.teacher}", "eval.every_steps="
              f"{args.eval_every}", f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts_per_step}",
              f"rollout.samples_per_prompt={args.samples_per_prompt}", f"learner.lr={args.lr}",
              "learner.warmup_steps=2", "run.export_final=false", *args.overrides]
    cfg0 = driver_config(common)
    p_tok = mean_prompt_tokens()
    results: dict[str, dict] = {}
    for m in methods:
        t0 = time.monotonic()
        if m == "sft":
            rows = run_sft_baseline(pair, steps=args.steps, batch_size=args.prompts_per_step * args.samples_per_prompt,
                                    lr=args.lr, eval_every=args.eval_every, eval_cfg=cfg0.eval, seed=cfg0.run.seed)
            # Ground-truth SFT: training FLOPs only, from the tokens it processed.
            flops = {r["step"]: FlopCounts(6.0 * n_s * r["sft/tokens"], 0.0) for r in rows}
        else:
            ov, kind = DRIVER_METHODS[m]
            cfg = driver_config(common + ov + [f"run.dir={out / m}"])
            rows = read_metrics(run_driver(cfg))
            flops = cumulative_flops(rows, method=kind, n_student=n_s, n_teacher=n_t,
                                     prompt_tokens_per_completion=p_tok)
        results[m] = {"rows": rows, "flops": flops, "wall_s": time.monotonic() - t0}
        print(f"[compare] {m} done in {results[m]['wall_s']:.0f}s", flush=True)

    from recipes.sft import heldout_records

    held = heldout_records()[: cfg0.eval.num_prompts]
    teacher_acc = accuracy(pair.teacher, held, temperature=cfg0.eval.temperature,
                           samples_per_prompt=cfg0.eval.samples_per_prompt, seed=cfg0.run.seed)
    init_acc, targets = choose_targets(results, teacher_acc)
    init = {"accuracy": init_acc, "flops": s_sum["train_flops"]}
    tables = comparison_tables(results, init, teacher_acc, targets)
    header = (f"# recipes.compare: {args.steps} steps x {args.prompts_per_step} prompts x "
              f"{args.samples_per_prompt} samples, lr {args.lr}\n\nstudent {n_s:,} matmul params, teacher "
              f"{n_t:,}; teacher SFT cost {t_sum['train_flops']:.2e} FLOPs (not counted below, as in "
              f"\"On-Policy Distillation\"). "
              f"Targets: the best accuracy every method reaches, then half and three quarters of the "
              f"init-to-teacher gap.\n\n")
    (out / "compare.md").write_text(header + tables + "\n")
    write_json(out / "compare.json", {
        "args": vars(args), "teacher_accuracy": teacher_acc, "init": init, "targets": targets,
        "n_student": n_s, "n_teacher": n_t,
        "methods": {m: {"rows": r["rows"], "wall_s": r["wall_s"],
                        "flops": {str(k): [v.student, v.teacher] for k, v in r["flops"].items()}}
                    for m, r in results.items()}})
    png = plot_compare(results, init_acc, teacher_acc, out / "compare.png")
    print("\n" + header + tables)
    print(f"\n{out / 'compare.md'}, plot {png}; total {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
