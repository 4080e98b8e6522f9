"""Several teachers and the teacher's own prompt, pure logic
(rollout/teacher_routes.py, cluster/stages.py, cluster/loop.py): the config
checks, the teachers a config makes, routing each record, building the
teacher's prefix with a real (tiny) tokenizer, and TeacherSet splitting a
score call by teacher and merging the results back in order. The clients
here are fakes that score by a fixed rule; tests/e2e/test_teacher_routes.py
runs real servers."""

from __future__ import annotations

import threading
import types

import pytest

from cluster.config import ConfigError, config_from_dict
from cluster.loop import merge_chunk_metrics
from cluster.tiny_models import build_tokenizer
from rollout.config import TeacherConfig, TeacherRoute
from rollout.prompts import PromptDataError, PromptRecord
from rollout.teacher_client import ScoreResult
from rollout.teacher_routes import (
    DEFAULT,
    PrefixRenderer,
    TeacherSet,
    assign_teachers,
    server_configs,
    teacher_specs,
)

BASE = {"student": {"model": "s"}, "data": {"train": "x.jsonl"}}


def cfg_with(teacher: dict, **sections):
    return config_from_dict({**BASE, "teacher": teacher, **sections})


def problems_of(teacher: dict, **sections) -> list[str]:
    with pytest.raises(ConfigError) as e:
        cfg_with(teacher, **sections)
    return e.value.problems


# --------------------------------------------------------------------------- config

def test_routes_parse_from_yaml_shapes():
    cfg = cfg_with({"url": "http://a:1", "route_by": "data_source", "prompt": "field:teacher_prompt",
                    "routes": [{"name": "m", "values": "math", "url": "http://b:1", "temperature": 1},
                               {"name": "o", "values": ["other", 7], "prompt": "student"}]})
    assert cfg.teacher.routes == (
        TeacherRoute(name="m", values=("math",), url="http://b:1", temperature=1.0),
        TeacherRoute(name="o", values=("other", "7"), prompt="student"))


def test_route_and_prompt_problems_name_the_key():
    p = problems_of({"url": "http://a:1", "prompt": "bogus", "system_prompt": None,
                     "routes": [{"name": "m", "values": ["math", "x"]},
                                {"name": "m", "values": ["x"], "temperature": 0, "prompt": "field:"},
                                {"name": "default", "values": ["y"]},
                                {"name": "a/b", "values": []}]})
    text = "\n".join(p)
    assert "teacher.prompt: 'bogus' is not valid" in text
    assert "teacher.routes[1].prompt: 'field:' is not valid" in text
    assert text.count("is not valid; use student") == 2  # an inherited bad prompt is reported once
    assert "teacher.routes: 4 route(s) but teacher.route_by is null" in text
    assert "teacher.routes[1].name: 'm' is also the name of teacher.routes[0]" in text
    assert "teacher.routes[1].values: 'x' is also listed by teacher.routes[0]" in text
    assert "teacher.routes[1].temperature: 0.0 must be > 0" in text
    assert "teacher.routes[2].name: 'default' names the top-level teacher" in text
    assert "teacher.routes[3].name: 'a/b' is not a valid teacher name" in text
    assert "teacher.routes[3].values: empty" in text


def test_a_routes_own_url_and_backend_are_checked_as_the_top_level_ones():
    p = problems_of({"url": "http://a:1", "backend": "vllm", "route_by": "src",
                     "routes": [{"name": "m", "values": ["m"], "model": "x"},
                                {"name": "o", "values": ["o"], "url": "ftp://x", "backend": "bogus"},
                                {"name": "p", "values": ["p"]}]})
    assert p == ["teacher.routes[0].backend: vllm needs teacher.routes[0].url (a running vllm server); with no url "
                 "the driver starts opd's teacher_server: set teacher.routes[0].backend=auto (or opd)",
                 "teacher.routes[1].url: 'ftp://x' must start with http:// or https:// (e.g. http://teacher-node:8000)",
                 "teacher.routes[1].backend: 'bogus' is not one of ['auto', 'opd', 'vllm', 'sglang']"]


def test_route_by_without_routes_and_system_prompt_without_a_template():
    p = problems_of({"url": "http://a:1", "route_by": "data_source"})
    assert any("teacher.route_by: 'data_source' but teacher.routes is empty" in x for x in p)
    p = problems_of({"url": "http://a:1", "system_prompt": "Be exact."})
    assert any(x.startswith("teacher.system_prompt: set, but the teacher's prompt is the student's token ids")
               for x in p)
    p = problems_of({"url": "http://a:1", "prompt": "field:hint", "system_prompt": "Be exact."},
                    data={"train": "x.jsonl", "apply_chat_template": False})
    assert any(x.startswith("teacher.system_prompt: the teacher's prompt (field:hint) is rendered") for x in p)


def test_per_teacher_temperature_rule_and_teacher_sampling_refused():
    p = problems_of({"url": "http://a:1", "route_by": "src",
                     "routes": [{"name": "m", "values": ["math"], "temperature": 0.7}]})
    assert any(x.startswith("teacher.routes[0].temperature (0.7) differs from rollout.temperature (1.0)")
               for x in p)
    # The top-k losses take any teacher temperature.
    cfg_with({"url": "http://a:1", "top_k": 4, "route_by": "src",
              "routes": [{"name": "m", "values": ["math"], "temperature": 0.7}]}, loss={"kind": "forward_kl_topk"})
    p = problems_of({"url": "http://a:1", "prompt": "own_template", "model": "t"},
                    train={"sample_from": "teacher"}, loss={"kind": "reverse_kl_topk"})
    assert any(x.startswith("train.sample_from=teacher: the teacher writes the completions") for x in p)


def test_the_top_level_teacher_needs_a_server_only_when_used():
    routes = [{"name": "m", "values": ["math"], "url": "http://m:1"}, {"name": "o", "values": ["x"], "model": "o"}]
    cfg_with({"route_by": "src", "routes": routes})  # every record has a teacher with a server of its own
    for extra in ({"unrouted": "default"}, {"routes": routes + [{"name": "p", "values": ["p"], "prompt": "student"}]}):
        p = problems_of({"route_by": "src", "routes": routes, **extra})
        assert any(x.startswith("teacher: set either teacher.url") for x in p), extra


# --------------------------------------------------------------------------- specs

def test_specs_take_the_default_teachers_settings_unless_overridden():
    t = TeacherConfig(url="http://d:1", api_key_file="/k", temperature=1.0, top_k=3, prompt="own_template",
                      model="tm", route_by="src", unrouted="default",
                      routes=(TeacherRoute(name="a", values=("a",), url="http://a:1", temperature=2.0),
                              TeacherRoute(name="b", values=("b",), model="mb", prompt="student"),
                              TeacherRoute(name="c", values=("c",), prompt="field:hint", system_prompt="S")))
    specs = {s.name: s for s in teacher_specs(t)}
    assert list(specs) == [DEFAULT, "a", "b", "c"]
    a, b, c = specs["a"].cfg, specs["b"].cfg, specs["c"].cfg
    assert (a.url, a.model, a.api_key_file, a.temperature, a.top_k, a.prompt) == \
        ("http://a:1", None, "/k", 2.0, 3, "own_template")
    assert (b.url, b.model, b.prompt) == (None, "mb", "student")
    # c names neither url nor model: the default teacher's server and model.
    assert (c.url, c.model, c.prompt, c.system_prompt) == ("http://d:1", "tm", "field:hint", "S")
    assert [specs[n].server for n in specs] == [DEFAULT, "a", "b", DEFAULT]
    assert all(s.cfg.routes == () for s in specs.values())
    assert set(server_configs(t, list(specs.values()))) == {DEFAULT, "a", "b"}
    # unrouted=error and no route sharing it: the default teacher scores nothing and is not served.
    t2 = TeacherConfig(route_by="src", routes=(TeacherRoute(name="a", values=("a",), url="http://a:1"),))
    assert [s.name for s in teacher_specs(t2)] == ["a"] and set(server_configs(t2, teacher_specs(t2))) == {"a"}


# --------------------------------------------------------------------------- routing and prefixes

def rec(i: int, **fields) -> PromptRecord:
    text = fields.pop("prompt", f"{i}+1=")
    messages = fields.pop("messages", None)
    return PromptRecord(index=i, prompt_ids=[1, 2, 3], text=None if messages else text, messages=messages,
                        metadata=fields, where=f"d.jsonl line {i + 1}")


def test_every_record_gets_its_teacher_or_one_error_lists_them_all():
    t = TeacherConfig(route_by="data_source", routes=(TeacherRoute(name="m", values=("math", "3")),
                                                      TeacherRoute(name="o", values=("other",))))
    specs = teacher_specs(t)
    records = [rec(0, data_source="math"), rec(1, data_source="other"), rec(2, data_source=3)]
    assert assign_teachers(records, t, specs, {}) == {"m": 2, "o": 1}
    assert [r.teacher for r in records] == ["m", "o", "m"]
    assert all(r.teacher_prefix_ids is None for r in records)
    bad = [rec(0, data_source="math"), rec(1, data_source="code"), rec(2), rec(3, data_source=[1])]
    with pytest.raises(PromptDataError) as e:
        assign_teachers(bad, t, specs, {})
    msg = str(e.value)
    assert "d.jsonl line 2: data_source='code' has no teacher: teacher.routes lists ['3', 'math', 'other']; " \
           "add 'code' to the values of a route (teacher.routes[i].values), or set teacher.unrouted=default" in msg
    assert "d.jsonl line 3: no field 'data_source' (teacher.route_by)" in msg
    assert "d.jsonl line 4: field 'data_source' (teacher.route_by) is list" in msg
    # unrouted=default: the top-level teacher scores them.
    t = TeacherConfig(url="http://d:1", route_by="data_source", unrouted="default", routes=t.routes)
    bad = bad[:3]
    assign_teachers(bad, t, teacher_specs(t), {})
    assert [r.teacher for r in bad] == ["m", DEFAULT, DEFAULT]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def chat_ids(tok, msgs) -> list[int]:
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_own_template_renders_the_record_with_the_system_prompt(tok):
    r = PrefixRenderer("own_template", "Add exactly.", tok, apply_chat_template=False, key="teacher")
    assert r(rec(0, prompt="12+34=")) == chat_ids(tok, [{"role": "system", "content": "Add exactly."},
                                                         {"role": "user", "content": "12+34="}])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]
    # A record's own system message keeps its place, after the configured one.
    assert r(rec(1, messages=msgs)) == chat_ids(tok, [{"role": "system", "content": "Add exactly.\n\nBe brief."},
                                                      msgs[1]])
    assert PrefixRenderer("own_template", None, tok, True, "teacher")(rec(1, messages=msgs)) == chat_ids(tok, msgs)


def test_field_prompt_is_rendered_as_the_prompt_is(tok):
    r = PrefixRenderer("field:teacher_prompt", None, tok, apply_chat_template=True, key="teacher.routes[0]")
    assert r(rec(0, teacher_prompt="12+34= (answer: 46)")) == chat_ids(
        tok, [{"role": "user", "content": "12+34= (answer: 46)"}])
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert r(rec(1, teacher_prompt=msgs)) == chat_ids(tok, msgs)
    raw = PrefixRenderer("field:teacher_prompt", None, tok, apply_chat_template=False, key="teacher")
    assert raw(rec(2, teacher_prompt="12+34=46? ")) == tok("12+34=46? ", add_special_tokens=True)["input_ids"]
    with pytest.raises(ValueError, match=r"d.jsonl line 4: field 'teacher_prompt' \(teacher.routes\[0\].prompt="
                                         r"field:teacher_prompt\) must be non-empty text or a list of"):
        r(rec(3))
    with pytest.raises(ValueError, match="holds messages, which need a chat template"):
        raw(rec(4, teacher_prompt=msgs))
    # field:answer reads the reserved field.
    a = PrefixRenderer("field:answer", None, tok, True, "teacher")
    assert a(PromptRecord(index=0, prompt_ids=[1], answer="46", where="w")) == chat_ids(
        tok, [{"role": "user", "content": "46"}])


def test_a_template_is_required_where_one_is_used(tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(PromptDataError, match=r"teacher.prompt=own_template renders the teacher's prompt with its "
                                              r"chat template, but the tokenizer .* has none"):
        PrefixRenderer("own_template", None, bare, True, "teacher")
    PrefixRenderer("field:x", None, bare, False, "teacher")  # rendered as raw text: no template needed


def test_assign_sets_prefixes_and_reports_records_without_the_field(tok):
    t = TeacherConfig(url="http://d:1", prompt="field:teacher_prompt")
    specs = teacher_specs(t)
    render = {DEFAULT: PrefixRenderer("field:teacher_prompt", None, tok, True, "teacher")}
    records = [rec(0, teacher_prompt="A"), rec(1, teacher_prompt="B")]
    assign_teachers(records, t, specs, render)
    assert [r.teacher for r in records] == [None, None]  # one teacher: no per-teacher split
    assert records[0].teacher_prefix_ids == chat_ids(tok, [{"role": "user", "content": "A"}])
    with pytest.raises(PromptDataError, match="2 problems"):
        assign_teachers([rec(0), rec(1, teacher_prompt=""), rec(2, teacher_prompt="C")], t, specs, render)


# --------------------------------------------------------------------------- TeacherSet

class FakeClient:
    """Scores token t at position j as -(t + offset) / 100 (a rule to check
    against); fails sequences whose first id is 999 (a per-sequence error)."""

    def __init__(self, offset: float, top_k: int = 0):
        self.offset, self.calls, self.threads = offset, [], []
        self.top_k = top_k
        self.barrier: threading.Barrier | None = None

    def score(self, seqs, top_k=None, temperature=None):
        self.calls.append(([list(s) for s, _ in seqs], [st for _, st in seqs], top_k, temperature))
        self.threads.append(threading.current_thread().name)
        if self.barrier is not None:
            self.barrier.wait(timeout=10)  # both teachers inside score at once: concurrent
        k = self.top_k if top_k is None else top_k
        lps, ids, tlps, errors = [], [], [], []
        for i, (s, st) in enumerate(seqs):
            if s[0] == 999:
                lps.append(None), ids.append(None), tlps.append(None)
                errors.append((i, "bad id"))
                continue
            lps.append([-(t + self.offset) / 100 for t in s[st:]])
            ids.append([[t] * k for t in s[st:]])
            tlps.append([[-1.0] * k for _ in s[st:]])
        tokens = sum(len(s) - st for (s, st), lp in zip(seqs, lps, strict=True) if lp is not None)
        return ScoreResult(lps, ids if k else None, tlps if k else None, errors,
                           {"teacher/requests": 1, "teacher/tokens_scored": tokens, "teacher/latency_s": 0.5,
                            "teacher/failed_sequences": len(errors)})

    def metrics(self):
        return {"teacher/requests": len(self.calls)}

    def close(self):
        pass


def test_teacher_set_splits_by_teacher_concurrently_and_merges_in_order():
    a, b = FakeClient(0), FakeClient(1000)
    a.barrier = b.barrier = threading.Barrier(2)
    ts = TeacherSet({"a": a, "b": b}, max_model_len={"a": 6})
    seqs = [([1, 2, 3], 1), ([4, 5, 6, 7], 2), ([999, 5], 1), ([8, 9], 1), ([1, 2, 3, 4, 5, 6, 7], 3)]
    res = ts.score(seqs, top_k=0, temperature=None, teachers=["a", "b", "b", "a", "a"],
                   labels=[f"rec{i}" for i in range(5)])
    assert res.logprobs[0] == [-0.02, -0.03] and res.logprobs[3] == [-0.09]
    assert res.logprobs[1] == pytest.approx([-10.06, -10.07])
    assert res.logprobs[2] is None and res.logprobs[4] is None
    assert res.top_ids is None and res.top_logprobs is None
    errs = dict(res.errors)
    assert errs[2] == "teacher 'b': bad id"
    assert errs[4].startswith("rec4: the teacher's prompt (3 tokens) + the completion (4) is 7 tokens, more than "
                              "teacher 'a''s max_model_len 6")
    # Each teacher got its own sequences only, in order; the too-long one was never sent.
    assert a.calls == [([[1, 2, 3], [8, 9]], [1, 1], 0, None)]
    assert b.calls == [([[4, 5, 6, 7], [999, 5]], [2, 1], 0, None)]
    assert a.threads[0] != b.threads[0]
    m = res.metrics
    assert (m["teacher/a/tokens"], m["teacher/b/tokens"], m["teacher/tokens_scored"]) == (3, 2, 5)
    assert m["teacher/a/latency_s"] == 0.5 and m["teacher/requests"] == 2
    assert m["teacher/failed_sequences"] == 2
    # Each teacher's replicas keep their own keys (both have a replica 0).
    a.metrics = lambda: {"teacher/requests": 3, "teacher/replica0/healthy": 1, "teacher/replica1/healthy": 0}
    b.metrics = lambda: {"teacher/requests": 2, "teacher/replica0/healthy": 1}
    assert ts.metrics() == {"teacher/requests": 5, "teacher/a/replica0/healthy": 1,
                            "teacher/a/replica1/healthy": 0, "teacher/b/replica0/healthy": 1}
    ts.close()


def test_teacher_set_top_k_and_one_teacher():
    a = FakeClient(0, top_k=2)
    ts = TeacherSet({DEFAULT: a})
    res = ts.score([([1, 2, 3], 2), ([4, 5], 1)])  # teachers=None: the default one; top_k: its own
    assert res.top_ids == [[[3, 3]], [[5, 5]]] and res.top_logprobs == [[[-1.0, -1.0]], [[-1.0, -1.0]]]
    assert a.calls[0][2:] == (None, None)
    assert "teacher/default/tokens" not in res.metrics  # one teacher: the totals say it all
    assert ts.generate is not None and ts.default is a


# --------------------------------------------------------------------------- the stages

def comp(p: int, prompt, completion, lp):
    from rollout.types import Completion

    return Completion(prompt_index=p, sample_index=0, prompt_ids=list(prompt), completion_ids=list(completion),
                      sampler_logprobs=list(lp), finish_reason="stop", policy_version=0)


def test_score_completions_scores_the_same_completion_after_the_teachers_prefix():
    from cluster.config import LossConfig
    from cluster.stages import score_completions, teacher_sequences

    recs = [PromptRecord(index=10, prompt_ids=[1, 2], where="r0", teacher="a", teacher_prefix_ids=[7, 7, 7]),
            PromptRecord(index=11, prompt_ids=[3], where="r1", teacher="b")]
    comps = [comp(0, [1, 2], [5, 6], [-0.1, -0.2]), comp(1, [3], [8], [-0.3]), comp(0, [1, 2], [], [])]
    seqs, names = teacher_sequences(comps, recs)
    assert seqs == [([7, 7, 7, 5, 6], 3), ([3, 8], 1), ([7, 7, 7], 3)] and names == ["a", "b", "a"]
    a, b = FakeClient(0), FakeClient(100)
    batch, m = score_completions(TeacherSet({"a": a, "b": b}), comps, recs, TeacherConfig(temperature=1.0),
                                 LossConfig())
    # The learner's batch keeps the student's prompt; the teacher's logprobs align with the completion.
    assert batch.prompt_ids_B_T == [[1, 2], [3]] and batch.completion_ids_B_T == [[5, 6], [8]]
    assert batch.teacher_logprobs_B_T == [[-0.05, -0.06], pytest.approx([-1.08])]
    assert a.calls[0][3] is None  # each teacher at its own temperature
    assert m["teacher/a/reverse_kl"] == pytest.approx(((-0.1 + 0.05) + (-0.2 + 0.06)) / 2)
    assert m["teacher/b/reverse_kl"] == pytest.approx(-0.3 + 1.08)
    assert m["teacher/reverse_kl"] == pytest.approx(((-0.1 + 0.05) + (-0.2 + 0.06) + (-0.3 + 1.08)) / 3)
    assert (m["teacher/a/tokens"], m["teacher/b/tokens"]) == (2, 1)
    # Records without a teacher or prefix: the plain call, as before.
    plain = [PromptRecord(index=0, prompt_ids=[1, 2])]
    assert teacher_sequences([comps[0]], plain) == (None, None)


def test_eval_scores_by_teacher_and_logs_each_ones_share():
    from cluster.config import EvalConfig
    from cluster.stages import evaluate

    class Pool:
        def generate(self, prompts, n, seed, temperature, top_p, top_k):
            return [[comp(p, ids, [5, 6], [-0.1, -0.1])] for p, ids in enumerate(prompts)]

    recs = [PromptRecord(index=0, prompt_ids=[1], where="e0", teacher="a"),
            PromptRecord(index=1, prompt_ids=[2], where="e1", teacher="b", teacher_prefix_ids=[4, 4])]
    a, b = FakeClient(0), FakeClient(100)
    m = evaluate(Pool(), TeacherSet({"a": a, "b": b}), recs, EvalConfig(num_prompts=2), types.SimpleNamespace(),
                 seed=0)
    assert a.calls[0][:2] == ([[1, 5, 6]], [1]) and b.calls[0][:2] == ([[4, 4, 5, 6]], [2])
    assert a.calls[0][3] == 1.0 and b.calls[0][3] == 1.0  # eval/reverse_kl is at T = 1 for every teacher
    assert m["eval/teacher/a/reverse_kl"] == pytest.approx(-0.1 + 0.055)
    assert m["eval/teacher/b/reverse_kl"] == pytest.approx(-0.1 + 1.055)
    assert (m["eval/teacher/a/tokens"], m["eval/teacher/b/tokens"]) == (2, 2)


def test_chunks_weight_each_teachers_kl_by_its_tokens():
    parts = [{"teacher/a/reverse_kl": 1.0, "teacher/a/tokens": 10, "teacher/reverse_kl": 1.0,
              "teacher/tokens_scored": 10},
             {"teacher/a/reverse_kl": 4.0, "teacher/a/tokens": 30, "teacher/b/reverse_kl": 2.0, "teacher/b/tokens": 5,
              "teacher/reverse_kl": 3.0, "teacher/tokens_scored": 35}]
    m = merge_chunk_metrics(parts)
    assert m["teacher/a/reverse_kl"] == pytest.approx((10 * 1 + 30 * 4) / 40)
    assert m["teacher/b/reverse_kl"] == 2.0 and m["teacher/a/tokens"] == 40 and m["teacher/b/tokens"] == 5
