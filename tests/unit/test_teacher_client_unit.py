"""Pure logic of the teacher client (rollout/teacher_client.py): packing, the
backoff schedule, Retry-After parsing, error pickling, key handling. No server:
the behaviour against a real teacher_server is in tests/e2e/test_teacher_client.py.

    .venv/bin/python -m pytest tests/unit/test_teacher_client_unit.py -q
"""

import pickle
import random

import pytest

from cluster.config import TeacherConfig
from rollout.teacher_client import (TeacherClient, TeacherRequestError, TeacherUnavailableError,
                                    TokenizerMismatchError, backoff_delay, item_index, pack_by_budget,
                                    parse_retry_after)


def test_pack_by_budget_in_order_and_within_budget():
    costs = [3, 4, 2, 10, 1, 1, 6, 5]
    packs = pack_by_budget(costs, budget=7)
    assert [i for p in packs for i in p] == list(range(len(costs)))  # every item once, in order
    assert packs == [[0, 1], [2], [3], [4, 5], [6], [7]]
    for p in packs:  # within budget unless a lone oversized item
        assert sum(costs[i] for i in p) <= 7 or len(p) == 1
    assert pack_by_budget([], 5) == []
    assert pack_by_budget([5, 5, 5], 100) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="budget 0 must be > 0"):
        pack_by_budget([1], 0)


def test_pack_by_budget_randomized():
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.randint(1, 50) for _ in range(rng.randint(0, 40))]
        budget = rng.randint(1, 120)
        packs = pack_by_budget(costs, budget)
        assert [i for p in packs for i in p] == list(range(len(costs)))
        for a, b in zip(packs, packs[1:]):
            # greedy: the next pack's first item did not fit in the previous pack
            assert sum(costs[i] for i in a) + costs[b[0]] > budget
        assert all(sum(costs[i] for i in p) <= budget or len(p) == 1 for p in packs)


def test_backoff_full_jitter_grows_and_is_capped():
    rng = random.Random(1)
    for attempt in range(10):
        cap = min(8.0, 0.5 * 2 ** attempt)
        draws = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(2000)]
        assert 0.0 <= min(draws) and max(draws) <= cap
        assert abs(sum(draws) / len(draws) - cap / 2) < 0.05 * cap  # uniform on [0, cap]: mean cap/2
    # Retry-After is a floor, plus up to base_s of jitter
    draws = [backoff_delay(0, 0.5, 8.0, rng, retry_after_s=3.0) for _ in range(500)]
    assert all(3.0 <= d <= 3.5 for d in draws) and max(draws) - min(draws) > 0.3
    # reproducible by seed
    assert [backoff_delay(3, 0.5, 8.0, random.Random(7)) for _ in range(3)] == \
           [backoff_delay(3, 0.5, 8.0, random.Random(7)) for _ in range(3)]


def test_parse_retry_after_and_item_index():
    assert parse_retry_after("2") == 2.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None and parse_retry_after("nan") is None
    assert item_index("sequences[12].token_ids[3]", "sequences") == 12
    assert item_index("sequences[0].start", "sequences") == 0
    assert item_index("prompts[4].token_ids", "sequences") is None
    assert item_index("top_k", "sequences") is None and item_index(None, "sequences") is None


def test_errors_pickle_and_say_what_to_do():
    errs = [
        TeacherUnavailableError("http://h:1", 3.2, 3.0, "ClientConnectorError: refused", 5),
        TeacherRequestError("http://h:1", 401, "unauthorized", "bad key", None, "check teacher.api_key_file"),
        TokenizerMismatchError("3fa2" + "0" * 60, "91bc" + "1" * 60, "teacher-x", "/m/student"),
        TokenizerMismatchError("3fa2" + "0" * 60, "91bc" + "1" * 60, "teacher-x", "/m/student",
                               ["1 token id maps to different tokens (id 7): id 7: student 'a', teacher 'b'"]),
    ]
    for e in errs:
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is type(e) and str(again) == str(e)
    assert "teacher.unavailable_timeout_s=3" in str(errs[0]) and "http://h:1" in str(errs[0])
    assert "refused" in str(errs[0]) and "3.2 s" in str(errs[0])
    assert str(errs[2]).startswith("teacher tokenizer differs from the student's (sha256 3fa200000000... of "
                                   "teacher teacher-x vs 91bc11111111... of student /m/student): on-policy "
                                   "distillation scores the student's own token ids, so both must use one tokenizer")
    assert str(errs[3]).startswith(str(errs[2]).split("; serve")[0] + "; 1 token id maps to different tokens (id 7): "
                                   "id 7: student 'a', teacher 'b'; serve a teacher that shares")


def test_from_config_key_file_and_pickling(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-key\n")
    cfg = TeacherConfig(url="http://127.0.0.1:9", api_key_file=str(key), max_tokens_per_request=100,
                        max_concurrency=3, top_k=5)
    c = TeacherClient.from_config(cfg)
    assert (c.url, c.max_tokens_per_request, c.max_concurrency, c.top_k) == ("http://127.0.0.1:9", 100, 3, 5)
    blob = pickle.dumps(c)
    assert b"s3cret" not in blob and "s3cret" not in repr(c)  # the key travels as its file name only
    c2 = pickle.loads(blob)
    assert c2.max_concurrency == 3 and c2._headers["Authorization"] == "Bearer s3cret-key"
    with pytest.raises(ValueError, match="no teacher url: teacher.url is null"):
        TeacherClient.from_config(TeacherConfig(url=None))
    with pytest.raises(ValueError, match=r"teacher.api_key_file: cannot read .*missing"):
        TeacherClient("http://127.0.0.1:9", api_key_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        TeacherClient("http://127.0.0.1:9", api_key_file=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="must start with http"):
        TeacherClient("127.0.0.1:9")
