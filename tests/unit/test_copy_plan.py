"""rollout/copy_plan.py: a model's weight loading, recorded once and replayed
as plain copies, must leave the model exactly as its own `load_weights`
would, and must refuse (falling back to `load_weights`) whenever the loader
does anything a replay of copies would not reproduce.

    .venv/bin/python -m pytest tests/unit/test_copy_plan.py -q
"""

import pytest
import torch

from rollout.copy_plan import CopyPlan, param_layout
from rollout.weight_sync import dest_views, layout_id, param_slots, plan_param_region

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
                if self.mode == "uneven_pad":
                    self.emb.data[-1].fill_(1.0)
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
                if self.mode == "buffer":
                    self.scale.copy_(w)
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


NAMES = [n for n, _ in weights(0)]


def loaded(mode: str = "ok", seed: int = 1, vocab: int = 3):
    model = Toy(mode)
    plan = plan_for(model)
    with torch.no_grad():
        plan.load(model.load_weights, weights(seed, vocab))
    return model, plan


def test_a_shared_region_laid_out_by_the_plan_holds_what_the_loader_would():
    """The shm transport's shared mode: the sender writes each tensor into the
    region through the layout's views, the sampler's parameters become the
    region's slots; the model must then equal a model loaded by its own loader."""
    model, plan = loaded()
    layout, why = param_layout(plan, model.named_parameters(), NAMES)
    assert why is None
    assert [p[0] for p in layout["params"]] == ["qkv", "emb", "norm"]  # the buffer is not shared
    assert layout["fill"] == [None, 0.0, None]  # the vocabulary padding: one value, no copy writes it
    # Sender side: a fresh region, its fills, then the tensors through the views.
    offsets, nbytes = plan_param_region(layout)
    assert offsets[0] >= 4096 and all(o % 4096 == 0 for o in offsets)
    region = torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # garbage: the fills must cover it
    slots = param_slots(region, layout)
    for slot, value in zip(slots, layout["fill"], strict=True):
        if value is not None:
            slot.fill_(value)
    dests = dest_views(slots, layout)
    assert {n: len(v) for n, v in dests.items()} == {"q": 1, "k": 1, "v": 1, "emb": 1, "norm": 1, "lm_head": 0}
    for name, t in weights(2):
        for view in dests[name]:
            view.copy_(t)
    # Receiver side: the parameters adopt their slots.
    params = dict(model.named_parameters())
    for (name, _, _), slot in zip(layout["params"], slots, strict=True):
        params[name].data = slot
    assert_same(state(model), reference(weights(2)))
    # The next write lands in the model directly.
    for name, t in weights(3):
        for view in dests[name]:
            view.copy_(t)
    assert_same(state(model), reference(weights(3)))


def test_equal_models_have_one_layout_id_and_other_shapes_another():
    a, b = loaded(seed=1), loaded(seed=2)
    c = loaded(vocab=4)
    ids = [layout_id(param_layout(plan, m.named_parameters(), NAMES)[0]) for m, plan in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("mode,names,why", [
    ("scaled", NAMES, "copy replay is off"),
    ("ok", NAMES + ["extra"], "not replayed yet"),
    ("buffer", NAMES, "lands outside the model's parameters"),
    ("uneven_pad", NAMES, "not all one value"),
])
def test_what_a_shared_region_cannot_hold_is_refused(mode, names, why):
    model, plan = loaded(mode)
    layout, reason = param_layout(plan, model.named_parameters(), names)
    assert layout is None and why in reason, reason


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
