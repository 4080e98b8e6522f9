"""Several teachers by route, and the teacher's own prompt, on real servers.

- the teacher's logprobs under `teacher.prompt=field:teacher_prompt` (the
  driver's path: records -> prefixes -> score_completions) equal scoring
  `teacher_prefix + completion` directly on the session teacher_server;
- a driver run on a multi-source dataset with real teachers (the session
  teacher_server for `math`, with the student's prompt; a second
  teacher_server for `other`, with a privileged `teacher_prompt`; and, for a
  few `extra` records, a server the driver starts for a route's `model`,
  with its own chat template and a system prompt): the two servers' own
  counters show each scored only its own records, with the prefix its route
  asks for, and the per-teacher metrics add up to them;
- start-up errors before anything starts: a `data_source` value no route
  lists, and `own_template` for a teacher named only by url (exit 2).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import requests

from cluster.tiny_data import arithmetic_records
from rollout.prompts import records_from_rows
from tests.e2e.test_cluster import read_metrics, run_in_process
from tests.fixtures.teacher import start_teacher_server, stop_teacher_server

REPO = Path(__file__).resolve().parents[2]


def source_rows(n: int, seed: int) -> list[dict]:
    """Fixed-width sums from two sources. The byte-level tiny tokenizer makes
    each kind of prompt one fixed length, and the four (student prompt, teacher
    prompt) x (math, other) lengths all differ: a server's prefilled - scored
    tokens then tell which prefixes it was sent."""
    rows = []
    for i, r in enumerate(arithmetic_records(n, seed, fixed_width=True)):
        q, ans = r["prompt"], r["answer"]
        if i % 2 == 0:
            rows.append({"prompt": q, "answer": ans, "data_source": "math",
                         "teacher_prompt": f"{q} is {ans}. {q}"})
        else:
            rows.append({"prompt": f"Sum: {q}", "answer": ans, "data_source": "other",
                         "teacher_prompt": f"Reference answer {ans}. Sum: {q}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_len(tok, text: str) -> int:
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return len(tok(rendered, add_special_tokens=False)["input_ids"])


def server_counters(server) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", headers=server.headers(), timeout=10).text
    out = {}
    for name in ("teacher_tokens_scored", "teacher_tokens_prefilled", "teacher_sequences_scored"):
        m = re.search(rf"^{name}_total (\S+)$", text, re.M)
        assert m, f"no {name}_total in the server's /metrics"
        out[name] = float(m.group(1))
    return out


def test_field_prompt_scores_equal_the_prefix_plus_completion_scored_directly(teacher_server, teacher_path,
                                                                             tokenizer):
    from transformers import AutoTokenizer

    from cluster.config import LossConfig, TeacherConfig
    from cluster.stages import score_completions
    from rollout.teacher_client import TeacherClient
    from rollout.teacher_routes import DEFAULT, PrefixRenderer, TeacherSet, assign_teachers, teacher_specs
    from rollout.types import Completion

    rows = source_rows(6, seed=5)
    records = records_from_rows([(f"t row {i}", r) for i, r in enumerate(rows)], tokenizer,
                                apply_chat_template=True, max_prompt_tokens=64)
    tcfg = TeacherConfig(url=teacher_server.url, api_key_file=teacher_server.api_key_file,
                         prompt="field:teacher_prompt")
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    assign_teachers(records, tcfg, teacher_specs(tcfg),
                    {DEFAULT: PrefixRenderer(tcfg.prompt, None, teacher_tok, True, "teacher")})
    # The student's completions: the answer and EOS, the same ids for both scorings.
    eos = tokenizer.eos_token_id
    comps = [Completion(prompt_index=p, sample_index=0, prompt_ids=list(r.prompt_ids),
                        completion_ids=tokenizer(rows[p]["answer"], add_special_tokens=False)["input_ids"] + [eos],
                        sampler_logprobs=[-1.0] * 4, finish_reason="stop", policy_version=0)
             for p, r in enumerate(records)]
    with TeacherClient.from_config(tcfg) as client:
        batch, m = score_completions(TeacherSet({DEFAULT: client}), comps, records, tcfg, LossConfig())
        assert m["teacher/failed_sequences"] == 0 and len(batch) == len(comps)
        # Directly: the privileged prompt rendered here, then the same completion ids.
        prefixes = [teacher_tok(teacher_tok.apply_chat_template(
            [{"role": "user", "content": row["teacher_prompt"]}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False)["input_ids"] for row in rows]
        direct = client.score([(p + c.completion_ids, len(p)) for p, c in zip(prefixes, comps, strict=True)])
        student = client.score([(c.prompt_ids + c.completion_ids, len(c.prompt_ids)) for c in comps])
    # The same sequences in the same order, one request each: the same numbers.
    assert batch.teacher_logprobs_B_T == direct.logprobs
    assert batch.completion_ids_B_T == [c.completion_ids for c in comps]
    assert batch.prompt_ids_B_T == [c.prompt_ids for c in comps]  # the learner keeps the student's prompt
    # The privileged prompt changes what the teacher thinks of the completion.
    diff = max(abs(a - b) for x, y in zip(direct.logprobs, student.logprobs, strict=True)
               for a, b in zip(x, y, strict=True))
    assert diff > 1e-2, diff


def test_a_route_value_with_no_teacher_stops_the_run_before_anything_starts(tmp_path, monkeypatch, capsys):
    import cluster.placement
    from cluster.train import main

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the route check")

    monkeypatch.setattr(cluster.placement, "connect", no_ray)
    rows = source_rows(8, seed=3)
    rows[5]["data_source"] = "code"
    data = write_jsonl(tmp_path / "two.jsonl", rows)
    routes = [{"name": "math", "values": ["math"]}, {"name": "other", "values": ["other"]}]
    base = ["--config", str(REPO / "configs" / "demo.yaml"), f"run.dir={tmp_path / 'run'}", f"data.train={data}",
            "data.eval_size=2", "teacher.model=null", "teacher.url=http://127.0.0.1:9", "teacher.route_by=data_source",
            f"teacher.routes={json.dumps(routes)}"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"{data} line 6: data_source='code' has no teacher: teacher.routes lists ['math', 'other']; add " \
           "'code' to the values of a route (teacher.routes[i].values), or set teacher.unrouted=default" in err
    # own_template needs the teacher's tokenizer: a url alone does not name it.
    assert main(base[:-2] + ["teacher.prompt=own_template", f"run.dir={tmp_path / 'run2'}"]) == 2
    assert "teacher.prompt=own_template renders the record with the teacher's chat template, but teacher names " \
           "only a url; set teacher.model" in capsys.readouterr().err


@pytest.mark.slow
def test_two_teachers_by_data_source_each_score_only_their_own_records(ray_session, teacher_server, student_path,
                                                                       tokenizer, tmp_path):
    rows = source_rows(48, seed=11)
    for r in rows[3::4]:  # some "other" records go to a third teacher, served by the driver
        r["data_source"], r["prompt"] = "extra", "Total of " + r["prompt"][len("Sum: "):]
        del r["teacher_prompt"]  # its teacher renders the prompt itself (routed to "other", it would fail)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:32])
    evals = write_jsonl(tmp_path / "eval.jsonl", rows[32:])
    math_q, other_q = rows[0], rows[1]
    lens = {"math student": chat_len(tokenizer, math_q["prompt"]),
            "other student": chat_len(tokenizer, other_q["prompt"]),
            "math teacher": chat_len(tokenizer, math_q["teacher_prompt"]),
            "other teacher": chat_len(tokenizer, other_q["teacher_prompt"])}
    assert len(set(lens.values())) == 4, lens
    two = [r for r in rows if r["data_source"] != "extra"]
    assert all(chat_len(tokenizer, r["prompt"]) == lens[f"{r['data_source']} student"] for r in two)
    assert all(chat_len(tokenizer, r["teacher_prompt"]) == lens[f"{r['data_source']} teacher"] for r in two)
    # An extra record sent to the math server would show as a prefix of another length.
    assert chat_len(tokenizer, rows[3]["prompt"]) != lens["math student"]
    # Teacher "other": a second real server (the student's weights: another
    # model, one tokenizer) that reads the privileged teacher_prompt.
    (tmp_path / "second").mkdir()
    second = start_teacher_server(student_path, api_key="second-key", workdir=str(tmp_path / "second"))
    try:
        routes = [{"name": "math", "values": ["math"]},  # the top-level teacher's server, the student's prompt
                  {"name": "other", "values": ["other"], "url": second.url, "api_key_file": second.api_key_file,
                   "prompt": "field:teacher_prompt"},
                  {"name": "extra", "values": ["extra"], "model": "tiny:student", "prompt": "own_template",
                   "system_prompt": "Add exactly."}]
        before = {"math": server_counters(teacher_server), "other": server_counters(second)}
        run_dir = tmp_path / "routes"
        rc = run_in_process([
            f"run.dir={run_dir}", f"teacher.url={teacher_server.url}",
            f"teacher.api_key_file={teacher_server.api_key_file}", "teacher.model=null", "log.wandb.mode=offline",
            "train.steps=2", "train.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=16",
            "run.save_every_steps=0", f"data.train={train}", f"data.eval={evals}", "eval.num_prompts=16",
            "eval.every_steps=2", "teacher.route_by=data_source", f"teacher.routes={json.dumps(routes)}"])
        after = {"math": server_counters(teacher_server), "other": server_counters(second)}
    finally:
        stop_teacher_server(second)
    assert rc == 0
    rows_m = read_metrics(run_dir)
    for r in rows_m:
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
    trained = [r for r in rows_m if "learner/loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    evals_m = [r for r in rows_m if "eval/reverse_kl" in r]
    assert [r["step"] for r in evals_m] == [0, 2]
    for r in trained:
        assert r["teacher/failed_sequences"] == 0
        per_teacher = sum(r.get(f"teacher/{n}/tokens", 0) for n in ("math", "other", "extra"))
        assert per_teacher == r["teacher/tokens_scored"]
        assert {"teacher/math/reverse_kl", "teacher/other/reverse_kl", "teacher/math/latency_s",
                "teacher/other/latency_s"} <= set(r)
    # The third teacher scored its records on the server the driver started for it.
    assert sum(r.get("teacher/extra/tokens", 0) for r in trained) > 0
    assert sum(r.get("eval/teacher/extra/tokens", 0) for r in evals_m) > 0
    assert (run_dir / "teacher_extra" / "teacher_server.log").is_file()
    for name in ("math", "other"):
        d = {k: after[name][k] - before[name][k] for k in after[name]}
        seqs, scored = d["teacher_sequences_scored"], d["teacher_tokens_scored"]
        assert seqs > 0, (name, d)
        # Tokens this server scored == what the run logged for this teacher (train + eval).
        logged = sum(r[f"teacher/{name}/tokens"] for r in trained) + \
            sum(r.get(f"eval/teacher/{name}/tokens", 0) for r in evals_m)
        assert scored == logged, (name, scored, logged)
        # Every sequence it was sent had its route's prefix, of its own source:
        # math after the student's prompt, other after the privileged one.
        prefix = lens["math student"] if name == "math" else lens["other teacher"]
        assert d["teacher_tokens_prefilled"] - scored == prefix * seqs, (name, d, lens)
