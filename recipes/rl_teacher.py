"""Distilling an RL teacher, a check of "On-Policy Distillation" (Thinking Machines Lab, 2025): from the same
init, does on-policy distillation learn an RL-trained policy in fewer gradient steps than RL took?

    python -m recipes.rl_teacher
    python -m recipes.rl_teacher --steps 150 --lr 1e-3 --distill-lr 3e-4 --target-fraction 0.5
    python -m recipes.rl_teacher --rl-dir runs/rl_teacher-<time>/rl --distill-set loss.kind=reverse_kl   # reuse an RL teacher
    python -m recipes.rl_teacher --student DIR    # another init (a checkpoint with the tiny tokenizer)

Two runs from the SFT student init (recipes.sft; or --student), through the real driver, on
the arithmetic task with its grader (cluster.tiny_data:first_line, exact match
of the answer) as the task reward:

  rl        plain RL: loss.kind=reverse_kl with loss.kl_coef=0 and
            reward.coef=1, reward.fn = the grader; the per-token advantage is
            R - b (b the mean reward of the prompt's samples, a group baseline).
            The driver still scores completions on a teacher (here the init,
            which also makes eval/reverse_kl the drift from the init); at
            kl_coef=0 those scores do not enter the loss. Its export
            (<out>/rl/final) is the RL teacher.
  distill   on-policy distillation from the same init with the RL teacher:
            teacher.model = <out>/rl/final, the reverse KL over the teacher's
            top 16 tokens (loss.kind=reverse_kl_topk teacher.top_k=16,
            kl_coef=1), no reward, at RL's learning rate. (The sampled-token
            reverse KL, --distill-set loss.kind=reverse_kl, learned the
            teacher much more slowly here: recipes/README.md.)

Both report eval/accuracy: the held-out grader score of the student's own
completions sampled at T=1 (the RL reward's held-out mean). The target is a
fixed accuracy, the same for both runs:

    target = init + f (teacher - init)

with init and teacher the held-out accuracy of the student init and of the
RL teacher (the RL run's export), each measured on 200 prompts x 10 samples
at T=1 (transformers, recipes.common.accuracy; one driver eval's 800 samples
would move the target with their noise), f --target-fraction. Both runs start
from the same weights. Steps to the target: the first eval at or above it,
linearly interpolated between that eval and the one before
(`steps_to_reach`); the ratio is RL's steps over distillation's. Output in
runs/rl_teacher-<time>/ (or --out): the two driver run dirs,
`rl_teacher.md` (tables), `rl_teacher.json`, `rl_teacher.png` (accuracy
over steps, the target, where each run crosses it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from recipes.common import accuracy, default_run_dir, driver_config, run_driver, run_parser, write_json
from recipes.report import flops_to_reach, format_table, read_metrics, save_figure, series, subplots
from recipes.sft import STUDENT_RECIPE, build_sft_model

REWARD_FN = "cluster.tiny_data:first_line"
# The distillation loss: exact reverse KL over the teacher's top 16 tokens.
DISTILL_LOSS = ["loss.kind=reverse_kl_topk", "teacher.top_k=16"]
LABELS = {"rl": "RL (task reward)", "distill": "on-policy distillation of the RL teacher"}
# Fractions of the RL teacher's gain reported beside the chosen one.
FRACTIONS = (0.5, 0.8, 0.9, 1.0)


def target_accuracy(init: float, teacher: float, fraction: float) -> float:
    """The accuracy `fraction` of the way from `init` to `teacher`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--target-fraction must be in (0, 1], got {fraction}")
    if teacher <= init:
        raise ValueError(f"the RL teacher's accuracy ({teacher:.3f}) is not above the init's ({init:.3f}): RL did "
                         "not improve the task reward, so there is no gain to distil; train RL longer or at "
                         "another learning rate (--steps, --lr)")
    return init + fraction * (teacher - init)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Gradient steps at which an (step, accuracy) curve, sorted by step,
    first reaches `target`: the first eval at or above it, linearly
    interpolated from the eval before; None if it never does."""
    return flops_to_reach([(float(s), a) for s, a in curve], target)


def step_ratio(rl_steps: float | None, distill_steps: float | None) -> float | None:
    """RL's steps over distillation's to the same target; None unless both
    reached it (and distillation took more than 0 steps)."""
    if rl_steps is None or distill_steps is None or distill_steps <= 0:
        return None
    return rl_steps / distill_steps


def summarize(results: dict[str, list[dict]], fraction: float, fractions=FRACTIONS, *, init: float | None = None,
              teacher: float | None = None) -> dict:
    """Steps to the target for each run at `fraction` and at each of
    `fractions`, from the runs' metrics rows. `init` and `teacher` are the
    accuracies the target lies between; by default the RL run's first and
    last evals."""
    rl = series(results["rl"], "eval/accuracy")
    dist = series(results["distill"], "eval/accuracy")
    if not rl or not dist:
        raise ValueError("a run logged no eval/accuracy: set eval.every_steps > 0")
    init = rl[0][1] if init is None else init
    teacher = rl[-1][1] if teacher is None else teacher
    rows = []
    for f in sorted(set(fractions) | {fraction}):
        t = target_accuracy(init, teacher, f)
        a, b = steps_to_reach(rl, t), steps_to_reach(dist, t)
        rows.append({"fraction": f, "target": t, "rl_steps": a, "distill_steps": b, "ratio": step_ratio(a, b)})
    main_row = next(r for r in rows if r["fraction"] == fraction)
    return {"init_accuracy": init, "distill_init_accuracy": dist[0][1], "teacher_accuracy": teacher,
            "teacher_steps": rl[-1][0], "distill_final_accuracy": dist[-1][1], "distill_steps_run": dist[-1][0],
            "fraction": fraction, "target": main_row["target"], "rl_steps": main_row["rl_steps"],
            "distill_steps": main_row["distill_steps"], "ratio": main_row["ratio"], "by_fraction": rows}


def curve_table(results: dict[str, list[dict]]) -> str:
    """One row per evaluated step: held-out accuracy of each run (and the
    distilled student's reverse KL to the RL teacher)."""
    acc = {n: dict(series(rows, "eval/accuracy")) for n, rows in results.items()}
    kl = dict(series(results["distill"], "eval/reverse_kl"))
    steps = sorted({s for d in acc.values() for s in d})
    return format_table(["step", f"{LABELS['rl']}: accuracy", f"{LABELS['distill']}: accuracy",
                         "distillation: reverse KL to the RL teacher"],
                        [[s, acc["rl"].get(s), acc["distill"].get(s), kl.get(s)] for s in steps])


def _steps(v: float | None) -> str | None:
    return None if v is None else f"{v:.1f}"


def steps_table(s: dict) -> str:
    """Steps each run needs to reach each target."""
    return format_table(["fraction of the RL gain", "target accuracy", "RL steps", "distillation steps",
                         "ratio (RL / distillation)"],
                        [[r["fraction"], r["target"], _steps(r["rl_steps"]), _steps(r["distill_steps"]),
                          None if r["ratio"] is None else f"{r['ratio']:.1f}x"] for r in s["by_fraction"]])


def plot_rl_teacher(results: dict[str, list[dict]], s: dict, out_png: Path) -> Path:
    fig, ax = subplots(1, figsize=(7, 4.2))
    for name, rows in results.items():
        acc = series(rows, "eval/accuracy")
        if acc:
            ax.plot(*zip(*acc), marker="o", markersize=3, label=LABELS[name])
    ax.axhline(s["target"], color="gray", linestyle="--",
               label=f"target: {s['fraction']:.0%} of the RL gain ({s['target']:.3f})")
    for key, color in (("rl_steps", "C0"), ("distill_steps", "C1")):
        if s[key] is not None:
            ax.axvline(s[key], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("gradient steps from the init")
    ax.set_ylabel("held-out accuracy (sampled, T=1)")
    ax.axhline(s["teacher_accuracy"], color="C0", linestyle="-.", linewidth=0.8, label="RL teacher (final export)")
    ratio = "a run did not reach the target" if s["ratio"] is None else f"{s['ratio']:.1f}x fewer steps to the target"
    ax.set_title(f"RL teacher vs its on-policy distillation: {ratio}", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    ap = run_parser("rl_teacher", __doc__, steps=100, prompts_per_step=64, lr=1e-3, eval_every=5,
                    lr_help="learning rate of the RL run", overrides_help="driver overrides applied to both runs")
    ap.add_argument("--distill-steps", type=int, default=None, help="steps of the distillation run (default: "
                    "--steps, the RL run's: the same budget, whichever reaches the target first)")
    ap.add_argument("--distill-lr", type=float, default=1e-3, help="learning rate of the distillation run "
                    "(default: the RL run's)")
    ap.add_argument("--distill-eval-every", type=int, default=2)
    ap.add_argument("--target-fraction", type=float, default=0.8,
                    help="the target accuracy is init + f (RL teacher - init)")
    ap.add_argument("--accuracy-samples", type=int, default=10, help="samples per held-out prompt (T=1) for the "
                    "init's and the RL teacher's accuracy, the two ends of the target")
    ap.add_argument("--student", default=None, help="the init both runs start from (a checkpoint directory "
                    "with the tiny tokenizer; default: the recipes.sft student init, built on first use)")
    ap.add_argument("--rl-dir", default=None, help="reuse the RL run of an earlier invocation (its driver run "
                    "directory, e.g. runs/rl_teacher-<time>/rl: its metrics.jsonl and final/ export) instead of "
                    "training one (to try distillation settings against the same RL teacher)")
    ap.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                    help="driver override of the distillation run only, after the recipe's own (repeatable; e.g. "
                         "--distill-set loss.kind=reverse_kl_topk --distill-set teacher.top_k=16)")
    args = ap.parse_args(argv)
    if bad := [o for o in args.distill_set if "=" not in o]:
        ap.error(f"--distill-set {bad[0]!r}: expected KEY=VALUE, e.g. loss.kind=reverse_kl_topk")
    if not 0.0 < args.target_fraction <= 1.0:
        ap.error(f"--target-fraction must be in (0, 1], got {args.target_fraction}")
    if args.student is not None and not (Path(args.student) / "config.json").is_file():
        ap.error(f"--student {args.student}: not a checkpoint directory (no config.json there)")
    out = Path(args.out or default_run_dir("rl_teacher")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    student = Path(args.student).resolve() if args.student else build_sft_model(STUDENT_RECIPE)
    common = [f"student.model={student}", f"train.prompts_per_step={args.prompts_per_step}",
              f"rollout.samples_per_prompt={args.samples_per_prompt}", "learner.warmup_steps=2",
              "eval.samples_per_prompt=4", *args.overrides]
    rl_ov = [f"teacher.model={student}", "loss.kind=reverse_kl", "loss.kl_coef=0", f"reward.fn={REWARD_FN}",
             "reward.coef=1", f"learner.lr={args.lr}", f"train.steps={args.steps}",
             f"eval.every_steps={args.eval_every}", "run.export_final=true", f"run.dir={out / 'rl'}"]
    results: dict[str, list[dict]] = {}
    wall: dict[str, float] = {"rl": 0.0}
    if args.rl_dir is None:
        t0 = time.monotonic()
        rl_dir = run_driver(driver_config(common + rl_ov))
        wall["rl"] = time.monotonic() - t0
    else:
        rl_dir = Path(args.rl_dir).resolve()
        if not (rl_dir / "final" / "config.json").is_file():
            ap.error(f"--rl-dir {rl_dir}: no final/ export there (a finished RL run of this recipe has "
                     "<run>/final/config.json)")
    results["rl"] = read_metrics(rl_dir)
    # The two ends of the target, each measured on 200 x --accuracy-samples
    # samples at T=1: the driver's evals draw 800, and their noise would move the target.
    acc_init = accuracy(student, temperature=1.0, samples_per_prompt=args.accuracy_samples)
    acc_teacher = accuracy(rl_dir / "final", temperature=1.0, samples_per_prompt=args.accuracy_samples)
    print(f"[rl_teacher] held-out accuracy (T=1, {args.accuracy_samples} samples per prompt): init {acc_init:.3f}, "
          f"RL teacher {acc_teacher:.3f}", flush=True)
    try:
        target_accuracy(acc_init, acc_teacher, args.target_fraction)
    except ValueError as e:  # no gain, nothing to distil: stop here, the RL run kept
        print(f"python -m recipes.rl_teacher: error: {e} (the RL run is kept in {rl_dir})", file=sys.stderr)
        return 2
    distill_ov = [f"teacher.model={rl_dir / 'final'}", *DISTILL_LOSS, "loss.kl_coef=1", "reward.coef=0",
                  f"learner.lr={args.distill_lr}", f"train.steps={args.distill_steps or args.steps}",
                  f"eval.every_steps={args.distill_eval_every}", "run.export_final=false",
                  f"run.dir={out / 'distill'}", *args.distill_set]
    t0 = time.monotonic()
    results["distill"] = read_metrics(run_driver(driver_config(common + distill_ov)))
    wall["distill"] = time.monotonic() - t0
    s = summarize(results, args.target_fraction, init=acc_init, teacher=acc_teacher)
    rl_desc = f"reused from {rl_dir}" if args.rl_dir else f"{args.steps} steps at lr {args.lr}"
    header = (f"# recipes.rl_teacher: {args.prompts_per_step} prompts x {args.samples_per_prompt} samples per "
              f"step; RL {rl_desc}; distillation {args.distill_steps or args.steps} steps at lr "
              f"{args.distill_lr} ({' '.join(DISTILL_LOSS + args.distill_set)})\n\n"
              f"held-out accuracy at T=1 ({args.accuracy_samples} samples per prompt): init "
              f"{s['init_accuracy']:.3f}, RL teacher (the RL run's step-{s['teacher_steps']} export) "
              f"{s['teacher_accuracy']:.3f}; distilled student (driver eval) after {s['distill_steps_run']} steps "
              f"{s['distill_final_accuracy']:.3f}\n\n")
    ratio = "n/a (a run did not reach the target)" if s["ratio"] is None else f"{s['ratio']:.1f}x"
    fmt = lambda v: "not reached" if v is None else f"{v:.1f}"  # noqa: E731
    text = (header + steps_table(s) + f"\n\nsteps to {s['fraction']:.0%} of the RL gain (accuracy "
            f"{s['target']:.3f}): RL {fmt(s['rl_steps'])}, distillation {fmt(s['distill_steps'])}: {ratio}\n\n"
            + curve_table(results) + "\n")
    (out / "rl_teacher.md").write_text(text)
    write_json(out / "rl_teacher.json", {"args": vars(args), "summary": s, "wall_s": wall, "runs": results})
    png = plot_rl_teacher(results, s, out / "rl_teacher.png")
    print("\n" + text)
    print(f"{out / 'rl_teacher.md'}, plot {png}; runs {wall['rl']:.0f}s + {wall['distill']:.0f}s; "
          f"total {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
