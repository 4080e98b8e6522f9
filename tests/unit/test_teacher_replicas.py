"""Teacher replicas (`teacher.url` as a list), pure logic: which replica gets a
request (rollout/teacher_replicas.py), out of rotation and back, the client's
url handling, metrics keys and errors, the config checks. No server: a
client against real teacher_servers is tests/e2e/test_teacher_replicas.py,
the driver surviving a SIGKILLed replica tests/e2e/test_reliability.py.

    .venv/bin/python -m pytest tests/unit/test_teacher_replicas.py -q
"""

import pickle

import pytest

from cluster.config import ConfigError, TeacherConfig, config_from_dict
from cluster.loop import merge_chunk_metrics
from rollout.config import url_list
from rollout.teacher_client import TeacherClient, TeacherUnavailableError, request_tokens
from rollout.teacher_replicas import ReplicaSet, replica_backoff_s
from teacher_server import protocol as P

URLS = ["http://a:1", "http://b:2", "http://c:3"]


def test_requests_go_to_the_fewest_outstanding_tokens():
    rs = ReplicaSet(URLS, backoff_base_s=0.5, backoff_max_s=8.0)
    t0 = rs.acquire(100, now=0.0)  # all idle: ties go to the fewest requests, then the lowest index
    t1 = rs.acquire(30, now=0.0)
    t2 = rs.acquire(50, now=0.0)
    assert [t.index for t in (t0, t1, t2)] == [0, 1, 2]
    assert [r.outstanding_tokens for r in rs.replicas] == [100, 30, 50]
    assert rs.acquire(10, now=0.0).index == 1  # 30 < 50 < 100
    assert rs.acquire(10, now=0.0).index == 1  # 40 < 50
    assert rs.acquire(10, now=0.0).index == 2  # 50 < 100, 50
    rs.release(t0)  # replica 0's big request is done
    assert [r.outstanding_tokens for r in rs.replicas] == [0, 50, 60]
    assert rs.acquire(1, now=0.0).index == 0
    assert not any(t.probe for t in (t0, t1, t2))


def test_one_at_a_time_alternates():
    rs = ReplicaSet(URLS[:2], 0.5, 8.0)
    seen = []
    for _ in range(6):
        t = rs.acquire(20, now=0.0)
        seen.append(t.index)
        rs.release(t)
        rs.answered(t, ok=True)
    assert seen == [0, 1, 0, 1, 0, 1]
    assert [(r.requests, r.tokens) for r in rs.replicas] == [(3, 60), (3, 60)]


def test_failing_replica_leaves_rotation_and_returns_after_a_probe():
    rs = ReplicaSet(URLS[:2], backoff_base_s=0.5, backoff_max_s=4.0)
    a = rs.acquire(10, now=0.0)  # -> 0
    b = rs.acquire(10, now=0.0)  # -> 1
    stale = rs.acquire(10, now=0.0)  # -> 0 (also in flight when 0 dies)
    assert (a.index, b.index, stale.index) == (0, 1, 0)
    rs.release(a)
    assert rs.failed(a, now=1.0) is True  # took it out: 0.5 s
    assert not rs.replicas[0].healthy and rs.replicas[0].back_at == 1.5
    rs.release(stale)
    assert rs.failed(stale, now=1.2) is False  # was in flight before: no longer wait
    assert rs.replicas[0].back_at == 1.5 and rs.replicas[0].failures == 2
    # While out, everything goes to replica 1, even when it is busier.
    assert all(rs.acquire(100, now=1.4).index == 1 for _ in range(3))
    assert rs.available(1.4)
    # Due at 1.5: one probe at a time (it is idle, so it wins the choice).
    probe = rs.acquire(10, now=1.5)
    assert probe.index == 0 and probe.probe
    assert rs.acquire(10, now=1.6).index == 1  # a probe is in flight: no second one
    rs.release(probe)
    rs.failed(probe, now=2.0)  # the probe failed: the wait doubles
    assert rs.replicas[0].failures_in_row == 2 and rs.replicas[0].back_at == 3.0
    assert rs.acquire(10, now=2.9).index == 1
    probe = rs.acquire(10, now=3.0)
    assert probe.index == 0 and probe.probe
    rs.release(probe)
    rs.answered(probe, ok=False)  # any reply (a 400 here) shows it is up
    assert rs.replicas[0].healthy and rs.replicas[0].failures_in_row == 0
    m = rs.metrics()
    assert m["teacher/replica0/healthy"] == 1 and m["teacher/replica0/failures"] == 3
    assert m["teacher/replica0/tokens"] == 0 and m["teacher/replica0/requests"] == 4
    assert m["teacher/replica1/requests"] == 6
    assert sorted(m) == sorted(f"teacher/replica{i}/{k}" for i in (0, 1)
                               for k in ("requests", "tokens", "failures", "healthy"))


def test_an_answer_to_a_request_sent_before_the_failure_does_not_restore():
    # A replica answering 503 to one request and 200 to an older one is still
    # overloaded: only a probe's reply puts it back.
    rs = ReplicaSet(URLS[:2], 0.5, 8.0)
    old = rs.acquire(10, now=0.0)
    new = rs.acquire(10, now=0.0)
    new2 = rs.acquire(10, now=0.0)
    assert (old.index, new.index, new2.index) == (0, 1, 0)
    rs.release(new2)
    rs.failed(new2, now=0.1, retry_after_s=5.0)  # 503 + Retry-After: 5
    assert rs.replicas[0].back_at == 5.1  # the Retry-After beats the 0.5 s backoff
    rs.release(old)
    rs.answered(old, ok=True)
    assert not rs.replicas[0].healthy and rs.replicas[0].tokens == 10


def test_all_out_falls_back_to_the_replica_due_first():
    rs = ReplicaSet(URLS, 0.5, 8.0)
    for i, now in ((0, 0.0), (1, 0.1), (2, 0.2)):
        t = rs.acquire(5, now=now)
        assert t.index == i
        rs.release(t)
        rs.failed(t, now=now)
    assert not rs.available(0.3)
    t = rs.acquire(5, now=0.3)  # nothing due: the one back first, sent as a probe
    assert t.index == 0 and t.probe
    # A single replica: always that one (the client's one-url behaviour).
    one = ReplicaSet(URLS[:1], 0.5, 8.0)
    t = one.acquire(5, now=0.0)
    one.release(t)
    one.failed(t, now=0.0)
    assert not one.available(0.1) and one.acquire(5, now=0.1).index == 0


def test_release_on_cancel_frees_the_probe():
    rs = ReplicaSet(URLS[:2], 0.5, 8.0)
    t = rs.acquire(5, now=0.0)
    rs.release(t)
    rs.failed(t, now=0.0)
    busy = rs.acquire(5, now=0.1)  # replica 1, still in flight
    probe = rs.acquire(5, now=1.0)
    assert busy.index == 1 and probe.index == 0 and probe.probe and rs.replicas[0].probing
    rs.release(probe)  # cancelled mid-send: neither answered nor failed
    assert not rs.replicas[0].probing and rs.replicas[0].outstanding_tokens == 0
    assert rs.acquire(5, now=1.0).index == 0  # due again: the next request probes


def test_replica_backoff_grows_per_failure_capped_and_honours_retry_after():
    assert [replica_backoff_s(n, 0.5, 4.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert replica_backoff_s(1, 0.5, 4.0, retry_after_s=3.0) == 3.0
    assert replica_backoff_s(5, 0.5, 4.0, retry_after_s=1.0) == 4.0


def test_client_urls_repr_pickle_and_metrics(tmp_path):
    c = TeacherClient(["http://a:1/", "http://b:2"], top_k=3)
    assert c.urls == ("http://a:1", "http://b:2") and c.url == "http://a:1, http://b:2"
    assert repr(c).startswith("TeacherClient(['http://a:1', 'http://b:2'],")
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.urls == c.urls and c2.top_k == 3
    m = c.metrics()
    assert m["teacher/replica1/healthy"] == 1 and m["teacher/replica0/requests"] == 0
    assert m["teacher/requests"] == 0  # the totals are still there
    # One url: exactly the single-server client (no per-replica keys).
    one = TeacherClient("http://a:1/")
    assert one.urls == ("http://a:1",) and one.url == "http://a:1"
    assert repr(one).startswith("TeacherClient('http://a:1',")
    assert not any("replica" in k for k in one.metrics())
    assert TeacherClient(["http://a:1"]).url == "http://a:1"
    cfg = TeacherConfig(url=("http://a:1", "http://b:2"))
    assert TeacherClient.from_config(cfg).urls == ("http://a:1", "http://b:2")
    with pytest.raises(ValueError, match="empty list"):
        TeacherClient([])
    with pytest.raises(ValueError, match="'b:2' must start with http"):
        TeacherClient(["http://a:1", "b:2"])
    with pytest.raises(ValueError, match="lists a replica twice"):
        TeacherClient(["http://a:1", "http://a:1/"])


def test_unavailable_error_names_every_replica_and_pickles():
    one = TeacherUnavailableError("http://h:1", 3.2, 3.0, "ClientConnectorError: refused", 5)
    many = TeacherUnavailableError("http://h:1, http://h:2", 3.2, 3.0,
                                   "ClientConnectorError: refused (replica http://h:2)", 7)
    assert str(one).startswith("teacher at http://h:1 unavailable: a request kept failing for 3.2 s over 5 attempts")
    assert "GET http://h:1/health" in str(one)
    assert str(many).startswith("all 2 teacher replicas (http://h:1, http://h:2) unavailable: a request kept "
                                "failing for 3.2 s over 7 attempts, past teacher.unavailable_timeout_s=3")
    assert "(replica http://h:2)" in str(many) and "each replica's server is running" in str(many)
    for e in (one, many):
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is type(e) and str(again) == str(e)


def test_request_tokens():
    req = P.LogprobsRequest(sequences=[P.ScoreSequence(token_ids=[1, 2, 3], start=1),
                                       P.ScoreSequence(token_ids=[4, 5], start=1)])
    assert request_tokens(req) == 5
    gen = P.GenerateRequest(prompts=[P.GeneratePrompt(token_ids=[1, 2]), P.GeneratePrompt(token_ids=[3])], n=2,
                            max_new_tokens=10)
    assert request_tokens(gen) == (2 + 10) * 2 + (1 + 10) * 2
    assert request_tokens(None) == 0


REQUIRED = {"student": {"model": "org/student"}, "data": {"train": "prompts.jsonl"}}


def test_config_url_list_and_its_errors():
    cfg = config_from_dict(REQUIRED, ["teacher.url=[http://a:1, http://b:2]"])
    assert cfg.teacher.url == ("http://a:1", "http://b:2")
    assert url_list(cfg.teacher.url) == ("http://a:1", "http://b:2")
    assert url_list("http://a:1") == ("http://a:1",) and url_list(None) == ()
    assert config_from_dict(REQUIRED, ["teacher.url=http://a:1"]).teacher.url == "http://a:1"
    for override, want in [
        ("teacher.url=[http://a:1, b:2]", "teacher.url: 'b:2' must start with http:// or https://"),
        ("teacher.url=b:2", "teacher.url: 'b:2' must start with http:// or https://"),
        ("teacher.url=[http://a:1, http://a:1/]", "teacher.url: http://a:1 listed more than once"),
        ("teacher.url=[]", "teacher.url: an empty list; give one url, a list of replica urls, or null"),
    ]:
        with pytest.raises(ConfigError) as ei:
            config_from_dict(REQUIRED, [override])
        assert any(p.startswith(want) for p in ei.value.problems), (override, ei.value.problems)


def test_chunk_merge_keeps_the_last_health_state():
    a = {"teacher/replica1/healthy": 1, "teacher/replica1/requests": 3, "teacher/replica1/failures": 0}
    b = {"teacher/replica1/healthy": 0, "teacher/replica1/requests": 2, "teacher/replica1/failures": 1}
    m = merge_chunk_metrics([a, b])
    assert m == {"teacher/replica1/healthy": 0, "teacher/replica1/requests": 5, "teacher/replica1/failures": 1}
