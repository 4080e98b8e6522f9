"""The carry-trace addition task (recipes/carry_task.py): format, grader,
recovery traces, error breakdown, data splits and the loss mask. Pure logic.

    python -m pytest tests/unit/test_carry_task.py -q
"""

import random

import pytest

from cluster.tiny_data import read_jsonl
from cluster.tiny_models import build_tokenizer
from recipes.carry_task import (TraceErrors, build_task_files, carry_trace, encode_trace, eval_problems, format_prompt,
                                grade_record, make_record, parse_prompt, parse_trace, trace_errors,
                                trace_value, train_records, validation_problems)


def test_docstring_example():
    assert format_prompt(47291, 83154, 5) == "47291+83154="
    assert carry_trace(47291, 83154, 5) == ("50 41 40 01 31", [])
    assert trace_value("50 41 40 01 31", 5) == 47291 + 83154 == 130445


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_trace_value_is_the_sum_for_random_problems(n):
    rng = random.Random(n)
    for _ in range(300):
        a, b = rng.randrange(10 ** n), rng.randrange(10 ** n)
        text, no_loss = carry_trace(a, b, n)
        assert no_loss == [] and len(text) == 3 * n - 1
        assert trace_value(text, n) == a + b
        assert grade_record(text, {"prompt": format_prompt(a, b, n)}) == 1.0
        assert parse_prompt(format_prompt(a, b, n)) == (a, b, n)
        # Carries are 0/1 and are the true column carries.
        steps = parse_trace(text, n)
        assert all(c in (0, 1) for _, c in steps)
        assert steps[-1][1] == (a + b) // 10 ** n


def test_carries_chain_through_a_long_carry():
    # 99999 + 00001: every column carries; the 1 ripples to the top.
    assert carry_trace(99999, 1, 5)[0] == "01 01 01 01 01"
    assert carry_trace(0, 0, 3)[0] == "00 00 00"


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_recovery_trace_flips_one_carry_masks_it_and_recovers(j):
    a, b, n = 47291, 83154, 5
    clean, _ = carry_trace(a, b, n)
    text, no_loss = carry_trace(a, b, n, wrong_carry_at=j)
    assert no_loss == [3 * j + 1]
    diff = [i for i, (x, y) in enumerate(zip(clean, text, strict=True)) if x != y]
    assert diff == [3 * j + 1]                      # only that carry differs
    assert {clean[3 * j + 1], text[3 * j + 1]} == {"0", "1"}
    assert trace_value(text, n) == a + b            # later steps use the true carry: the answer is right
    e = trace_errors(text, format_prompt(a, b, n))
    assert e == TraceErrors(well_formed=True, correct=True, wrong_carries=1, wrong_digits=0, recovered=1,
                            compounded=int(_digit_with_carry(a, b, n, j + 1, int(text[3 * j + 1]))
                                           == int(clean[3 * (j + 1)])))


def _digit_with_carry(a, b, n, i, carry_in):
    return ((a // 10 ** i) % 10 + (b // 10 ** i) % 10 + carry_in) % 10


def test_the_last_carry_cannot_be_the_wrong_one():
    with pytest.raises(ValueError, match=r"wrong_carry_at=4: must be in \[0, 3\]"):
        carry_trace(1, 2, 5, wrong_carry_at=4)


def test_trace_errors_tells_a_compounding_error_from_a_recovery():
    a, b, n = 47291, 83154, 5          # true: "50 41 40 01 31"
    p = format_prompt(a, b, n)
    # Step 1 writes carry 0 (true 1); step 2 then uses it: 2+1+0 = 3: compounded, answer wrong.
    e = trace_errors("50 40 30 01 31", p)
    assert (e.correct, e.wrong_carries, e.wrong_digits, e.recovered, e.compounded) == (False, 1, 1, 0, 1)
    assert grade_record("50 40 30 01 31", {"prompt": p}) == 0.0
    # Same wrong carry, next digit right: recovered.
    e = trace_errors("50 40 40 01 31", p)
    assert (e.correct, e.wrong_carries, e.wrong_digits, e.recovered, e.compounded) == (True, 1, 0, 1, 0)
    # A wrong top digit (last carry) is a wrong digit, not a scratch carry.
    e = trace_errors("50 41 40 01 30", p)
    assert (e.correct, e.wrong_carries, e.wrong_digits) == (False, 0, 1)
    assert trace_errors("50 41 40 01", p) == TraceErrors(well_formed=False, correct=False)


@pytest.mark.parametrize("text", ["50 41 40 01", "50 41 40 01 31 00", "5041400131", "50  41 40 01 31",
                                  "50 41 40 01 3", "50 41 4x 01 31", "", "130445"])
def test_malformed_traces_score_zero(text):
    assert parse_trace(text, 5) is None and trace_value(text, 5) is None
    assert grade_record(text, {"prompt": "47291+83154="}) == 0.0


def test_grader_reads_the_first_line_stripped():
    assert grade_record(" 50 41 40 01 31 \nanything", {"prompt": "47291+83154="}) == 1.0


def test_columns_layout_lines_each_step_up_with_its_column():
    assert format_prompt(47291, 83154, 5, "columns") == "14 95 21 73 48="
    assert parse_prompt("14 95 21 73 48=") == (47291, 83154, 5)
    rng = random.Random(0)
    for n in (1, 3, 6):
        for _ in range(100):
            a, b = rng.randrange(10 ** n), rng.randrange(10 ** n)
            p = format_prompt(a, b, n, "columns")
            assert parse_prompt(p) == (a, b, n) and len(p) == 3 * n
            r = make_record(a, b, n, layout="columns")
            assert r["prompt"] == p and grade_record(r["answer"], r) == 1.0
    assert {parse_prompt(r["prompt"])[:2] for r in train_records(20, 4, seed=0, layout="columns")} == \
        {parse_prompt(r["prompt"])[:2] for r in train_records(20, 4, seed=0)}   # same problems, other layout
    with pytest.raises(ValueError, match="layout='rows' is not valid; use one of plain, columns"):
        format_prompt(1, 2, 3, "rows")


@pytest.mark.parametrize("prompt", ["1+22=", "12+34", "a+b=", "12-34=", "14 95 2=", "14 95"])
def test_bad_prompts_raise(prompt):
    with pytest.raises(ValueError, match="is not 'A\\+B='"):
        parse_prompt(prompt)


def test_eval_set_is_fixed_distinct_and_train_streams_avoid_it():
    held = eval_problems(5, 500)
    assert held == eval_problems(5, 500) and len(set(held)) == 500
    assert eval_problems(5, 100) == held[:100]       # a prefix of the same stream
    val = validation_problems(5)
    assert len(val) == 500 and not set(val) & set(held)
    with pytest.raises(ValueError, match="at most 500 validation problems"):
        validation_problems(5, 501)
    tr = train_records(2000, 5, seed=0, recovery_frac=0.25)
    assert not {parse_prompt(r["prompt"])[:2] for r in tr} & (set(held) | set(val))
    # Where the space is small, the default exclusion is what keeps them apart (n = 2: 10^4 problems).
    tr2 = {parse_prompt(r["prompt"])[:2] for r in train_records(3000, 2, seed=0)}
    assert not tr2 & set(eval_problems(2, 1000))
    assert train_records(50, 5, seed=0) != train_records(50, 5, seed=1)
    # Excluding pairs is enforced (a 1-digit space is small enough to hit them).
    small_held = set(eval_problems(1, 40))
    assert not {parse_prompt(r["prompt"])[:2] for r in train_records(300, 1, seed=3, exclude=small_held)} & small_held


def test_recovery_fraction_and_every_recovery_record_grades_correct():
    tr = train_records(4000, 5, seed=7, recovery_frac=0.25)
    rec = [r for r in tr if "no_loss" in r]
    assert 0.22 < len(rec) / len(tr) < 0.28           # binomial sd ~0.007
    assert {r["no_loss"][0] for r in rec} == {1, 4, 7, 10}   # the carries of steps 0..3, never the last
    assert all(grade_record(r["answer"], r) == 1.0 for r in tr)
    with pytest.raises(ValueError, match="recovery_frac=1.5"):
        train_records(1, 5, seed=0, recovery_frac=1.5)


def test_encode_trace_masks_the_prompt_and_the_wrong_carry():
    tok = build_tokenizer()
    r = make_record(47291, 83154, 5, wrong_carry_at=1)
    ids, mask = encode_trace(tok, r["prompt"], r["answer"], r["no_loss"])
    assert len(ids) == 12 + 14 + 1 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:12]) == "47291+83154=" and tok.decode(ids[12:26]) == r["answer"]
    expect = [1] * 14 + [1]
    expect[4] = 0
    assert mask == [0] * 12 + expect
    # Clean record: every answer token and EOS trained.
    ids, mask = encode_trace(tok, "47291+83154=", "50 41 40 01 31")
    assert mask == [0] * 12 + [1] * 15
    # A no_loss position needs one token per character; a plain answer (a teacher's sample) encodes anyway.
    with pytest.raises(ValueError, match="not one per character"):
        encode_trace(tok, "1+2=", "\u00e93", [1])
    ids, mask = encode_trace(tok, "1+2=", "\u00e93")
    assert mask == [0] * 4 + [1] * (len(ids) - 4) and len(ids) == 4 + 3 + 1


def test_task_files_hold_the_eval_set_and_disjoint_prompts(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    train, ev = build_task_files(n=4, n_train=300, n_eval=50, seed=0)
    tr, he = read_jsonl(train), read_jsonl(ev)
    assert len(tr) == 300 and len(he) == 50
    assert [parse_prompt(r["prompt"])[:2] for r in he] == eval_problems(4, 50)
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in he}
    assert all("no_loss" not in r and grade_record(r["answer"], r) == 1.0 for r in tr + he)
    assert build_task_files(n=4, n_train=300, n_eval=50, seed=0) == (train, ev)   # reused


def test_sft_on_recovery_traces_never_learns_the_masked_wrong_carry():
    """A real (small) SFT through recipes.sft.sft_loop with the carry encoding:
    each problem appears as its clean trace and as a recovery trace (step 0's
    carry flipped). With the mask, the model puts its mass on the true carry
    and still learns the recovery (after the wrong carry, the true digits);
    without the mask (control) it learns to write the wrong carry about half
    the time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.tiny_models import build_model
    from recipes.carry_sft import encode_record
    from recipes.sft import sft_loop

    probs = [(58, 64, 3), (275, 319, 3)]   # step 0 carries 1 in both
    recs = [make_record(a, b, n, w) for a, b, n in probs for w in (None, 0)]
    path = build_model("student")
    tok = AutoTokenizer.from_pretrained(path)

    def train(encode):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        sft_loop(model, tok, recs, steps=120, batch_size=4, lr_fn=lambda s: 3e-3, seed=0, log=lambda *_: None,
                 encode=encode)
        model.eval()
        return model

    def p_true_carry(model, a, b, n):
        clean, _ = carry_trace(a, b, n)
        ids = tok.encode(format_prompt(a, b, n) + clean[:1], add_special_tokens=False)
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        return float(p[tok.encode(clean[1], add_special_tokens=False)[0]])

    masked = train(encode_record)
    unmasked = train(lambda t, r: encode_trace(t, r["prompt"], r["answer"]))
    for a, b, n in probs:
        assert p_true_carry(masked, a, b, n) > 0.9
        assert 0.2 < p_true_carry(unmasked, a, b, n) < 0.8
        # After the wrong carry, the masked model continues with the true digits.
        wrong, _ = carry_trace(a, b, n, wrong_carry_at=0)
        ids = tok.encode(format_prompt(a, b, n) + wrong[:3], add_special_tokens=False)
        with torch.no_grad():
            out = masked.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert tok.decode(out[0, len(ids):], skip_special_tokens=True) == wrong[3:]


# The long-tail variant: operators that map b's digits before the addition.

def test_operator_names_and_tables():
    from recipes.carry_task import MAX_OPERATORS, operator_index, operator_name, operator_table

    # One letter each: one token in the tiny tokenizer.
    assert MAX_OPERATORS == 52
    assert [operator_name(k) for k in (0, 1, 25, 26, MAX_OPERATORS - 1)] == ["a", "b", "z", "A", "Z"]
    assert all(operator_index(operator_name(k)) == k for k in range(MAX_OPERATORS))
    tok = build_tokenizer()
    ids = [tok.encode(operator_name(k), add_special_tokens=False) for k in range(MAX_OPERATORS)]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == MAX_OPERATORS
    tables = [operator_table(k) for k in range(MAX_OPERATORS)]
    assert all(sorted(t) == list(range(10)) for t in tables)        # permutations of 0-9
    assert len({tuple(t) for t in tables}) == MAX_OPERATORS          # one table per operator
    assert operator_table(5) == operator_table(5)                    # fixed: seeded by k alone
    with pytest.raises(ValueError, match="out of range"):
        operator_name(MAX_OPERATORS)
    for bad in ("ab", "1", ""):
        with pytest.raises(ValueError, match="not one ASCII letter"):
            operator_index(bad)


@pytest.mark.parametrize("layout", ["plain", "columns"])
def test_operator_records_add_the_mapped_operand(layout):
    from recipes.carry_task import mapped_operand, operator_name, operator_table, parse_operator

    rng = random.Random(7)
    n, differs = 3, 0
    for _ in range(300):
        a, b, op = rng.randrange(1000), rng.randrange(1000), rng.randrange(52)
        rec = make_record(a, b, n, layout=layout, op=op)
        assert rec["prompt"].startswith(operator_name(op) + ":")
        assert parse_operator(rec["prompt"]) == (op, a, b, n)
        bm = mapped_operand(b, n, op)
        assert bm == sum(operator_table(op)[(b // 10 ** i) % 10] * 10 ** i for i in range(n))
        assert parse_prompt(rec["prompt"]) == (a, bm, n)
        assert trace_value(rec["answer"], n) == a + bm
        assert grade_record(rec["answer"], rec) == 1.0
        plain = carry_trace(a, b, n)[0]                              # ignoring the operator
        differs += bm != b
        assert grade_record(plain, rec) == float(a + b == a + bm)
        assert trace_errors(rec["answer"], rec["prompt"]) == TraceErrors(well_formed=True, correct=True)
    assert differs > 250


def test_operator_recovery_traces_recover_to_the_mapped_sum():
    from recipes.carry_task import mapped_operand

    rec = make_record(472, 831, 3, wrong_carry_at=0, op=9)
    assert rec["no_loss"] == [1]
    assert trace_value(rec["answer"], 3) == 472 + mapped_operand(831, 3, 9)
    assert grade_record(rec["answer"], rec) == 1.0


def test_operator_streams_follow_their_distribution_and_avoid_the_held_out_set():
    from recipes.carry_task import HELD_OUT, held_out_problems, parse_operator

    count, ops = 20000, 52
    h = sum(1 / (k + 1) for k in range(ops))
    zipf = [parse_operator(r["prompt"])[0] for r in train_records(count, 3, seed=1, operators=ops)]
    unif = [parse_operator(r["prompt"])[0] for r in train_records(count, 3, seed=1, operators=ops,
                                                                 op_dist="uniform")]
    # Shares within 5 binomial standard deviations of 1/h (Zipf, operator 0)
    # and 1/ops (uniform).
    for got, p in ((zipf.count(0) / count, 1 / h), (zipf.count(ops - 1) / count, 1 / (ops * h)),
                   (unif.count(0) / count, 1 / ops)):
        assert abs(got - p) < 5 * (p * (1 - p) / count) ** 0.5, (got, p)
    assert set(unif) == set(range(ops))
    held = held_out_problems(3, "test", operators=ops) + held_out_problems(3, "validation", operators=ops)
    assert len({(a, b) for a, b, _ in held}) == HELD_OUT
    assert held[:10] == held_out_problems(3, "test", 10, operators=ops)   # a shorter test set = its head
    pairs = {(a, b) for a, b, _ in held}
    for r in train_records(5000, 3, seed=2, operators=ops):
        assert parse_operator(r["prompt"])[1:3] not in pairs
    # The plain task's stream is unchanged by the variant's existence.
    assert train_records(50, 3, seed=1) == train_records(50, 3, seed=1, operators=0)
    with pytest.raises(ValueError, match="operator distribution"):
        train_records(1, 3, seed=1, operators=4, op_dist="pareto")
