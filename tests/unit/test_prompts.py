"""Prompt sources (rollout/prompts.py): formats, validation errors, the
deterministic shuffle and resume.

Uses the tiny byte-level tokenizer (one token per ASCII character) with its
chat template, so expected token ids are computed independently here.

    .venv/bin/python -m pytest tests/unit/test_prompts.py -q
"""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import DataConfig
from rollout.prompts import (PromptDataError, PromptRecord, PromptStream, epoch_order, load_prompt_sources,
                             load_records)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_ids(tokenizer, text):
    """Expected ids of `text` as one user message, built from the template by hand:
    the byte tokenizer maps each ASCII char to one id, specials to their own id."""
    sp = tokenizer.convert_tokens_to_ids
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return ([sp("<|im_start|>")] + enc("user\n" + text) + [sp("<|im_end|>")] + enc("\n")
            + [sp("<|im_start|>")] + enc("assistant\n"))


ROWS = [
    {"prompt": "What is 2+3?", "answer": "5", "source": "arith", "level": 1},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "answer": {"ref": "Hello"}, "source": "chat", "level": 2},
    {"prompt": "Name a color.", "source": "misc", "level": 3},
]


# ---------------------------------------------------------------- formats


def test_jsonl_prompt_and_messages_rendered_and_fields_carried(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    recs = load_records(path, tokenizer, DataConfig(train=path))
    assert [r.index for r in recs] == [0, 1, 2]
    assert recs[0].prompt_ids == chat_ids(tokenizer, "What is 2+3?")
    # messages go through the tokenizer's own apply_chat_template(tokenize=True)
    expected = tokenizer.apply_chat_template(ROWS[1]["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert recs[1].prompt_ids == list(expected)
    assert recs[0].text == "What is 2+3?" and recs[0].messages is None
    assert recs[1].messages == ROWS[1]["messages"] and recs[1].text is None
    assert recs[0].answer == "5" and recs[1].answer == {"ref": "Hello"} and recs[2].answer is None
    assert recs[1].metadata == {"source": "chat", "level": 2}
    assert recs[1].where == f"{path} line 2"


def test_raw_prompt_without_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "abc"}])
    recs = load_records(path, tokenizer, DataConfig(train=path, apply_chat_template=False))
    assert recs[0].prompt_ids == tokenizer.encode("abc", add_special_tokens=True)
    assert len(recs[0].prompt_ids) == 3


def test_parquet_equals_jsonl(tmp_path, tokenizer):
    jl = write_jsonl(tmp_path / "t.jsonl", ROWS)
    pq_path = str(tmp_path / "t.parquet")
    # Parquet columns have one type: the answer column here is a struct (null where absent)
    # (from_pylist takes its columns from the first row: give every row every key)
    cols = ["prompt", "messages", "answer", "source", "level"]
    rows = [{c: r.get(c) for c in cols} | ({"answer": {"ref": str(i)}} if i != 2 else {})
            for i, r in enumerate(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    a = load_records(jl, tokenizer, DataConfig(train=jl))
    b = load_records(pq_path, tokenizer, DataConfig(train=pq_path))
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    assert [r.answer for r in b] == [{"ref": "0"}, {"ref": "1"}, None]
    assert b[1].messages == ROWS[1]["messages"]
    assert b[2].metadata == {"source": "misc", "level": 3}
    assert b[2].where == f"{pq_path} row 2"


def test_saved_dataset_and_split(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recs = load_records(str(tmp_path / "ds"), tokenizer, DataConfig())
    assert [r.answer for r in recs] == ["0", "1", "2", "3"]
    assert recs[1].prompt_ids == chat_ids(tokenizer, "q1")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                               "test": datasets.Dataset.from_list(rows[3:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    test = load_records(f"{tmp_path / 'dd'}:test", tokenizer, DataConfig())
    assert [r.answer for r in test] == ["3"] and test[0].where == f"{tmp_path / 'dd'}:test row 0"
    with pytest.raises(PromptDataError, match=r"several splits; valid splits are \['test', 'train'\]"):
        load_records(str(tmp_path / "dd"), tokenizer, DataConfig())


def test_saved_dataset_without_datasets_package_says_how_to_fix(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(PromptDataError, match=r"needs the `datasets` package, which is not installed: "
                                              r"pip install datasets"):
        load_records(str(tmp_path / "ds"), tokenizer, DataConfig())


# ---------------------------------------------------------------- errors


def test_errors_name_file_line_and_field_all_at_once(tmp_path, tokenizer):
    rows = ['{"prompt": "ok"}', '{"prompt": 7}', '', '{"messages": [{"role": "user"}]}',
            '{"prompt": "a", "messages": []}', '{"text": "x"}', '{bad json', '[1, 2]']
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(PromptDataError) as ei:
        load_records(str(path), tokenizer, DataConfig())
    msg = str(ei.value)
    assert f"{path} line 7: not valid JSON" in msg  # JSON errors are reported first, alone
    path.write_text("\n".join(rows[:6] + rows[7:]) + "\n")
    with pytest.raises(PromptDataError) as ei:
        load_records(str(path), tokenizer, DataConfig())
    p = ei.value.problems
    assert p == [
        f"{path} line 2: field 'prompt' must be a string, got int",
        f"{path} line 4: field 'messages[0].content' must be a string, missing",
        f"{path} line 5: has both 'prompt' and 'messages'; give exactly one",
        f"{path} line 6: no 'prompt' (text) or 'messages' (chat) field; non-null fields present: ['text']",
        f"{path} line 7: expected an object with a 'prompt' or 'messages' field, got list",
    ]
    assert str(ei.value).startswith("5 problems in the prompt data:")
    # crosses Ray actor boundaries
    again = pickle.loads(pickle.dumps(ei.value))
    assert isinstance(again, PromptDataError) and again.problems == p and str(again) == str(ei.value)


def test_too_long_prompt_names_record(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "short"}, {"prompt": "x" * 40}])
    with pytest.raises(PromptDataError) as ei:
        load_records(path, tokenizer, DataConfig(max_prompt_tokens=30, apply_chat_template=False))
    assert str(ei.value) == (f"{path} line 2: prompt is 40 tokens, more than data.max_prompt_tokens=30; "
                             "shorten or drop the record, or raise data.max_prompt_tokens (and "
                             "student.max_model_len with it)")


def test_messages_without_chat_template_and_missing_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [ROWS[1]])
    with pytest.raises(PromptDataError, match="line 1: field 'messages' needs a chat template"):
        load_records(path, tokenizer, DataConfig(apply_chat_template=False))
    with pytest.raises(PromptDataError, match="nope.jsonl: no such file"):
        load_records(str(tmp_path / "nope.jsonl"), tokenizer, DataConfig())
    (tmp_path / "t.csv").write_text("prompt\nx\n")
    with pytest.raises(PromptDataError, match="unknown prompt file type '.csv'"):
        load_records(str(tmp_path / "t.csv"), tokenizer, DataConfig())


# ---------------------------------------------------------------- stream


def fake_records(n):
    return [PromptRecord(index=i, prompt_ids=[i + 3]) for i in range(n)]


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == epoch_order(50, seed=1, epoch=0)
    assert a != epoch_order(50, seed=2, epoch=0) and a != epoch_order(50, seed=1, epoch=1)
    assert epoch_order(50, seed=1, epoch=0, shuffle=False) == list(range(50))


def test_stream_covers_each_epoch_exactly_once():
    s = PromptStream(fake_records(10), seed=3)
    drawn = [r.index for _ in range(5) for r in s.next_batch(4)]  # 20 = two epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # each epoch has its own order
    assert s.state_dict()["epoch"] == 1 and s.progress_epochs == 2.0


@pytest.mark.parametrize("k,consumed", [(3, 2), (3, 4), (7, 3)])  # before and across epoch boundaries
def test_resume_continues_exactly(k, consumed):
    recs = fake_records(10)
    ref = PromptStream(recs, seed=11)
    uninterrupted = [[r.index for r in ref.next_batch(k)] for _ in range(consumed + 4)]

    run = PromptStream(recs, seed=11)
    for _ in range(consumed):
        run.next_batch(k)
    state = json.loads(json.dumps(run.state_dict()))  # as stored in a checkpoint
    resumed = PromptStream(recs, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    after = [[r.index for r in resumed.next_batch(k)] for _ in range(4)]
    assert after == uninterrupted[consumed:]


def test_resume_refuses_other_data():
    s = PromptStream(fake_records(10), seed=0)
    s.next_batch(3)
    with pytest.raises(ValueError, match="checkpoint streamed 10 training prompts, the data now holds 9"):
        PromptStream(fake_records(9), seed=0).load_state_dict(s.state_dict())
    other = fake_records(10)
    other[4].prompt_ids = [99]
    with pytest.raises(ValueError, match="training prompts differ from the checkpoint's"):
        PromptStream(other, seed=0).load_state_dict(s.state_dict())


def test_load_prompt_sources_eval_split(tmp_path, tokenizer):
    rows = [{"prompt": f"p{i}", "answer": i} for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    stream, ev = load_prompt_sources(DataConfig(train=path, eval_size=3), tokenizer, seed=5)
    assert [r.answer for r in ev] == [7, 8, 9]
    assert sorted(r.answer for r in stream.next_batch(7)) == list(range(7))  # no eval prompt leaks into train
    ev_path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "e0", "answer": "x"}])
    stream, ev = load_prompt_sources(DataConfig(train=path, eval=ev_path), tokenizer, seed=5)
    assert len(stream) == 10 and [r.answer for r in ev] == ["x"]
    with pytest.raises(PromptDataError, match="data.eval_size=10 would hold out all 10 records"):
        load_prompt_sources(DataConfig(train=path, eval_size=10), tokenizer, seed=5)
    built = {"tiny:demo": lambda: [{"prompt": "1+1=", "answer": "2"}] * 3}
    stream, ev = load_prompt_sources(DataConfig(train="tiny:demo", eval_size=1), tokenizer, 0, builtin=built)
    assert len(stream) == 2 and ev[0].where == "tiny:demo row 2"
    with pytest.raises(PromptDataError, match="built-in name that is not available here"):
        load_prompt_sources(DataConfig(train="tiny:arithmetic"), tokenizer, 0)
