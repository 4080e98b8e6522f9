"""The learner stage's config: the optimizer and DeepSpeed ranks, the loss, and
the one table of losses.

Frozen dataclasses with a comment on every field; cluster/config.py composes
them (with the rollout stage's, rollout/config.py) into the one tree of a run
and owns the front end (YAML, dotted overrides, cross-section checks).

`LOSSES` says, for each `loss.kind`, what the loss reads and where its
samples may come from; the config's checks (cluster/config.py), the teacher
scoring stage (cluster/stages.py), the learner (learner/group.py) and
`learner.losses.compute_loss` all read it. It imports no torch, so that the
config front end stays fast (`python -m cluster.config configs/demo.yaml`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from rollout.config import non_negative, positive

# --------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossSpec:
    # The teacher's logprob of each sampled token (the per-token advantage
    # lp_teacher - lp_sampler of the policy-gradient loss).
    needs_teacher_lp: bool
    # The teacher's top-k ids and logprobs at each position (teacher.top_k > 0).
    needs_topk: bool
    # The train.sample_from values the loss is valid with.
    sample_from: tuple[str, ...]
    # Its per-token function in learner/losses.py, named (this table imports
    # no torch; `compute_loss` looks it up there).
    fn: str


LOSSES: dict[str, LossSpec] = {
    # The sampled-token estimator: on teacher samples lp_sampler is the
    # teacher's, so its advantage is 0.
    "reverse_kl": LossSpec(needs_teacher_lp=True, needs_topk=False, sample_from=("student",), fn="reverse_kl"),
    "reverse_kl_topk": LossSpec(needs_teacher_lp=False, needs_topk=True, sample_from=("student", "teacher"),
                                fn="reverse_kl_topk"),
    "forward_kl_topk": LossSpec(needs_teacher_lp=False, needs_topk=True, sample_from=("student", "teacher"),
                                fn="forward_kl_topk"),
    "jsd": LossSpec(needs_teacher_lp=False, needs_topk=True, sample_from=("student", "teacher"), fn="jsd_topk"),
    "sft": LossSpec(needs_teacher_lp=False, needs_topk=False, sample_from=("student", "teacher"), fn="sft"),
}

# The valid values of loss.kind, in the table's order (what the config front
# end checks a YAML value against).
LossKind = Literal[tuple(LOSSES)]


# --------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------

# The largest LoRA rank the samplers serve: vLLM's largest `max_lora_rank`
# (its MaxLoRARanks, vllm/config/lora.py).
MAX_SERVED_LORA_RANK = 512


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    # LoRA rank of every adapted layer; 0 = full fine-tuning (no adapters).
    # With rank > 0 the learner trains only the adapters (peft) and the
    # samplers serve them through vLLM's LoRA support (learner/lora.py).
    rank: int = 0
    # Scale of an adapter's update: alpha / rank (peft's lora_alpha).
    alpha: float = 32.0
    # Dropout on each adapter's input in the learner's training forward
    # (peft's lora_dropout). vLLM applies none, so above 0 the learner's
    # log-probs of the sampled tokens differ from the samplers' at random
    # (learner/logprob_abs_diff > 0, importance ratios != 1 on-policy); 0
    # keeps the learner scoring exactly what the samplers sample, as the
    # learner's base-model dropout, which it always turns off.
    dropout: float = 0.0
    # Modules that get adapters: names matched as peft matches a list (a
    # module whose name is the entry or ends with "." + the entry, e.g.
    # q_proj, mlp.down_proj). Empty = every linear layer of the attention and
    # MLP blocks (all but the output head).
    target_modules: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        out = non_negative(self, "rank", "dropout")
        if self.rank > MAX_SERVED_LORA_RANK:
            out.append(f"learner.lora.rank: {self.rank} is above {MAX_SERVED_LORA_RANK}, the largest rank vLLM "
                       "serves; use a smaller rank, or 0 for full fine-tuning")
        if self.rank > 0 and not self.alpha > 0:
            out.append(f"learner.lora.alpha: {self.alpha} must be > 0 (the adapter's scale is alpha / rank; "
                       "rank or 2 x rank are usual)")
        if not self.dropout < 1.0:
            out.append(f"learner.lora.dropout: {self.dropout} must be below 1 (0 = off)")
        bad = [t for t in self.target_modules if not t.strip() or t != t.strip()]
        if bad:
            out.append(f"learner.lora.target_modules: {list(bad)} are not module names; give names such as "
                       "q_proj or mlp.down_proj, or an empty list for every linear layer")
        return out


# DeepSpeed config keys opd sets itself, and what sets them instead:
# learner.deepspeed may not name them.
DEEPSPEED_KEYS: dict[str, str] = {
    "train_batch_size": "opd accumulates gradients over micro-batches itself (learner.micro_batch_tokens)",
    "train_micro_batch_size_per_gpu": "set learner.micro_batch_tokens instead",
    "gradient_accumulation_steps": "set learner.micro_batch_tokens instead",
    "gradient_clipping": "set learner.grad_clip instead",
    "bf16": "set learner.dtype instead", "fp16": "set learner.dtype instead",
    "optimizer": "the optimizer is torch AdamW (learner.lr, learner.betas, learner.weight_decay)",
    "scheduler": "set learner.lr_schedule, learner.warmup_steps, learner.min_lr_ratio instead",
    "zero_optimization.stage": "set learner.zero_stage instead",
}


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    # Learner ranks (one Ray actor each: one GPU each on GPU, one process on CPU).
    world_size: int = 1
    # DeepSpeed ZeRO stage (0 = plain data parallel).
    zero_stage: Literal[0, 1, 2, 3] = 0
    # Training precision: fp32 master weights always; "bfloat16" computes in
    # bf16; "auto" is bfloat16 when the run has GPUs, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Peak learning rate (AdamW). 1e-6 is the usual full fine-tuning value of
    # RL-style trainers (OpenRLHF, verl); LoRA and tiny models take more.
    lr: float = 1e-6
    # Linear warmup steps from 0 to `lr`.
    warmup_steps: int = 0
    # Schedule after warmup.
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    # Final learning rate as a fraction of `lr` (cosine/linear).
    min_lr_ratio: float = 0.0
    # AdamW weight decay. Decoupled decay shrinks every weight each step
    # whatever the gradient, so even a policy with zero advantages moves
    # (self-distillation stays bitwise still only at 0, the default).
    weight_decay: float = 0.0
    # AdamW betas.
    betas: tuple[float, float] = (0.9, 0.999)
    # Clip the global gradient norm to this (0 = off).
    grad_clip: float = 1.0
    # Token budget of one micro-batch (prompt + completion tokens, padded).
    micro_batch_tokens: int = 8192
    # Gradient checkpointing in the student's forward.
    gradient_checkpointing: bool = False
    # CPUs reserved per learner rank in the placement group.
    cpus_per_worker: float = 1.0
    # Timeout of every collective and learner RPC (seconds): a dead rank fails
    # the run instead of hanging it.
    collective_timeout_s: float = 600.0
    # LoRA adapters instead of full fine-tuning (rank > 0).
    lora: LoraConfig = LoraConfig()
    # More DeepSpeed config, deep-merged into the one opd builds
    # (learner/worker.py build_ds_config), e.g. {zero_optimization:
    # {offload_optimizer: {device: cpu}, reduce_bucket_size: 5.0e+8}}; or
    # learner.deepspeed.zero_optimization.overlap_comm=true. Not the keys opd
    # sets from its own (DEEPSPEED_KEYS names them).
    deepspeed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def problems(self) -> list[str]:
        out = positive(self, "world_size", "lr", "micro_batch_tokens", "collective_timeout_s")
        out += non_negative(self, "warmup_steps", "weight_decay", "grad_clip", "cpus_per_worker")
        for path, where in DEEPSPEED_KEYS.items():
            node = self.deepspeed
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                out.append(f"learner.deepspeed.{path}: opd sets this DeepSpeed key itself; {where}")
        zero = self.deepspeed.get("zero_optimization")
        if zero is not None and not isinstance(zero, dict):
            out.append(f"learner.deepspeed.zero_optimization: {zero!r:.80} must be a mapping of ZeRO settings")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"learner.min_lr_ratio: {self.min_lr_ratio} is outside [0, 1]")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(f"learner.betas: {list(self.betas)} must both be in [0, 1)")
        return out


@dataclasses.dataclass(frozen=True)
class LossConfig:
    # reverse_kl: on-policy distillation ("On-Policy Distillation", Thinking
    #   Machines Lab, 2025) (sampled-token reverse KL as a per-token advantage,
    #   importance-sampling loss).
    # reverse_kl_topk / forward_kl_topk / jsd: divergences over the teacher's
    #   top-k support (teacher.top_k > 0).
    # sft: cross-entropy on the completions (sequence-level KD when
    #   train.sample_from=teacher).
    # What each needs is in LOSSES above.
    kind: LossKind = "reverse_kl"
    # Scale of the reverse-KL advantage A_t = -coef * (lp_sampler - lp_teacher).
    kl_coef: float = 1.0
    # Discount of future per-token advantages (0 = each token's own advantage,
    # 1 = undiscounted sum to the end of the completion).
    discount: float = 0.0
    # Truncate the importance ratio exp(lp_learner - lp_sampler) at this cap.
    ratio_cap: float = 2.0
    # "token": mean over all trained tokens of the batch; "sequence": mean per
    # sequence, then over sequences.
    normalize: Literal["token", "sequence"] = "token"
    # Generalized JSD interpolation (0 -> forward KL, 1 -> reverse KL, in the
    # GKD's D_JSD(beta) convention with P = teacher).
    jsd_beta: float = 0.5
    # Probability outside the teacher's top-k in the *_topk and jsd losses:
    # "bucket" adds one tail category holding each side's remaining mass (the
    # student's exact, from the learner's full logits), so student mass where
    # the teacher has little is penalised; "renormalize" restricts both
    # distributions to the top-k and renormalises (ignores that mass).
    topk_tail: Literal["renormalize", "bucket"] = "bucket"

    def problems(self) -> list[str]:
        out = positive(self, "ratio_cap")
        if not 0.0 <= self.discount <= 1.0:
            out.append(f"loss.discount: {self.discount} is outside [0, 1]")
        if not 0.0 <= self.jsd_beta <= 1.0:
            out.append(f"loss.jsd_beta: {self.jsd_beta} is outside [0, 1]")
        return out
