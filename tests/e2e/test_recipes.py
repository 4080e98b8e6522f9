"""The recipes end to end at toy scale, everything real: `recipes.compare`
(a carry teacher and a student init trained here, then one driver run per
method: Ray, vLLM sampler, the teacher server the driver starts, DeepSpeed),
`recipes.self_distill` and `recipes.demo` on the session's tiny models; the
analysis, the report and the plot of each.

The numbers are meaningless at this scale (2 steps per run); what is checked
is that each recipe's parts fit: each run is a real driver run of what the
recipe says it is, the tables and plots are built from them, and (compare) a
rerun into the same --out reuses the finished runs.
"""

from __future__ import annotations

import json
import shutil

import pytest

from recipes import compare
from recipes.report import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")

METHODS = ("seq_kd", "reverse_kl_topk")
ARGS = ["--quick", "--digits", "3", "--teacher-spec", "student-1l", "--teacher-steps", "40",
        "--student-spec", "student-1l-32", "--n0", "1024", "--steps", "2", "--eval-every", "1",
        "--prompts-per-step", "8", "--samples-per-prompt", "2", "--methods", ",".join(METHODS),
        "--top-k", "4", "eval.num_prompts=64"]


def test_compare_runs_each_method_through_the_driver_and_reuses_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    run_dirs = {m: out / compare.run_name(m, 1e-3, 0) for m in METHODS}
    assert compare.main(ARGS + ["--out", str(out)]) == 0

    res = json.loads((out / "compare.json").read_text())
    assert set(res["methods"]) == set(METHODS)
    assert all(info["lr"] == 1e-3 for info in res["methods"].values())
    trained = {}
    for m, run_dir in run_dirs.items():
        rows = read_metrics(run_dir)
        steps = [r["step"] for r in rows if "eval/accuracy" in r]
        assert steps == [0, 1, 2], (m, steps)
        trained[m] = [r for r in rows if "learner/loss" in r]
        assert [r["step"] for r in trained[m]] == [1, 2], m
        # The teacher the driver started scored every trained step.
        assert all(r["teacher/tokens_scored"] > 0 for r in trained[m]), m
        assert (run_dir / "final" / "config.json").is_file(), m
        result = json.loads((run_dir / "result.json").read_text())
        assert 0.0 <= result["validation_accuracy"] <= 1.0
        assert set(result["diagnosis"]) >= {"greedy", "accuracy", "probe"}
    # (a) trains on completions the teacher wrote; (c) on the student's own,
    # which the teacher only scores.
    assert all(r["teacher/tokens_generated"] > 0 and "teacher/forward_kl" in r for r in trained["seq_kd"])
    assert all(r.get("teacher/tokens_generated", 0) == 0 and "teacher/reverse_kl" in r
               for r in trained["reverse_kl_topk"])

    # Ratios in both of the publication's modes, one seed: per-seed only.
    assert set(res["ratios"]) == {"reverse_kl_topk"}
    for mode in ("data_given", "with_generation"):
        e = res["ratios"]["reverse_kl_topk"][mode]
        assert len(e["per_seed"]) == 1 and "interval" not in e
    assert len(res["truth_sft"]["curves"]) == 1 and [r["step"] for r in res["truth_sft"]["curves"][0]] == [0, 1, 2]
    md = (out / "compare.md").read_text()
    for part in ("SFT curve of the student init", "| teacher traces | test accuracy (sampled) | training loss |",
                 "Compute ratio", "Where the errors come from", "Run time"):
        assert part in md, part
    # Each point of an init's curve carries its training loss, which exact-match
    # accuracy lags (built here: the cache may hold an init from before the field).
    from pathlib import Path

    from recipes.carry_sft import StudentRecipe, train_student

    init = train_student(StudentRecipe(spec="student-1l-32", n0=256, batch_size=32, points=2, schedule="cosine"),
                         Path(res["teacher"]), tmp_path / "init", eval_count=20, log=lambda *_: None)
    assert [c["traces"] for c in init["curve"]] == [128, 256]
    assert all(0.0 < c["train_loss"] < float("inf") for c in init["curve"]), init["curve"]
    assert (out / "compare.png").stat().st_size > 10_000

    # A rerun into the same --out reads the finished runs back: no driver run.
    def no_driver(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(compare, "run_driver", no_driver)
    before = {m: (d / "result.json").stat().st_mtime_ns for m, d in run_dirs.items()}
    assert compare.main(ARGS + ["--out", str(out), "--no-truth-ref"]) == 0
    assert before == {m: (d / "result.json").stat().st_mtime_ns for m, d in run_dirs.items()}
    assert json.loads((out / "compare.json").read_text())["methods"]["seq_kd"]["final_accuracy"] == \
        res["methods"]["seq_kd"]["final_accuracy"]


def _config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_compare_on_the_long_tail_variant(tmp_path):
    """`--operators K`: the teacher trains on uniformly drawn operators, the
    init on Zipf-drawn ones, the driver's prompts and every evaluation carry
    operator prefixes, and the diagnosis splits head and tail operators. The
    teacher's and the init's batch size and lr reach their recipes (and so
    their cache keys)."""
    from pathlib import Path

    from cluster.tiny_data import read_jsonl
    from recipes.carry_task import parse_operator
    from recipes.common import carry_overrides

    out = tmp_path / "ops"
    args = [a for a in ARGS if a not in ("--methods", ",".join(METHODS))]
    assert compare.main(args + ["--methods", "seq_kd", "--operators", "16", "--steps", "1", "--no-truth-ref",
                                "--teacher-batch-size", "32", "--teacher-lr", "2e-3", "--init-batch-size", "32",
                                "--init-lr", "2e-3", "--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["settings"]["operators"] == 16
    t_recipe = json.loads((Path(res["teacher"]) / "sft_summary.json").read_text())["recipe"]
    assert (t_recipe["operators"], t_recipe["batch_size"], t_recipe["lr"]) == (16, 32, 2e-3)
    s_sum = json.loads((Path(res["seeds"]["0"]["init"]) / "sft_summary.json").read_text())
    assert (s_sum["operators"], s_sum["recipe"]["batch_size"], s_sum["recipe"]["lr"]) == (16, 32, 2e-3)
    # The driver's data: every prompt has an operator, head and tail both present.
    files = dict(o.split("=", 1) for o in carry_overrides(3, operators=16) if o.startswith("data."))
    for key in ("data.train", "data.eval"):
        ops = [parse_operator(r["prompt"])[0] for r in read_jsonl(files[key])]
        assert None not in ops and min(ops) == 0 and max(ops) >= 8, key
    run_dir = out / compare.run_name("seq_kd", 1e-3, 0)
    assert {k: str(v) for k, v in _config(run_dir)["data"].items() if k in ("train", "eval")} == \
        {"train": files["data.train"], "eval": files["data.eval"]}
    assert [r["step"] for r in read_metrics(run_dir) if "learner/loss" in r] == [1]
    diag = json.loads((run_dir / "result.json").read_text())["diagnosis"]
    assert {"greedy_head_accuracy", "greedy_tail_accuracy", "head_accuracy", "tail_accuracy"} <= set(diag)
    md = (out / "compare.md").read_text()
    assert "16 operators (Zipf)" in md
    assert "| head operators: sampled acc. | tail operators: sampled acc. |" in md


def test_self_distill_runs_its_three_runs_through_the_driver(tmp_path, student_path):
    """`python -m recipes.self_distill --student DIR` on a copy of the
    session's tiny student: SFT on its own samples, on-policy distillation
    with itself as teacher, and the recovery from the SFT run's export, each
    a real driver run. The lr is large so that two SFT steps move an
    untrained model far enough for a 64-sample estimate of the KL to show it.

    The init as its own teacher, served by the driver's teacher_server (vLLM
    prefill) while the sampler scores its own tokens while decoding: both
    are float32 vLLM CPU forwards of the same weights and give the same
    logprob bits, so every advantage is exactly 0, so are the loss and its
    gradient, and AdamW (weight_decay 0) takes a zero step: the export equals
    the init bit for bit. The checkpoint asks for attention dropout 0.5,
    which vLLM ignores; the learner turns it off (learner/worker.py
    disable_dropout), so its log-probs are the sampler's."""
    from recipes import self_distill

    init = tmp_path / "student_dropout"
    shutil.copytree(student_path, init)
    cfg = json.loads((init / "config.json").read_text())
    cfg["attention_dropout"] = 0.5
    (init / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "sd"
    assert self_distill.main(["--student", str(init), "--steps", "2", "--eval-every", "1",
                              "--prompts-per-step", "8", "--samples-per-prompt", "2", "--lr", "1e-2",
                              "--out", str(out), "eval.num_prompts=32", "learner.weight_decay=0.0"]) == 0
    runs = {name: read_metrics(out / name) for name in self_distill.RUNS}
    for name, rows in runs.items():
        assert [r["step"] for r in rows if "eval/reverse_kl" in r] == [0, 1, 2], name
        assert [r["step"] for r in rows if "learner/loss" in r] == [1, 2], name
        assert _config(out / name)["teacher"]["model"] == str(init), name
    # The init as its own teacher: nothing moves, exactly.
    for r in runs["on_policy_self"]:
        if "learner/loss" in r:
            assert r["teacher/reverse_kl"] == 0.0 and r["learner/reverse_kl"] == 0.0, r
            assert r["learner/loss"] == 0.0 and r["learner/grad_norm"] == 0.0, r
            assert r["learner/logprob_abs_diff"] < 1e-3, r  # with dropout 0.5 in the learner: ~0.5
    assert all(r["eval/reverse_kl"] == 0.0 for r in runs["on_policy_self"] if "eval/reverse_kl" in r)
    final = out / "on_policy_self" / "final"
    assert self_distill.same_weights(init, final)
    assert json.loads((out / "self_distill.json").read_text())["on_policy_self_export_equals_init"] is True
    # The export keeps the checkpoint's own config, dropout included.
    assert json.loads((final / "config.json").read_text())["attention_dropout"] == 0.5
    # SFT on its own samples starts at the init (KL exactly 0) and drifts: its export is another model.
    sft_kl = dict((r["step"], r["eval/reverse_kl"]) for r in runs["sft_own_samples"] if "eval/reverse_kl" in r)
    assert sft_kl[0] == 0.0 and sft_kl[2] > 0.0, sft_kl
    assert not self_distill.same_weights(init, out / "sft_own_samples" / "final")
    # The recovery run starts from the SFT run's export, away from the init.
    assert _config(out / "recovery")["student"]["model"] == str(out / "sft_own_samples" / "final")
    assert runs["recovery"][0]["eval/reverse_kl"] > 0.0
    md = (out / "self_distill.md").read_text()
    assert "recovery: OPD from the drifted SFT export: KL to init" in md
    assert "OPD, teacher = init: its step-2 export equals the init bit for bit" in md
    # The table has one row per evaluated step, the recovery run shifted after the SFT run's last one.
    assert [line.split("|")[1].strip() for line in md.splitlines()[4:] if line.startswith("|")] == \
        ["0", "1", "2", "3", "4"]
    assert (out / "self_distill.png").stat().st_size > 10_000


def test_demo_runs_the_driver_and_writes_its_report(tmp_path, student_path, teacher_path):
    """`make demo`'s recipe (`python -m recipes.demo --teacher DIR --student
    DIR`) on the session's tiny pair, 2 steps: the driver run, the
    teacher's accuracy and the greedy accuracies of the pair and of the
    export, the report and its plot."""
    from recipes import demo

    run_dir = tmp_path / "demo"
    assert demo.main(["--teacher", teacher_path, "--student", student_path, f"run.dir={run_dir}",
                      "train.steps=2", "eval.every_steps=1", "train.prompts_per_step=8", "eval.num_prompts=16"]) == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]
    assert all(r["teacher/tokens_scored"] > 0 for r in rows if "learner/loss" in r)
    s = json.loads((run_dir / "report.json").read_text())
    assert s["steps"] == 2 and s["run_dir"] == str(run_dir)
    assert s["teacher"] == str(teacher_path) and s["student_init"] == str(student_path)
    # Two different random models: the student's KL to the teacher is far from 0.
    assert s["reverse_kl_before"] > 0.1
    for k in ("accuracy_before", "accuracy_after", "teacher_accuracy", "greedy_before", "greedy_after",
              "teacher_greedy"):
        assert 0.0 <= s[k] <= 1.0, k
    assert "student after 2 steps of on-policy distillation" in (run_dir / "report.md").read_text()
    assert (run_dir / "report.png").stat().st_size > 10_000


def test_continual_runs_its_in_process_sft_and_three_driver_runs(tmp_path, monkeypatch):
    """`python -m recipes.continual` at toy scale: the post-trained and the
    two mid-trained models (in-process SFT, 2 steps each, cached under a
    fresh $OPD_CACHE_DIR), then its three driver runs of one step each
    (distillation and SFT on the teacher's samples on instruction prompts,
    the control on fact prompts), each scored on its export, the table and
    the plot. A rerun reuses the cached models instead of training again."""
    from pathlib import Path

    from recipes import continual

    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "cont"
    args = ["--post-steps", "2", "--mid-steps", "2", "--steps", "1", "--eval-every", "1", "--prompts-per-step", "8",
            "--samples-per-prompt", "2", "eval.num_prompts=32"]
    assert continual.main(args + ["--out", str(out)]) == 0
    res = json.loads((out / "continual.json").read_text())
    post, mids = Path(res["post"]), {k: Path(v) for k, v in res["mid"].items()}
    assert json.loads((post / "sft_summary.json").read_text())["recipe"]["steps"] == 2
    mid_recipes = {k: json.loads((d / "sft_summary.json").read_text())["recipe"] for k, d in mids.items()}
    assert {k: (r["steps"], r["instruction_frac"]) for k, r in mid_recipes.items()} == \
        {"mid100": (2, 0.0), "mid70": (2, 0.3)}
    assert set(res["scores"]) == {"post", "mid100", "mid70", *continual.RUNS}
    for name, s in res["scores"].items():
        assert set(s) == {"knowledge", "instruction", "instruction_sampled"}, name
        assert all(0.0 <= v <= 1.0 for v in s.values()), (name, s)
    files = continual.build_task_files(continual.MID.n_facts, fact_seed=continual.MID.seed)
    for name, (train, overrides) in continual.RUNS.items():
        run_dir = out / name
        cfg = _config(run_dir)
        # Each run: the 70% mid-trained student, the post-trained teacher, its own prompts and loss.
        assert (cfg["student"]["model"], cfg["teacher"]["model"]) == (str(mids["mid70"]), str(post)), name
        assert cfg["data"]["train"] == str(files[train]), name
        assert cfg["data"]["eval"] == str(files["facts" if train == "facts" else "inst_eval"]), name
        assert cfg["loss"]["kind"] == overrides[0].split("=")[1], name
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1], name
        trained = [r for r in rows if "learner/loss" in r]
        assert [r["step"] for r in trained] == [1], name
        assert (run_dir / "final" / "config.json").is_file(), name
        # SFT on the teacher's samples trains on completions the teacher wrote; the others on the student's own.
        generated = trained[0].get("teacher/tokens_generated", 0)
        assert (generated > 0) == (name == "sft_teacher_samples"), (name, trained[0])
        assert trained[0]["teacher/tokens_scored"] > 0, name
    assert res["runs"].keys() == continual.RUNS.keys()
    md = (out / "continual.md").read_text()
    for label in continual.LABELS.values():
        assert label in md, label
    assert (out / "continual.png").stat().st_size > 10_000

    # A second invocation reuses the cached post- and mid-trained models.
    def no_training(*a, **k):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(continual, "train_post", no_training)
    monkeypatch.setattr(continual, "train_mid", no_training)
    assert continual.main(args + ["--runs", "distill", "--out", str(tmp_path / "cont2")]) == 0
    res2 = json.loads((tmp_path / "cont2" / "continual.json").read_text())
    assert (res2["post"], res2["mid"]) == (res["post"], res["mid"])
    assert set(res2["runs"]) == {"distill"}


def test_rl_teacher_runs_rl_then_distils_the_teacher_it_is_given(tmp_path, student_path, capsys):
    """`python -m recipes.rl_teacher` at toy scale, in its two halves.

    RL from the session's random student: a real driver run on the task
    reward (the grader), which two steps cannot lift off an accuracy of 0,
    so the recipe stops with the reason and keeps the RL run. Then the
    distillation half with `--rl-dir`: a copy of that RL run whose export is
    replaced by a stand-in teacher with a gain over the init (an SFT model
    stopped at greedy accuracy 0.3; two RL steps cannot make one), distilled
    into the same init through the driver, with the steps table and plot."""
    from recipes import rl_teacher
    from recipes.sft import SFTRecipe, build_sft_model

    common = ["--student", student_path, "--steps", "2", "--eval-every", "1", "--prompts-per-step", "8",
              "--samples-per-prompt", "2", "--accuracy-samples", "1", "eval.num_prompts=32"]
    out = tmp_path / "rl_only"
    assert rl_teacher.main(common + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not above the init's" in err and f"the RL run is kept in {out / 'rl'}" in err, err
    rl_dir = out / "rl"
    cfg = _config(rl_dir)
    assert (cfg["student"]["model"], cfg["reward"]["fn"], cfg["reward"]["coef"], cfg["loss"]["kl_coef"]) == \
        (student_path, rl_teacher.REWARD_FN, 1.0, 0.0)
    trained = [r for r in read_metrics(rl_dir) if "learner/loss" in r]
    assert [r["step"] for r in trained] == [1, 2] and all("reward/mean" in r for r in trained), trained
    assert (rl_dir / "final" / "config.json").is_file()
    assert not (out / "distill").exists()

    stand_in = build_sft_model(SFTRecipe(name="rl-teacher-stand-in", spec="student-4l", steps=3000, batch_size=64,
                                         lr=3e-3, min_lr_ratio=1.0, stop_at_accuracy=0.3, seed=0))
    teacher_run = tmp_path / "teacher_run"
    shutil.copytree(rl_dir, teacher_run, ignore=shutil.ignore_patterns("final"))
    shutil.copytree(stand_in, teacher_run / "final")
    out2 = tmp_path / "distill_only"
    assert rl_teacher.main(common + ["--rl-dir", str(teacher_run), "--distill-eval-every", "1",
                                     "--out", str(out2)]) == 0
    assert not (out2 / "rl").exists()  # the given RL run is read, not run again
    s = json.loads((out2 / "rl_teacher.json").read_text())["summary"]
    assert s["init_accuracy"] < s["teacher_accuracy"], s
    assert s["target"] == pytest.approx(s["init_accuracy"] + 0.8 * (s["teacher_accuracy"] - s["init_accuracy"]))
    assert [r["fraction"] for r in s["by_fraction"]] == list(rl_teacher.FRACTIONS)
    dcfg = _config(out2 / "distill")
    assert (dcfg["student"]["model"], dcfg["teacher"]["model"]) == (student_path, str(teacher_run / "final"))
    assert (dcfg["loss"]["kind"], dcfg["teacher"]["top_k"], dcfg["reward"]["coef"]) == ("reverse_kl_topk", 16, 0.0)
    rows = read_metrics(out2 / "distill")
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]
    assert all(r["teacher/tokens_scored"] > 0 for r in rows if "learner/loss" in r)
    md = (out2 / "rl_teacher.md").read_text()
    assert f"RL reused from {teacher_run}" in md and "| fraction of the RL gain |" in md
    assert (out2 / "rl_teacher.png").stat().st_size > 10_000
