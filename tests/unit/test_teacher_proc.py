"""The driver-started teacher's pure logic (cluster/teacher_proc.py,
cluster/placement.py); the real server in its Ray actor is exercised by
tests/e2e/test_teacher_actor.py.

    .venv/bin/python -m pytest tests/unit/test_teacher_proc.py -q
"""

import os
import stat

import pytest

from cluster.config import LearnerConfig, PlacementConfig, RolloutConfig, TeacherConfig
from cluster.placement import PlacementError, RayInfo, make_placement
from cluster.teacher_proc import TeacherHandle, TeacherStartError, _run_key, bind_host, server_args


def test_the_server_listens_on_loopback_only_beside_the_driver():
    assert bind_host("node-a", "node-a", "10.0.0.7") == "127.0.0.1"
    assert bind_host("node-b", "node-a", "10.0.0.7") == "10.0.0.7"


def test_a_run_without_a_key_file_gets_a_private_random_key(tmp_path):
    (key, path, own), (key2, path2, _) = _run_key(TeacherConfig()), _run_key(TeacherConfig())
    try:
        assert own and len(key) >= 32 and open(path).read().strip() == key
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert key2 != key and path2 != path
    finally:
        for p in (path, path2):
            TeacherHandle("http://x", api_key_file=p, own_key_file=True).stop()
    assert not os.path.exists(path) and not os.path.exists(path2)


def test_a_configured_key_file_is_used_and_never_removed(tmp_path):
    f = tmp_path / "teacher.key"
    f.write_text("s3cret\n")
    key, path, own = _run_key(TeacherConfig(api_key_file=str(f)))
    assert (key, path, own) == ("s3cret", str(f), False)
    TeacherHandle("http://x", api_key_file=path, own_key_file=own).stop()
    assert f.exists()
    f.write_text("\n")
    with pytest.raises(TeacherStartError, match=r"teacher.api_key_file: .* is empty"):
        _run_key(TeacherConfig(api_key_file=str(f)))
    with pytest.raises(TeacherStartError, match=r"teacher.api_key_file: cannot read .*missing"):
        _run_key(TeacherConfig(api_key_file=str(tmp_path / "missing")))


def test_server_args_carry_the_teacher_config():
    args = server_args(TeacherConfig(dtype="bfloat16", max_model_len=1024, tensor_parallel_size=4), "/m")
    assert args == ["--model", "/m", "--dtype", "bfloat16", "--max-model-len", "1024", "--tensor-parallel-size", "4"]


def test_the_gpu_check_counts_the_teacher_the_driver_starts():
    rollout, learner = RolloutConfig(num_samplers=2), LearnerConfig(world_size=2)
    info = RayInfo(started_local=False, cluster_gpus=5.0)
    with pytest.raises(PlacementError, match=r"the run needs 6 GPUs \(2 samplers x 1 \+ 2 learner ranks, "
                                             r"placement.gpus_per_bundle=1 \+ 2 for the teacher the driver starts "
                                             r"\(teacher.tensor_parallel_size\)\) but the Ray cluster has 5.*"
                                             r"serve the teacher elsewhere \(teacher.url\)"):
        make_placement(PlacementConfig(), rollout, learner, info, teacher_tensor_parallel_size=2)


def test_teacher_engine_args_reach_the_server_as_its_flags_and_engine_args():
    import json

    from teacher_server.__main__ import parse_args

    tcfg = TeacherConfig(engine_args={"max_num_seqs": 64, "max_num_batched_tokens": 8192,
                                      "enable_prefix_caching": False, "quantization": "fp8"})
    args = server_args(tcfg, "/m")
    assert args[args.index("--max-num-seqs") + 1] == "64"
    assert args[args.index("--max-batch-tokens") + 1] == "8192"
    assert json.loads(args[args.index("--engine-args") + 1]) == {"enable_prefix_caching": False, "quantization": "fp8"}
    parsed = parse_args(args)
    assert (parsed.max_num_seqs, parsed.max_batch_tokens) == (64, 8192)
    assert parsed.engine_args == {"enable_prefix_caching": False, "quantization": "fp8"}
    assert "--engine-args" not in server_args(TeacherConfig(), "/m")


@pytest.mark.parametrize("value, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object of engine arguments, got list"),
    ('{"max_num_seqs": 3}', "--engine-args.max_num_seqs: opd sets this engine argument itself; set --max-num-seqs"),
    ('{"seed": 3}', "--engine-args.seed: opd sets this engine argument itself"),
    ('{"enable_prefix_cachin": true}', "not an engine argument of the installed vLLM (did you mean "
                                       "enable_prefix_caching"),
])
def test_teacher_server_refuses_bad_engine_args(value, message, capsys):
    from teacher_server.__main__ import parse_args

    with pytest.raises(SystemExit) as ei:
        parse_args(["--model", "/m", "--engine-args", value])
    assert ei.value.code == 2
    assert message in capsys.readouterr().err
