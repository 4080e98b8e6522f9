"""bench/e2e.py's accounting: the FLOP floor's parameter count and the steps
an opd run takes (the async drain step is run, not measured)."""

from pathlib import Path

import pytest

from bench.e2e import Workload, drain_steps, matmul_params, opd_overrides, step_flops
from cluster.tiny_models import SPECS, VOCAB_SIZE


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_matmul_params_counts_every_linear_weight_of_the_architecture(name):
    """From the spec, by hand: per layer q and o (h x h), k and v
    (h x kv_heads * head_dim), gate, up and down (h x i each); the untied
    lm_head (V x h). Embeddings and norms are not matmuls."""
    s = SPECS[name]
    kv = s.num_kv_heads * s.head_dim
    per_layer = 2 * s.hidden_size ** 2 + 2 * s.hidden_size * kv + 3 * s.hidden_size * s.intermediate_size
    assert matmul_params(f"tiny:{name}") == s.num_layers * per_layer + VOCAB_SIZE * s.hidden_size


def test_step_flops_is_sampling_teacher_and_training_per_token():
    # 2 sequences of 3 prompt tokens, 5 completion tokens in all: 11 tokens;
    # per token 2 N_s (sampling) + 2 N_t (teacher) + 6 N_s (train).
    assert step_flops(10, 100, 2, 3.0, 5) == 11 * (2 * 10 + 2 * 100 + 6 * 10)


@pytest.mark.parametrize("mode,total", [("sync", 7), ("sync:c2", 7), ("async", 8), ("async:c2", 8)])
def test_an_async_run_takes_its_drain_step_after_the_measured_ones(mode, total):
    w = Workload(pair="small", student="tiny:student", teacher="tiny:teacher", prompts_per_step=2,
                 samples_per_prompt=2, max_new_tokens=4, lr=1e-3, warmup=3, steps=4)
    assert f"train.steps={total}" in opd_overrides(w, mode, Path("/tmp/x"), [])
    assert drain_steps(mode.split(":")[0]) == total - 7
