"""Reading a run's metrics.jsonl, counting its FLOPs, building the recipes'
report tables and plots. Pure functions (plus matplotlib for the PNGs), so the
tables are unit-tested on synthetic metrics (tests/unit/test_recipes.py).

FLOP model (the post's table has teacher and student FLOPs columns). With N_s,
N_t the student's and teacher's matmul parameters (recipes.sft.flop_params:
all parameters but the input embedding), and per step P prompt tokens and C
completion tokens over all samples:

    student sampling   2 N_s (P + C)   (on-policy methods: the student writes)
    student training   6 N_s (P + C)   (forward 2N + backward 4N per token)
    teacher scoring    2 N_t (P + C)   (reverse / forward KL: one forward)
    teacher sampling   2 N_t (P + C)   (sequence-level KD: the teacher writes;
                                        its samples need no scoring for SFT)

Prefix caching, attention's own FLOPs (small at these lengths) and held-out
evaluation are not counted. "Student FLOPs" in the tables = sampling +
training, as the post reports all compute spent on the student.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable

# --------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl (one JSON object per line, each with `step`),
    in file order; a resumed run may repeat a step: the last row wins."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: the run wrote no metrics (did it start?)")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not a JSON object: {line[:80]!r}") from e
        if "step" not in row:
            raise ValueError(f"{p}:{n}: row has no 'step' field: {line[:80]!r}")
        by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def series(rows: Iterable[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) for every row that has `key` with a finite number."""
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((r["step"], float(v)))
    return out


# --------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlopCounts:
    student: float  # sampling + training of the student
    teacher: float  # scoring or sampling by the teacher

    @property
    def total(self) -> float:
        return self.student + self.teacher


def step_flops(*, method: str, n_student: int, n_teacher: int, prompt_tokens: int,
               completion_tokens: int) -> FlopCounts:
    """FLOPs of one training step of `method` (see the module docstring).

    method: "on_policy" (the student samples, the teacher scores: reverse KL,
    on-policy forward KL, self-distillation), "seq_kd" (the teacher samples,
    the student trains on them), "student_sft" (the student samples and trains
    on its own samples, no teacher), "sft" (ground-truth SFT: training only)."""
    tokens = prompt_tokens + completion_tokens
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got prompt_tokens={prompt_tokens}, "
                         f"completion_tokens={completion_tokens}")
    train = 6.0 * n_student * tokens
    if method == "on_policy":
        return FlopCounts(student=2.0 * n_student * tokens + train, teacher=2.0 * n_teacher * tokens)
    if method == "seq_kd":
        return FlopCounts(student=train, teacher=2.0 * n_teacher * tokens)
    if method == "student_sft":
        return FlopCounts(student=2.0 * n_student * tokens + train, teacher=0.0)
    if method == "sft":
        return FlopCounts(student=train, teacher=0.0)
    raise ValueError(f"method={method!r} is not valid; use one of on_policy, seq_kd, student_sft, sft")


def cumulative_flops(rows: list[dict], *, method: str, n_student: int, n_teacher: int,
                     prompt_tokens_per_completion: float) -> dict[int, FlopCounts]:
    """Cumulative FLOPs after each step of a driver run, from its
    `rollout/completions` and `rollout/completion_tokens` metrics (prompt
    tokens = completions x the mean prompt length, which the caller measures
    on the task's prompts). Step 0 (before training) is 0."""
    out = {0: FlopCounts(0.0, 0.0)}
    s_acc = t_acc = 0.0
    for r in rows:
        if r["step"] == 0 or "rollout/completion_tokens" not in r:
            continue
        c = step_flops(method=method, n_student=n_student, n_teacher=n_teacher,
                       prompt_tokens=round(r.get("rollout/completions", 0) * prompt_tokens_per_completion),
                       completion_tokens=int(r["rollout/completion_tokens"]))
        s_acc += c.student
        t_acc += c.teacher
        out[r["step"]] = FlopCounts(s_acc, t_acc)
    return out


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The compute at which an (x = FLOPs, y = accuracy) curve, sorted by x,
    first reaches `target`, linearly interpolated between the two points
    around the crossing; None if it never does."""
    prev = None
    for x, y in curve:
        if y >= target:
            if prev is None or prev[1] >= target:
                return x
            x0, y0 = prev
            return x0 + (x - x0) * (target - y0) / (y - y0)
        prev = (x, y)
    return None


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def format_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (as in recipes/README.md)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1e5:
            v = float(v)
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
                return f"{v:.2e}"
            return f"{v:.3f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def gap_closed(before: float, after: float, teacher: float) -> float | None:
    """Fraction of the student's accuracy gap to the teacher closed by training
    ((after - before) / (teacher - before)); None when there is no gap."""
    if teacher - before <= 1e-12:
        return None
    return (after - before) / (teacher - before)


def demo_summary(rows: list[dict], teacher_accuracy: float, teacher_greedy: float | None = None,
                 greedy_before: float | None = None, greedy_after: float | None = None) -> dict:
    """Before/after numbers of a demo run from its metrics rows: the first and
    last evaluations (eval/accuracy and eval/reverse_kl on the student's own
    sampled held-out completions)."""
    acc = series(rows, "eval/accuracy")
    kl = series(rows, "eval/reverse_kl")
    if not acc or not kl:
        raise ValueError("the run logged no eval/accuracy or eval/reverse_kl: set eval.every_steps > 0 and "
                         "give the run a held-out set with answers (tiny:arithmetic has one)")
    out = {
        "steps": rows[-1]["step"],
        "accuracy_before": acc[0][1], "accuracy_after": acc[-1][1],
        "reverse_kl_before": kl[0][1], "reverse_kl_after": kl[-1][1],
        "teacher_accuracy": teacher_accuracy,
        "gap_closed": gap_closed(acc[0][1], acc[-1][1], teacher_accuracy),
    }
    if teacher_greedy is not None and greedy_before is not None and greedy_after is not None:
        out.update(greedy_before=greedy_before, greedy_after=greedy_after, teacher_greedy=teacher_greedy,
                   greedy_gap_closed=gap_closed(greedy_before, greedy_after, teacher_greedy))
    return out


def demo_table(s: dict) -> str:
    """The demo's closing table from `demo_summary`."""
    rows = [["student (SFT init)", s["accuracy_before"], s.get("greedy_before"), s["reverse_kl_before"]],
            [f"student after {s['steps']} steps of on-policy distillation", s["accuracy_after"],
             s.get("greedy_after"), s["reverse_kl_after"]],
            ["teacher", s["teacher_accuracy"], s.get("teacher_greedy"), 0.0]]
    t = format_table(["model", "held-out accuracy (sampled, T=1)", "held-out accuracy (greedy)",
                      "reverse KL to teacher (nats/token)"], rows)
    gc = s["gap_closed"]
    t += "\n\nfraction of the accuracy gap to the teacher closed (sampled): " + (
        "n/a (no gap)" if gc is None else f"{gc:.2f}")
    if s.get("greedy_gap_closed") is not None:
        t += f"; greedy: {s['greedy_gap_closed']:.2f}"
    return t


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def subplots(ncols: int, figsize: tuple[float, float]):
    """(figure, axes) of `ncols` side-by-side plots, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig, out_png: str | Path) -> Path:
    """Lay `fig` out, write it as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_demo(rows: list[dict], teacher_accuracy: float, out_png: str | Path, title: str = "") -> Path:
    """Reverse KL (training batches and held-out) and held-out accuracy over steps."""
    fig, (ax1, ax2) = subplots(2, figsize=(10, 4))
    for key, label in (("teacher/reverse_kl", "train batch (sampled)"), ("eval/reverse_kl", "held-out")):
        s = series(rows, key)
        if s:
            ax1.plot(*zip(*s), marker="o" if key.startswith("eval") else None, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("reverse KL to teacher (nats/token)")
    ax1.legend()
    acc = series(rows, "eval/accuracy")
    if acc:
        ax2.plot(*zip(*acc), marker="o", label="student")
    ax2.axhline(teacher_accuracy, color="gray", linestyle="--", label="teacher")
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)
