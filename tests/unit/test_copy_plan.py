"""rollout/copy_plan.py: a model's weight loading, recorded once and replayed
as plain copies, must leave the model exactly as its own `load_weights`
would, and must refuse (falling back to `load_weights`) whenever the loader
does anything a replay of copies would not reproduce.

    .venv/bin/python -m pytest tests/unit/test_copy_plan.py -q
"""

import pytest
import torch

from rollout.copy_plan import CopyPlan

QKV = {"q": 0, "k": 2, "v": 4}


class Toy(torch.nn.Module):
    """vLLM-like loading: q/k/v fused into one parameter (narrowed copies), a
    vocabulary padded past the checkpoint's rows (copy, then zero the pad),
    a plain copy, a tied name the loader skips, and a buffer."""

    def __init__(self, mode: str = "ok"):
        super().__init__()
        self.mode = mode
        self.qkv = torch.nn.Parameter(torch.full((6, 4), 7.0))
        self.emb = torch.nn.Parameter(torch.full((5, 4), 7.0))
        self.norm = torch.nn.Parameter(torch.full((4,), 7.0))
        self.register_buffer("scale", torch.ones(4))
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        for name, w in weights:
            if name in QKV:
                dst = self.qkv.data.narrow(0, QKV[name], 2)
                if self.mode == "transposed" and name == "k":
                    dst.copy_(w.t().t().contiguous() * 1.0)  # a computed source
                else:
                    dst.copy_(w)
            elif name == "emb":
                self.emb.data[: w.shape[0]].copy_(w)
                self.emb.data[w.shape[0]:].fill_(0.0)
                if self.mode == "fill_over_copy":
                    self.emb.data[0].fill_(1.0)
            elif name == "norm":
                if self.mode == "temporary":
                    tmp = torch.empty_like(w)
                    tmp.copy_(w)
                    self.norm.data = tmp
                else:
                    self.norm.data.copy_(w)
                if self.mode == "scaled":
                    self.norm.data.mul_(2.0)
            elif name == "lm_head" and self.mode == "tied_copy":
                self.emb.data[: w.shape[0]].copy_(w)  # last writer wins: order matters
            elif name == "lm_head":
                pass  # tied to emb: vLLM's loaders skip it


def weights(seed: int, vocab: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [("q", torch.randn(2, 4, generator=g)), ("k", torch.randn(2, 4, generator=g)),
            ("v", torch.randn(2, 4, generator=g)), ("emb", torch.randn(vocab, 4, generator=g)),
            ("norm", torch.randn(4, generator=g)), ("lm_head", torch.randn(vocab, 4, generator=g))]


def reference(ws, mode: str = "ok") -> dict:
    model = Toy(mode)
    with torch.no_grad():
        model.load_weights(ws)
    return {k: v.clone() for k, v in model.state_dict().items()}


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def plan_for(model) -> CopyPlan:
    return CopyPlan([*model.parameters(), *model.buffers()])


def test_replay_lands_every_byte_where_the_loader_puts_it():
    model = Toy()
    plan = plan_for(model)
    with torch.no_grad():
        assert plan.load(model.load_weights, weights(1)) == 0  # first sight: the loader runs, recorded
        assert model.calls == 1 and plan.refused is None
        assert_same(state(model), reference(weights(1)))
        # Bucketed like an update: later loads are replayed, the loader is not called.
        ws = weights(2)
        assert plan.load(model.load_weights, ws[:4]) == 4
        assert plan.load(model.load_weights, ws[4:]) == 2
    assert model.calls == 1
    assert_same(state(model), reference(weights(2)))


def test_names_first_seen_later_are_recorded_then_replayed():
    model = Toy()
    plan = plan_for(model)
    ws = weights(1)
    with torch.no_grad():
        plan.load(model.load_weights, ws[:2])
        assert plan.load(model.load_weights, weights(2)) == 2  # q, k replayed; v, emb, norm, lm_head recorded
        assert model.calls == 2
        assert plan.load(model.load_weights, weights(3)) == 6
    assert model.calls == 2
    assert_same(state(model), reference(weights(3)))


def test_a_new_shape_is_loaded_by_the_loader_not_replayed():
    model = Toy()
    plan = plan_for(model)
    with torch.no_grad():
        plan.load(model.load_weights, weights(1, vocab=3))
        assert plan.load(model.load_weights, weights(2, vocab=4)) == 4  # emb and lm_head changed shape
        assert plan.refused is None  # the re-recorded emb replaces its old copies, it does not clash with them
        assert plan.load(model.load_weights, weights(3, vocab=4)) == 6
    assert model.calls == 2
    assert_same(state(model), reference(weights(3, vocab=4)))


@pytest.mark.parametrize("mode,why", [
    ("transposed", "not an incoming weight as sent"),
    ("scaled", "calls mul_"),
    ("temporary", "calls __set__|outside the model"),
    ("fill_over_copy", "fill overlaps a copied region"),
    ("tied_copy", "two copies write the same memory"),
])
def test_anything_but_whole_copies_turns_replay_off_and_the_loader_keeps_loading(mode, why):
    model = Toy(mode)
    plan = plan_for(model)
    with torch.no_grad():
        assert plan.load(model.load_weights, weights(1)) == 0
        assert plan.refused is not None and __import__("re").search(why, plan.refused), plan.refused
        for seed in (2, 3):
            assert plan.load(model.load_weights, weights(seed)) == 0
            assert_same(state(model), reference(weights(seed), mode))
    assert model.calls == 3


def test_sources_that_share_memory_are_not_replayed():
    """Two names backed by the same bytes cannot be told apart by address."""
    model = Toy()
    plan = plan_for(model)
    ws = weights(1)
    ws[1] = ("k", ws[0][1])  # k is q's tensor
    with torch.no_grad():
        plan.load(model.load_weights, ws)
        assert plan.refused == "two incoming tensors share memory"
        assert plan.load(model.load_weights, weights(2)) == 0
    assert_same(state(model), reference(weights(2)))


def test_the_reload_rotary_warning_is_dropped_and_others_kept():
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights"
    at every onednn update (its cos/sin cache is in no checkpoint, and vLLM
    keeps it); rollout.weight_receiver filters that record on vLLM's own
    logger and nothing else."""
    import logging

    import rollout.weight_receiver  # noqa: F401 - installs the filter
    from vllm.model_executor.model_loader.reload import layerwise

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep(level=logging.DEBUG)
    layerwise.logger.addHandler(h)
    try:
        layerwise.logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        layerwise.logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    finally:
        layerwise.logger.removeHandler(h)
    assert seen == ["QKVParallelLinear: Failed to load weights"]
