"""The continual-learning recipe's data (recipes/continual_task.py):
instructions, facts, documents, the mid-training mix, the splits and the
grader. Pure logic.

    python -m pytest tests/unit/test_continual.py -q
"""

import re
from collections import Counter

import pytest

from cluster.tiny_data import read_jsonl
from cluster.tiny_models import build_tokenizer
from recipes.continual_task import (KINDS, MAX_ANSWER_CHARS, MAX_PROMPT_CHARS, build_task_files, documents,
                                    eval_instructions, fact_question, fact_sentence, grade_record, instruction,
                                    make_facts, midtrain_mix, train_instructions)


def test_docstring_examples():
    assert instruction("rev", "kqbz")["prompt"] == "rev:kqbz=" and instruction("rev", "kqbz")["answer"] == "zbqk"
    assert instruction("up", "kqbz")["answer"] == "KQBZ"
    assert instruction("sort", "kqbz")["answer"] == "bkqz"
    assert instruction("dup", "kqbz")["answer"] == "kkqqbbzz"
    assert fact_question("qzv", "47") == {"prompt": "code qzv?", "answer": "47", "kind": "fact"}
    assert fact_sentence("qzv", "47") == "the code of qzv is 47."


@pytest.mark.parametrize("kind,s", [("nope", "abc"), ("rev", ""), ("rev", "aBc"), ("up", "a1")])
def test_bad_instruction_is_refused(kind, s):
    with pytest.raises(ValueError):
        instruction(kind, s)


def test_grader_is_first_line_exact_match():
    rec = instruction("sort", "cab")
    assert grade_record("abc", rec) == 1.0
    assert grade_record(" abc \nanything after", rec) == 1.0
    assert grade_record("abcd", rec) == 0.0
    assert grade_record("ab c", rec) == 0.0
    assert grade_record("", rec) == 0.0
    assert grade_record("47", fact_question("qzv", "47")) == 1.0
    assert grade_record("4", fact_question("qzv", "47")) == 0.0


def test_eval_set_is_deterministic_balanced_and_distinct():
    ev = eval_instructions(400)
    assert ev == eval_instructions(400)
    assert eval_instructions(100) == ev[:100]
    assert Counter(r["kind"] for r in ev) == {k: 100 for k in KINDS}
    assert len({r["prompt"].split(":", 1)[1] for r in ev}) == 400


def test_train_stream_never_holds_a_held_out_string():
    held = {r["prompt"].split(":", 1)[1] for r in eval_instructions(400)}
    tr = train_instructions(5000, seed=0)
    assert not held & {r["prompt"].split(":", 1)[1] for r in tr}
    assert tr != train_instructions(5000, seed=1)
    assert set(Counter(r["kind"] for r in tr)) == set(KINDS)


def test_records_fit_the_token_budget():
    tok = build_tokenizer()
    for r in eval_instructions(400) + train_instructions(400, seed=3):
        assert re.fullmatch(r"(rev|up|sort|dup):[a-z]{3,6}=", r["prompt"])
        assert len(tok.encode(r["prompt"], add_special_tokens=False)) <= MAX_PROMPT_CHARS
        assert len(tok.encode(r["answer"], add_special_tokens=False)) <= MAX_ANSWER_CHARS


def test_facts_are_distinct_names_with_two_digit_codes():
    facts = make_facts(500)
    assert facts == make_facts(500) and facts != make_facts(500, seed=1)
    assert len({n for n, _ in facts}) == 500
    assert all(re.fullmatch(r"[a-z]{3}", n) and re.fullmatch(r"\d\d", c) for n, c in facts)
    with pytest.raises(ValueError):
        make_facts(26 ** 3 + 1)


def test_documents_state_only_true_facts():
    facts = make_facts(50)
    truth = dict(facts)
    for d in documents(facts, 200, seed=0):
        assert d["prompt"] == ""
        stated = re.findall(r"the code of ([a-z]{3}) is (\d\d)\.", d["answer"])
        assert 1 <= len(stated) <= 3
        assert " ".join(fact_sentence(n, c) for n, c in stated) == d["answer"]
        assert all(truth[n] == c for n, c in stated)


@pytest.mark.parametrize("inst,qa", [(0.0, 0.35), (0.3, 0.35), (0.3, 0.0)])
def test_midtrain_mix_has_the_asked_shares(inst, qa):
    facts = make_facts(30)
    mix = midtrain_mix(facts, 1000, instruction_frac=inst, qa_frac=qa, seed=0)
    kinds = Counter("inst" if r["kind"] in KINDS else r["kind"] for r in mix)
    assert len(mix) == 1000
    assert kinds["inst"] == round(1000 * inst) and kinds["fact"] == round(1000 * qa)
    assert kinds["doc"] == 1000 - kinds["inst"] - kinds["fact"]
    truth = dict(facts)
    assert all(truth[r["prompt"][5:-1]] == r["answer"] for r in mix if r["kind"] == "fact")
    held = {r["prompt"] for r in eval_instructions(400)}
    assert not held & {r["prompt"] for r in mix}


@pytest.mark.parametrize("inst,qa", [(-0.1, 0.3), (0.8, 0.3), (0.3, 1.2)])
def test_midtrain_mix_refuses_bad_shares(inst, qa):
    with pytest.raises(ValueError, match="instruction_frac"):
        midtrain_mix(make_facts(5), 10, instruction_frac=inst, qa_frac=qa, seed=0)


def test_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    paths = build_task_files(40, n_train=300, n_eval=80)
    assert read_jsonl(paths["inst_eval"]) == eval_instructions(80)
    assert read_jsonl(paths["inst_train"]) == train_instructions(300, seed=0)
    assert read_jsonl(paths["facts"]) == [fact_question(*f) for f in make_facts(40)]
    assert all(str(p).startswith(str(tmp_path)) for p in paths.values())


def test_driver_configs_of_the_recipe_runs_are_valid(tmp_path, monkeypatch):
    # Every driver run of recipes.continual loads as a config (no actor starts):
    # its data files, the grader spec, the token budget, loss and sampling source.
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    from recipes.common import driver_config
    from recipes.continual import RUNS, task_overrides

    files = build_task_files(40, n_train=300, n_eval=80)
    for name, (train, ov) in RUNS.items():
        cfg = driver_config(task_overrides(files, train) + ov + [f"run.dir={tmp_path / name}"])
        assert cfg.data.train == str(files[train])
        assert cfg.eval.grader == "recipes.continual_task:grade_record"
        assert cfg.eval.num_prompts == (80 if train == "inst_train" else 40)
        assert cfg.data.max_prompt_tokens >= MAX_PROMPT_CHARS and cfg.rollout.max_new_tokens > MAX_ANSWER_CHARS
    assert driver_config(RUNS["sft_teacher_samples"][1]).train.sample_from == "teacher"


def test_table_has_one_row_per_model():
    from recipes.continual import continual_table

    s = {"knowledge": 0.5, "instruction": 0.25, "instruction_sampled": 0.125}
    lines = continual_table({"post": s, "distill": s}).splitlines()
    assert len(lines) == 4 and "post-trained" in lines[2] and "on-policy distillation" in lines[3]
    assert "| 0.500" in lines[2] and "0.250" in lines[2] and "0.125" in lines[2]
