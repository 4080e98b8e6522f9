"""The student sampler (rollout/sampler.py) on a real vLLM CPU engine: sampled
token logprobs against transformers, prompt forms, seeds, stops, scoring;
a tensor-parallel (2-worker) sampler inside a placement group, with a weight push.

    .venv/bin/python -m pytest tests/e2e/test_sampler.py -q
"""

import math

import pytest
import ray

from tests.fixtures.sampler import reference_logprobs

PROMPTS = [
    "12+7=",
    [{"role": "user", "content": "What is 3*4?"}],
    [5, 40, 41, 42, 43],
]


def _check_against_hf(groups, hf, temperature, top_p):
    worst = 0.0
    for group in groups:
        for c in group:
            seq = c.prompt_ids + c.completion_ids
            ref = reference_logprobs(hf, seq, temperature, top_p)[len(c.prompt_ids) - 1:]
            assert len(ref) == len(c.sampler_logprobs)
            for got, want in zip(c.sampler_logprobs, ref, strict=True):
                assert math.isfinite(got) and math.isfinite(want), "sampled a token outside the top-p set"
                worst = max(worst, abs(got - want))
    assert worst < 1e-4, f"sampler logprobs differ from transformers by {worst}"


def test_sampled_logprobs_match_transformers_at_temperature_1(student_sampler, student_hf, tokenizer):
    groups = ray.get(student_sampler.generate.remote(PROMPTS, n=3, temperature=1.0, seed=11))
    assert [len(g) for g in groups] == [3, 3, 3]
    for p, group in enumerate(groups):
        for s, c in enumerate(group):
            assert (c.prompt_index, c.sample_index, c.policy_version) == (p, s, 0)
            assert c.finish_reason in ("stop", "length")
            assert 1 <= len(c.completion_ids) <= 12
    # The three prompt forms are tokenized as the tokenizer would.
    assert groups[0][0].prompt_ids == tokenizer("12+7=")["input_ids"]
    chat = tokenizer.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    assert groups[1][0].prompt_ids == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert groups[2][0].prompt_ids == PROMPTS[2]
    _check_against_hf(groups, student_hf, 1.0, 1.0)


def test_sampled_logprobs_are_of_the_processed_distribution(student_sampler, student_hf):
    """At temperature 0.7 and top-p 0.9 the logprob is of the distribution
    actually sampled from (what an importance ratio needs), not the raw one."""
    groups = ray.get(student_sampler.generate.remote(PROMPTS, n=4, temperature=0.7, top_p=0.9, seed=5))
    _check_against_hf(groups, student_hf, 0.7, 0.9)
    # ...and it is measurably not the raw distribution.
    c = groups[0][0]
    raw = reference_logprobs(student_hf, c.prompt_ids + c.completion_ids)[len(c.prompt_ids) - 1:]
    assert max(abs(a - b) for a, b in zip(c.sampler_logprobs, raw, strict=True)) > 1e-2


def test_seed_makes_sampling_reproducible(student_sampler):
    a = ray.get(student_sampler.generate.remote(PROMPTS[:2], n=2, seed=3))
    b = ray.get(student_sampler.generate.remote(PROMPTS[:2], n=2, seed=3))
    c = ray.get(student_sampler.generate.remote(PROMPTS[:2], n=2, seed=4))
    ids = lambda g: [[x.completion_ids for x in grp] for grp in g]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # The n samples of one prompt differ from each other.
    assert a[0][0].completion_ids != a[0][1].completion_ids


def test_stop_tokens_and_max_new_tokens(student_sampler):
    stopped = ray.get(student_sampler.generate.remote(PROMPTS[:1], n=2, stop_token_ids=list(range(320)), seed=1))
    for c in stopped[0]:
        assert c.finish_reason == "stop" and len(c.completion_ids) == 1
    short = ray.get(student_sampler.generate.remote(PROMPTS[:1], n=1, max_new_tokens=3, seed=1))
    assert short[0][0].finish_reason == "length" and len(short[0][0].completion_ids) == 3


def test_score_matches_transformers(student_sampler, student_hf):
    seqs = [[5, 40, 41, 42, 43, 44, 45], [1, 80, 81, 82]]
    got = ray.get(student_sampler.score.remote(seqs, [1, 2]))
    want = [reference_logprobs(student_hf, seqs[0]), reference_logprobs(student_hf, seqs[1])[1:]]
    assert [len(g) for g in got] == [6, 2]
    assert max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)) < 1e-4


def test_bad_prompt_is_a_clear_error(student_sampler):
    with pytest.raises(Exception, match=r"prompt 1 is a float"):
        ray.get(student_sampler.generate.remote(["ok", 3.5]))
    with pytest.raises(Exception, match=r"start 0 of sequence 0"):
        ray.get(student_sampler.score.remote([[1, 2, 3]], 0))


def test_tensor_parallel_sampler_in_a_placement_group(ray_session, student_path, student_hf):
    """A sampler with tensor_parallel_size=2 inside a placement-group bundle,
    as the driver places it. Left to choose, vLLM takes its Ray executor
    whenever it runs in a placement group (vllm/config/parallel.py), which
    refuses bundles of more than one GPU and any CPU platform ("current
    platform cpu does not support ray"); the sampler names vLLM's local "mp"
    executor, whose 2 workers then serve, take a weight push (one transfer
    rank each) and score like transformers. It also runs with engine
    arguments of the user's (rollout.engine_args)."""
    import copy

    import torch
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from learner.weight_sender import GlooWeightSender, specs_from_named
    from rollout.config import CpuConfig
    from rollout.pool import SamplerPool
    from rollout.host import free_port
    from tests.fixtures.sampler import sampler_configs

    # One engine worker per core: vLLM's CPU worker binds each rank's threads.
    # rollout.engine_args reach vLLM as given (and a max_num_seqs below the
    # batch only queues sequences: the samples still match transformers).
    rollout_cfg, student_cfg = sampler_configs(tensor_parallel_size=2, cpus_per_sampler=2.0,
                                               engine_args={"max_num_seqs": 3, "enable_prefix_caching": False})
    pg = placement_group([{"CPU": 2.0}], strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    bundle = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                              placement_group_capture_child_tasks=True)
    pool = sender = None
    try:
        pool = SamplerPool.create(student_path, rollout_cfg, student_cfg, scheduling_strategies=[bundle],
                                  num_gpus_per_sampler=0, cpu_cfg=CpuConfig(sampler_threads="0|1"))
        assert pool.num_workers() == [2]
        [engine] = pool.engine_configs()
        assert (engine["max_num_seqs"], engine["enable_prefix_caching"], engine["dtype"]) == (3, False, "float32")
        _check_against_hf(pool.generate(PROMPTS, n=2, temperature=1.0, seed=7), student_hf, 1.0, 1.0)

        new = copy.deepcopy(student_hf)
        gen = torch.Generator().manual_seed(13)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        sender = GlooWeightSender(pool, "127.0.0.1", free_port(), bucket_bytes=96 << 10, timeout_s=120.0)
        sender.connect()
        named = [(n, p.detach()) for n, p in new.named_parameters()]
        sender.send(1, specs_from_named(named), iter(named))
        assert pool.weight_versions() == [1]
        seqs = [[5, 40, 41, 42, 43, 44, 45], [1, 80, 81, 82]]
        got = pool.score(seqs)
        want = [reference_logprobs(new, s) for s in seqs]
        assert max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)) < 1e-4
    finally:
        if sender is not None:
            sender.shutdown()
        if pool is not None:
            pool.shutdown()
        remove_placement_group(pg)
