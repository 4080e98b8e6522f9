"""Model references and the tokenizer check, before anything starts.

- `cluster.models.resolve_model`: `tiny:`, local directories, hub ids from an
  offline Hugging Face cache laid out in tmp; what it says when it cannot.
- `teacher_server.protocol` tokenizer compatibility: a Base student under an
  Instruct teacher of its family (same vocabulary, another chat template and
  eos_token) passes; swapped ids or a BOS one side adds are refused, naming
  what differs.
- The driver (`cluster.train.main`, the real entry point) exits 2 on both
  kinds of bad input before Ray or any actor starts.

No Ray cluster, no vLLM engine: everything here fails (or passes) first.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError
from cluster.models import ResolvedModel, ensure_local, resolve_model, resolve_models
from rollout.teacher_client import TokenizerMismatchError, check_tokenizers
from teacher_server.protocol import TokenizerInfo, load_tokenizer_info, tokenizer_differences, tokenizer_info
from tests.fixtures.models import INSTRUCT_TEMPLATE, edit_tokenizer, hub_cache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, student_path):
    """An offline hub cache holding `opd-test/student`; huggingface_hub reads
    its cache location and offline flag at import, so this process's copy of
    them is pointed at it (a subprocess gets HF_HOME / HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    snap = hub_cache(home, "opd-test/student", student_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home, snap


# ----------------------------------------------------------------------------- resolve_model

def test_resolve_tiny_and_local_directories(student_path, tmp_path, monkeypatch):
    assert resolve_model("tiny:student", "student.model") == ResolvedModel("student.model", "tiny:student",
                                                                          student_path)
    monkeypatch.chdir(Path(student_path).parent)
    rel = resolve_model(Path(student_path).name, "student.model")  # relative: made absolute for every actor
    assert rel.path == student_path and rel.repo_id is None
    with pytest.raises(ConfigError, match=r"student.model: unknown tiny model 'nope'"):
        resolve_model("tiny:nope", "student.model")


def test_resolve_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for spec, says in [(str(tmp_path / "missing"), "does not exist"), (str(tmp_path / "file.txt"), "is a file"),
                       (str(tmp_path / "empty"), "has no config.json")]:
        with pytest.raises(ConfigError) as ei:
            resolve_model(spec, "teacher.model")
        (problem,) = ei.value.problems
        assert problem.startswith(f"teacher.model: {spec!r}") and says in problem, problem


def test_resolve_hub_id_from_offline_cache(offline_hub):
    home, snap = offline_hub
    got = resolve_model("opd-test/student", "student.model")
    assert got.path == str(snap.resolve()) and got.repo_id == "opd-test/student" and got.revision == snap.name
    assert ensure_local(got) is None  # the node (this one) has it


def test_resolve_unresolvable_ids_report_every_key(offline_hub, tmp_path):
    home, _ = offline_hub
    with pytest.raises(ConfigError) as ei:
        resolve_models("opd-test/absent", "org/also absent")
    student, teacher = ei.value.problems
    assert student.startswith("student.model: 'opd-test/absent' is not a local directory")
    assert "not in the local Hugging Face cache" in student and "HF_HUB_OFFLINE=1" in student
    assert "hf download opd-test/absent" in student
    assert teacher.startswith("teacher.model: 'org/also absent'") and "not a valid hub id" in teacher
    assert pickle.loads(pickle.dumps(ei.value)).problems == ei.value.problems


def test_ensure_local_on_a_node_without_the_model(offline_hub, tmp_path):
    """What a node that lacks the driver's path answers: a local directory
    cannot be fetched; a hub id is fetched from the node's own cache, which
    must put it at the driver's path."""
    home, snap = offline_hub
    local = ResolvedModel("student.model", "/data/m", str(tmp_path / "gone"))
    assert "does not exist on this node" in ensure_local(local)
    elsewhere = ResolvedModel("student.model", "opd-test/student", str(tmp_path / "other-home" / "snap"),
                              repo_id="opd-test/student", revision=snap.name)
    problem = ensure_local(elsewhere)
    assert f"resolves to {snap.resolve()} on this node" in problem and "same directory on every node" in problem
    missing = ResolvedModel("student.model", "opd-test/absent", str(tmp_path / "x"), repo_id="opd-test/absent",
                            revision="0" * 40)
    assert "not in the local Hugging Face cache" in ensure_local(missing)


# ----------------------------------------------------------------------------- tokenizer compatibility

def test_base_student_under_instruct_teacher_is_compatible(student_path, teacher_path, tmp_path):
    """Same vocabulary, another chat template and eos_token: what Qwen3 Base
    and Instruct differ in. Scoring only sees ids, so they are compatible."""
    from transformers import AutoTokenizer

    inst = edit_tokenizer(teacher_path, tmp_path / "instruct", chat_template=INSTRUCT_TEMPLATE,
                          eos_token="<|endoftext|>")
    t = AutoTokenizer.from_pretrained(inst)
    s = AutoTokenizer.from_pretrained(student_path)
    assert t.eos_token_id != s.eos_token_id and t.chat_template != s.chat_template  # the edit took
    s_info, t_info = tokenizer_info(s), load_tokenizer_info(inst)
    assert len(s_info.vocab) == 320 and s_info.sha256() == t_info.sha256()
    assert tokenizer_differences(s_info, t_info) == []
    check_tokenizers(s_info, t_info, student_path, str(inst))  # does not raise


def test_swapped_ids_are_refused_naming_them(student_path, teacher_path, tmp_path):
    swapped = edit_tokenizer(teacher_path, tmp_path / "swapped", swap=("a", "b"))
    s_info, t_info = load_tokenizer_info(student_path), load_tokenizer_info(swapped)
    with pytest.raises(TokenizerMismatchError) as ei:
        check_tokenizers(s_info, t_info, student_path, "org/teacher")
    msg = str(ei.value)
    assert msg.startswith(f"teacher tokenizer differs from the student's (sha256 {t_info.sha256()[:12]}... of "
                          f"teacher org/teacher vs {s_info.sha256()[:12]}... of student {student_path})")
    assert ("2 token ids map to different tokens (ids 67, 68): id 67: student 'a', teacher 'b'; "
            "id 68: student 'b', teacher 'a'") in msg
    again = pickle.loads(pickle.dumps(ei.value))
    assert str(again) == msg and again.differences == ei.value.differences


def test_differences_name_ids_and_added_bos():
    base = TokenizerInfo(vocab={f"t{i}": i for i in range(20)}, prefix_ids=[], suffix_ids=[])
    assert tokenizer_differences(base, base) == []
    # The teacher has 3 tokens more and a BOS added to every text, and 9 ids renamed.
    vocab = {(f"u{i}" if i < 9 else f"t{i}"): i for i in range(23)}
    teacher = TokenizerInfo(vocab=vocab, prefix_ids=[1], suffix_ids=[])
    ids, bos = tokenizer_differences(base, teacher, limit=4)
    assert ids.startswith("12 token ids map to different tokens (ids 0, 1, 2, 3...): id 0: student 't0', "
                          "teacher 'u0'; ")
    assert ids.endswith("id 3: student 't3', teacher 'u3' (and 8 more)")
    assert "id 20" not in ids  # only the first `limit` are named
    assert bos == ("the student's tokenizer adds ids [] before every text, the teacher's [1] (e.g. a BOS token "
                   "one of them expects)")
    assert base.sha256() != TokenizerInfo(vocab=base.vocab, prefix_ids=[1], suffix_ids=[]).sha256()


# ----------------------------------------------------------------------------- the driver, exit 2

def _driver_overrides(tmp_path: Path) -> list[str]:
    return [f"run.dir={tmp_path / 'run'}", "log.wandb.mode=disabled", "train.steps=1"]


def test_driver_refuses_teacher_with_other_ids_before_anything_starts(student_path, teacher_path, tmp_path,
                                                                      capsys):
    from cluster.train import main

    swapped = edit_tokenizer(teacher_path, tmp_path / "swapped", swap=("a", "b"))
    rc = main(["--config", str(REPO / "configs" / "demo.yaml"), f"teacher.model={swapped}",
               *_driver_overrides(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2, err[-3000:]
    assert "teacher tokenizer differs from the student's" in err and "ids 67, 68" in err
    assert "Traceback" not in err
    assert "[opd] starting" not in out  # no teacher, no Ray, no actor
    assert not (tmp_path / "run" / "placement.json").exists()


def test_driver_refuses_unresolvable_models_before_anything_starts(tmp_path, student_path):
    """The real command with HF_HOME / HF_HUB_OFFLINE=1 in its environment: a
    missing local path and an id absent from the cache are both named."""
    home = tmp_path / "hf"
    hub_cache(home, "opd-test/student", student_path)  # a cache that holds something else
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "cluster.train", "--config", str(REPO / "configs" / "demo.yaml"),
                          f"student.model={tmp_path / 'no-such-model'}", "teacher.model=opd-test/absent",
                          *_driver_overrides(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2 problems in the config" in out.stderr
    assert f"student.model: '{tmp_path / 'no-such-model'}' does not exist" in out.stderr
    assert "teacher.model: 'opd-test/absent' is not a local directory" in out.stderr
    assert "not in the local Hugging Face cache" in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr
    assert "Traceback" not in out.stderr and "[opd] starting" not in out.stdout
    assert not (tmp_path / "run" / "placement.json").exists()
