"""LoRA vs full fine-tuning through the real driver: step time by phase,
bytes and seconds per weight push, learner peak memory.

    .venv/bin/python -m bench.lora                                  # large pair, rank 16 vs full (~5 min on 2 cores)
    .venv/bin/python -m bench.lora --pair small --ranks 0,8,64 --steps 5

Each row is one `python -m cluster.train --config configs/demo.yaml` run
(bench/e2e.py's `run_opd`: a private local Ray cluster, the driver's own
teacher_server, eval/checkpoints/export off, `--warmup` steps left out of the
means) at `learner.lora.rank` = the row's rank (0 = full fine-tuning), all
else equal. Columns are per-step means of metrics.jsonl: the phases
(`time/sample_s`, `time/teacher_s`, `time/train_s`, `time/sync_s`), inside
training the slowest rank's forward+backward and optimizer step, one weight
push (`sync/bytes`; `sync/total_s` seen by the learner side, `time/sync_s`
by the driver), the learner's peak memory as it reports it
(`learner/peak_memory_gib`: the rank's peak RSS on CPU, the allocator's peak
on GPU) and the peak RSS of its processes seen from outside (bench/e2e.py's
RssMonitor). Full fine-tuning pushes every weight over gloo; LoRA pushes the
adapter alone through Ray's object store into vLLM's LoRA slot.

Files: `<out>/results.json`, `<out>/rank<r>/` (run dirs and driver logs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
from pathlib import Path

from bench.e2e import PAIRS, Workload, run_opd

COLUMNS = ("rank", "step_s", "sample_s", "teacher_s", "train_s", "fwd_bwd_s", "opt_step_s", "sync_s", "push_mib",
           "push_s", "learner_peak_gib", "learner_rss_mib", "trainable_frac")


def run_row(w: Workload, rank: int, alpha: float, out: Path, extra: list[str]) -> dict:
    lora = [f"learner.lora.rank={rank}", f"learner.lora.alpha={alpha}"] if rank else []
    res = run_opd(w, "sync", out / f"rank{rank}", lora + extra, {})
    rows = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("step", 0) > w.warmup and "time/step_s" in r]

    def mean(k):
        return statistics.fmean(r[k] for r in rows)

    return {"rank": rank, "step_s": res["step_s"], "sample_s": res["sample_s"], "teacher_s": res["teacher_s"],
            "train_s": res["train_s"], "fwd_bwd_s": mean("time/learner_forward_backward_s"),
            "opt_step_s": mean("time/learner_optimizer_step_s"), "sync_s": res["sync_s"],
            "push_mib": mean("sync/bytes") / 2**20, "push_s": mean("sync/total_s"),
            "learner_peak_gib": max(r["learner/peak_memory_gib"] for r in rows),
            "learner_rss_mib": res["peak_rss_mib"].get("learner", float("nan")), "run_dir": res["run_dir"]}


def trainable_fraction(student: str, rank: int, alpha: float) -> float:
    """Trainable parameters / all parameters of the student at `rank`."""
    if rank == 0:
        return 1.0
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cluster.tiny_models import resolve_model
    from learner.config import LoraConfig
    from learner.lora import wrap

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(student)))
    model = wrap(model, LoraConfig(rank=rank, alpha=alpha))
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="large")
    ap.add_argument("--ranks", default="0,16", help="comma-separated learner.lora.rank values (0 = full fine-tuning)")
    ap.add_argument("--alpha", type=float, default=32.0, help="learner.lora.alpha of every LoRA row")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the means")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--override", action="append", default=[], help="extra dotted override for every run")
    ap.add_argument("--out", default="runs/bench-lora")
    args = ap.parse_args(argv)
    student, teacher, prompts = PAIRS[args.pair]
    w = Workload(pair=args.pair, student=student, teacher=teacher, prompts_per_step=prompts, samples_per_prompt=4,
                 max_new_tokens=32, lr=args.lr, warmup=args.warmup, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        row = run_row(w, rank, args.alpha, out, args.override)
        row["trainable_frac"] = trainable_fraction(student, rank, args.alpha)
        results.append(row)
    (out / "results.json").write_text(json.dumps({"workload": dataclasses.asdict(w),
                                                  "machine": platform.processor() or platform.machine(),
                                                  "rows": results}, indent=1, default=str))
    print(" ".join(f"{c:>16}" for c in COLUMNS))
    for r in results:
        print(" ".join(f"{r[c]:>16.4g}" if isinstance(r[c], float) else f"{r[c]:>16}" for c in COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
