"""Compute efficiency of on-policy distillation against continued
sequence-level KD, in miniature: the "SFT-2M" comparison of "On-Policy
Distillation" (Thinking Machines Lab, 2025), its 9x and 30x.

    python -m recipes.compare --quick      # 1 seed, 1 lr per method
    python -m recipes.compare              # 3 seeds x 2 lrs per method

Task (recipes/carry_task.py): n-digit addition written least significant
digit first with an explicit carry per step, so a wrong carry compounds into
a wrong digit unless the model recomputes it; the teacher is trained on
ground truth plus recovery traces (one flipped carry, followed by the true
digits), so it corrects a wrong carry where the student would compound it.

Student start (recipes/carry_sft.py): SFT on N0 fresh teacher traces (the
teacher sampled at T = 1), one init per seed; its SFT curve at N0/4, N0/2 and
N0 traces is recorded with it.

Runs from that start, through the real driver (Ray, vLLM sampler, teacher
server, DeepSpeed learner), all with the same steps x prompts x samples:

  seq_kd           (a) more SFT on fresh teacher traces (sequence-level KD):
                   loss.kind=sft train.sample_from=teacher
  reverse_kl       (b) on-policy distillation, sampled-token reverse KL
  reverse_kl_topk  (c) on-policy distillation, reverse KL over the teacher's
                   top-K tokens (loss.kind=reverse_kl_topk teacher.top_k=K)

Ground-truth SFT (in-process, the same budget) is a reference row only.
Every method runs at each of its learning rates; the one with the best mean
accuracy over seeds on a validation set (500 held-out problems disjoint from
the test set, graded on the run's exported student) is reported, on the test
set (the driver's own evaluation, 500 problems x 2 samples at T = 1).

Compute ratio, per seed (recipes/efficiency.py): OPD's final accuracy is the
target; continued SFT's data to reach it comes from a log-linear fit of
accuracy in log2(traces) over the init's curve and run (a)'s evaluations,
extrapolated beyond them as the publication's "SFT-2M (extrapolated)". FLOPs
count from the common init, in the publication's two modes: "data_given"
(SFT pays its training only: the 9x) and "with_generation" (SFT also pays the
teacher writing the traces: the 30x). On-policy distillation always pays its
sampling, training and teacher scoring. The claim counts as reproduced when
the 95% seed-to-seed interval of the ratio lies above 1; one seed (--quick)
gives per-seed ratios only.

Output in runs/compare-<time>/ (or --out): one driver run per (method, lr,
seed), each with `result.json` (a rerun with the same --out skips finished
runs), `compare.md`, `compare.json`, `compare.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

from recipes.common import carry_overrides, default_run_dir, driver_config, one_ray_for_runs, run_driver, write_json
from recipes.efficiency import MODES, compute_ratio, ratio_interval, reproduced, sft_flops_per_trace
from recipes.report import cumulative_flops, format_table, read_metrics, save_figure, series, subplots

# method -> (driver overrides, FLOP accounting of recipes.report.step_flops)
DRIVER_METHODS: dict[str, tuple[list[str], str]] = {
    "seq_kd": (["loss.kind=sft", "train.sample_from=teacher"], "seq_kd"),
    "reverse_kl": (["loss.kind=reverse_kl"], "on_policy"),
    "reverse_kl_topk": (["loss.kind=reverse_kl_topk"], "on_policy"),
}
OPD_METHODS = ("reverse_kl", "reverse_kl_topk")
LABELS = {
    "init": "student init: SFT on N0 teacher traces",
    "seq_kd": "(a) more SFT on fresh teacher traces",
    "reverse_kl": "(b) on-policy distillation, sampled reverse KL",
    "reverse_kl_topk": "(c) on-policy distillation, top-K reverse KL",
    "truth_sft": "reference: SFT on ground truth",
    "teacher": "teacher",
}


@dataclasses.dataclass(frozen=True)
class Grid:
    seeds: tuple[int, ...]
    lrs: dict[str, tuple[float, ...]]
    steps: int
    eval_every: int


FULL = Grid(seeds=(0, 1, 2), steps=40, eval_every=5,
            lrs={"seq_kd": (1e-3, 3e-3), "reverse_kl": (3e-4, 1e-3), "reverse_kl_topk": (3e-4, 1e-3)})
QUICK = Grid(seeds=(0,), steps=20, eval_every=5,
             lrs={"seq_kd": (1e-3,), "reverse_kl": (1e-3,), "reverse_kl_topk": (1e-3,)})


def parse_lrs(items: list[str], base: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    """`METHOD=LR[,LR...]` items over `base`."""
    out = dict(base)
    for it in items:
        m, _, v = it.partition("=")
        if m not in DRIVER_METHODS or not v:
            raise ValueError(f"--lr {it!r}: expected METHOD=LR[,LR...] with METHOD one of {', '.join(DRIVER_METHODS)}")
        try:
            out[m] = tuple(float(x) for x in v.split(","))
        except ValueError as e:
            raise ValueError(f"--lr {it!r}: learning rates must be numbers") from e
        if any(not lr > 0 for lr in out[m]):
            raise ValueError(f"--lr {it!r}: learning rates must be > 0")
    return out


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def driver_run(method: str, lr: float, seed: int, *, init: Path, teacher: Path, n_digits: int, grid: Grid,
               prompts: int, samples: int, top_k: int, out: Path, extra: list[str], operators: int = 0,
               log=print) -> dict:
    """One driver run from the init; returns (and stores in result.json) its
    metrics rows, its validation accuracy and its wall time. A finished run
    in `out` is read back instead of rerun."""
    from recipes.carry_sft import diagnose, held_out_accuracy

    run_dir = out / run_name(method, lr, seed)
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():   # an earlier attempt died: the driver refuses a dir holding its checkpoints
        import shutil

        shutil.rmtree(run_dir)
    ov, _ = DRIVER_METHODS[method]
    if method == "reverse_kl_topk":
        ov = ov + [f"teacher.top_k={top_k}"]
    cfg = driver_config(carry_overrides(n_digits, operators=operators) + [
        f"student.model={init}", f"teacher.model={teacher}", f"train.steps={grid.steps}",
        f"train.prompts_per_step={prompts}", f"rollout.samples_per_prompt={samples}", f"learner.lr={lr}",
        "learner.warmup_steps=2", f"eval.every_steps={grid.eval_every}", f"run.seed={seed}",
        "run.export_final=true", f"run.dir={run_dir}", *ov, *extra])
    t0 = time.monotonic()
    run_driver(cfg, log=log)
    rows = read_metrics(run_dir)
    val = held_out_accuracy(run_dir / "final", n_digits, "validation", seed=seed, operators=operators)
    res = {"method": method, "lr": lr, "seed": seed, "rows": rows, "validation_accuracy": val,
           "diagnosis": diagnose(run_dir / "final", n_digits, operators=operators), "wall_s": time.monotonic() - t0}
    write_json(done, res)
    log(f"[compare] {run_name(method, lr, seed)}: test {series(rows, 'eval/accuracy')[-1][1]:.3f}, "
        f"validation {val:.3f}, {res['wall_s']:.0f}s")
    return res


def final_accuracy(rows: list[dict]) -> float:
    """Mean of the last two test evaluations (one eval is 1000 samples)."""
    acc = [a for _, a in series(rows, "eval/accuracy")]
    return statistics.fmean(acc[-2:])


# --------------------------------------------------------------------------
# Analysis (pure: tests/unit/test_efficiency.py)
# --------------------------------------------------------------------------


def choose_lrs(runs: list[dict]) -> dict[str, float]:
    """Per method, the lr with the best validation accuracy averaged over seeds."""
    by: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["validation_accuracy"])
    return {m: max(v, key=lambda lr: (statistics.fmean(v[lr]), -lr)) for m, v in by.items()}


def sft_points(init_curve: list[dict], seq_kd_rows: list[dict], n0: int, traces_per_step: int,
               fit_from: float = 0.5) -> list[tuple[float, float]]:
    """(traces trained in total, test accuracy) of continued SFT on teacher
    traces: the init's own curve from `fit_from` x N0 on, then run (a)'s
    evaluations after step 0. The default fits the curve past its phase
    transition (N0/2, N0, and beyond), as the publication extrapolates the
    flattening SFT curve; fit_from=0.25 also takes N0/4 (a steeper line:
    cheaper SFT, a smaller ratio)."""
    pts = [(float(c["traces"]), float(c["accuracy"])) for c in init_curve if c["traces"] >= fit_from * n0 - 1e-9]
    pts += [(float(n0 + s * traces_per_step), a) for s, a in series(seq_kd_rows, "eval/accuracy") if s > 0]
    return pts


def opd_curve(rows: list[dict], *, n_student: int, n_teacher: int, prompt_tokens: float) -> list[tuple[float, float]]:
    """(cumulative FLOPs from the init, test accuracy) of an on-policy run."""
    flops = cumulative_flops(rows, method="on_policy", n_student=n_student, n_teacher=n_teacher,
                             prompt_tokens_per_completion=prompt_tokens)
    return [(flops[s].total, a) for s, a in series(rows, "eval/accuracy") if s in flops]


def ratios_for(method: str, seeds_data: list[dict], *, n_student: int, n_teacher: int, prompt_tokens: float,
               completion_tokens: float) -> dict:
    """Per mode: each seed's Ratio (as a dict) and, with >= 2 seeds, the
    interval and whether the claim is reproduced. `seeds_data[i]` holds
    'sft_points', 'n0' and the OPD run's 'rows'."""
    out = {}
    for mode in MODES:
        per_trace = sft_flops_per_trace(n_student=n_student, n_teacher=n_teacher, prompt_tokens=prompt_tokens,
                                        completion_tokens=completion_tokens, mode=mode)
        per_seed = []
        for d in seeds_data:
            curve = opd_curve(d["rows"], n_student=n_student, n_teacher=n_teacher, prompt_tokens=prompt_tokens)
            target, start = final_accuracy(d["rows"]), series(d["rows"], "eval/accuracy")[0][1]
            r = compute_ratio(d["sft_points"], d["n0"], curve, target, per_trace)
            # Also at the accuracy both runs reached (no extrapolation): the
            # lower of the two final accuracies.
            common = min(target, d.get("sft_final", target))
            rc = compute_ratio(d["sft_points"], d["n0"], curve, common, per_trace)
            # No gain over the init's own measured accuracy: nothing to compare.
            gain = target > start
            per_seed.append({**dataclasses.asdict(r), "ratio": r.ratio if gain else None, "no_gain": not gain,
                             "common_target": common,
                             "common_ratio": rc.ratio if gain and common > start and not rc.extrapolated else None})
        entry = {"per_seed": per_seed}
        vals = [p["ratio"] for p in per_seed]
        if len(vals) >= 2 and all(v is not None and v > 0 for v in vals):
            try:
                iv = ratio_interval(vals)
                entry.update(interval=iv, reproduced=reproduced(iv))
            except ValueError as e:
                entry["interval_error"] = str(e)
        out[mode] = entry
    return out


def analyse(seeds: dict[str, dict], all_runs: list[dict], methods: list[str], settings: dict, *, n_teacher: int,
            teacher_accuracy: float, traces_per_step: int) -> dict:
    """compare.json from the finished runs: `seeds[k]` holds the init's
    'n0', 'init_curve', 'init_accuracy', 'flop_params' and 'runs_by_lr'
    (method -> lr -> run result)."""
    chosen = choose_lrs(all_runs)
    n = settings["n_digits"]
    n_s = next(iter(seeds.values()))["flop_params"]
    kd_rows = [r for d in seeds.values() for r in d["runs_by_lr"]["seq_kd"][chosen["seq_kd"]]["rows"]]
    completions = sum(r.get("rollout/completions", 0) for r in kd_rows)
    ctoks = sum(r.get("rollout/completion_tokens", 0) for r in kd_rows)
    completion_tokens = ctoks / completions if completions else 3 * n
    # columns layout, one token per character; the long-tail variant's operator adds "b:"
    prompt_tokens = 3 * n + (2 if settings.get("operators") else 0)
    out_seeds = {}
    for k, d in seeds.items():
        runs = {m: d["runs_by_lr"][m][chosen[m]] for m in methods}
        out_seeds[k] = {kk: vv for kk, vv in d.items() if kk != "runs_by_lr"} | {
            "runs": runs, "sft_points": sft_points(d["init_curve"], runs["seq_kd"]["rows"], d["n0"], traces_per_step),
            "sft_points_from_quarter": sft_points(d["init_curve"], runs["seq_kd"]["rows"], d["n0"], traces_per_step,
                                                  fit_from=0.25)}
    res = {"settings": settings, "n_student": n_s, "n_teacher": n_teacher, "prompt_tokens": prompt_tokens,
           "completion_tokens": completion_tokens, "teacher_accuracy": teacher_accuracy, "seeds": out_seeds,
           "all_runs": [{k: r[k] for k in ("method", "lr", "seed", "validation_accuracy", "wall_s")} |
                        {"final_accuracy": final_accuracy(r["rows"])} for r in all_runs],
           "methods": {}, "ratios": {}}
    for m in methods:
        kind = DRIVER_METHODS[m][1]
        f = [cumulative_flops(d["runs"][m]["rows"], method=kind, n_student=n_s, n_teacher=n_teacher,
                              prompt_tokens_per_completion=prompt_tokens) for d in out_seeds.values()]
        last = [x[max(x)] for x in f]
        res["methods"][m] = {"lr": chosen[m],
                             "final_accuracy": [final_accuracy(d["runs"][m]["rows"]) for d in out_seeds.values()],
                             "diagnosis": [d["runs"][m].get("diagnosis") for d in out_seeds.values()],
                             "student_flops": statistics.fmean(x.student for x in last),
                             "teacher_flops": statistics.fmean(x.teacher for x in last)}
    res["ratios_fit_from_quarter"] = {}
    for m in OPD_METHODS:
        if m in methods:
            for key, pts in (("ratios", "sft_points"), ("ratios_fit_from_quarter", "sft_points_from_quarter")):
                res[key][m] = ratios_for(m, [{"sft_points": d[pts], "n0": d["n0"], "rows": d["runs"][m]["rows"],
                                              "sft_final": final_accuracy(d["runs"]["seq_kd"]["rows"])}
                                             for d in out_seeds.values()],
                                         n_student=n_s, n_teacher=n_teacher, prompt_tokens=prompt_tokens,
                                         completion_tokens=completion_tokens)
    return res


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def _fmt_ratio(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "not reached"
    return "inf" if math.isinf(x) else f"{x:.2f}x"


def report(res: dict) -> str:
    """The markdown tables of a finished comparison (`res` = compare.json)."""
    s = res["settings"]
    task = f"carry addition, n = {s['n_digits']}" + (
        f", {s['operators']} operators (Zipf)" if s.get("operators") else "")
    lines = [f"# recipes.compare: {task}, {s['steps']} steps x {s['prompts']} prompts "
             f"x {s['samples']} samples, seeds {s['seeds']}",
             "",
             f"student `{s['student_spec']}` ({res['n_student']:,} matmul params), teacher `{s['teacher_spec']}` "
             f"({res['n_teacher']:,}); N0 = {s['n0']:,} teacher traces; test: 500 problems x 2 samples at T = 1.",
             ""]
    if s.get("run_teacher"):
        lines += [f"The driver runs score with (and run (a) samples) another teacher than the init's: "
                  f"`{s['run_teacher']}`.", ""]
    # SFT curve of the init
    pts = sorted({c["traces"] for d in res["seeds"].values() for c in d["init_curve"]})
    rows = [[f"{p:,}", *(_mean_sd([c[k] for d in res["seeds"].values() for c in d["init_curve"]
                                   if c["traces"] == p and k in c]) for k in ("accuracy", "train_loss"))]
            for p in pts]
    lines += ["SFT curve of the student init (teacher traces, one pass; training loss before each update, "
              "nats per token, over each point's last 50 steps: exact-match accuracy lags it, and a curve whose "
              "loss still falls has not flattened):", "",
              format_table(["teacher traces", "test accuracy (sampled)", "training loss"], rows), ""]
    # Main table
    head = ["method", "lr", "test accuracy (final)", "student FLOPs", "teacher FLOPs", "wrong carries / completion"]
    body = [[LABELS["init"], "-", _mean_sd([d["init_accuracy"] for d in res["seeds"].values()]), "-", "-", "-"]]
    for m, info in res["methods"].items():
        body.append([LABELS[m], f"{info['lr']:g}", _mean_sd(info["final_accuracy"]), info["student_flops"],
                     info["teacher_flops"], "-"])
    if res.get("truth_sft"):
        body.append([LABELS["truth_sft"], f"{res['truth_sft']['lr']:g}", _mean_sd(res["truth_sft"]["final_accuracy"]),
                     res["truth_sft"]["student_flops"], 0.0, "-"])
    body.append([LABELS["teacher"], "-", f"{res['teacher_accuracy']:.3f}", "-", "-", "-"])
    lines += ["Final accuracy (mean ± sd over seeds) at each method's chosen lr; FLOPs from the init, per run:", "",
              format_table(head[:-1], [r[:-1] for r in body]), ""]
    # Ratios
    head = ["on-policy method", "mode", "per-seed ratio", "geometric mean", "95% interval", "reproduced",
            "SFT data extrapolated", "per-seed ratio, fit from N0/4", "per-seed ratio at the accuracy both reached"]
    body = []
    for m, by_mode in res["ratios"].items():
        for mode, e in by_mode.items():
            per = ["no gain" if p["no_gain"] else p["ratio"] for p in e["per_seed"]]
            quarter = ["no gain" if p["no_gain"] else p["ratio"]
                       for p in res["ratios_fit_from_quarter"][m][mode]["per_seed"]]
            iv = e.get("interval")
            body.append([LABELS[m], mode, ", ".join(_fmt_ratio(x) for x in per),
                         _fmt_ratio(iv[0]) if iv else "-", f"{_fmt_ratio(iv[1])} - {_fmt_ratio(iv[2])}" if iv else
                         e.get("interval_error", "needs >= 2 seeds"),
                         ("yes" if e["reproduced"] else "no") if iv else "-",
                         ", ".join("yes" if p["extrapolated"] else "no" for p in e["per_seed"]),
                         ", ".join(_fmt_ratio(x) for x in quarter),
                         ", ".join(f"{_fmt_ratio(p['common_ratio'])} at {p['common_target']:.3f}"
                                   for p in e["per_seed"])])
    lines += ["Compute ratio (SFT FLOPs / on-policy FLOPs to the on-policy run's final accuracy; SFT's curve "
              "fitted log-linearly from N0/2 on, and, as a check, from N0/4):", "",
              format_table(head, body), ""]
    lines += mechanism_table(res)
    return "\n".join(lines)


DIAG_COLUMNS = (("greedy", "greedy acc."), ("accuracy", "sampled acc."),
                ("wrong_carries_per_completion", "wrong carries / sampled completion"),
                ("compounded_share", "share of them compounding"), ("probe.recovers", "probe: recovers"),
                ("probe.compounds", "probe: compounds"))

LONG_TAIL_COLUMNS = (("head_accuracy", "head operators: sampled acc."), ("tail_accuracy", "tail operators: sampled acc."))


def _diag_value(d: dict | None, key: str) -> float | None:
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def mechanism_table(res: dict) -> list[str]:
    """Where the errors come from, per model (means over seeds): the final
    checkpoints' test diagnosis (`recipes.carry_sft.diagnose`)."""
    models = [(LABELS["init"], [d.get("init_diagnosis") for d in res["seeds"].values()])]
    models += [(LABELS[m], info.get("diagnosis") or []) for m, info in res["methods"].items()]
    if res.get("teacher_diagnosis"):
        models.append((LABELS["teacher"], [res["teacher_diagnosis"]]))
    columns = DIAG_COLUMNS
    if any(d and "head_accuracy" in d for _, diags in models for d in diags):  # the long-tail variant
        columns += LONG_TAIL_COLUMNS
    body = []
    for name, diags in models:
        row = [name]
        for key, _ in columns:
            vals = [v for v in (_diag_value(d, key) for d in diags) if v is not None]
            row.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        body.append(row)
    if all(all(c == "-" for c in r[1:]) for r in body):
        return []
    return ["Where the errors come from (exported final checkpoints, 500 test problems, one sample each; probe = "
            "teacher-forced clean trace with one carry flipped, greedy next digit true (recovers) or the one the "
            "flipped carry implies (compounds)):", "",
            format_table(["model"] + [h for _, h in columns], body), ""]


def plot(res: dict, out_png: Path) -> Path:
    """(1) the SFT curve in log data with its fit, extrapolated to where each
    on-policy run's accuracy lies; (2, 3) accuracy against FLOPs spent from
    the init in both modes: continued SFT (measured and extrapolated) and the
    on-policy runs; (4) accuracy against step."""
    from recipes.efficiency import fit_log_linear

    fig, axes = subplots(4, figsize=(20, 4.4))
    s = res["settings"]
    pt, ct = res["prompt_tokens"], res["completion_tokens"]
    colors = {"seq_kd": "C0", "reverse_kl": "C1", "reverse_kl_topk": "C2", "truth_sft": "C3"}
    for i, (seed, d) in enumerate(res["seeds"].items()):
        alpha, beta = fit_log_linear(d["sft_points"])
        n_stars = [res["ratios"][m][MODES[0]]["per_seed"][i]["n_star"] for m in OPD_METHODS if m in res["ratios"]]
        n_hi = max([n for n, _ in d["sft_points"]] + [n for n in n_stars if math.isfinite(n)])
        pts = d["sft_points_from_quarter"]
        axes[0].plot([n for n, _ in pts], [a for _, a in pts], "o", color=colors["seq_kd"], alpha=0.6,
                     label="SFT on teacher traces (init curve, then (a))" if i == 0 else None)
        n_lo = min(n for n, _ in d["sft_points"])
        grid_n = [n_lo * (n_hi / n_lo) ** (k / 40) for k in range(41)]
        axes[0].plot(grid_n, [alpha + beta * math.log2(n) for n in grid_n], "--", color=colors["seq_kd"], alpha=0.6,
                     label="log-linear fit from N0/2, extrapolated" if i == 0 else None)
        for m in OPD_METHODS:
            if m in d["runs"]:
                axes[0].axhline(final_accuracy(d["runs"][m]["rows"]), color=colors[m], alpha=0.4, lw=0.8,
                                label=f"{LABELS[m]}: final" if i == 0 else None)
        for ax, mode in zip(axes[1:3], MODES, strict=True):
            per_trace = sft_flops_per_trace(n_student=res["n_student"], n_teacher=res["n_teacher"], prompt_tokens=pt,
                                            completion_tokens=ct, mode=mode)
            meas = [((n - d["n0"]) * per_trace, a) for n, a in d["sft_points"] if n > d["n0"]]
            if meas:
                ax.plot(*zip(*meas), "o", color=colors["seq_kd"], label=LABELS["seq_kd"] if i == 0 else None)
            ext = [n for n in grid_n if n > d["n0"]]
            if ext:
                ax.plot([(n - d["n0"]) * per_trace for n in ext], [alpha + beta * math.log2(n) for n in ext], "--",
                        color=colors["seq_kd"], alpha=0.6, label="SFT fit, extrapolated" if i == 0 else None)
            for m in OPD_METHODS:
                if m in d["runs"]:
                    c = [(x, a) for x, a in opd_curve(d["runs"][m]["rows"], n_student=res["n_student"],
                                                      n_teacher=res["n_teacher"], prompt_tokens=pt) if x > 0]
                    if c:
                        ax.plot(*zip(*c), "-o", color=colors[m], ms=3, label=LABELS[m] if i == 0 else None)
    for m in res["methods"]:
        for i, d in enumerate(res["seeds"].values()):
            acc = series(d["runs"][m]["rows"], "eval/accuracy")
            axes[3].plot(*zip(*acc), "-o", ms=3, color=colors[m], alpha=0.8, label=LABELS[m] if i == 0 else None)
    if res.get("truth_sft"):
        for i, c in enumerate(res["truth_sft"]["curves"]):
            axes[3].plot([r["step"] for r in c], [r["accuracy"] for r in c], "-o", ms=3, color=colors["truth_sft"],
                         alpha=0.8, label=LABELS["truth_sft"] if i == 0 else None)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("teacher traces trained on (SFT)")
    for ax, mode in zip(axes[1:3], MODES, strict=True):
        ax.set_xscale("log")
        # Runs spanning less than a decade get labelled minor ticks: tilt them
        # so that neighbours do not overlap.
        ax.tick_params(axis="x", which="both", labelrotation=30, labelsize=7)
        ax.set_xlabel("FLOPs from the init (" + ("SFT data given" if mode == "data_given" else
                                                 "SFT pays the teacher's generation") + ")")
    axes[3].set_xlabel("step")
    for ax in axes:
        ax.axhline(res["teacher_accuracy"], color="gray", linestyle=":", label="teacher" if ax is axes[3] else None)
        ax.set_ylabel("test accuracy (sampled, T=1)")
    for ax in (axes[0], axes[1], axes[3]):
        ax.legend(fontsize=6)
    fig.suptitle(f"carry addition, n = {s['n_digits']}: continued SFT on teacher traces vs on-policy distillation")
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from recipes.carry_sft import (StudentRecipe, TeacherRecipe, build_student, build_teacher, diagnose,
                                   held_out_accuracy, truth_sft_run)

    ap = argparse.ArgumentParser(prog="python -m recipes.compare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 lr per method, fewer steps")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--prompts-per-step", type=int, default=64)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR]",
                    help="learning rates of one method (repeatable)")
    ap.add_argument("--methods", default=",".join(DRIVER_METHODS))
    ap.add_argument("--digits", type=int, default=TeacherRecipe.n_digits, help="n: chain length of the task")
    ap.add_argument("--operators", type=int, default=0, metavar="K",
                    help="the long-tail variant of the task (recipes/carry_task.py): K operators, uniform in the "
                         "teacher's data, Zipf(1) in the student's, the driver's and the evaluation's")
    ap.add_argument("--teacher-spec", default="student-4l")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--teacher-batch-size", type=int, default=TeacherRecipe.batch_size)
    ap.add_argument("--teacher-lr", type=float, default=TeacherRecipe.lr,
                    help="the teacher's peak SFT lr (cosine decay to 0.1x)")
    ap.add_argument("--recovery-frac", type=float, default=TeacherRecipe.recovery_frac,
                    help="share of the teacher's SFT traces that recover from a flipped carry (0: a teacher that "
                         "does not correct)")
    ap.add_argument("--run-teacher", default=None, metavar="DIR",
                    help="teacher of the driver runs (their scoring and run (a)'s traces) instead of the one that "
                         "wrote the init's traces: e.g. the cache dir of a teacher built with --recovery-frac 0, to "
                         "see whether the teacher's corrections matter from the same init")
    ap.add_argument("--student-spec", default="student-1l")
    ap.add_argument("--n0", type=int, default=262144)
    ap.add_argument("--init-schedule", default=StudentRecipe.schedule, choices=["constant", "cosine"],
                    help="lr schedule of the init's SFT (recipes/carry_sft.py StudentRecipe.schedule)")
    ap.add_argument("--init-batch-size", type=int, default=StudentRecipe.batch_size,
                    help="batch size of the init's SFT")
    ap.add_argument("--init-lr", type=float, default=StudentRecipe.lr, help="peak lr of the init's SFT")
    ap.add_argument("--top-k", type=int, default=16, help="teacher.top_k of reverse_kl_topk")
    ap.add_argument("--no-truth-ref", action="store_true", help="skip the ground-truth SFT reference row")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="driver overrides applied to every run")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    try:
        grid = dataclasses.replace(base, seeds=tuple(range(args.seeds)) if args.seeds else base.seeds,
                                   steps=args.steps or base.steps, eval_every=args.eval_every or base.eval_every,
                                   lrs=parse_lrs(args.lr, base.lrs))
    except ValueError as e:
        ap.error(str(e))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in DRIVER_METHODS]:
        ap.error(f"--methods: unknown {bad}; valid: {', '.join(DRIVER_METHODS)}")
    if "seq_kd" not in methods:
        ap.error("--methods must include seq_kd: the compute ratio extrapolates its curve")
    if args.run_teacher and not (Path(args.run_teacher) / "sft_summary.json").is_file():
        ap.error(f"--run-teacher {args.run_teacher}: not a teacher of this recipe (no sft_summary.json there; "
                 "build one with python -m recipes.carry_sft teacher ...)")
    out = Path(args.out or default_run_dir("compare")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    n = args.digits
    ops = args.operators
    teacher = build_teacher(TeacherRecipe(spec=args.teacher_spec, n_digits=n, steps=args.teacher_steps,
                                          batch_size=args.teacher_batch_size, lr=args.teacher_lr,
                                          recovery_frac=args.recovery_frac, operators=ops))
    run_teacher = Path(args.run_teacher).resolve() if args.run_teacher else teacher
    t_sum = json.loads((run_teacher / "sft_summary.json").read_text())
    traces_per_step = args.prompts_per_step * args.samples_per_prompt

    with one_ray_for_runs(driver_config(carry_overrides(n, operators=ops))):
        seeds: dict[str, dict] = {}
        all_runs: list[dict] = []
        for seed in grid.seeds:
            init = build_student(StudentRecipe(spec=args.student_spec, n0=args.n0, points=5, seed=seed,
                                               schedule=args.init_schedule, batch_size=args.init_batch_size,
                                               lr=args.init_lr), teacher)
            s_sum = json.loads((init / "sft_summary.json").read_text())
            runs = {}
            for m in methods:
                for lr in grid.lrs[m]:
                    r = driver_run(m, lr, seed, init=init, teacher=run_teacher, n_digits=n, grid=grid,
                                   prompts=args.prompts_per_step, samples=args.samples_per_prompt, top_k=args.top_k,
                                   out=out, extra=args.overrides, operators=ops)
                    all_runs.append(r)
                    runs.setdefault(m, {})[lr] = r
            seeds[str(seed)] = {"init": str(init), "n0": args.n0, "init_curve": s_sum["curve"],
                                "init_accuracy": s_sum["final"]["accuracy"], "init_diagnosis": s_sum["final"],
                                "runs_by_lr": runs,
                                "flop_params": s_sum["flop_params"]}

    settings = {"n_digits": n, "operators": ops, "steps": grid.steps, "prompts": args.prompts_per_step,
                "samples": args.samples_per_prompt, "seeds": list(grid.seeds), "lrs": grid.lrs,
                "teacher_spec": args.teacher_spec, "student_spec": args.student_spec, "n0": args.n0,
                "init_schedule": args.init_schedule, "init_batch_size": args.init_batch_size,
                "init_lr": args.init_lr, "recovery_frac": args.recovery_frac, "top_k": args.top_k,
                "run_teacher": str(run_teacher) if args.run_teacher else None,
                "quick": args.quick}
    res = analyse(seeds, all_runs, methods, settings, n_teacher=t_sum["flop_params"],
                  teacher_accuracy=held_out_accuracy(run_teacher, n, "test", seed=0, operators=ops),
                  traces_per_step=traces_per_step)
    res["teacher"] = str(run_teacher)
    res["teacher_diagnosis"] = diagnose(run_teacher, n, operators=ops)
    chosen = {m: info["lr"] for m, info in res["methods"].items()}
    n_s, prompt_tokens, completion_tokens = res["n_student"], res["prompt_tokens"], res["completion_tokens"]
    if not args.no_truth_ref:
        curves = [truth_sft_run(Path(d["init"]), n, steps=grid.steps, batch_size=traces_per_step,
                                lr=chosen["seq_kd"], eval_every=grid.eval_every, seed=int(k), operators=ops)
                  for k, d in res["seeds"].items()]
        res["truth_sft"] = {"lr": chosen["seq_kd"], "curves": curves,
                            "final_accuracy": [statistics.fmean(r["accuracy"] for r in c[-2:]) for c in curves],
                            "student_flops": 6.0 * n_s * (prompt_tokens + completion_tokens) * traces_per_step
                            * grid.steps}
    res["wall_s"] = time.monotonic() - t_start
    write_json(out / "compare.json", res)
    md = report(res) + f"\nRun time: {res['wall_s'] / 60:.1f} min (`python -m recipes.compare " \
                       f"{' '.join(argv if argv is not None else sys.argv[1:])}`).\n"
    (out / "compare.md").write_text(md)
    png = plot(res, out / "compare.png")
    print("\n" + md)
    print(f"{out / 'compare.md'}, plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
