"""The recipes' pure pieces: the task grader and SFT data encoding, the FLOP
counts, and the report tables built from a run's metrics.jsonl. Plus one small
real SFT (a few seconds): the completion-only loop memorises a handful of
problems, so the teacher/student builder trains what it claims to.

    python -m pytest tests/unit/test_recipes.py -q
"""

import dataclasses
import json
import math

import pytest

from cluster.tiny_data import grade
from cluster.tiny_models import SPECS, VOCAB_SIZE, build_tokenizer
from recipes.report import (FlopCounts, cumulative_flops, demo_summary, demo_table, flops_to_reach, format_table,
                            gap_closed, read_metrics, series, step_flops)
from recipes.sft import SFTRecipe, STUDENT_RECIPE, TEACHER_RECIPE, collate, encode_example, lr_at


# ----------------------------------------------------------------- task + data

@pytest.mark.parametrize("text,answer,expected", [
    ("81", "81", 1.0),
    (" 81 \nand more", "81", 1.0),   # first line, stripped
    ("81", 81, 1.0),                 # answers may be ints
    ("810", "81", 0.0),
    ("18", "81", 0.0),
    ("", "0", 0.0),
])
def test_grade(text, answer, expected):
    assert grade(text, answer) == expected


def test_encode_example_masks_answer_and_eos_only():
    tok = build_tokenizer()
    ids, mask = encode_example(tok, "23+58=", "81")
    # One token per character, no BOS; the answer then <|im_end|>.
    assert tok.decode(ids[:6]) == "23+58="
    assert tok.decode(ids[6:8]) == "81"
    assert ids[-1] == tok.eos_token_id
    assert mask == [0] * 6 + [1, 1, 1]


def test_collate_right_pads_and_keeps_masks():
    ex = [([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])]
    ids, attn, m = collate(ex, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert attn.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert m.tolist() == [[0, 1, 1], [0, 1, 0]]


def test_lr_schedule_warmup_then_cosine_to_floor():
    r = SFTRecipe(name="x", spec="student", steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, r) == pytest.approx(1e-4)
    assert lr_at(9, r) == pytest.approx(1e-3)
    assert lr_at(10, r) == pytest.approx(1e-3)
    assert lr_at(55, r) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(100, r) == pytest.approx(1e-4)
    assert all(lr_at(s, r) >= lr_at(s + 1, r) for s in range(10, 100))


def test_sft_problems_exclude_the_heldout_set():
    from recipes.sft import heldout_records, train_problems

    held = {r["prompt"] for r in heldout_records()}
    train = train_problems(STUDENT_RECIPE)
    assert STUDENT_RECIPE.task == TEACHER_RECIPE.task == "arithmetic-fixed"
    assert len(held) == 200
    assert len(train) == 100 * 100 - 200
    assert not held & {r["prompt"] for r in train}
    assert all(int(r["answer"]) == sum(map(int, r["prompt"][:-1].split("+"))) for r in train[:500])
    assert all(len(r["prompt"]) == 6 and len(r["answer"]) == 3 for r in train)
    sub = train_problems(dataclasses.replace(STUDENT_RECIPE, num_train_problems=50))
    assert len(sub) == 50


def test_heldout_records_reject_unknown_tasks():
    from recipes.sft import heldout_records

    with pytest.raises(ValueError, match="task='mult' is not a built-in task; valid: arithmetic, arithmetic-fixed"):
        heldout_records("mult")


def test_fixed_width_task_has_the_same_problems_and_split():
    from cluster.tiny_data import arithmetic_records, build_task

    plain, fixed = arithmetic_records(50, 7), arithmetic_records(50, 7, fixed_width=True)
    for p, f in zip(plain, fixed, strict=True):
        assert len(f["prompt"]) == 6 and len(f["answer"]) == 3
        a, b = (int(x) for x in f["prompt"][:-1].split("+"))
        assert p["prompt"] == f"{a}+{b}=" and int(f["answer"]) == int(p["answer"]) == a + b
    def problems(path):
        return [tuple(int(x) for x in json.loads(ln)["prompt"][:-1].split("+")) for ln in path.read_text().splitlines()]

    for i in (0, 1):  # train and held-out files hold the same (a, b) pairs in both formats
        assert problems(build_task("arithmetic")[i]) == problems(build_task("arithmetic-fixed")[i])


def test_recipe_key_is_stable_and_covers_every_field():
    assert TEACHER_RECIPE.key() == dataclasses.replace(TEACHER_RECIPE).key()
    assert TEACHER_RECIPE.key() != STUDENT_RECIPE.key()
    # Every field is in the key (the early-stop check interval only matters,
    # and only counts, when an early stop is set).
    base = dataclasses.replace(STUDENT_RECIPE, stop_at_accuracy=0.5)
    for f in dataclasses.fields(SFTRecipe):
        v = getattr(base, f.name)
        changed = {"name": "other", "spec": "teacher"}.get(f.name, v + 1 if isinstance(v, int) else v * 2)
        assert dataclasses.replace(base, **{f.name: changed}).key() != base.key(), f.name
    # Without an early stop, recipes keep the key they had before early stops
    # existed (cached SFT models stay valid).
    no_stop = dataclasses.replace(TEACHER_RECIPE, stop_at_accuracy=0.0)
    assert no_stop.key() == dataclasses.replace(no_stop, stop_check_every=7).key()


def test_teacher_is_the_larger_model():
    t, s = SPECS[TEACHER_RECIPE.spec], SPECS[STUDENT_RECIPE.spec]
    assert t.hidden_size * t.num_layers > s.hidden_size * s.num_layers


# ----------------------------------------------------------------- FLOPs

def _qwen2_matmul_params(spec) -> int:
    """Independent count for the Qwen2 layout (q/k/v with bias, o without,
    gated MLP, two RMSNorms per layer, final norm, untied LM head)."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * spec.intermediate_size + 2 * h
    return spec.num_layers * layer + h + VOCAB_SIZE * h


def test_flop_params_counts_all_but_the_input_embedding():
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.tiny_models import build_model
    from recipes.sft import flop_params

    model = AutoModelForCausalLM.from_pretrained(build_model("student"), dtype=torch.float32)
    assert flop_params(model) == _qwen2_matmul_params(SPECS["student"])
    total = sum(p.numel() for p in model.parameters())
    assert flop_params(model) == total - VOCAB_SIZE * SPECS["student"].hidden_size


def test_step_flops_per_method():
    kw = dict(n_student=10, n_teacher=100, prompt_tokens=6, completion_tokens=4)
    assert step_flops(method="on_policy", **kw) == FlopCounts(student=2 * 10 * 10 + 6 * 10 * 10, teacher=2 * 100 * 10)
    assert step_flops(method="seq_kd", **kw) == FlopCounts(student=6 * 10 * 10, teacher=2 * 100 * 10)
    assert step_flops(method="student_sft", **kw) == FlopCounts(student=8 * 10 * 10, teacher=0.0)
    assert step_flops(method="sft", **kw) == FlopCounts(student=6 * 10 * 10, teacher=0.0)
    with pytest.raises(ValueError, match="method='rl' is not valid; use one of on_policy, seq_kd"):
        step_flops(method="rl", **kw)
    with pytest.raises(ValueError, match="completion_tokens=-1"):
        step_flops(method="sft", n_student=1, n_teacher=1, prompt_tokens=1, completion_tokens=-1)


def test_cumulative_flops_accumulates_per_step():
    rows = [{"step": 0, "eval/accuracy": 0.1},
            {"step": 1, "rollout/completions": 8, "rollout/completion_tokens": 24},
            {"step": 2, "rollout/completions": 8, "rollout/completion_tokens": 16, "eval/accuracy": 0.5}]
    f = cumulative_flops(rows, method="on_policy", n_student=10, n_teacher=100, prompt_tokens_per_completion=6.0)
    tok1, tok2 = 8 * 6 + 24, 8 * 6 + 16
    assert f[0] == FlopCounts(0.0, 0.0)
    assert f[1] == FlopCounts(8 * 10 * tok1, 2 * 100 * tok1)
    assert f[2].student == pytest.approx(8 * 10 * (tok1 + tok2))
    assert f[2].teacher == pytest.approx(2 * 100 * (tok1 + tok2))
    assert f[2].total == pytest.approx(f[2].student + f[2].teacher)


def test_flops_to_reach_interpolates_the_first_crossing():
    curve = [(0.0, 0.2), (10.0, 0.4), (20.0, 0.8), (30.0, 0.7)]
    assert flops_to_reach(curve, 0.6) == pytest.approx(15.0)
    assert flops_to_reach(curve, 0.4) == pytest.approx(10.0)
    assert flops_to_reach(curve, 0.1) == 0.0          # already there at the start
    assert flops_to_reach(curve, 0.9) is None         # never reached
    assert flops_to_reach([], 0.5) is None


# ----------------------------------------------------------------- metrics + tables

def _write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DEMO_ROWS = [
    {"step": 0, "eval/accuracy": 0.30, "eval/reverse_kl": 0.50},
    {"step": 1, "teacher/reverse_kl": 0.45, "learner/loss": 0.4},
    {"step": 2, "teacher/reverse_kl": 0.30, "eval/accuracy": 0.60, "eval/reverse_kl": 0.20},
    {"step": 3, "teacher/reverse_kl": 0.10},
    {"step": 4, "teacher/reverse_kl": 0.05, "eval/accuracy": 0.75, "eval/reverse_kl": 0.04},
]


def test_read_metrics_orders_by_step_and_merges_repeats(tmp_path):
    p = _write_metrics(tmp_path / "metrics.jsonl", [DEMO_ROWS[2], DEMO_ROWS[0], {"step": 2, "eval/accuracy": 0.61}])
    rows = read_metrics(tmp_path)  # a run directory works too
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[1]["eval/accuracy"] == 0.61 and rows[1]["eval/reverse_kl"] == 0.20
    p.write_text('{"step": 0}\n{"loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: row has no 'step' field"):
        read_metrics(p)
    with pytest.raises(FileNotFoundError, match="the run wrote no metrics"):
        read_metrics(tmp_path / "nope")


def test_series_skips_missing_and_non_finite():
    rows = [{"step": 0, "a": 1.0}, {"step": 1}, {"step": 2, "a": None}, {"step": 3, "a": math.nan},
            {"step": 4, "a": 2}]
    assert series(rows, "a") == [(0, 1.0), (4, 2.0)]


def test_demo_summary_and_table(tmp_path):
    rows = read_metrics(_write_metrics(tmp_path / "metrics.jsonl", DEMO_ROWS))
    s = demo_summary(rows, teacher_accuracy=0.90, teacher_greedy=0.95, greedy_before=0.40, greedy_after=0.85)
    assert s["steps"] == 4
    assert (s["accuracy_before"], s["accuracy_after"]) == (0.30, 0.75)
    assert (s["reverse_kl_before"], s["reverse_kl_after"]) == (0.50, 0.04)
    assert s["gap_closed"] == pytest.approx(0.45 / 0.60)
    assert s["greedy_gap_closed"] == pytest.approx(0.45 / 0.55)
    t = demo_table(s)
    assert "| student (SFT init)" in t and "0.300" in t and "0.750" in t and "0.040" in t
    assert "closed (sampled): 0.75; greedy: 0.82" in t
    with pytest.raises(ValueError, match="eval.every_steps > 0"):
        demo_summary([{"step": 1, "teacher/reverse_kl": 0.1}], 0.9)


def test_gap_closed_edge_cases():
    assert gap_closed(0.2, 0.6, 1.0) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.4, 0.9) == pytest.approx(-0.25)  # regressions show as negative
    assert gap_closed(0.9, 0.9, 0.9) is None


def test_format_table_is_markdown():
    t = format_table(["a", "bb"], [["x", 0.5], ["yy", 1.5e20], ["z", None]])
    lines = t.splitlines()
    assert lines[0] == "| a  | bb       |"
    assert lines[1] == "|----|----------|"
    assert lines[3] == "| yy | 1.50e+20 |"
    assert lines[4] == "| z  | -        |"


def _synthetic_compare_runs():
    """An init curve and a seq-KD run exactly on acc = 0.3 + 0.1 log2(N/1000),
    and an on-policy run of 432,000 FLOPs per step (n_student 10, n_teacher
    40, 100 completions x 12 prompt tokens + 1500 completion tokens)."""
    init_curve = [{"traces": n, "accuracy": 0.3 + 0.1 * math.log2(n / 1000)} for n in (1000, 2000, 4000)]
    seq_kd = [{"step": 0, "eval/accuracy": 0.5}, {"step": 4, "eval/accuracy": 0.6}]
    opd = [{"step": 0, "eval/accuracy": 0.5},
           {"step": 1, "eval/accuracy": 0.6, "rollout/completions": 100, "rollout/completion_tokens": 1500},
           {"step": 2, "eval/accuracy": 0.7, "rollout/completions": 100, "rollout/completion_tokens": 1500}]
    return init_curve, seq_kd, opd


def test_compare_ratio_on_synthetic_runs():
    from recipes.compare import final_accuracy, ratios_for, sft_points

    init_curve, seq_kd, opd = _synthetic_compare_runs()
    pts = sft_points(init_curve, seq_kd, n0=4000, traces_per_step=1000)
    # from N0/2 on by default; N0/4 only when asked
    assert pts == [(2000.0, 0.4), (4000.0, 0.5), (8000.0, pytest.approx(0.6))]
    assert sft_points(init_curve, seq_kd, n0=4000, traces_per_step=1000, fit_from=0.25)[0] == (1000.0, 0.3)
    assert final_accuracy(opd) == pytest.approx(0.65)   # mean of the last two evals
    seeds = [{"sft_points": pts, "n0": 4000, "rows": opd}] * 2
    r = ratios_for("reverse_kl", seeds, n_student=10, n_teacher=40, prompt_tokens=12, completion_tokens=15)
    # SFT reaches 0.65 at N* = 1000 * 2^3.5 traces (beyond the 8000 run: extrapolated);
    # OPD crosses 0.65 halfway between 432,000 and 864,000 FLOPs.
    n_star = 1000 * 2 ** 3.5
    for mode, per_trace in (("data_given", 6 * 10 * 27), ("with_generation", 6 * 10 * 27 + 2 * 40 * 27)):
        seed0, e = r[mode]["per_seed"][0], r[mode]
        assert seed0["n_star"] == pytest.approx(n_star) and seed0["extrapolated"]
        assert seed0["ratio"] == pytest.approx((n_star - 4000) * per_trace / 648000)
        # identical seeds: a zero-width interval at that ratio
        assert e["interval"] == pytest.approx((seed0["ratio"],) * 3)
        assert e["reproduced"] == (seed0["ratio"] > 1)
        assert seed0["common_ratio"] is None   # no seq-KD final given: nothing measured to compare at
    # With seq-KD's final accuracy (0.6), also compared where both got: SFT's
    # measured 8000 traces (4000 past N0) against OPD's 432,000 FLOPs.
    r = ratios_for("reverse_kl", [dict(seeds[0], sft_final=0.6)], n_student=10, n_teacher=40, prompt_tokens=12,
                   completion_tokens=15)
    p = r["data_given"]["per_seed"][0]
    assert p["common_target"] == pytest.approx(0.6) and p["common_ratio"] == pytest.approx(4000 * 1620 / 432000)


def test_compare_report_and_plot_from_synthetic_runs(tmp_path):
    from recipes.compare import analyse, plot, report

    init_curve, seq_kd, opd = _synthetic_compare_runs()
    seq_kd = [dict(r, **{"rollout/completions": 1000, "rollout/completion_tokens": 15000}) if r["step"] else r
              for r in seq_kd]
    def run(m, lr, rows, val):
        return {"method": m, "lr": lr, "seed": 0, "rows": rows, "validation_accuracy": val, "wall_s": 1.0}
    runs = [run("seq_kd", 1e-3, seq_kd, 0.6), run("reverse_kl", 1e-3, opd, 0.6), run("reverse_kl", 3e-3, seq_kd, 0.5)]
    seeds = {"0": {"n0": 4000, "init_curve": init_curve, "init_accuracy": 0.5, "flop_params": 10,
                   "runs_by_lr": {"seq_kd": {1e-3: runs[0]}, "reverse_kl": {1e-3: runs[1], 3e-3: runs[2]}}}}
    settings = {"n_digits": 4, "steps": 2, "prompts": 250, "samples": 4, "seeds": [0], "teacher_spec": "t",
                "student_spec": "s", "n0": 4000}
    res = analyse(seeds, runs, ["seq_kd", "reverse_kl"], settings, n_teacher=40, teacher_accuracy=0.9,
                  traces_per_step=1000)
    assert res["methods"]["reverse_kl"]["lr"] == 1e-3 and res["completion_tokens"] == 15
    ratio = res["ratios"]["reverse_kl"]["data_given"]["per_seed"][0]["ratio"]
    assert ratio == pytest.approx((1000 * 2 ** 3.5 - 4000) * 6 * 10 * 27 / 648000)
    md = report(res)
    row = next(ln for ln in md.splitlines() if ln.startswith("| (b) on-policy") and "data_given" in ln)
    assert f"{ratio:.2f}x" in row and "needs >= 2 seeds" in row
    assert "Where the errors come from" not in md   # no diagnoses recorded: no empty table
    # With diagnoses (init, the chosen runs, the teacher): one row each, means over seeds.
    seeds["0"]["init_diagnosis"] = {"greedy": 0.8, "accuracy": 0.5, "wrong_carries_per_completion": 0.2,
                                    "compounded_share": 0.9, "probe": {"recovers": 0.1, "compounds": 0.9}}
    runs[1]["diagnosis"] = {"greedy": 0.9, "accuracy": 0.7, "wrong_carries_per_completion": 0.1,
                            "compounded_share": None, "probe": {"recovers": 0.6, "compounds": 0.4}}
    res = analyse(seeds, runs, ["seq_kd", "reverse_kl"], settings, n_teacher=40, teacher_accuracy=0.9,
                  traces_per_step=1000)
    res["teacher_diagnosis"] = {"greedy": 1.0, "accuracy": 1.0, "probe": {"recovers": 1.0, "compounds": 0.0}}
    lines = report(res).splitlines()
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines
             if ln.startswith("| ") and len(ln.split("|")) == 9}
    assert cells["student init: SFT on N0 teacher traces"] == ["0.800", "0.500", "0.200", "0.900", "0.100", "0.900"]
    assert cells["(b) on-policy distillation, sampled reverse KL"] == ["0.900", "0.700", "0.100", "-", "0.600", "0.400"]
    assert cells["(a) more SFT on fresh teacher traces"] == ["-"] * 6     # run (a) has no diagnosis
    assert cells["teacher"] == ["1.000", "1.000", "-", "-", "1.000", "0.000"]
    assert plot(res, tmp_path / "c.png").stat().st_size > 0
    # The long-tail variant's diagnoses split head and tail operators: two more columns.
    runs[1]["diagnosis"].update(head_accuracy=0.95, tail_accuracy=0.25)
    lines = report(res).splitlines()
    header = next(ln for ln in lines if ln.startswith("| model "))
    assert [c.strip() for c in header.split("|")[-3:-1]] == ["head operators: sampled acc.",
                                                             "tail operators: sampled acc."]
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines
             if ln.startswith("| ") and len(ln.split("|")) == 11}
    assert cells["(b) on-policy distillation, sampled reverse KL"][-2:] == ["0.950", "0.250"]
    assert cells["teacher"][-2:] == ["-", "-"]


def test_compare_picks_the_lr_with_the_best_mean_validation_accuracy():
    from recipes.compare import choose_lrs, parse_lrs

    runs = [{"method": "seq_kd", "lr": 1e-3, "validation_accuracy": a} for a in (0.5, 0.7)] + \
           [{"method": "seq_kd", "lr": 3e-3, "validation_accuracy": a} for a in (0.65, 0.6)] + \
           [{"method": "reverse_kl", "lr": 1e-4, "validation_accuracy": 0.4}]
    assert choose_lrs(runs) == {"seq_kd": 3e-3, "reverse_kl": 1e-4}
    assert parse_lrs(["reverse_kl=1e-4,3e-4"], {"seq_kd": (1e-3,)}) == {"seq_kd": (1e-3,), "reverse_kl": (1e-4, 3e-4)}
    with pytest.raises(ValueError, match="METHOD=LR"):
        parse_lrs(["sft=1e-3"], {})
    with pytest.raises(ValueError, match="must be > 0"):
        parse_lrs(["seq_kd=0"], {})


def test_self_distill_table_aligns_steps():
    from recipes.self_distill import self_distill_table

    res = {"sft_own_samples": [{"step": 0, "eval/reverse_kl": 0.0, "eval/accuracy": 0.3},
                               {"step": 5, "eval/reverse_kl": 0.2, "eval/accuracy": 0.35}],
           "on_policy_self": [{"step": 0, "eval/reverse_kl": 0.0, "eval/accuracy": 0.3},
                              {"step": 5, "eval/reverse_kl": 0.001, "eval/accuracy": 0.31}]}
    lines = self_distill_table(res).splitlines()
    assert len(lines) == 4
    assert lines[3].replace(" ", "") == "|5|0.200|0.350|0.001|0.310|"


def test_self_distill_table_shifts_the_recovery_run_after_the_drift():
    from recipes.self_distill import self_distill_table

    res = {"sft_own_samples": [{"step": 0, "eval/reverse_kl": 0.0, "eval/accuracy": 0.4},
                               {"step": 10, "eval/reverse_kl": 0.5, "eval/accuracy": 0.2}],
           "recovery": [{"step": 0, "eval/reverse_kl": 0.5, "eval/accuracy": 0.2},
                        {"step": 10, "eval/reverse_kl": 0.05, "eval/accuracy": 0.35}]}
    lines = self_distill_table(res, {"recovery": 10}).splitlines()
    assert [ln.replace(" ", "") for ln in lines[2:]] == ["|0|0.000|0.400|-|-|", "|10|0.500|0.200|0.500|0.200|",
                                                         "|20|-|-|0.050|0.350|"]


# ----------------------------------------------------------------- a real (small) SFT

def test_sft_loop_memorises_a_few_problems():
    """The completion-only SFT loop really trains: 6 problems, student arch,
    fresh init, ~80 steps -> greedy answers exact."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.tiny_models import build_model
    from recipes.common import model_accuracy
    from recipes.sft import sft_loop

    recs = [{"prompt": p, "answer": a} for p, a in
            [("12+30=", "42"), ("7+8=", "15"), ("55+45=", "100"), ("9+0=", "9"), ("31+31=", "62"), ("80+19=", "99")]]
    path = build_model("student")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model_accuracy(model, tok, recs) == 0.0  # random init
    counted, step_losses = [], []
    sft_loop(model, tok, recs, steps=80, batch_size=6, lr_fn=lambda s: 3e-3, seed=0, log=lambda *_: None,
             callback=lambda step, tokens: counted.append(tokens), losses=step_losses)
    assert counted[-1] == 80 * sum(len(r["prompt"]) + len(r["answer"]) + 1 for r in recs)  # tokens counted
    assert model_accuracy(model, tok, recs) == 1.0
    # One loss per step, the first before any update: near ln(vocab) from a
    # near-uniform init (logits of a 0.02-std init are a few tenths at most).
    vocab = model.get_output_embeddings().weight.shape[0]
    assert len(step_losses) == 80
    assert abs(step_losses[0] - math.log(vocab)) < 1.0, (step_losses[0], math.log(vocab))
    assert max(step_losses[-5:]) < step_losses[0] / 2


def test_sft_loop_stops_when_the_callback_says_so():
    """Early stop (SFTRecipe.stop_at_accuracy uses it): a callback returning
    True ends training after that step, and the tokens count stops there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.tiny_models import build_model
    from recipes.sft import sft_loop

    recs = [{"prompt": "12+30=", "answer": "42"}, {"prompt": "7+8=", "answer": "15"}]
    path = build_model("student")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seen = []
    tokens = sft_loop(model, tok, recs, steps=50, batch_size=2, lr_fn=lambda s: 1e-3, seed=0, log=lambda *_: None,
                      callback=lambda step, tokens: seen.append(step) or step == 3)
    assert seen == [1, 2, 3]
    assert tokens == 3 * sum(len(r["prompt"]) + len(r["answer"]) + 1 for r in recs)


def test_compare_refuses_a_run_teacher_that_is_not_a_recipe_teacher(tmp_path, capsys):
    from recipes.compare import main

    with pytest.raises(SystemExit) as e:   # refused before any model is built or run dir made
        main(["--run-teacher", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no sft_summary.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
