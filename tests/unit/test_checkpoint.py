"""learner/checkpoint.py (atomic commit, `latest` pointer, crash points,
pruning) and learner/batching.py (rank split, micro-batch packing, collate)
and the lr schedule. No Ray, no DeepSpeed.

    .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q
"""

from __future__ import annotations

import math
import os

import pytest

from learner import checkpoint as ckpt
from learner.batching import collate, pack_micro_batches, plan_micro_batches, split_across_ranks
from learner.worker import hf_name, lr_factor
from rollout.types import RolloutBatch


def _save(root, step, payload=b"weights", crash_before=None):
    """A fake multi-rank save: shards into staging, then commit; stop at
    `crash_before` ("commit" / "latest") to simulate a crash there."""
    staging = ckpt.new_staging_dir(root, "save")
    staging.mkdir(parents=True)
    for r in range(2):
        (staging / f"rank{r}.bin").write_bytes(payload + bytes([r]))
    if crash_before == "commit":
        return staging
    if crash_before == "latest":
        # Everything up to the rename, but `latest` is not replaced.
        real = ckpt.write_atomic

        def no_latest(path, data):
            if os.path.basename(path) == ckpt.LATEST:
                raise KeyboardInterrupt("crash")
            real(path, data)

        ckpt.write_atomic = no_latest
        try:
            with pytest.raises(KeyboardInterrupt):
                ckpt.commit(staging, root, ckpt.step_name(step), {"steps_done": step})
        finally:
            ckpt.write_atomic = real
        return root / ckpt.step_name(step)
    return ckpt.commit(staging, root, ckpt.step_name(step), {"steps_done": step})


def test_commit_and_resolve(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve(tmp_path)
    d = _save(tmp_path, 3)
    assert d == tmp_path / "step_00000003"
    assert ckpt.resolve(tmp_path) == d and ckpt.resolve(d) == d
    assert ckpt.read_meta(d) == {"steps_done": 3}
    assert (d / "rank1.bin").read_bytes() == b"weights\x01"
    assert not list(tmp_path.glob(".staging-*"))


@pytest.mark.parametrize("crash_before", ["commit", "latest"])
def test_crash_mid_save_keeps_previous(tmp_path, crash_before):
    first = _save(tmp_path, 2, b"old")
    _save(tmp_path, 4, b"new", crash_before=crash_before)
    assert ckpt.resolve(tmp_path) == first
    assert (ckpt.resolve(tmp_path) / "rank0.bin").read_bytes() == b"old\x00"
    # The next successful save wins and cleanup removes the debris.
    third = _save(tmp_path, 6, b"newer")
    ckpt.cleanup(tmp_path, keep=1)
    assert ckpt.resolve(tmp_path) == third
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000006"]


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5, b"a")
    d = _save(tmp_path, 5, b"b")
    assert (d / "rank0.bin").read_bytes() == b"b\x00"
    assert ckpt.resolve(tmp_path) == d
    assert not list(tmp_path.glob(".staging-*"))


def test_cleanup_keeps_latest_and_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    removed = ckpt.cleanup(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000002"]
    assert ckpt.resolve(tmp_path).name == "step_00000004"


def test_latest_pointing_at_missing_dir_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("step_00000009")
    with pytest.raises(ckpt.CheckpointError, match="step_00000009"):
        ckpt.resolve(tmp_path)


# ----------------------------------------------------------------- batching

def test_split_balances_tokens():
    lengths = [100, 90, 10, 10, 10, 50, 40, 5]
    ranks = split_across_ranks(lengths, 3)
    assert sorted(i for r in ranks for i in r) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= max(lengths) // 2


def test_pack_respects_budget_and_sorts():
    lengths = [7, 30, 8, 3, 12, 12, 2, 60]
    mbs = pack_micro_batches(list(range(len(lengths))), lengths, 32)
    assert sorted(i for mb in mbs for i in mb) == list(range(len(lengths)))
    for mb in mbs:
        assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 32
    assert mbs[0] == [7]  # a row above the budget gets its own micro-batch


def test_plan_gives_every_rank_the_same_count():
    lengths = [200, 5, 5, 5, 5, 5]
    plan = plan_micro_batches(lengths, 2, 16)
    assert len(plan[0]) == len(plan[1])
    assert [] in plan[0] or [] in plan[1]
    assert plan_micro_batches([], 2, 16) == [[[]], [[]]]
    # Fewer samples than ranks: the idle rank still runs one (dummy) pass.
    assert plan_micro_batches([9], 2, 16) == [[[0]], [[]]]


def test_collate_positions_and_padding():
    b = RolloutBatch(prompt_ids_B_T=[[1, 2, 3], [4]], completion_ids_B_T=[[5, 6], [7, 8, 9]],
                     sampler_logprobs_B_T=[[-1.0, -2.0], [-3.0, -4.0, -5.0]], loss_mask_B_T=[[1, 0], [1, 1, 1]],
                     policy_versions_B=[0, 0], prompt_index_B=[0, 1], finish_reasons_B=["stop", "length"],
                     teacher_top_ids_B_T_K=[[[5, 9], [6]], [[7, 1], [8, 2], [9, 3]]],
                     teacher_top_logprobs_B_T_K=[[[-0.25, -2.0], [-0.5]], [[-1.0, -1.5], [-0.5, -3.0], [-0.7, -0.9]]])
    mb = collate(b, [0, 1], pad_id=0)
    assert mb.input_ids_B_L.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert mb.attention_mask_B_L.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # logits at position p predict token p + 1
    assert mb.predict_pos_B_T.tolist() == [[2, 3, 2], [0, 1, 2]]  # padding: the row's first position
    assert mb.mask_B_T.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert mb.teacher_top_ids_B_T_K.shape == (2, 3, 2)
    assert mb.teacher_top_lp_B_T_K[0, 1].tolist() == [-0.5, -math.inf]  # short row: absent category
    assert mb.teacher_lp_B_T is None
    dummy = collate(b, [], pad_id=0)
    assert dummy.num_rows == 0 and dummy.mask_B_T.sum() == 0


def test_lr_schedule():
    f = [lr_factor(s, 2, "cosine", 6, 0.1) for s in range(8)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert math.isclose(f[6], 0.1) and math.isclose(f[7], 0.1)
    assert lr_factor(3, 2, "linear", 6, 0.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(5, 0, "cosine", None, 0.0)


def test_hf_names_strip_wrappers():
    assert hf_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("model.layers.0._checkpoint_wrapped_module.mlp.weight") == "model.layers.0.mlp.weight"
    assert hf_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_publish_dir_is_atomic_keeps_a_racing_winner_and_replaces_on_request(tmp_path):
    """cluster.tiny_models.publish_dir (the tiny-model and SFT caches): a
    failing build leaves neither `final` nor a temporary directory; a copy
    another process published first is kept; `replace` swaps it."""
    from cluster.tiny_models import publish_dir

    final = tmp_path / "cache" / "model-abc"

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        publish_dir(final, crash, done_marker="done")
    assert not final.exists() and list(final.parent.iterdir()) == []

    def write(content):
        def w(tmp):
            (tmp / "data").write_text(content)
            (tmp / "done").write_text("")
        return w

    assert publish_dir(final, write("first"), done_marker="done") == final
    assert (final / "data").read_text() == "first"
    # A second builder that lost the race: the published copy stays, its own is dropped.
    publish_dir(final, write("second"), done_marker="done")
    assert (final / "data").read_text() == "first"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model-abc"]
    # A rebuild that asks to replace it.
    publish_dir(final, write("third"), done_marker="done", replace=True)
    assert (final / "data").read_text() == "third"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model-abc"]
