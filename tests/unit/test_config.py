"""The typed config tree: YAML loading, dotted overrides, and every kind of error."""

import pickle
from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, config_from_dict, load_config, replace, to_dict

REPO = Path(__file__).resolve().parents[2]


def problems_of(data=None, overrides=()):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data, list(overrides))
    return ei.value.problems


def test_defaults_build_and_are_frozen():
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.loss.kind == "reverse_kl"
    with pytest.raises(Exception):
        cfg.learner.lr = 1.0  # frozen


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  lr: 3.0e-4\n  zero_stage: 2\nrollout:\n  stop: [\"\\n\\n\"]\n")
    cfg = load_config(p, ["learner.lr=1e-5", "train.mode=async", "rollout.stop_token_ids=[5, 7]",
                          "teacher.url=http://h:8000", "log.wandb.mode=disabled"])
    assert cfg.learner.lr == pytest.approx(1e-5)  # override wins, "1e-5" (YAML string) becomes a float
    assert cfg.learner.zero_stage == 2
    assert cfg.train.mode == "async"
    assert cfg.rollout.stop == ("\n\n",)
    assert cfg.rollout.stop_token_ids == (5, 7)
    assert cfg.teacher.url == "http://h:8000"
    assert cfg.log.wandb.mode == "disabled"


def test_null_override_for_optional():
    cfg = config_from_dict({}, ["teacher.url=http://x:1", "teacher.model=null"])
    assert cfg.teacher.model is None


def test_unknown_keys_are_named_with_valid_ones():
    probs = problems_of({"learner": {"lrr": 1.0}, "bogus": 1})
    assert any(p.startswith("learner.lrr: unknown key") and "lr" in p and "zero_stage" in p for p in probs)
    assert any(p.startswith("bogus: unknown key") and "learner" in p for p in probs)


def test_bad_values_name_key_value_and_valid():
    probs = problems_of({}, ["learner.zero_stage=4", "train.mode=fast", "learner.lr=abc",
                             "rollout.top_p=1.5", "learner.world_size=0", "run.resume=maybe"])
    text = "\n".join(probs)
    assert "learner.zero_stage: 4 is not valid; valid values are 0, 1, 2, 3" in text
    assert "train.mode: 'fast' is not valid; valid values are 'sync', 'async'" in text
    assert "learner.lr: 'abc' is not a number" in text
    assert "rollout.top_p: 1.5 is outside (0, 1]" in text
    assert "learner.world_size: 0 must be > 0" in text
    assert "run.resume: 'maybe' is not a boolean" in text
    # all problems at once, not just the first
    assert len(probs) == 6


def test_cross_section_problems_reported_with_field_problems():
    probs = problems_of({}, ["loss.kind=jsd", "learner.lr=-1"])
    assert any("loss.kind=jsd needs the teacher's top-k support" in p and "teacher.top_k" in p for p in probs)
    assert any(p.startswith("learner.lr: -1") for p in probs)


def test_sampler_engine_process_and_cpu_binding():
    from cluster.config import parse_cpu_list

    assert parse_cpu_list("auto") is None and parse_cpu_list("nobind") is None
    assert parse_cpu_list("0-1,6") == [0, 1, 6] and parse_cpu_list("0-1|2-3") == [0, 1, 2, 3]
    probs = problems_of({}, ["rollout.engine_process=inprocess", "rollout.tensor_parallel_size=2",
                             "rollout.cpu_threads_bind=3-1"])
    assert any("engine_process=inprocess" in p and "tensor_parallel_size is 2" in p for p in probs)
    assert any(p.startswith("rollout.cpu_threads_bind: '3-1'") for p in probs)
    cfg = config_from_dict({}, ["rollout.engine_process=multiprocess", "rollout.tensor_parallel_size=2",
                                "rollout.cpu_threads_bind=0-3|4-7"])
    assert cfg.rollout.engine_process == "multiprocess" and cfg.rollout.cpu_threads_bind == "0-3|4-7"
    assert any("rollout.engine_process: 'fork' is not valid" in p
               for p in problems_of({}, ["rollout.engine_process=fork"]))


def test_cpu_gemm_and_learner_threads():
    cfg = config_from_dict({}, ["rollout.cpu_gemm=plain", "learner.cpu_threads=2"])
    assert cfg.rollout.cpu_gemm == "plain" and cfg.learner.cpu_threads == 2
    assert config_from_dict({}, []).rollout.cpu_gemm == "onednn"  # vLLM's CPU default stays the default
    probs = problems_of({}, ["rollout.cpu_gemm=mkl", "learner.cpu_threads=-1"])
    assert any("rollout.cpu_gemm: 'mkl' is not valid; valid values are 'onednn', 'plain'" in p for p in probs)
    assert any(p.startswith("learner.cpu_threads: -1") for p in probs)


def test_lengths_must_fit_model():
    probs = problems_of({}, ["rollout.max_new_tokens=1000"])
    assert any("exceeds student.max_model_len" in p for p in probs)


def test_teacher_needs_url_or_model():
    probs = problems_of({}, ["teacher.model=null"])
    assert any("teacher.url" in p and "teacher.model" in p for p in probs)


def test_bad_override_syntax_and_section_type():
    probs = problems_of({}, ["learner.lr", "learner=3", "learner.lr.x=1"])
    text = "\n".join(probs)
    assert "expected dotted.key=value" in text
    assert "learner: expected a mapping" in text
    assert "learner.lr.x=1': learner is a value, not a section" in text


def test_wrong_types_in_lists():
    probs = problems_of({}, ["learner.betas=[0.9]", "rollout.stop_token_ids=[1, x]"])
    text = "\n".join(probs)
    assert "learner.betas: expected a list of 2 values" in text
    assert "rollout.stop_token_ids[1]: 'x' is not an integer" in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_error_pickles_and_round_trip():
    try:
        config_from_dict({}, ["learner.lr=x"])
    except ConfigError as e:
        e2 = pickle.loads(pickle.dumps(e))
        assert e2.problems == e.problems and str(e2) == str(e)
    cfg = config_from_dict({}, ["learner.lr=2e-5", "rollout.stop=['a']"])
    assert config_from_dict(to_dict(cfg)) == cfg
    assert replace(cfg, ["train.steps=3"]).train.steps == 3
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment holding the command that runs it"
    load_config(path)


def test_bad_element_of_a_tuple_field_is_reported_not_crashed():
    """Found by hypothesis (tests/unit/test_fuzz_config.py): `learner.betas:
    [null, null]` used to reach the section's own range check with the
    internal sentinel inside the tuple and raise TypeError."""
    with pytest.raises(ConfigError, match=r"learner\.betas\[0\]"):
        config_from_dict({"learner": {"betas": [None, None]}})
