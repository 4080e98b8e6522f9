"""The teacher client with replicas (`teacher.url` as a list) against the REAL
session teacher_server: a replica where nothing listens, a replica behind
`FaultProxy` (a real reverse proxy, tests/e2e/test_teacher_client.py) that
answers 503 first. The driver surviving a SIGKILLed replica mid-run is in
tests/e2e/test_reliability.py; the choice rules are unit-tested in
tests/unit/test_teacher_replicas.py.

    .venv/bin/python -m pytest tests/e2e/test_teacher_replicas.py -q
"""

from __future__ import annotations

import time

import pytest

from rollout.host import free_port
from rollout.teacher_client import TeacherUnavailableError, pack_by_budget
from tests.e2e.test_teacher_client import FaultProxy, assert_close, client_for, random_sequences


def test_dead_replica_leaves_rotation_and_the_live_one_scores_everything(teacher_server):
    seqs = random_sequences(16, seed=11, min_len=20, max_len=40)
    packs = pack_by_budget([len(ids) for ids, _ in seqs], 64)
    assert len(packs) >= 8
    with client_for(teacher_server.url, teacher_server) as c:
        direct = c.score(seqs)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with client_for([teacher_server.url, dead], teacher_server, max_tokens_per_request=64,
                    max_concurrency=4) as c:
        res = c.score(seqs)
        total = c.metrics()
    m = res.metrics
    assert res.errors == [] and m["teacher/failed_sequences"] == 0
    for a, b in zip(res.logprobs, direct.logprobs, strict=True):
        assert_close(a, b, 1e-5)
    # The dead one failed and is out of rotation; its requests went at once
    # (no backoff) to the live one, which answered every pack.
    assert m["teacher/replica1/healthy"] == 0 and m["teacher/replica1/failures"] >= 1
    assert m["teacher/replica1/tokens"] == 0
    assert m["teacher/replica0/healthy"] == 1 and m["teacher/replica0/failures"] == 0
    assert m["teacher/replica0/tokens"] == sum(len(ids) for ids, _ in seqs)
    assert m["teacher/replica0/requests"] == len(packs)
    assert m["teacher/requests"] == m["teacher/replica0/requests"] + m["teacher/replica1/requests"]
    assert m["teacher/retries"] == m["teacher/replica1/failures"] and m["teacher/backoff_wait_s"] == 0
    assert {k: v for k, v in total.items() if "replica" in k} == {k: v for k, v in m.items() if "replica" in k}


def test_replica_returns_after_a_probe_answers(teacher_server):
    seqs = random_sequences(6, seed=12, min_len=20, max_len=40)
    with FaultProxy(teacher_server.url, fail_first=2, retry_after="0") as proxy, \
            client_for([teacher_server.url, proxy.url], teacher_server, max_tokens_per_request=64) as c:
        deadline = time.monotonic() + 10
        while True:
            res = c.score(seqs)
            assert res.errors == [] and res.metrics["teacher/backoff_wait_s"] == 0
            m = c.metrics()
            if m["teacher/replica1/healthy"] and m["teacher/replica1/tokens"] > 0:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        # Its two 503s took it out of rotation; a later probe was answered, and
        # since then it takes its share.
        assert m["teacher/replica1/failures"] == 2 and proxy.received == 2 + proxy.forwarded
        assert m["teacher/replica1/tokens"] > 0 and m["teacher/replica0/tokens"] > 0
        assert m["teacher/failed_sequences"] == 0


def test_both_replicas_share_the_load_and_every_one_is_checked(teacher_server, student_path):
    seqs = random_sequences(16, seed=13, min_len=20, max_len=40)
    with FaultProxy(teacher_server.url, delay_s=0.1) as proxy, \
            client_for([teacher_server.url, proxy.url], teacher_server, max_tokens_per_request=64,
                       max_concurrency=4) as c:
        info = c.check_tokenizer(student_path)  # both replicas: up, same tokenizer
        assert info.vocab_size == 320
        res = c.score(seqs)
    m = res.metrics
    assert res.errors == [] and proxy.forwarded >= 1
    assert m["teacher/replica0/tokens"] > 0 and m["teacher/replica1/tokens"] > 0
    assert m["teacher/replica0/tokens"] + m["teacher/replica1/tokens"] == sum(len(ids) for ids, _ in seqs)
    # A replica that is down fails the start-up check, named.
    dead = f"http://127.0.0.1:{free_port()}"
    with client_for([teacher_server.url, dead], teacher_server, unavailable_timeout_s=1.0) as c:
        with pytest.raises(TeacherUnavailableError) as ei:
            c.check_tokenizer(student_path)
    assert str(ei.value).startswith(f"teacher at {dead} unavailable")
