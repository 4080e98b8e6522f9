"""The self-distillation check of "On-Policy Distillation" (Thinking Machines Lab, 2025): train the student on itself.

    python -m recipes.self_distill
    python -m recipes.self_distill --steps 20 --lr 6e-4
    python -m recipes.self_distill --student DIR     # your own checkpoint as init and teacher

Every run uses the SFT student init itself, frozen, as the teacher
(teacher.model = the student init), through the real driver, all at the same
learning rate:

  sft_own_samples   SFT on the student's own samples (loss.kind=sft,
                    train.sample_from=student). In expectation the gradient is
                    zero, but each finite batch pulls the model towards that
                    batch's samples, so the policy drifts away from the init.
  on_policy_self    on-policy distillation with the init as teacher
                    (loss.kind=reverse_kl): the advantage lp_teacher - lp_student
                    is zero while the student equals the init and pulls it back
                    if it moves, so the policy stays put. Where the sampler and
                    the teacher compute the same logprob bits (float32 vLLM CPU
                    forwards of the same weights) every advantage, the loss and
                    the update are exactly 0: the KL stays 0 and the run's export
                    equals the init bit for bit (reported; with AdamW's
                    weight_decay 0, the default).
  recovery          on-policy distillation with the init as teacher, starting
                    from the drifted student (the export of sft_own_samples'
                    last step, <out>/sft_own_samples/final): the same advantage
                    pulls the drifted policy back towards the init.

The drift is measured by the driver's held-out eval: eval/reverse_kl is the KL
from the current student to the frozen init on the student's own held-out
samples. The learning rate is one where SFT's drift is gradual (KL rising step
over step); at 2e-3 one Adam step is large enough that the same run collapses
(accuracy near 0 by step 5). Output in runs/self_distill-<time>/ (or --out):
the three driver run dirs, `self_distill.md` (the table), `self_distill.json`,
`self_distill.png` (KL to the init and held-out accuracy over steps; the
recovery run is drawn after the SFT run's last step, where it starts).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from recipes.common import default_run_dir, driver_config, run_driver, run_parser, write_json
from recipes.sft import STUDENT_RECIPE, build_sft_model
from recipes.report import format_table, read_metrics, save_figure, series, subplots

RUNS: dict[str, list[str]] = {
    "sft_own_samples": ["loss.kind=sft", "train.sample_from=student", "run.export_final=true"],
    # Exported: with the init as teacher every advantage is 0, so is the
    # update, and the export must equal the init bit for bit (checked in main).
    "on_policy_self": ["loss.kind=reverse_kl", "run.export_final=true"],
    # student.model is the drifted export of sft_own_samples (set in main).
    "recovery": ["loss.kind=reverse_kl", "run.export_final=false"],
}
LABELS = {"sft_own_samples": "SFT on own samples", "on_policy_self": "OPD, teacher = init",
          "recovery": "recovery: OPD from the drifted SFT export"}


def _shifted(rows: list[dict], key: str, offset: int) -> list[tuple[int, float]]:
    return [(s + offset, v) for s, v in series(rows, key)]


def self_distill_table(results: dict[str, list[dict]], offsets: dict[str, int] | None = None) -> str:
    """One row per evaluated step: KL to the init and accuracy of each run.
    A run's steps are shifted by `offsets[name]` (default 0): the recovery run
    starts where the SFT run ended, so its step 0 is the SFT run's last step."""
    offsets = offsets or {}
    kl = {n: dict(_shifted(rows, "eval/reverse_kl", offsets.get(n, 0))) for n, rows in results.items()}
    acc = {n: dict(_shifted(rows, "eval/accuracy", offsets.get(n, 0))) for n, rows in results.items()}
    steps = sorted({s for d in kl.values() for s in d})
    head = ["step"]
    for name in results:
        head += [f"{LABELS.get(name, name)}: KL to init", f"{LABELS.get(name, name)}: accuracy"]
    out_rows = []
    for s in steps:
        row: list = [s]
        for name in results:
            row += [kl[name].get(s), acc[name].get(s)]
        out_rows.append(row)
    return format_table(head, out_rows)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoint directories hold the same tensors, bit for bit
    (names, dtypes, shapes, values; every *.safetensors file of each)."""
    import torch
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        out: dict = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    wa, wb = load(a), load(b)
    return bool(wa) and wa.keys() == wb.keys() and all(
        wa[n].dtype == wb[n].dtype and torch.equal(wa[n], wb[n]) for n in wa)


def plot_self_distill(results: dict[str, list[dict]], out_png: Path, offsets: dict[str, int] | None = None) -> Path:
    offsets = offsets or {}
    fig, (ax1, ax2) = subplots(2, figsize=(11, 4.2))
    for name, rows in results.items():
        kl = _shifted(rows, "eval/reverse_kl", offsets.get(name, 0))
        if kl:
            ax1.plot(*zip(*kl), marker="o", label=LABELS.get(name, name))
        acc = _shifted(rows, "eval/accuracy", offsets.get(name, 0))
        if acc:
            ax2.plot(*zip(*acc), marker="o", label=LABELS.get(name, name))
    ax1.axhline(0.0, color="gray", linewidth=0.5)
    ax1.set_xlabel("step")
    ax1.set_ylabel("held-out KL(student || init) (nats/token)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out accuracy (sampled, T=1)")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    fig.suptitle("self-distillation: the init as its own teacher")
    return save_figure(fig, out_png)


def main(argv: list[str] | None = None) -> int:
    ap = run_parser("self_distill", __doc__, steps=20, prompts_per_step=32, lr=3e-4, eval_every=5,
                    lr_help="the same learning rate for all three runs",
                    overrides_help="driver overrides applied to all three runs")
    ap.add_argument("--student", default=None, help="the init (and its own teacher): a checkpoint directory of a "
                    "model with the tiny tokenizer (default: build recipes.sft's student init)")
    args = ap.parse_args(argv)
    if args.student is not None and not (Path(args.student) / "config.json").is_file():
        ap.error(f"--student {args.student}: no config.json there; give a checkpoint directory "
                 "(save_pretrained's output)")
    out = Path(args.out or default_run_dir("self_distill")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    # Only the student init is needed: it is its own teacher.
    student = Path(args.student).resolve() if args.student else build_sft_model(STUDENT_RECIPE)
    common = [f"student.model={student}", f"teacher.model={student}",
              f"eval.every_steps={args.eval_every}", f"train.steps={args.steps}",
              f"train.prompts_per_step={args.prompts_per_step}",
              f"rollout.samples_per_prompt={args.samples_per_prompt}", f"learner.lr={args.lr}",
              "learner.warmup_steps=2", *args.overrides]
    results: dict[str, list[dict]] = {}
    for name, ov in RUNS.items():
        if name == "recovery":  # the drifted student: the SFT run's export of its last step
            ov = ov + [f"student.model={out / 'sft_own_samples' / 'final'}"]
        results[name] = read_metrics(run_driver(driver_config(common + ov + [f"run.dir={out / name}"])))
    offsets = {"recovery": results["sft_own_samples"][-1]["step"]}
    still = same_weights(student, out / "on_policy_self" / "final")
    table = self_distill_table(results, offsets) + (
        f"\n\nOPD, teacher = init: its step-{args.steps} export "
        + ("equals the init bit for bit" if still else "DIFFERS from the init (expected: equal bit for bit)"))
    header = (f"# recipes.self_distill: {args.steps} steps x {args.prompts_per_step} prompts x "
              f"{args.samples_per_prompt} samples, lr {args.lr}; teacher = the student init; the recovery run "
              f"starts from the SFT run's step-{offsets['recovery']} export\n\n")
    (out / "self_distill.md").write_text(header + table + "\n")
    write_json(out / "self_distill.json", {"args": vars(args), "runs": results,
                                           "on_policy_self_export_equals_init": still})
    png = plot_self_distill(results, out / "self_distill.png", offsets)
    print("\n" + header + table)
    print(f"\n{out / 'self_distill.md'}, plot {png}; total {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
