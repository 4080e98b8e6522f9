"""The self-distillation check of "On-Policy Distillation" (Thinking Machines Lab, 2025): train the student on itself.

    python -m recipes.self_distill
    python -m recipes.self_distill --steps 20 --lr 5e-3

Both runs start from the SFT student init and use the init itself, frozen, as
the teacher (teacher.model = the student init), through the real driver:

  sft_own_samples   SFT on the student's own samples (loss.kind=sft,
                    train.sample_from=student). In expectation the gradient is
                    zero, but each finite batch pulls the model towards that
                    batch's samples, so the policy drifts away from the init.
  on_policy_self    on-policy distillation with the init as teacher
                    (loss.kind=reverse_kl): the advantage lp_teacher - lp_student
                    is zero while the student equals the init and pulls it back
                    if it moves, so the policy stays put (KL stays near zero).

The drift is measured by the driver's held-out eval: eval/reverse_kl is the KL
from the current student to the frozen init on the student's own held-out
samples. Output in runs/self_distill-<time>/ (or --out): the two driver run
dirs, `self_distill.md` (the table), `self_distill.json`, `self_distill.png`
(KL to the init and held-out accuracy over steps, both runs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from recipes.common import default_run_dir, driver_config, run_driver, run_parser, write_json
from recipes.sft import STUDENT_RECIPE, build_sft_model
from recipes.report import format_table, read_metrics, save_figure, series, subplots

RUNS: dict[str, list[str]] = {
    "sft_own_samples": ["loss.kind=sft", "train.sample_from=student"],
    "on_policy_self": ["loss.kind=reverse_kl"],
}
LABELS = {"sft_own_samples": "SFT on own samples", "on_policy_self": "on-policy distillation, teacher = init"}


def self_distill_table(results: dict[str, list[dict]]) -> str:
    """One row per evaluated step: KL to the init and accuracy of each run."""
    steps = sorted({s for rows in results.values() for s, _ in series(rows, "eval/reverse_kl")})
    head = ["step"]
    for name in results:
        head += [f"{LABELS.get(name, name)}: KL to init", f"{LABELS.get(name, name)}: accuracy"]
    out_rows = []
    for s in steps:
        row: list = [s]
        for rows in results.values():
            kl = dict(series(rows, "eval/reverse_kl"))
            acc = dict(series(rows, "eval/accuracy"))
            row += [kl.get(s), acc.get(s)]
        out_rows.append(row)
    return format_table(head, out_rows)


def plot_self_distill(results: dict[str, list[dict]], out_png: Path) -> Path:
    fig, (ax1, ax2) = subplots(2, figsize=(10, 4))
    for name, rows in results.items():
        kl = series(rows, "eval/reverse_kl")
        if kl:
            ax1.plot(*zip(*kl), marker="o", label=LABELS.get(name, name))
        acc = series(rows, "eval/accuracy")
        if acc:
            ax2.plot(*zip(*acc), marker="o", label=LABELS.get(name, name))
    ax1.axhline(0.0, color="gray", linewidth=0.5)
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out KL(student || init) (nats/token)")
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out accuracy (sampled, T=1)")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    fig.suptitle("self-distillation: the init as its own teacher")
    return save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    ap = run_parser("self_distill", __doc__, steps=20, prompts_per_step=32, lr=2e-3, eval_every=5,
                    lr_help="the same learning rate for both runs", overrides_help="driver overrides applied to both runs")
    args = ap.parse_args(argv)
    out = Path(args.out or default_run_dir("self_distill")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    # Only the student init is needed: it is its own teacher.
    student = build_sft_model(STUDENT_RECIPE)
    common = [f"student.model={student}", f"teacher.model={student}",
              f"eval.every_steps={args.eval_every}", f"train.steps={args.steps}",
              f"train.prompts_per_step={args.prompts_per_step}",
              f"rollout.samples_per_prompt={args.samples_per_prompt}", f"learner.lr={args.lr}",
              "learner.warmup_steps=2", "run.export_final=false", *args.overrides]
    results: dict[str, list[dict]] = {}
    for name, ov in RUNS.items():
        results[name] = read_metrics(run_driver(driver_config(common + ov + [f"run.dir={out / name}"])))
    table = self_distill_table(results)
    header = (f"# recipes.self_distill: {args.steps} steps x {args.prompts_per_step} prompts x "
              f"{args.samples_per_prompt} samples, lr {args.lr}; teacher = the student init\n\n")
    (out / "self_distill.md").write_text(header + table + "\n")
    write_json(out / "self_distill.json", {"args": vars(args), "runs": results})
    png = plot_self_distill(results, out / "self_distill.png")
    print("\n" + header + table)
    print(f"\n{out / 'self_distill.md'}, plot {png}; total {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
