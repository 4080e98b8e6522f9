"""The learner on real DeepSpeed (gloo, CPU) inside Ray actors, on the tiny
student: ZeRO 0/2/3 and world size give the same training, the learner's
logprobs are the model's, a checkpoint restores the exact run after the actors
are killed (and survives a crash mid-save), and the HF export loads in
transformers with identical logits; a LoRA student trains alike under ZeRO 0
and 3, moves only its adapted layers and restores from a checkpoint exactly.

    .venv/bin/python -m pytest tests/e2e/test_learner.py -x -q     # ~4 min on 2 cores
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from cluster import checkpoint as cpt
from cluster.config import LearnerConfig, LossConfig
from learner import checkpoint as ckpt
from learner.batching import plan_micro_batches, sequence_lengths
from learner.group import LearnerGroup
from rollout.types import RolloutBatch

STEPS = 3
MICRO_TOKENS = 48
# Partition every parameter under ZeRO-3 (the default threshold would keep
# the tiny model's small tensors whole on every rank).
DS_OVERRIDES = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
# Runs whose weights are read before and after the first optimizer step.
FIRST_UPDATE_RUNS = ("z0", "z0_bf16", "z2_bf16")


def _hf_logprobs(model_path: str, batch: RolloutBatch, temperature: float) -> list[list[float]]:
    """Reference: transformers forward, log_softmax(logits / temperature) of
    each completion token, one sequence at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(batch.prompt_ids_B_T, batch.completion_ids_B_T, strict=True):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(c) - 1].double() / temperature
            lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            out.append(lp.tolist())
    return out


@pytest.fixture(scope="module")
def scored_batch(student_path, teacher_path, tokenizer) -> RolloutBatch:
    """A batch scored like the real loop: sampler logprobs are the student's
    own (temperature 1), teacher logprobs the teacher's; ragged lengths, one
    long sample so the ranks get different micro-batch counts (dummy passes),
    and some masked tokens."""
    g = torch.Generator().manual_seed(0)
    texts = ["2+2=", "What is 7*6?", "hi", "Count to five please, slowly and clearly.", "abc", "Say yes."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for t in texts]
    lengths = [5, 11, 2, 30, 7, 3]
    comps = [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]
    masks = [[1] * n for n in lengths]
    masks[1][4] = masks[1][5] = 0
    b = RolloutBatch(prompt_ids_B_T=prompts, completion_ids_B_T=comps, sampler_logprobs_B_T=[[0.0] * n for n in lengths],
                     loss_mask_B_T=masks, policy_versions_B=[0] * 6, prompt_index_B=list(range(6)),
                     finish_reasons_B=["length"] * 6)
    b.sampler_logprobs_B_T = _hf_logprobs(student_path, b, 1.0)
    b.teacher_logprobs_B_T = _hf_logprobs(teacher_path, b, 1.0)
    b.validate()
    return b


def _cfg(**kw) -> LearnerConfig:
    base = dict(world_size=2, zero_stage=0, lr=2e-3, grad_clip=1.0, micro_batch_tokens=MICRO_TOKENS,
                collective_timeout_s=300.0)
    base.update(kw)
    return LearnerConfig(**base)


def _full_state(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """Learner rank 0's full weights (every rank takes part in the gather)."""
    import ray

    return ray.get([w.full_state_dict.remote() for w in group.workers])[0]


def _train(group: LearnerGroup, batch: RolloutBatch, steps, temperature=1.0) -> list[dict]:
    return [group.train_step(batch, step=s, temperature=temperature) for s in steps]


@pytest.fixture(scope="module")
def zero_runs(ray_session, student_path, scored_batch, tmp_path_factory):
    """3 steps on the same batch for ZeRO 0, 2, 3 on 2 ranks and ZeRO 0 on 1
    rank, in float32 (ZeRO-2 with gradient checkpointing, as
    configs/gpu_cluster.yaml trains); ZeRO 0 and 2 on 2 ranks in bfloat16.
    The ZeRO-3 group also exports an HF checkpoint and reports its own
    logprobs (at temperature 0.7) before it shuts down."""
    runs = {}
    export_dir = tmp_path_factory.mktemp("export") / "hf"
    # learner.deepspeed reaches the engine (one bucket holds the 0.4M-parameter student either way).
    user_ds = {"zero_optimization": {"reduce_bucket_size": 3_000_000}}
    for name, kw in [("z0", dict(zero_stage=0)),
                     ("z2", dict(zero_stage=2, gradient_checkpointing=True, deepspeed=user_ds)),
                     ("z3", dict(zero_stage=3)),
                     ("z0_ws1", dict(zero_stage=0, world_size=1)),
                     ("z0_bf16", dict(zero_stage=0, dtype="bfloat16")),
                     ("z2_bf16", dict(zero_stage=2, dtype="bfloat16"))]:
        group = LearnerGroup.create(student_path, _cfg(**kw), LossConfig(), seed=0, ds_config_overrides=DS_OVERRIDES)
        assert [r["deepspeed"]["zero_stage"] for r in group.ranks] == [kw["zero_stage"]] * group.cfg.world_size
        assert all(r["deepspeed"]["reduce_bucket_size"] == (3_000_000 if name == "z2" else 500_000_000)
                   for r in group.ranks), (name, group.ranks)
        try:
            if name in FIRST_UPDATE_RUNS:
                # The weights before and after the first optimizer step.
                before = _full_state(group)
                first = _train(group, scored_batch, range(1))
                after = _full_state(group)
                runs[name] = {"metrics": first + _train(group, scored_batch, range(1, STEPS)),
                              "first_update": (before, after)}
            else:
                runs[name] = {"metrics": _train(group, scored_batch, range(STEPS))}
            if name == "z3":
                # Shards of at most 400 KB: the 1.6 MB float32 student takes
                # several, as a large model does at the default 5GB.
                runs[name]["export"] = group.export_hf(export_dir, max_shard_size="400KB")
                runs[name]["logprobs_t07"] = group.logprobs(scored_batch, temperature=0.7)
        finally:
            group.shutdown()
    return runs


def test_plan_exercises_dummy_micro_batches(scored_batch):
    plan = plan_micro_batches(sequence_lengths(scored_batch), 2, MICRO_TOKENS)
    assert len(plan[0]) == len(plan[1]) >= 2
    assert any(mb == [] for rank in plan for mb in rank), plan


def test_first_step_is_on_policy(zero_runs):
    """Step 0: the learner's logprobs equal the sampler's (both the student's
    HF logprobs), so ratios are 1 and the loss is the sampled reverse KL."""
    m = zero_runs["z0"]["metrics"][0]
    assert m["learner/logprob_abs_diff"] < 1e-5
    assert abs(m["learner/ratio_mean"] - 1.0) < 1e-5
    assert m["learner/ratio_truncated_frac"] == 0.0
    assert abs(m["learner/loss"] - m["learner/reverse_kl"]) < 1e-5
    assert m["learner/tokens"] == 5 + 11 + 2 + 30 + 7 + 3 - 2  # two masked tokens


@pytest.mark.parametrize("run", ["z2", "z3", "z0_ws1"])
def test_zero_stages_and_world_size_match_stage0(zero_runs, run):
    ref, got = zero_runs["z0"]["metrics"], zero_runs[run]["metrics"]
    for s in range(STEPS):
        for key in ("learner/loss", "learner/reverse_kl", "learner/student_logprob", "learner/grad_norm"):
            assert abs(got[s][key] - ref[s][key]) < 1e-4 * max(1.0, abs(ref[s][key])), (run, s, key, got[s][key],
                                                                                       ref[s][key])
    # The steps really trained: same batch, the loss (sampled reverse KL) falls.
    assert ref[-1]["learner/loss"] < ref[0]["learner/loss"] - 1e-3


def _half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of x's dtype at |x| (float64): the largest error of
    rounding a real number to x's dtype near x (round to nearest)."""
    mant = torch.finfo(x.dtype).eps  # 2^-(significand bits - 1): 2^-7 bf16, 2^-23 fp32
    tiny = torch.finfo(x.dtype).tiny
    mag = x.double().abs().clamp_min(tiny)
    return 0.5 * mant * torch.exp2(torch.floor(torch.log2(mag)))


@pytest.mark.parametrize("run", FIRST_UPDATE_RUNS)
def test_first_adamw_update_is_lr_per_weight(zero_runs, run):
    """The first AdamW step moves every weight whose gradient is nonzero by
    lr * |g| / (|g| + eps): with Adam's bias correction m_hat = g and
    sqrt(v_hat) = |g| (weight decay 0), whatever the gradient's size, so by lr
    up to a relative eps / |g|. The measured move is the difference of two
    weights in the parameters' dtype: the weight lands within half a unit in
    the last place (ulp) of that dtype of where the fp32 master goes, and the
    fp32 arithmetic of the update itself is finer. Those bounds hold on any
    CPU. They are checked where they can tell lr from 0.74 lr (half an ulp
    under lr / 10).

    With DeepSpeed's zero-gradient step at construction left in (ZeRO-0 with
    bf16 wraps torch AdamW in FP16_UnfusedOptimizer), the first real step used
    Adam's step-2 bias correction: every weight moved by 0.744 lr
    (`learner.worker.undo_init_optimizer_step`)."""
    lr = _cfg().lr
    before, after = zero_runs[run]["first_update"]
    assert before.keys() == after.keys()
    checked = close = 0
    for name, w0 in before.items():
        w1 = after[name]
        assert w1.dtype == (torch.bfloat16 if "bf16" in run else torch.float32), (name, w1.dtype)
        move = (w1.double() - w0.double()).abs()
        # fp32 arithmetic of the update itself: a few fp32 roundings of lr.
        bound = _half_ulp(w1) + 4 * 2.0 ** -24 * lr
        sharp = (move > 0) & (bound < lr / 10)
        checked += int(sharp.sum())
        # lr * |g| / (|g| + eps) is lr to 1% wherever |g| >= 100 eps (1e-6).
        close += int(((move <= lr + bound) & (move >= 0.99 * lr - bound))[sharp].sum())
    assert checked > 1000, (run, checked)
    # Gradients under 100 eps are rare (the clipped gradients here are ~1e-3).
    assert close >= 0.99 * checked, (run, close, checked)


def test_bf16_zero0_trains_like_bf16_zero2_and_fp32(zero_runs, scored_batch):
    """bf16 under ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer around torch
    AdamW) and under ZeRO-2 start from the same bf16 weights and see the same
    batch, so their first forward is the same computation: the step-0 loss
    agrees to one bf16 rounding (2^-8 relative). Their gradients are rounded
    to bf16 at different points: ZeRO-0 sums each micro-batch's bf16 gradient
    into a bf16 gradient and all-reduces it in bf16, ZeRO-2 accumulates into
    fp32 partitions. Each rounding moves an element by at most 2^-9 of its
    value, so with m micro-batches per rank the gradient norm moves by at most
    (m + 2) * 2^-9 of itself. Later steps start from weights that differ by
    bf16 rounding, so their values are bounded only against fp32, loosely. The
    update size itself is checked exactly above
    (test_first_adamw_update_is_lr_per_weight)."""
    z0, z2, fp32 = (zero_runs[k]["metrics"] for k in ("z0_bf16", "z2_bf16", "z0"))
    micro = max(len(rank) for rank in plan_micro_batches(sequence_lengths(scored_batch), 2, MICRO_TOKENS))
    assert abs(z0[0]["learner/loss"] - z2[0]["learner/loss"]) <= 2.0 ** -8 * abs(z2[0]["learner/loss"])
    assert (abs(z0[0]["learner/grad_norm"] - z2[0]["learner/grad_norm"])
            <= (micro + 2) * 2.0 ** -9 * z2[0]["learner/grad_norm"]), (micro, z0[0], z2[0])
    for s in range(STEPS):
        assert abs(z0[s]["learner/loss"] - fp32[s]["learner/loss"]) < 1e-2, (s, z0[s], fp32[s])
    assert z0[-1]["learner/loss"] < z0[0]["learner/loss"] - 1e-3


def test_hf_export_loads_with_identical_logprobs(zero_runs, scored_batch, student_path):
    """The ZeRO-3 export (gathered partitions) loads in transformers and gives
    the learner's own logprobs (temperature 0.7); it is the trained model,
    not the initial one; the tokenizer comes along."""
    from transformers import AutoTokenizer

    export = Path(zero_runs["z3"]["export"])
    names = {p.name for p in export.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"} <= names
    shards = set(json.loads((export / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 3 and shards <= names and "model.safetensors" not in names, names
    assert json.loads((export / "config.json").read_text())["dtype"] == "float32"  # the training dtype
    ref = _hf_logprobs(str(export), scored_batch, 0.7)
    got = zero_runs["z3"]["logprobs_t07"]
    diff = max(abs(a - b) for r, g in zip(ref, got, strict=True) for a, b in zip(r, g, strict=True))
    assert diff < 1e-4
    init = _hf_logprobs(student_path, scored_batch, 0.7)
    moved = max(abs(a - b) for r, g in zip(init, got, strict=True) for a, b in zip(r, g, strict=True))
    assert moved > 1e-3
    tok = AutoTokenizer.from_pretrained(str(export))
    assert tok("2+2=")["input_ids"] == AutoTokenizer.from_pretrained(student_path)("2+2=")["input_ids"]


def test_checkpoint_restore_after_kill_continues_exactly(ray_session, student_path, scored_batch, tmp_path):
    """Run A: 2 steps, save (cluster/checkpoint.py's commit of the learners'
    shards), 2 more steps (the reference), then a save that crashes mid-way
    (shards written into the staging directory, never committed, one file
    truncated) and the actors are killed. Run B: new actors load the run's
    latest -> the step-2 checkpoint, and its steps 3 and 4 equal A's (loss,
    lr, grad norm): weights, AdamW moments, lr schedule and step count were
    all restored."""
    cfg = _cfg(zero_stage=2, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    run_dir = tmp_path / "run"
    root = cpt.ckpt_root(run_dir)
    a = LearnerGroup.create(student_path, cfg, LossConfig(), seed=0, total_steps=5)
    try:
        _train(a, scored_batch, range(2))
        saved = cpt.save_checkpoint(run_dir, 2, a.save_shards, {"prompt_cursor": 12}, keep=2)
        assert saved.name == "step_00000002" and (root / "latest").read_text() == "step_00000002"
        ref = _train(a, scored_batch, range(2, 4))
        staging = cpt.new_staging_dir(root, 4)
        a.save_shards(staging / cpt.LEARNER)
        victim = max((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    finally:
        a.kill()  # the processes die; no shutdown, no commit
    assert (root / "latest").read_text() == "step_00000002"
    assert cpt.latest_checkpoint(run_dir) == root / "step_00000002"

    b = LearnerGroup.create(student_path, cfg, LossConfig(), seed=0, total_steps=5)
    try:
        other = tmp_path / "other" / "step_00000001" / cpt.LEARNER
        other.mkdir(parents=True)
        ckpt.write_atomic(other / ckpt.META, b'{"steps_done": 1, "world_size": 4, "zero_stage": 3}')
        with pytest.raises(Exception, match="learner.world_size=4 learner.zero_stage=3"):
            b.load(other)
        latest = cpt.latest_checkpoint(run_dir)
        info = b.load(latest / cpt.LEARNER)
        assert info["steps_done"] == 2 and cpt.read_driver_state(latest) == {"step": 2, "prompt_cursor": 12}
        got = _train(b, scored_batch, range(2, 4))
        # A later save cleans up the crashed staging directory.
        cpt.save_checkpoint(run_dir, info["steps_done"] + 2, b.save_shards, {}, keep=1)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004"]
    finally:
        b.shutdown()
    assert ref[0]["learner/lr"] != ref[1]["learner/lr"]  # the schedule is live
    for r, g in zip(ref, got, strict=True):
        for key in ("learner/loss", "learner/lr", "learner/grad_norm", "learner/student_logprob"):
            assert math.isclose(g[key], r[key], rel_tol=1e-6, abs_tol=1e-7), (key, g[key], r[key])


def _hf_full_logprobs(model_path: str, batch: RolloutBatch) -> list[torch.Tensor]:
    """Per sample: (T, V) float64 log-softmax at the completion positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1]
                                  .double(), dim=-1)
                for p, c in zip(batch.prompt_ids_B_T, batch.completion_ids_B_T, strict=True)]


def test_topk_and_sft_losses_through_the_worker(ray_session, student_path, teacher_path, scored_batch):
    """The worker's plumbing for the other cells of the variants' table: teacher
    top-k (K=5, one position with only 3 entries) for forward KL, reverse KL
    and JSD (tail bucket), and SFT on a batch without teacher logprobs
    (off-policy / sequence-level KD shape). Each step's loss equals the loss
    functions applied to transformers' logprobs of the same tokens (lr is
    negligible, so the weights do not move between kinds); the sampling
    temperature (0.7) only enters the ratio metrics for these kinds."""
    from learner import losses

    K = 5
    t_full = _hf_full_logprobs(teacher_path, scored_batch)
    s_full = _hf_full_logprobs(student_path, scored_batch)
    top = [lp.topk(K, dim=-1) for lp in t_full]
    top_ids = [t.indices.tolist() for t in top]
    top_lp = [t.values.tolist() for t in top]
    top_ids[3][0], top_lp[3][0] = top_ids[3][0][:3], top_lp[3][0][:3]
    batch = dataclasses.replace(scored_batch, teacher_top_ids_B_T_K=top_ids, teacher_top_logprobs_B_T_K=top_lp)
    sft_batch = dataclasses.replace(scored_batch, teacher_logprobs_B_T=None)

    def reference(loss_cfg, b):
        mask = [torch.tensor(m, dtype=torch.float64)[None] for m in b.loss_mask_B_T]
        denom = sum(losses.loss_denominator(m, loss_cfg.normalize) for m in mask)
        total = 0.0
        for i, s_lp in enumerate(s_full):
            c = torch.tensor(b.completion_ids_B_T[i])
            learner = s_lp.gather(-1, c[:, None]).squeeze(-1)[None]
            inputs = losses.LossInputs(mask_B_T=mask[i], learner_lp_B_T=learner, sampler_lp_B_T=learner)
            if loss_cfg.kind != "sft":
                k = max(len(x) for x in top_ids[i])
                ids = torch.tensor([x + [0] * (k - len(x)) for x in top_ids[i]])
                t = torch.tensor([x + [-math.inf] * (k - len(x)) for x in top_lp[i]], dtype=torch.float64)
                inputs.student_top_lp_B_T_K = s_lp.gather(-1, ids)[None]
                inputs.teacher_top_lp_B_T_K = t[None]
            total += float(losses.compute_loss(inputs, loss_cfg, denom)[0])
        return total

    cfg = _cfg(world_size=1, lr=1e-9, micro_batch_tokens=64)
    group = LearnerGroup.create(student_path, cfg, LossConfig(kind="sft"), seed=0)
    try:
        kinds = [(LossConfig(kind="forward_kl_topk"), batch), (LossConfig(kind="reverse_kl_topk"), batch),
                 (LossConfig(kind="jsd", jsd_beta=0.3, topk_tail="bucket", normalize="sequence"), batch),
                 (LossConfig(kind="sft"), sft_batch)]
        for step, (loss_cfg, b) in enumerate(kinds):
            group.set_loss(loss_cfg)
            m = group.train_step(b, step=step, temperature=0.7)
            ref = reference(loss_cfg, b)
            assert abs(m["learner/loss"] - ref) < 1e-4 * max(1.0, abs(ref)), (loss_cfg.kind, m["learner/loss"], ref)
            assert m["learner/grad_norm"] > 0
        assert "learner/reverse_kl" not in m  # no teacher logprobs in the SFT batch
        group.set_loss(LossConfig(kind="jsd"))
        with pytest.raises(ValueError, match="teacher.top_k"):
            group.train_step(scored_batch, step=9)
    finally:
        group.shutdown()


def test_lora_zero0_matches_zero3_and_checkpoint_restores(ray_session, student_path, scored_batch, tmp_path):
    """A LoRA student (learner.lora.rank=4) on 2 ranks: ZeRO-0 and ZeRO-3
    (every parameter partitioned) train alike; only the adapters move (the
    merged export's untouched tensors are the base's exactly); a ZeRO-3
    checkpoint restores the run exactly in new actors; a checkpoint of
    another rank is refused, naming the key."""
    from learner.config import LoraConfig

    lora = LoraConfig(rank=4, alpha=8.0)
    ref: dict[str, list[dict]] = {}
    z0 = LearnerGroup.create(student_path, _cfg(zero_stage=0, lr=1e-2, lora=lora), LossConfig(), seed=0)
    try:
        ref["z0"] = _train(z0, scored_batch, range(STEPS))
    finally:
        z0.shutdown()
    cfg3 = _cfg(zero_stage=3, lr=1e-2, lora=lora)
    run_dir = tmp_path / "run"
    a = LearnerGroup.create(student_path, cfg3, LossConfig(), seed=0, ds_config_overrides=DS_OVERRIDES)
    try:
        first = _train(a, scored_batch, range(STEPS - 1))
        saved = cpt.save_checkpoint(run_dir, STEPS - 1, a.save_shards, {}, keep=1)
        ref["z3"] = first + _train(a, scored_batch, range(STEPS - 1, STEPS))
        trained = _full_state(a)
    finally:
        a.shutdown()
    for r0, r3 in zip(ref["z0"], ref["z3"], strict=True):
        for key in ("learner/loss", "learner/grad_norm", "learner/student_logprob"):
            assert math.isclose(r0[key], r3[key], rel_tol=1e-4, abs_tol=1e-6), (key, r0[key], r3[key])
    assert ref["z3"][-1]["learner/loss"] != ref["z3"][0]["learner/loss"]  # it trained
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).state_dict()
    assert set(trained) == set(base)
    moved = {n for n in base if not torch.equal(trained[n], base[n])}
    assert moved and all(n.endswith("_proj.weight") for n in moved), sorted(moved)

    b = LearnerGroup.create(student_path, cfg3, LossConfig(), seed=0, ds_config_overrides=DS_OVERRIDES)
    try:
        info = b.load(saved / cpt.LEARNER)
        assert info["steps_done"] == STEPS - 1
        got = _train(b, scored_batch, range(STEPS - 1, STEPS))
    finally:
        b.shutdown()
    for key in ("learner/loss", "learner/lr", "learner/grad_norm", "learner/student_logprob"):
        assert math.isclose(got[0][key], ref["z3"][-1][key], rel_tol=1e-6, abs_tol=1e-7), key
    meta = json.loads((saved / cpt.LEARNER / ckpt.META).read_text())
    assert meta["lora"]["rank"] == 4
