"""What the recipes share: the demo pair of SFT models, the driver config they
run with, running the real driver in-process, and held-out accuracy of a
checkpoint measured with transformers (for the teacher, which the driver does
not evaluate, and for greedy decoding).

Used by recipes/demo.py, recipes/compare.py and recipes/self_distill.py; not a
command of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from recipes.sft import STUDENT_RECIPE, TEACHER_RECIPE, build_sft_model, heldout_records, read_summary, set_threads

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo.yaml"

# Overrides of configs/demo.yaml for the recipes: the task the SFT models were
# trained on, with raw "07+58=" prompts (no chat template); answers are 3
# digits + EOS; evaluation covers the whole held-out set (the one recipes.sft
# held out). Each recipe adds its own.
BASE_OVERRIDES = [
    f"data.train=tiny:{TEACHER_RECIPE.task}",
    "data.apply_chat_template=false",
    "data.max_prompt_tokens=16",
    "student.max_model_len=64",
    "teacher.max_model_len=64",
    "rollout.max_new_tokens=8",
    "eval.num_prompts=200",
    "eval.samples_per_prompt=2",
    "run.save_every_steps=0",
    "log.wandb.table_every_steps=0",
]


def carry_overrides(n_digits: int, layout: str = "columns", n_train: int = 20000, n_eval: int = 500,
                    operators: int = 0) -> list[str]:
    """Overrides that put the driver on the carry-trace addition task
    (recipes/carry_task.py; with `operators`, its long-tail variant), after
    BASE_OVERRIDES: its data files (written on first use), its grader, raw
    prompts, completions of 3n tokens + 1 spare, evaluation on the whole
    held-out set."""
    from recipes.carry_task import build_task_files

    train, ev = build_task_files(n_digits, n_train=n_train, n_eval=n_eval, layout=layout, operators=operators)
    prompt_tokens = (3 * n_digits if layout == "columns" else 2 * n_digits + 2) + (2 if operators else 0)
    return [f"data.train={train}", f"data.eval={ev}", "eval.grader=recipes.carry_task:grade_record",
            "data.apply_chat_template=false", f"data.max_prompt_tokens={prompt_tokens}",
            f"rollout.max_new_tokens={3 * n_digits + 1}", f"eval.num_prompts={n_eval}",
            f"student.max_model_len={max(64, prompt_tokens + 3 * n_digits + 1)}",
            f"teacher.max_model_len={max(64, prompt_tokens + 3 * n_digits + 1)}"]


@dataclasses.dataclass(frozen=True)
class Pair:
    """The teacher and the student init built by recipes.sft."""

    teacher: Path
    student: Path

    def summaries(self) -> tuple[dict, dict]:
        return read_summary(self.teacher), read_summary(self.student)


def build_pair(log=print) -> Pair:
    """Build (or reuse from $OPD_CACHE_DIR) the SFT teacher and student init."""
    t0 = time.monotonic()
    teacher = build_sft_model(TEACHER_RECIPE, log=log)
    student = build_sft_model(STUDENT_RECIPE, log=log)
    ts, ss = read_summary(teacher), read_summary(student)
    log(f"[recipes] teacher {teacher.name}: greedy held-out accuracy {ts['heldout_greedy_accuracy']:.3f}; "
        f"student init {student.name}: {ss['heldout_greedy_accuracy']:.3f} ({time.monotonic() - t0:.0f}s)")
    return Pair(teacher=teacher, student=student)


def pair_from_args(teacher: str | None, student: str | None, log=print) -> Pair:
    """The recipes' pair, or checkpoints the user gave (both or neither)."""
    if (teacher is None) != (student is None):
        raise ValueError("give both --teacher and --student (checkpoint directories) or neither (the recipes "
                         f"build their own SFT pair); got teacher={teacher!r}, student={student!r}")
    if teacher is None:
        return build_pair(log=log)
    return Pair(teacher=Path(teacher).resolve(), student=Path(student).resolve())


def default_run_dir(kind: str) -> str:
    """runs/<kind>-<UTC time>: a fresh directory per invocation (the driver
    refuses a run.dir holding an earlier run's checkpoints)."""
    return str(REPO / "runs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")


def run_parser(kind: str, doc: str, *, steps: int, prompts_per_step: int, lr: float, eval_every: int,
               lr_help: str, overrides_help: str) -> argparse.ArgumentParser:
    """The command line every recipe that runs the driver has (`python -m
    recipes.<kind>`, described by the first paragraph of `doc`); the recipe
    adds its own options."""
    ap = argparse.ArgumentParser(prog=f"python -m recipes.{kind}", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--prompts-per-step", type=int, default=prompts_per_step)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--lr", type=float, default=lr, help=lr_help)
    ap.add_argument("--eval-every", type=int, default=eval_every)
    ap.add_argument("--out", default=None, help=f"output directory (default runs/{kind}-<time>)")
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    return ap


def driver_config(overrides: list[str]):
    """configs/demo.yaml + BASE_OVERRIDES + `overrides` (later ones win)."""
    from cluster.config import load_config

    return load_config(DEMO_YAML, BASE_OVERRIDES + list(overrides))


@contextlib.contextmanager
def one_ray_for_runs(cfg):
    """One Ray connection for every driver run of a recipe (each run_driver
    joins it instead of starting a local cluster of its own): connected as the
    driver connects (cluster.placement.connect, with `cfg`'s actor
    environment); a local cluster started here is shut down on exit."""
    import ray

    from cluster.placement import connect
    from cluster.train import actor_env

    info = connect(cfg.placement, env_vars=actor_env(cfg))
    try:
        yield info
    finally:
        if info.started_local:
            ray.shutdown()


def run_driver(cfg, log=print) -> Path:
    """Run the real driver (cluster.train.run) in this process; returns the
    run directory. Raises if the driver fails. Ray as the driver connects:
    an initialised Ray, else `placement.ray_address` / RAY_ADDRESS, else a
    local cluster of its own for this run (cluster.placement.connect)."""
    from cluster.train import run

    t0 = time.monotonic()
    rc = run(cfg)
    if rc != 0:
        raise RuntimeError(f"the driver exited with code {rc} (run dir {cfg.run.dir}); see its output above")
    log(f"[recipes] driver run {cfg.run.dir} finished in {time.monotonic() - t0:.0f}s")
    return Path(cfg.run.dir).resolve()


# --------------------------------------------------------------------------
# Accuracy of a checkpoint (transformers, outside the driver)
# --------------------------------------------------------------------------


def accuracy(model_dir: str | os.PathLike, records: list[dict] | None = None, *, temperature: float = 0.0,
             samples_per_prompt: int = 1, seed: int = 0, max_new_tokens: int = 8) -> float:
    """Held-out accuracy of a checkpoint directory (see `model_accuracy`).
    Records default to the task's held-out set.
    The tokenizer is the checkpoint's own (the driver's export carries it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_accuracy(model, tok, heldout_records() if records is None else records, temperature=temperature,
                          samples_per_prompt=samples_per_prompt, seed=seed, max_new_tokens=max_new_tokens)


def model_accuracy(model, tok, records: list[dict], *, temperature: float = 0.0, samples_per_prompt: int = 1,
                   seed: int = 0, max_new_tokens: int = 8) -> float:
    """Accuracy of a transformers model on `records`: greedy (temperature 0)
    or sampled from the raw distribution at `temperature` (no top-k/top-p, as
    the driver's eval samples), `samples_per_prompt` samples each, graded
    with the task's grader. Leaves the model in eval mode."""
    import torch

    from cluster.tiny_data import grade

    set_threads()
    model.eval()
    prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in records]
    T = max(len(p) for p in prompts)
    ids_B_T = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in prompts])
    attn_B_T = (torch.arange(T)[None, :] >= torch.tensor([T - len(p) for p in prompts])[:, None]).long()
    kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0,
                                                             top_p=1.0)
    n = samples_per_prompt if temperature else 1
    correct = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n):
            with torch.no_grad():
                out = model.generate(input_ids=ids_B_T, attention_mask=attn_B_T, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
            for r, row in zip(records, out[:, T:].tolist(), strict=True):
                correct += grade(tok.decode(row, skip_special_tokens=True), r["answer"])
    return correct / (len(records) * n)


def mean_prompt_tokens(records: list[dict] | None = None) -> float:
    """Mean prompt length in tokens (one token per character for the tiny
    tokenizer; raw prompts, no chat template), for the FLOP counts."""
    from cluster.tiny_models import build_tokenizer

    tok = build_tokenizer()
    records = heldout_records() if records is None else records
    return sum(len(tok.encode(r["prompt"], add_special_tokens=False)) for r in records) / len(records)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
