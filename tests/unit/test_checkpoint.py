"""cluster/checkpoint.py (one atomic commit of the learners' shards and the
driver's state, the `latest` pointer, crash points, partial cleanup, retention),
learner/checkpoint.py (the learner's meta.json), learner/batching.py (rank
split, micro-batch packing, collate) and the lr schedule. No Ray, no DeepSpeed.

    .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q
"""

from __future__ import annotations

import math
import os

import pytest

from cluster import checkpoint as cpt
from learner import checkpoint as ckpt
from learner.batching import collate, pack_micro_batches, plan_micro_batches, split_across_ranks
from learner.worker import hf_name, lr_factor
from rollout.types import RolloutBatch


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def _shards(payload):
    """A fake two-rank LearnerGroup.save_shards."""
    def write(path):
        path.mkdir(parents=True)
        for r in range(2):
            (path / f"rank{r}.bin").write_bytes(payload + bytes([r]))
    return write


def _save(run_dir, step, payload=b"weights", keep=10, crash_at=None, monkeypatch=None):
    """cluster.checkpoint.save_checkpoint with fake learner shards; with
    `crash_at` the save dies there: "shards" (one rank's shard written),
    "rename" (driver_state.json written and fsynced, not renamed), "latest"
    (renamed into place, `latest` not replaced), "prune" (committed, older
    checkpoints not pruned)."""
    write = _shards(payload)
    if crash_at == "shards":
        def write(path):
            path.mkdir(parents=True)
            (path / "rank0.bin").write_bytes(payload + b"\x00")
            raise Crash
    elif crash_at == "rename":
        real_fsync = cpt.fsync_tree

        def fsync_then_crash(path):
            real_fsync(path)
            raise Crash
        monkeypatch.setattr(cpt, "fsync_tree", fsync_then_crash)
    elif crash_at == "latest":
        real_write = cpt.write_atomic

        def no_latest(path, data):
            if os.path.basename(path) == cpt.LATEST:
                raise Crash
            real_write(path, data)
        monkeypatch.setattr(cpt, "write_atomic", no_latest)
    elif crash_at == "prune":
        def crash(*_):
            raise Crash
        monkeypatch.setattr(cpt, "prune", crash)
    try:
        if crash_at is None:
            return cpt.save_checkpoint(run_dir, step, write, {"version": step}, keep)
        with pytest.raises(Crash):
            cpt.save_checkpoint(run_dir, step, write, {"version": step}, keep)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return None


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if cpt.TMP in p.name)


def test_save_and_latest(tmp_path):
    assert cpt.latest_checkpoint(tmp_path) is None
    d = _save(tmp_path, 3)
    root = cpt.ckpt_root(tmp_path)
    assert d == root / "step_00000003"
    assert cpt.latest_checkpoint(tmp_path) == d and (root / "latest").read_text() == "step_00000003"
    assert cpt.read_driver_state(d) == {"step": 3, "version": 3}
    assert (d / cpt.LEARNER / "rank1.bin").read_bytes() == b"weights\x01"
    assert _leftovers(root) == []


@pytest.mark.parametrize("crash_at", ["shards", "rename", "latest", "prune"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, crash_at):
    root = cpt.ckpt_root(tmp_path)
    first = _save(tmp_path, 2, b"old")
    _save(tmp_path, 4, b"new", keep=1, crash_at=crash_at, monkeypatch=monkeypatch)
    got = cpt.latest_checkpoint(tmp_path)
    if crash_at == "prune":  # the commit was complete: the new checkpoint is the latest
        assert got == root / "step_00000004" and first.is_dir()
    else:
        assert got == first
        assert (got / cpt.LEARNER / "rank0.bin").read_bytes() == b"old\x00"
        assert cpt.read_driver_state(got)["step"] == 2
    if crash_at in ("shards", "rename"):
        assert [n.startswith(".step_00000004.tmp-") for n in _leftovers(root)] == [True]
        # --resume removes the partial checkpoint and nothing else.
        assert [n.startswith(".step_00000004.tmp-") for n in cpt.clean_partial(tmp_path)] == [True]
        assert _leftovers(root) == [] and cpt.latest_checkpoint(tmp_path) == first
    # The next successful save wins and removes the debris and the pruned ones.
    third = _save(tmp_path, 6, b"newer", keep=1)
    assert cpt.latest_checkpoint(tmp_path) == third
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006"]


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5, b"a")
    d = _save(tmp_path, 5, b"b")
    assert (d / cpt.LEARNER / "rank0.bin").read_bytes() == b"b\x00"
    assert cpt.latest_checkpoint(tmp_path) == d
    assert _leftovers(cpt.ckpt_root(tmp_path)) == []


def test_crash_while_replacing_the_same_step_falls_back(tmp_path, monkeypatch):
    """SIGKILL between moving the old step_5 aside and renaming the new one
    into place: `latest` names a missing directory; the newest complete
    checkpoint is used and --resume cleans the rest."""
    first = _save(tmp_path, 3, b"three")
    _save(tmp_path, 5, b"a")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise Crash
        real_rename(src, dst)
    monkeypatch.setattr(cpt.os, "rename", rename)
    with pytest.raises(Crash):
        cpt.save_checkpoint(tmp_path, 5, _shards(b"b"), {}, 10)
    monkeypatch.undo()
    assert (cpt.ckpt_root(tmp_path) / "latest").read_text() == "step_00000005"
    assert cpt.latest_checkpoint(tmp_path) == first
    assert len(cpt.clean_partial(tmp_path)) == 2  # the new staging dir and the old step_5 moved aside
    assert sorted(p.name for p in cpt.ckpt_root(tmp_path).iterdir()) == ["latest", "step_00000003"]


def test_prune_keeps_latest_and_newest(tmp_path):
    root = cpt.ckpt_root(tmp_path)
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    removed = cpt.prune(root, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000002"]
    assert cpt.latest_checkpoint(tmp_path).name == "step_00000004"
    # The checkpoint `latest` names is never pruned, even when older ones are newer.
    (root / "latest").write_text("step_00000003")
    assert cpt.prune(root, keep=1) == []
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_latest_pointing_at_missing_dir(tmp_path):
    root = cpt.ckpt_root(tmp_path)
    root.mkdir()
    (root / "latest").write_text("step_00000009")
    with pytest.raises(ckpt.CheckpointError, match="step_00000009"):
        cpt.latest_checkpoint(tmp_path)
    # With a complete checkpoint there, it is used instead.
    d = _save(tmp_path, 2)
    (root / "latest").write_text("step_00000009")
    assert cpt.latest_checkpoint(tmp_path) == d


def test_learner_meta(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no learner checkpoint"):
        ckpt.read_meta(tmp_path)
    ckpt.write_meta(tmp_path, {"steps_done": 3, "world_size": 2})
    assert ckpt.read_meta(tmp_path) == {"steps_done": 3, "world_size": 2}


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
