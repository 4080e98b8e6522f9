"""A learner weight push reaches a real vLLM CPU sampler exactly.

A miniature on-policy loop with real parts: a SamplerPool (vLLM CPU, its
engine in a separate process as on GPU) samples
completions, the teacher (transformers) scores them, a 2-rank ZeRO-3
LearnerGroup (DeepSpeed on gloo) trains on them, and rank 0 pushes the
gathered weights over the gloo transport (learner/weight_sender.py ->
rollout/weight_receiver.py) in several buckets. Afterwards the sampler's
logprobs of the same tokens equal the learner's own (1e-4), both as scored
(temperature 1) and as sampled at temperature 0.8 (processed logprobs vs the
learner's logits / temperature).

    .venv/bin/python -m pytest tests/e2e/test_learner_sync.py -x -q
"""

from __future__ import annotations

import pytest
import ray
import torch

from cluster.config import LearnerConfig, LossConfig
from learner.group import LearnerGroup
from rollout.types import RolloutBatch
from tests.fixtures.sampler import sampler_configs

TEMPERATURE = 0.8


def _batch_from(completions_P_G, teacher_path) -> RolloutBatch:
    from transformers import AutoModelForCausalLM

    flat = [c for row in completions_P_G for c in row if c.completion_ids]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    t_lp = []
    with torch.no_grad():
        for c in flat:
            logits = teacher(torch.tensor([c.prompt_ids + c.completion_ids])).logits[0].double()
            lp = torch.log_softmax(logits[len(c.prompt_ids) - 1: -1], -1)
            t_lp.append(lp.gather(-1, torch.tensor(c.completion_ids)[:, None]).squeeze(-1).tolist())
    return RolloutBatch(
        prompt_ids_B_T=[c.prompt_ids for c in flat], completion_ids_B_T=[c.completion_ids for c in flat],
        sampler_logprobs_B_T=[c.sampler_logprobs for c in flat],
        loss_mask_B_T=[[1] * len(c.completion_ids) for c in flat], policy_versions_B=[c.policy_version for c in flat],
        prompt_index_B=[c.prompt_index for c in flat], finish_reasons_B=[c.finish_reason for c in flat],
        teacher_logprobs_B_T=t_lp)


def _max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.fixture(scope="module")
def loop(ray_session, student_path):
    from rollout.pool import SamplerPool

    # vLLM's own engine-core process (the GPU default; CPU samplers default to
    # an in-process engine): collective_rpc then crosses a process boundary,
    # and the opd_gloo weight-transfer engine must be registered in that process too.
    rollout_cfg, student_cfg = sampler_configs(temperature=TEMPERATURE, max_new_tokens=10,
                                               engine_process="multiprocess")
    pool = SamplerPool.create(student_path, rollout_cfg, student_cfg, num_samplers=1)
    group = None
    try:
        cfg = LearnerConfig(world_size=2, zero_stage=3, lr=3e-3, micro_batch_tokens=256, collective_timeout_s=300.0)
        group = LearnerGroup.create(student_path, cfg, LossConfig(), seed=0,
                                    ds_config_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
        # Small buckets: the tiny student (~0.2M params) crosses in several.
        group.init_weight_sync(pool, backend="gloo", bucket_bytes=256 << 10, timeout_s=120.0)
        yield pool, group
    finally:
        if group is not None:
            group.shutdown()
        pool.shutdown()


def test_push_makes_sampler_match_learner(loop, tokenizer, teacher_path):
    pool, group = loop
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for t in ("1+1=", "Name a color.")]
    batch = _batch_from(pool.generate(prompts, n=2, seed=1), teacher_path)
    # Before training the learner already agrees with the sampler (same initial
    # weights; sampler logprobs are processed at the sampling temperature).
    lp0 = group.logprobs(batch, temperature=TEMPERATURE)
    d = _max_diff(lp0, batch.sampler_logprobs_B_T)
    assert d < 1e-4, d

    m = [group.train_step(batch, step=s, temperature=TEMPERATURE) for s in range(2)]
    assert m[0]["learner/logprob_abs_diff"] < 1e-4
    seqs = [p + c for p, c in zip(batch.prompt_ids_B_T, batch.completion_ids_B_T, strict=True)]
    starts = [len(p) for p in batch.prompt_ids_B_T]
    learner_t1 = group.logprobs(batch, temperature=1.0)
    stale = pool.score(seqs, starts)
    d = _max_diff(stale, learner_t1)
    assert d > 1e-3, d  # training moved the learner away from the sampler

    stats = group.push_weights(pool, version=1)
    assert pool.weight_versions() == [1]
    assert stats["sync/buckets"] >= 2
    d = _max_diff(pool.score(seqs, starts), learner_t1)
    assert d < 1e-4, d

    # Fresh samples from the updated sampler at temperature 0.8: their
    # processed logprobs equal the learner's logits/0.8 logprobs.
    fresh = pool.generate(prompts, n=2, seed=2)
    assert all(c.policy_version == 1 for row in fresh for c in row)
    batch2 = _batch_from(fresh, teacher_path)
    d = _max_diff(group.logprobs(batch2, temperature=TEMPERATURE), batch2.sampler_logprobs_B_T)
    assert d < 1e-4, d


def test_lora_merged_push_to_a_sampler_without_adapters(loop, tokenizer, teacher_path, student_path):
    """The fallback for samplers that cannot serve LoRA adapters (this pool's
    were started without a LoRA rank): a LoRA learner pushes its merged
    weights over the same gloo transport (base names and shapes), and the
    sampler then scores like the adapted learner."""
    from learner.config import LoraConfig

    pool, _ = loop
    cfg = LearnerConfig(world_size=1, zero_stage=0, lr=1e-2, micro_batch_tokens=256, collective_timeout_s=300.0,
                        lora=LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")))
    group = LearnerGroup.create(student_path, cfg, LossConfig(), seed=0)
    try:
        assert not pool.serves_lora_adapters()
        chosen = group.init_weight_sync(pool, backend="gloo", bucket_bytes=256 << 10, timeout_s=120.0)
        assert chosen == "gloo (merged LoRA weights: the samplers cannot serve adapters)", chosen
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)]
        batch = _batch_from(pool.generate(prompts, n=4, seed=3), teacher_path)
        for s in range(2):
            group.train_step(batch, step=s, temperature=TEMPERATURE)
        seqs = [p + c for p, c in zip(batch.prompt_ids_B_T, batch.completion_ids_B_T, strict=True)]
        starts = [len(p) for p in batch.prompt_ids_B_T]
        learner_t1 = group.logprobs(batch, temperature=1.0)
        version = max(pool.weight_versions()) + 1
        stats = group.push_weights(pool, version=version)
        assert pool.weight_versions() == [version] and stats["sync/bytes"] > 0
        d = _max_diff(pool.score(seqs, starts), learner_t1)
        assert d < 1e-4, d
    finally:
        group.shutdown()
