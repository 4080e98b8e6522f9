"""KV cache of the CPU engines (rollout/host.py kv_cache_size, cluster/train.py
batch_sequences / with_sampler_kv_cache) and Ray's idle workers on a local
cluster (cluster/placement.py local_ray_system_config).

    .venv/bin/python -m pytest tests/unit/test_kv_cache_size.py -q
"""

import json

import pytest

from cluster.config import config_from_dict
from cluster.placement import LOCAL_RAY_SYSTEM_CONFIG, local_ray_system_config
from cluster.train import batch_sequences, with_sampler_kv_cache
from rollout.host import (GiB, KV_AUTO_FLOOR_BYTES, KV_BLOCK_TOKENS, KV_FALLBACK_BYTES, KV_MAX_SEQS, MiB,
                          kv_bytes_per_token, kv_cache_size)

REQ = {"student": {"model": "org/student"}, "teacher": {"model": "org/teacher"}, "data": {"train": "p.jsonl"}}
# tiny:student-25m's shape: 8 layers, 8 heads of 64 (hidden 512), 4 KV heads.
STUDENT = {"num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 512}


def model_dir(tmp_path, config: dict, name: str = "m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_bytes_per_token_from_the_config(tmp_path):
    d = model_dir(tmp_path, STUDENT)
    # 2 (K and V) x 8 layers x 4 KV heads x 64 head dim x 4 bytes
    assert kv_bytes_per_token(d, "float32") == 2 * 8 * 4 * 64 * 4 == 16384
    assert kv_bytes_per_token(d, "bfloat16") == 8192
    # An explicit head_dim wins over hidden / heads; no num_key_value_heads means MHA.
    d2 = model_dir(tmp_path, {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "head_dim": 32},
                   "explicit")
    assert kv_bytes_per_token(d2, "float32") == 2 * 2 * 4 * 32 * 4
    # A multimodal config keeps the language model's shape in text_config.
    d3 = model_dir(tmp_path, {"text_config": STUDENT, "vision_config": {"num_hidden_layers": 99}}, "vlm")
    assert kv_bytes_per_token(d3, "float32") == 16384


def test_bytes_per_token_unknown(tmp_path):
    assert kv_bytes_per_token(tmp_path / "missing", "float32") is None
    assert kv_bytes_per_token(model_dir(tmp_path, {"num_hidden_layers": 8}), "float32") is None
    assert kv_bytes_per_token(model_dir(tmp_path, STUDENT, "s"), "auto") is None


def test_auto_holds_the_batch_in_whole_blocks_plus_one_sequence(tmp_path):
    d = model_dir(tmp_path, STUDENT)
    size = kv_cache_size("auto", d, "float32", seqs=32, seq_tokens=96, max_model_len=256)
    # 96 tokens round up to one 128-token block; 32 sequences + 1 spare.
    assert size.bytes == 33 * KV_BLOCK_TOKENS * 16384 == 66 * MiB
    assert "33 sequences x 128 tokens x 16 KiB per token = 66.0 MiB" in size.reason and "cpu.sampler_kv_cache_gib=auto" in size.reason
    # Longer sequences take more blocks each.
    assert kv_cache_size("auto", d, "float32", seqs=32, seq_tokens=129).bytes == 33 * 256 * 16384


def test_auto_floors_and_caps(tmp_path):
    d = model_dir(tmp_path, STUDENT)
    # One short sequence: the floor.
    small = kv_cache_size("auto", d, "float32", seqs=1, seq_tokens=8)
    assert small.bytes == KV_AUTO_FLOOR_BYTES and "raised to the floor of 64 MiB" in small.reason
    # At least one sequence of max_model_len (plus a block): vLLM refuses to start below it.
    size = kv_cache_size("auto", d, "float32", seqs=1, seq_tokens=8, max_model_len=8192)
    assert size.bytes == (8192 + KV_BLOCK_TOKENS) * 16384 > KV_AUTO_FLOOR_BYTES
    assert "raised to one 8192-token sequence" in size.reason
    # No more sequences than the engine runs at once.
    big = kv_cache_size("auto", d, "float32", seqs=10_000, seq_tokens=128)
    assert big.bytes == (KV_MAX_SEQS + 1) * 128 * 16384


def test_a_number_is_taken_as_gib_and_unknown_models_fall_back(tmp_path):
    d = model_dir(tmp_path, STUDENT)
    assert kv_cache_size(0.25, d, "float32", seqs=32, seq_tokens=96).bytes == GiB // 4
    assert kv_cache_size(2, d, "float32", seqs=32, seq_tokens=96).bytes == 2 * GiB
    size = kv_cache_size("auto", tmp_path / "nothing", "float32", seqs=32, seq_tokens=96,
                         key="cpu.teacher_kv_cache_gib")
    assert size.bytes == KV_FALLBACK_BYTES and "set cpu.teacher_kv_cache_gib" in size.reason


def test_the_driver_sizes_the_sampler_to_a_step_or_an_eval(tmp_path):
    d = model_dir(tmp_path, STUDENT)
    base = ["train.prompts_per_step=8", "rollout.samples_per_prompt=4", "data.max_prompt_tokens=64",
            "rollout.max_new_tokens=32", "student.max_model_len=256", "student.dtype=float32"]
    cfg = config_from_dict(REQ, base + ["eval.every_steps=0"])
    assert batch_sequences(cfg) == 32
    resolved = with_sampler_kv_cache(cfg, str(d))
    assert resolved.cpu.sampler_kv_cache_gib * GiB == 33 * 128 * 16384
    # An eval with more sequences than a step sizes it; a number stays as given.
    cfg = config_from_dict(REQ, base + ["eval.every_steps=5", "eval.num_prompts=48"])
    assert batch_sequences(cfg) == 48
    cfg = config_from_dict(REQ, base + ["cpu.sampler_kv_cache_gib=0.5"])
    assert with_sampler_kv_cache(cfg, str(d)).cpu.sampler_kv_cache_gib == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "big", "true"])
def test_bad_kv_cache_values_name_the_key(value):
    from cluster.config import ConfigError

    for key in ("cpu.sampler_kv_cache_gib", "cpu.teacher_kv_cache_gib"):
        with pytest.raises(ConfigError) as e:
            config_from_dict(REQ, [f"{key}={value}"])
        assert key in str(e.value)


def test_defaults_are_auto():
    cfg = config_from_dict(REQ, [])
    assert (cfg.cpu.sampler_kv_cache_gib, cfg.cpu.teacher_kv_cache_gib) == ("auto", "auto")


def test_local_ray_keeps_no_idle_workers_unless_the_environment_says_so():
    assert local_ray_system_config({}) == LOCAL_RAY_SYSTEM_CONFIG
    assert LOCAL_RAY_SYSTEM_CONFIG["num_workers_soft_limit"] == 0
    left = local_ray_system_config({"RAY_num_workers_soft_limit": "-1"})
    assert "num_workers_soft_limit" not in left and left["enable_worker_prestart"] is False


@pytest.mark.parametrize("where", ["env", "config"])
def test_address_local_starts_a_local_cluster_with_the_drivers_settings(monkeypatch, where):
    """RAY_ADDRESS=local is Ray's spelling of "start a new local cluster": it
    must get placement.local_num_cpus and the settings above, not Ray's
    defaults (one CPU per core, where a one-node run's roles cannot all be
    placed). Any other address is joined as given."""
    import ray

    from cluster.config import PlacementConfig
    from cluster.placement import connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", "local")
    info = connect(PlacementConfig(local_num_cpus=8, ray_address="local" if where == "config" else None))
    (kw,) = calls
    assert info.started_local
    assert kw["address"] == "local" and kw["num_cpus"] == 8 and kw["include_dashboard"] is False
    assert kw["_system_config"] == local_ray_system_config()

    calls.clear()
    info = connect(PlacementConfig(local_num_cpus=8, ray_address="10.0.0.1:6379"))
    (kw,) = calls
    assert not info.started_local
    assert kw["address"] == "10.0.0.1:6379" and "num_cpus" not in kw and "_system_config" not in kw
