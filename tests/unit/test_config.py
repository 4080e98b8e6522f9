"""The typed config tree: YAML loading, dotted overrides, and every kind of error."""

import dataclasses
import pickle
from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, config_from_dict, load_config, replace, to_dict

REPO = Path(__file__).resolve().parents[2]


# The keys a config must set (everything else has a default).
REQUIRED = {"student": {"model": "org/student"}, "teacher": {"model": "org/teacher"},
            "data": {"train": "prompts.jsonl"}}


def req(**sections) -> dict:
    """The required keys, plus `sections`."""
    import copy

    return {**copy.deepcopy(REQUIRED), **sections}


def problems_of(data=None, overrides=()):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data, list(overrides))
    return ei.value.problems


def test_defaults_build_and_are_frozen():
    cfg = config_from_dict(req())
    d = Config()
    assert cfg == Config(student=dataclasses.replace(d.student, model="org/student"),
                         teacher=dataclasses.replace(d.teacher, model="org/teacher"),
                         data=dataclasses.replace(d.data, train="prompts.jsonl"))
    assert cfg.loss.kind == "reverse_kl"
    with pytest.raises(Exception):
        cfg.learner.lr = 1.0  # frozen


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  lr: 3.0e-4\n  zero_stage: 2\nrollout:\n  stop: [\"\\n\\n\"]\n")
    cfg = load_config(p, ["student.model=org/s", "data.train=t.jsonl", "learner.lr=1e-5", "train.mode=async",
                          "rollout.stop_token_ids=[5, 7]",
                          "teacher.url=http://h:8000", "log.wandb.mode=disabled"])
    assert cfg.learner.lr == pytest.approx(1e-5)  # override wins, "1e-5" (YAML string) becomes a float
    assert cfg.learner.zero_stage == 2
    assert cfg.train.mode == "async"
    assert cfg.rollout.stop == ("\n\n",)
    assert cfg.rollout.stop_token_ids == (5, 7)
    assert cfg.teacher.url == "http://h:8000"
    assert cfg.log.wandb.mode == "disabled"


def test_null_override_for_optional():
    cfg = config_from_dict(req(), ["teacher.url=http://x:1", "teacher.model=null"])
    assert cfg.teacher.model is None


def test_unknown_keys_are_named_with_valid_ones():
    probs = problems_of({"learner": {"lrr": 1.0}, "bogus": 1})
    assert any(p.startswith("learner.lrr: unknown key") and "lr" in p and "zero_stage" in p for p in probs)
    assert any(p.startswith("bogus: unknown key") and "learner" in p for p in probs)


def test_bad_values_name_key_value_and_valid():
    probs = problems_of(req(), ["learner.zero_stage=4", "train.mode=fast", "learner.lr=abc",
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
    probs = problems_of(req(), ["loss.kind=jsd", "learner.lr=-1"])
    assert any("loss.kind=jsd needs the teacher's top-k support" in p and "teacher.top_k" in p for p in probs)
    assert any(p.startswith("learner.lr: -1") for p in probs)


def test_sampler_engine_process_and_cpu_binding():
    from cluster.config import parse_cpu_list

    assert parse_cpu_list("auto") is None and parse_cpu_list("nobind") is None
    assert parse_cpu_list("0-1,6") == [0, 1, 6] and parse_cpu_list("0-1|2-3") == [0, 1, 2, 3]
    probs = problems_of(req(), ["rollout.engine_process=inprocess", "rollout.tensor_parallel_size=2",
                             "cpu.sampler_threads=3-1"])
    assert any("engine_process=inprocess" in p and "tensor_parallel_size is 2" in p for p in probs)
    assert any(p.startswith("cpu.sampler_threads: '3-1'") for p in probs)
    cfg = config_from_dict(req(), ["rollout.engine_process=multiprocess", "rollout.tensor_parallel_size=2",
                                "cpu.sampler_threads=0-3|4-7"])
    assert cfg.rollout.engine_process == "multiprocess" and cfg.cpu.sampler_threads == "0-3|4-7"
    assert any("rollout.engine_process: 'fork' is not valid" in p
               for p in problems_of(req(), ["rollout.engine_process=fork"]))


def test_cpu_section_holds_the_cpu_only_knobs():
    cfg = config_from_dict(req(), ["cpu.learner_threads=2", "cpu.sampler_kv_cache_gib=3",
                                   "cpu.teacher_kv_cache_gib=2"])
    assert (cfg.cpu.learner_threads, cfg.cpu.sampler_kv_cache_gib, cfg.cpu.teacher_kv_cache_gib) == (2, 3.0, 2.0)
    probs = problems_of(req(), ["cpu.learner_threads=-1", "cpu.sampler_kv_cache_gib=0"])
    assert any(p.startswith("cpu.learner_threads: -1") for p in probs)
    assert any(p.startswith("cpu.sampler_kv_cache_gib: 0") for p in probs)
    # The old places of these keys say where each one went.
    probs = problems_of(req(), ["rollout.kv_cache_gib=2", "rollout.cpu_threads_bind=0", "teacher.kv_cache_gib=2",
                                "learner.cpu_threads=2"])
    for old, new in [("rollout.kv_cache_gib", "cpu.sampler_kv_cache_gib"),
                     ("rollout.cpu_threads_bind", "cpu.sampler_threads"),
                     ("teacher.kv_cache_gib", "cpu.teacher_kv_cache_gib"), ("learner.cpu_threads", "cpu.learner_threads")]:
        assert any(p.startswith(f"{old}: moved to {new}") for p in probs), (old, probs)


def test_lengths_must_fit_model():
    probs = problems_of(req(), ["rollout.max_new_tokens=4000"])
    assert any("exceeds student.max_model_len" in p for p in probs)


def test_teacher_needs_url_or_model():
    probs = problems_of(req(), ["teacher.model=null"])
    assert any("teacher.url" in p and "teacher.model" in p for p in probs)


def test_bad_override_syntax_and_section_type():
    probs = problems_of(req(), ["learner.lr", "learner=3", "learner.lr.x=1"])
    text = "\n".join(probs)
    assert "expected dotted.key=value" in text
    assert "learner: expected a mapping" in text
    assert "learner.lr.x=1': learner is a value, not a section" in text


def test_wrong_types_in_lists():
    probs = problems_of(req(), ["learner.betas=[0.9]", "rollout.stop_token_ids=[1, x]"])
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
    cfg = config_from_dict(req(), ["learner.lr=2e-5", "rollout.stop=['a']"])
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


def test_required_keys_and_cluster_defaults():
    """No demo values in the product: a config without a student or training
    data is refused naming both keys, and the defaults suit a GPU cluster
    (the demo's values live in configs/demo.yaml)."""
    probs = problems_of({})
    assert any(p.startswith("student.model: required") for p in probs), probs
    assert any(p.startswith("data.train: required") for p in probs), probs
    assert any("teacher.url" in p and "teacher.model" in p for p in probs), probs
    cfg = config_from_dict(req(teacher={"url": "http://t:8000"}))
    assert (cfg.student.dtype, cfg.teacher.dtype, cfg.learner.dtype) == ("auto", "auto", "auto")
    assert cfg.rollout.enforce_eager is False and cfg.rollout.gpu_memory_utilization == 0.9
    assert 1e-7 <= cfg.learner.lr <= 1e-5
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.student.model == "tiny:student" and demo.data.train == "tiny:arithmetic"
    assert (demo.student.dtype, demo.teacher.dtype, demo.learner.dtype) == ("float32",) * 3


def test_auto_dtypes_are_made_concrete_for_the_hardware():
    from cluster.train import with_concrete_dtypes

    cfg = config_from_dict(req(teacher={"url": "http://t:8000"}, learner={"dtype": "float32"}))
    gpu, cpu = with_concrete_dtypes(cfg, True), with_concrete_dtypes(cfg, False)
    assert (gpu.student.dtype, gpu.teacher.dtype, gpu.learner.dtype) == ("bfloat16", "bfloat16", "float32")
    assert (cpu.student.dtype, cpu.teacher.dtype, cpu.learner.dtype) == ("float32", "float32", "float32")


def test_engine_args_pass_through_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  engine_args:\n    enable_prefix_caching: true\n    compilation_config: {level: 3}\n"
                 "teacher:\n  engine_args: {quantization: fp8, max_num_seqs: 64}\n")
    cfg = load_config(p, [*(f"{s}.{k}={v}" for s, d in REQUIRED.items() for k, v in d.items()),
                          "rollout.engine_args.max_num_seqs=512"])
    assert cfg.rollout.engine_args == {"enable_prefix_caching": True, "compilation_config": {"level": 3},
                                       "max_num_seqs": 512}
    assert cfg.teacher.engine_args == {"quantization": "fp8", "max_num_seqs": 64}
    assert config_from_dict(to_dict(cfg)) == cfg
    assert Config().rollout.engine_args == {} and Config().teacher.engine_args == {}


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.engine_args.seed=3"], "rollout.engine_args.seed: opd sets this engine argument itself; set "
                                     "rollout.seed instead"),
    (["rollout.engine_args.dtype=half"], "set student.dtype instead"),
    (["rollout.engine_args.weight_transfer_config=x"], "rollout.engine_args.weight_transfer_config: opd sets this "
                                                       "engine argument itself"),
    (["rollout.engine_args.max_num_seq=8"], "rollout.engine_args.max_num_seq: not an engine argument of the "
                                            "installed vLLM (did you mean max_num_seqs"),
    (["rollout.engine_args=8"], "rollout.engine_args: expected a mapping of names to values, got 8"),
    (["rollout.engine_args.max_num_seqs=2001-12-14"], "rollout.engine_args.max_num_seqs: datetime.date(2001, 12, "
                                                      "14) is not plain data"),
    (["teacher.engine_args.max_model_len=9"], "set teacher.max_model_len instead"),
    (["teacher.engine_args.max_num_seqs=0"], "teacher.engine_args.max_num_seqs: 0 must be a positive integer"),
    (["teacher.url=http://h:8000", "teacher.engine_args.quantization=fp8"],
     "teacher.engine_args: set, but teacher.url is a running server"),
])
def test_bad_engine_args_are_named(overrides, expected):
    problems = problems_of(req(), overrides)
    assert any(expected in p for p in problems), problems


def test_learner_deepspeed_is_merged_into_the_deepspeed_config():
    from learner.worker import build_ds_config

    cfg = config_from_dict(req(learner={"zero_stage": 3, "deepspeed": {"zero_optimization": {
        "offload_optimizer": {"device": "cpu"}}}}), ["learner.deepspeed.zero_optimization.overlap_comm=true"])
    ds = build_ds_config(cfg.learner, world_size=2, overrides={"zero_optimization": {"reduce_bucket_size": 7}})
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True,
                                       "reduce_bucket_size": 7}
    assert ds["train_batch_size"] == 2 and ds["gradient_clipping"] == 1.0
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, expected", [
    ("learner.deepspeed.zero_optimization.stage=2", "learner.deepspeed.zero_optimization.stage: opd sets this "
                                                    "DeepSpeed key itself; set learner.zero_stage instead"),
    ("learner.deepspeed.bf16={enabled: true}", "learner.deepspeed.bf16: opd sets this DeepSpeed key itself; set "
                                               "learner.dtype instead"),
    ("learner.deepspeed.gradient_accumulation_steps=4", "set learner.micro_batch_tokens instead"),
    ("learner.deepspeed.optimizer={type: Adam}", "the optimizer is torch AdamW"),
    ("learner.deepspeed.zero_optimization=3", "learner.deepspeed.zero_optimization: 3 must be a mapping"),
])
def test_deepspeed_keys_opd_sets_are_refused(override, expected):
    problems = problems_of(req(), [override])
    assert any(expected in p for p in problems), problems
