"""LoRA students without Ray, vLLM or DeepSpeed: which modules get adapters,
the config's errors (each naming its key, all at once, before any actor
starts), the merged export's names and values against peft's own merge, and
the adapter files against peft's loader.

    .venv/bin/python -m pytest tests/unit/test_lora.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from cluster.config import ConfigError, config_from_dict
from learner.config import LoraConfig
from learner.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_files,
    adapter_params,
    check_student,
    default_target_modules,
    export_items,
    match_target_modules,
    wrap,
)
from rollout.weight_sync import write_adapter

LAYER = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "lm_head"]


def test_targets_match_whole_name_components():
    matched, missing = match_target_modules(LAYER, ["q_proj", "mlp.down_proj", "nope", "proj"])
    assert matched == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                       "model.layers.1.self_attn.q_proj"]
    # "proj" is not a suffix of whole name components ("q_proj" ends in "_proj").
    assert missing == ["nope", "proj"]
    assert match_target_modules(LAYER, ["lm_head"]) == (["lm_head"], [])


def test_default_targets_are_every_block_linear_but_the_head():
    assert default_target_modules(LAYER, "lm_head") == ["q_proj", "o_proj", "down_proj"]
    assert default_target_modules(["lm_head"], "lm_head") == []


def _problems(**lora) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"student": {"model": "tiny:student"}, "data": {"train": "tiny:arithmetic"},
                          "teacher": {"model": "tiny:teacher"}, "learner": {"lora": lora}})
    return e.value.problems


def test_config_errors_name_the_key_all_at_once():
    got = _problems(rank=-1, alpha=0, dropout=1.0, target_modules=["q_proj", " "], bogus=1)
    text = "\n".join(got)
    for key in ("learner.lora.rank", "learner.lora.dropout", "learner.lora.target_modules",
                "learner.lora.bogus: unknown key"):
        assert key in text, text
    assert any("learner.lora.rank: 600 is above 512" in p for p in _problems(rank=600))
    assert any(p.startswith("learner.lora.alpha") for p in _problems(rank=8, alpha=0))
    # Full fine-tuning is the default; rank 0 ignores alpha.
    assert config_from_dict({"student": {"model": "x"}, "data": {"train": "y"}, "teacher": {"url": "http://t"},
                             "learner": {"lora": {"rank": 0, "alpha": 0}}}).learner.lora.rank == 0


@pytest.fixture(scope="module")
def tiny_student(student_path):
    return student_path


def test_check_student_accepts_the_default_and_names_bad_targets(tiny_student, tmp_path):
    assert check_student(tiny_student, LoraConfig(rank=0, target_modules=("nope",))) == []
    assert check_student(tiny_student, LoraConfig(rank=8)) == []
    assert check_student(tiny_student, LoraConfig(rank=8, target_modules=("q_proj", "mlp.up_proj"))) == []
    [p] = check_student(tiny_student, LoraConfig(rank=8, target_modules=("q_proj", "attn_proj")))
    assert p.startswith("learner.lora.target_modules: ['attn_proj'] match no module") and "down_proj" in p, p
    # A module peft cannot adapt (a norm): peft's refusal, under the key.
    [p] = check_student(tiny_student, LoraConfig(rank=8, target_modules=("input_layernorm",)))
    assert p.startswith("learner.lora: peft cannot put LoRA adapters") and "not supported" in p, p
    # An architecture transformers cannot build.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    [p] = check_student(str(bad), LoraConfig(rank=8))
    assert p.startswith("learner.lora.rank=8: cannot build the student"), p


def test_driver_exits_2_before_any_actor(tiny_student, tmp_path, capsys, monkeypatch):
    """A bad target module stops the real command with exit code 2 before Ray
    (or any actor) starts: the driver never connects to Ray. (The test
    session may hold a Ray cluster of its own, so ray.is_initialized() says
    nothing here.)"""
    import cluster.placement
    from cluster.train import main

    def no_ray(*a, **k):
        raise AssertionError("the driver connected to Ray despite a bad LoRA setting")

    monkeypatch.setattr(cluster.placement, "connect", no_ray)
    rc = main(["--config", "configs/demo.yaml", f"run.dir={tmp_path / 'run'}", "learner.lora.rank=8",
               "learner.lora.target_modules=[qq_proj]", "log.wandb.mode=disabled"])
    assert rc == 2
    assert "learner.lora.target_modules: ['qq_proj'] match no module" in capsys.readouterr().err
    assert not (tmp_path / "run" / "placement.json").exists()


def _peft_student(student_path, **lora):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    peft_model = wrap(model, LoraConfig(**lora), student_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (B = 0 at init would merge to the base)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model


def test_merged_export_is_the_base_layout_and_peft_merge(tiny_student):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    peft_model = _peft_student(tiny_student, rank=4, alpha=8.0, target_modules=("q_proj", "down_proj"))
    items = export_items(peft_model, lambda n: n)
    assert [it.name for it in items] == [n for n, _ in base.named_parameters()]
    merged = {it.name: it.make() for it in items}
    reference = peft_model.merge_and_unload().state_dict()  # peft's own merge (mutates the model)
    for n, t in merged.items():
        assert torch.allclose(t, reference[n], rtol=0, atol=1e-6), n
        assert torch.equal(t, base.state_dict()[n]) == (not n.endswith(("q_proj.weight", "down_proj.weight"))), n


def test_adapter_files_load_in_peft(tiny_student, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = _peft_student(tiny_student, rank=8, alpha=16.0).eval()
    named = adapter_params(peft_model, lambda n: n)
    assert named and all(".lora_A.weight" in k or ".lora_B.weight" in k for k, _ in named)
    files = adapter_files({k: p.detach() for k, p in named}, peft_model.peft_config["default"])
    assert set(files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    cfg = json.loads(files[ADAPTER_CONFIG])
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    d = write_adapter(tmp_path / "adapter", files)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32),
                                       str(d)).eval()
    ids = torch.tensor([[3, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, peft_model(ids).logits)
    with pytest.raises(ValueError, match="not a plain file name"):
        write_adapter(tmp_path / "x", {"../evil": b""})


def test_vllm_max_lora_rank_is_the_next_served_rank():
    from rollout.sampler import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="above 512"):
        vllm_max_lora_rank(513)
