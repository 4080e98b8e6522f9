"""One learner rank: a DeepSpeed engine on the student, inside a Ray actor.

`LearnerGroup` (learner/group.py) creates `world_size` of these, one per GPU
(on CPU one per process), and calls every method on every rank in lockstep:
train_step, save_checkpoint, load_checkpoint, export_hf and push_weights all
run collectives (gradient all-reduce / reduce-scatter, ZeRO-3 parameter
gathers, checkpoint barriers), so a rank that skips a call deadlocks the rest
until `collective_timeout_s`, when the collective raises instead of hanging.

The class is a plain Python class; the group wraps it with `ray.remote`.
Tests: tests/e2e/test_learner.py (real DeepSpeed on gloo in Ray actors).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import inspect
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from learner import checkpoint as ckpt
from learner.batching import collate
from learner.config import LearnerConfig, LossConfig
from learner.ds_ops import use_env_build_dir
from rollout.config import ThreadShare
from learner.logprobs import completion_logprobs, sampling_truncation
from learner.losses import LossInputs, compute_loss
from rollout.host import node_address
from rollout.types import RolloutBatch
from rollout.weight_sync import ParamSpec, concrete_dtype, dtype_name

# Prefixes that wrappers (activation checkpointing, torch.compile, DDP-style
# wrappers) put in front of the Hugging Face parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")
# Largest safetensors shard of an HF export (the hub's usual size: files it
# uploads and serves well; transformers' own default is 50GB).
EXPORT_MAX_SHARD_SIZE = "5GB"


def hf_name(name: str) -> str:
    """Strip wrapper prefixes so names match safetensors / vLLM load_weights."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
        name = name.replace("._checkpoint_wrapped_module.", ".").replace("._orig_mod.", ".")
    return name


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear
    warmup over `warmup_steps` (the first step uses lr/warmup), then constant,
    cosine or linear decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"learner.lr_schedule={schedule!r} decays over the run: pass total_steps "
                         "(train.steps) to LearnerGroup.create")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    raise ValueError(f"learner.lr_schedule={schedule!r} is not valid; use constant, cosine or linear")


def build_ds_config(learner_cfg: LearnerConfig, world_size: int, overrides: dict | None = None) -> dict:
    """The DeepSpeed config of a learner rank. Gradient accumulation is driven
    by the worker (set_gradient_accumulation_boundary per micro-batch), so the
    config says 1 micro-batch of 1 row per step. The user's
    `learner.deepspeed`, then `overrides`, are deep-merged into it."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(learner_cfg.grad_clip),
        "zero_optimization": {"stage": int(learner_cfg.zero_stage)},
        "bf16": {"enabled": learner_cfg.dtype == "bfloat16"},
        # The client optimizer is torch AdamW (works on CPU and GPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(dict(a.get(k, {})), v) if isinstance(v, dict) else v
        return a

    return merge(merge(cfg, learner_cfg.deepspeed), overrides or {})


def undo_init_optimizer_step(ds_optimizer) -> bool:
    """Undo the zero-gradient `step()` that DeepSpeed's `FP16_UnfusedOptimizer`
    takes at construction (`initialize_optimizer_states`; ZeRO-0 with bf16
    wraps our torch AdamW in it). That step counts: the first real update then
    uses Adam's step-2 bias correction and moments diluted by a zero gradient,
    about 0.74x the update (measured: bf16 ZeRO-0 loss after one step -0.714
    against -0.756 for bf16 ZeRO-1/2/3 and -0.761 for fp32), and AdamW's
    decoupled decay shrinks the fp32 master weights once. ZeRO 1-3 no longer
    take that step (DeepSpeed PR 5104). Clearing the inner optimizer's state
    brings back torch's lazy initialisation at the first real step; the fp32
    masters are re-copied from the low-precision weights they were cloned from
    (the dummy step never wrote those back). Returns True when it undid one."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(ds_optimizer, FP16_UnfusedOptimizer):
        return False
    inner = getattr(ds_optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer) or not inner.state:
        return False
    inner.state.clear()
    lp_groups = getattr(ds_optimizer, "fp16_groups", None)
    hp_groups = getattr(ds_optimizer, "fp32_groups", None)
    if lp_groups and hp_groups:
        with torch.no_grad():
            for hp_group, lp_group in zip(hp_groups, lp_groups, strict=True):
                for hp, lp in zip(hp_group, lp_group, strict=True):
                    hp.copy_(lp)
    return True


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability of a Hugging Face model to 0 (config
    fields and modules); returns what it changed. The learner must score the
    function the samplers sample from: vLLM never applies dropout, so a
    dropout forward (the learner runs in train mode, which gradient
    checkpointing needs) would make lp_learner differ from lp_sampler at
    random, and move a policy whose every advantage is 0. Hub configs set it
    (`attention_dropout`, `hidden_dropout`, GPT-2's `resid_pdrop`, ...):
    config floats and module attributes named *dropout* / *pdrop*, and every
    nn.Dropout. TRL (`disable_dropout_in_model`) and verl do the same."""
    changed: list[str] = []

    def is_rate(key: str, value) -> bool:
        return ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0.0

    def zero_config(cfg, prefix: str) -> None:
        for key, value in list(vars(cfg).items()):
            if is_rate(key, value):
                setattr(cfg, key, 0.0)
                changed.append(f"{prefix}{key}")
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
                zero_config(value, f"{prefix}{key}.")

    if getattr(model, "config", None) is not None:
        zero_config(model.config, "config.")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0.0:
            module.p = 0.0
            changed.append(f"{name}.p")
        for key, value in list(vars(module).items()):
            if is_rate(key, value):
                setattr(module, key, 0.0)
                changed.append(f"{name}.{key}")
    return changed


class LearnerWorker:
    """Learner rank `rank` of `world_size`. Construction joins the torch
    process group (all ranks must be constructed concurrently) and builds the
    DeepSpeed engine."""

    def __init__(self, rank: int, world_size: int, master_addr: str | None, master_port: int | None, model_path: str,
                 learner_cfg: LearnerConfig, loss_cfg: LossConfig, seed: int, *, use_gpu: bool = False,
                 total_steps: int | None = None, ds_config_overrides: dict | None = None,
                 cpu_threads: int | ThreadShare | None = 0):
        """`cpu_threads`: torch threads of a CPU rank: a count, the placement
        plan's ThreadShare (resolved on this node), or 0 / None (Ray's default)."""
        self.rank, self.world_size = rank, world_size
        self.model_path = str(model_path)
        learner_cfg = dataclasses.replace(learner_cfg, dtype=concrete_dtype(learner_cfg.dtype, use_gpu))
        self.cfg, self.loss_cfg = learner_cfg, loss_cfg
        self.seed = seed
        if master_addr is None:  # a group of one rank hosts its own rendezvous
            master_addr, master_port = node_address()
        os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if not use_gpu:
            os.environ["DS_ACCELERATOR"] = "cpu"
            use_env_build_dir()  # load the shm op `make venv` built, not a fresh compile (learner/ds_ops.py)
            if isinstance(cpu_threads, ThreadShare):
                cpu_threads = cpu_threads.threads()
            if cpu_threads:
                torch.set_num_threads(cpu_threads)
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from transformers import AutoModelForCausalLM

        self._deepspeed = deepspeed
        random.seed(seed + rank)
        torch.manual_seed(seed + rank)
        timeout = datetime.timedelta(seconds=learner_cfg.collective_timeout_s)
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False,
                                   timeout=timeout, rank=rank, world_size=world_size, verbose=False)
        if use_gpu:
            get_accelerator().set_device(0)  # Ray gives each rank one visible GPU
        self.device = torch.device(get_accelerator().device_name(0) if use_gpu else "cpu")

        self.ds_config = build_ds_config(learner_cfg, world_size, ds_config_overrides)
        # Every rank loads the full checkpoint into CPU memory; under ZeRO-3
        # deepspeed.initialize then partitions it (a parameter at a time onto
        # the device). Loading straight into partitions would need
        # transformers' HfDeepSpeedConfig, which requires `accelerate`.
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        source_config = copy.deepcopy(model.config)  # exports keep the checkpoint's own (dropout included)
        disable_dropout(model)  # score what the samplers sample from (see disable_dropout)
        if learner_cfg.gradient_checkpointing:
            # transformers' default is use_reentrant=False, so frozen inputs
            # (a LoRA student's embeddings) still give the adapters gradients.
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        # transformers' causal LMs take `logits_to_keep` (lm_head on the last N
        # positions only); a model class without it gets full logits.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        self.hf_config = source_config
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        # LoRA (learner.lora.rank > 0): peft adapters on the target modules,
        # the base frozen. Wrapped after disable_dropout, so the adapters'
        # own dropout is learner.lora.dropout (see LoraConfig).
        self.lora = learner_cfg.lora.rank > 0
        self._peft_config = None
        if self.lora:
            from learner.lora import wrap

            model = wrap(model, learner_cfg.lora, self.model_path)
            self._peft_config = model.peft_config["default"]
        # Only trainable parameters reach the optimizer (all of them in full
        # fine-tuning, the adapters with LoRA).
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learner_cfg.lr,
                                      betas=tuple(learner_cfg.betas), weight_decay=learner_cfg.weight_decay,
                                      eps=1e-8)
        lr_factor(0, learner_cfg.warmup_steps, learner_cfg.lr_schedule, total_steps, learner_cfg.min_lr_ratio)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
                s, learner_cfg.warmup_steps, learner_cfg.lr_schedule, total_steps, learner_cfg.min_lr_ratio))

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.ds_config)
        undo_init_optimizer_step(self.engine.optimizer)
        self.zero3 = int(self.ds_config["zero_optimization"]["stage"]) == 3
        self.steps_done = 0  # optimizer steps taken (saved in checkpoints)
        self._sender = None
        self._sync_dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ misc

    def ready(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "zero_stage": self.ds_config["zero_optimization"]["stage"], "steps_done": self.steps_done,
                # As the DeepSpeed engine took them (defaults, opd's and learner.deepspeed).
                "deepspeed": {"zero_stage": self.engine.zero_optimization_stage(),
                              "reduce_bucket_size": self.engine.zero_reduce_bucket_size(),
                              "overlap_comm": self.engine.zero_overlap_comm()}}

    def set_loss_config(self, loss_cfg: LossConfig) -> None:
        self.loss_cfg = loss_cfg

    def address(self) -> tuple[str, int]:
        return node_address()

    # ----------------------------------------------------------- training

    def _logprobs(self, mb, temperature: float, *, top_k: int = 0, top_p: float = 1.0,
                  loss_is_sampling: bool = True):
        """Forward pass; returns (logits, lp_sampling_B_T, lp_loss_B_T,
        lp_loss_top_B_T_K, lp_loss_tail_B_T).

        `lp_sampling_B_T` is the learner's log-prob of each completion token
        under the distribution the sampler drew it from, as the sampler's
        processed logprobs are: logits / `temperature`, masked to vLLM's
        top-k / nucleus set (`top_k`, `top_p`) and renormalised
        (learner/logprobs.py). The importance ratio and the sampler-vs-learner
        metrics use it. With `loss_is_sampling` (reverse_kl trains the
        sampling distribution) `lp_loss_B_T` is that same tensor and the
        other two are None. Otherwise (sft, the top-k divergences) `lp_loss_*`
        is under the model's own distribution (temperature 1, untruncated):
        the completion token, the teacher's top-k ids, and with
        loss.topk_tail="bucket" the exact log-mass outside those ids; then
        `lp_sampling_B_T` carries no gradient (unless it is the same
        distribution, then the same tensor)."""
        kwargs = {}
        first = 0
        if self._logits_to_keep:
            # Logits only from the earliest position that predicts a completion
            # token on: the shortest prompt's positions cost neither lm_head
            # work nor logits memory (and their gradient).
            first = int(mb.predict_pos_B_T.min())
            kwargs["logits_to_keep"] = mb.input_ids_B_L.shape[1] - first
        logits_B_L_V = self.engine(input_ids=mb.input_ids_B_L, attention_mask=mb.attention_mask_B_L,
                                   use_cache=False, **kwargs).logits
        pos, sampled = mb.predict_pos_B_T, mb.completion_ids_B_T[..., None]
        temperature, top_k, top_p = sampling_truncation(temperature, top_k, top_p)

        def sampling_lp():
            return completion_logprobs(logits_B_L_V, pos, sampled, temperature, first, top_k=top_k,
                                       top_p=top_p)[..., 0]

        if loss_is_sampling:
            lp = sampling_lp()
            return logits_B_L_V, lp, lp, None, None
        # Score the sampled token and, after it, the teacher's top-k ids (and
        # the mass outside them: absent entries, at -inf, take the first id's
        # place so that their tokens count as tail).
        ids_B_T_K, tail_from, K = sampled, None, 0
        if mb.teacher_top_ids_B_T_K is not None:
            top_ids = mb.teacher_top_ids_B_T_K
            K = top_ids.shape[-1]
            if self.loss_cfg.topk_tail == "bucket":
                top_ids = torch.where(torch.isfinite(mb.teacher_top_lp_B_T_K), top_ids, top_ids[..., :1])
                tail_from = 1
            ids_B_T_K = torch.cat([sampled, top_ids], dim=-1)
        lp_B_T_K = completion_logprobs(logits_B_L_V, pos, ids_B_T_K, 1.0, first, tail_from=tail_from)
        lp_loss_B_T = lp_B_T_K[..., 0]
        if temperature == 1.0 and top_k == 0 and top_p == 1.0:
            lp_sampling_B_T = lp_loss_B_T
        else:
            with torch.no_grad():
                lp_sampling_B_T = sampling_lp()
        top_B_T_K = lp_B_T_K[..., 1:1 + K] if K else None
        tail_B_T = lp_B_T_K[..., 1 + K] if tail_from is not None else None
        return logits_B_L_V, lp_sampling_B_T, lp_loss_B_T, top_B_T_K, tail_B_T

    def train_step(self, shard: RolloutBatch | None, micro_batches: list[list[int]], denominator: float,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict:
        """One optimizer step on this rank's `shard`, cut into `micro_batches`
        (row indices into the shard; [] = zero-weight dummy pass). The loss of
        each micro-batch is its share of the GLOBAL loss (`denominator` is the
        global token or sequence count), scaled by world_size because DeepSpeed
        averages gradients over ranks: the summed gradient is then exactly the
        whole batch's. Returns sums and maxima that the group reduces."""
        eng = self.engine
        eng.train()
        s = {k: 0.0 for k in ("loss", "tokens", "sequences", "padded_tokens", "real_tokens", "kl_sum", "kl_tokens",
                              "teacher_lp_sum", "learner_lp_sum", "sampler_lp_sum", "ratio_sum",
                              "truncated", "abs_lp_diff_sum")}
        s["ratio_max"] = 0.0
        t0 = time.perf_counter()
        for m, rows in enumerate(micro_batches):
            eng.set_gradient_accumulation_boundary(m == len(micro_batches) - 1)
            if shard is None or not rows:
                mb = collate(shard if shard is not None else _EMPTY, [], self.pad_id).to(self.device)
            else:
                mb = collate(shard, rows, self.pad_id).to(self.device)
            # reverse_kl trains the sampled (tempered, truncated) distribution
            # through the importance ratio; sft and the top-k divergences fit
            # the model's own distribution (temperature 1) to the target.
            logits, sampling_lp, loss_lp, top_lp, tail_lp = self._logprobs(
                mb, temperature, top_k=top_k, top_p=top_p, loss_is_sampling=self.loss_cfg.kind == "reverse_kl")
            if mb.num_rows == 0:
                # Dummy pass: same collectives as a real one, zero gradient.
                loss = logits.float().sum() * 0.0
            else:
                inputs = LossInputs(mask_B_T=mb.mask_B_T, learner_lp_B_T=loss_lp, sampler_lp_B_T=mb.sampler_lp_B_T,
                                    teacher_lp_B_T=mb.teacher_lp_B_T, student_top_lp_B_T_K=top_lp,
                                    teacher_top_lp_B_T_K=mb.teacher_top_lp_B_T_K, student_tail_lp_B_T=tail_lp)
                if shard.reward_advantages_B is not None:  # reward.coef * (R - b), one per row, on every token
                    inputs.reward_advantage_B_T = torch.tensor(
                        [shard.reward_advantages_B[i] for i in rows], dtype=mb.mask_B_T.dtype,
                        device=self.device)[:, None].expand_as(mb.mask_B_T)
                loss, _ = compute_loss(inputs, self.loss_cfg, denominator)
                self._accumulate(s, mb, sampling_lp.detach(), float(loss.detach()))
            eng.backward(loss * self.world_size, scale_wrt_gas=False)
        t1 = time.perf_counter()
        lr = float(eng.get_lr()[0])
        own_norm = self._plain_grad_norm()
        eng.step()
        t2 = time.perf_counter()
        self.steps_done += 1
        gn = own_norm if own_norm is not None else eng.get_global_grad_norm()
        gn = float(gn.item() if isinstance(gn, torch.Tensor) else gn) if gn is not None else float("nan")
        s.update(grad_norm=gn, lr=lr, forward_backward_s=t1 - t0, optimizer_step_s=t2 - t1,
                 steps_done=self.steps_done, peak_memory_bytes=self._peak_memory_bytes())
        return s

    def _peak_memory_bytes(self) -> float:
        """Peak memory of this rank so far: the accelerator's allocator peak
        on GPU, the process's peak resident set on CPU."""
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0  # Linux reports KiB

    def _plain_grad_norm(self) -> float | None:
        """Global grad norm (before clipping) for plain fp32 data parallel
        (ZeRO 0), where DeepSpeed does not report one; after the boundary
        backward every rank holds the all-reduced gradient. None otherwise
        (ZeRO 1-3 and bf16 optimizers report their own)."""
        if self.ds_config["zero_optimization"]["stage"] != 0 or self.ds_config["bf16"]["enabled"]:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _accumulate(self, s: dict, mb, learner_lp_B_T: torch.Tensor, loss: float) -> None:
        mask = mb.mask_B_T.bool()
        lp = learner_lp_B_T.double()[mask]
        slp = mb.sampler_lp_B_T.double()[mask]
        log_ratio = lp - slp
        ratio = torch.exp(log_ratio)
        s["loss"] += loss
        s["tokens"] += float(mask.sum())
        s["sequences"] += float(mb.num_rows)
        s["padded_tokens"] += float(mb.input_ids_B_L.numel())
        s["real_tokens"] += float(mb.attention_mask_B_L.sum())
        s["learner_lp_sum"] += float(lp.sum())
        s["sampler_lp_sum"] += float(slp.sum())
        s["ratio_sum"] += float(ratio.sum())
        s["ratio_max"] = max(s["ratio_max"], float(ratio.max()) if ratio.numel() else 0.0)
        s["truncated"] += float((ratio > self.loss_cfg.ratio_cap).sum())
        s["abs_lp_diff_sum"] += float(log_ratio.abs().sum())
        if mb.teacher_lp_B_T is not None:
            tlp = mb.teacher_lp_B_T.double()[mask]
            s["teacher_lp_sum"] += float(tlp.sum())
            s["kl_sum"] += float((slp - tlp).sum())
            s["kl_tokens"] += float(mask.sum())

    def logprobs(self, batch: RolloutBatch, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> list[list[float]]:
        """The learner's log-probs of each completion token under the sampling
        distribution (temperature, top-k, top-p; no grad). Every rank must
        call it with the same batch under ZeRO-3 (forward gathers)."""
        self.engine.eval()
        out: list[list[float]] = []
        with torch.no_grad():
            for i in range(len(batch)):
                mb = collate(batch, [i], self.pad_id).to(self.device)
                _, lp, _, _, _ = self._logprobs(mb, temperature, top_k=top_k, top_p=top_p)
                out.append(lp[0, : len(batch.completion_ids_B_T[i])].double().cpu().tolist())
        return out

    # ------------------------------------------------------- full weights

    def _export_items(self) -> list:
        """The student's checkpoint tensors, HF names, in order: each live
        parameter in full fine-tuning; with LoRA the base parameters, each
        adapted weight merged with its adapter (learner.lora.export_items)."""
        from learner.lora import ExportItem, export_items

        if self.lora:
            return export_items(self.engine.module, hf_name)
        return [ExportItem(hf_name(n), [p], lambda p=p: p.detach()) for n, p in self.engine.module.named_parameters()]

    def param_specs(self, dtype: str | None = None) -> list[ParamSpec]:
        """Full-shape specs of every checkpoint tensor, HF names, in iteration
        order (with LoRA: the merged base weights, no adapter tensors)."""
        out = []
        for item in self._export_items():
            p = item.params[0]
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            out.append(ParamSpec(item.name, dtype or dtype_name(p.dtype), shape))
        return out

    def iter_full_params(self, bucket_bytes: int = 64 << 20, dtype: torch.dtype | None = None,
                         gathered_views: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for every parameter, in `param_specs`
        order. EVERY rank must run this iterator to the end in lockstep: under
        ZeRO-3 each bucket of at most `bucket_bytes` is gathered with
        `GatheredParameters`, a collective. Without ZeRO-3 a tensor is the
        live weight itself (no copy unless `dtype` converts it): read it
        before the next optimizer step, copy what you keep. Under ZeRO-3 it
        is a copy made inside the gather, unless `gathered_views`: then it is
        the gathered weight, valid only until the next one is requested (for
        a consumer that copies each tensor before asking for the next, like
        the CPU weight senders; vLLM's NCCL packer keeps several). Memory is
        bounded by one gathered bucket. With LoRA the tensors are the merged
        base weights (`_export_items`): each merged one is a new tensor."""
        items = self._export_items()
        if not self.zero3:
            for it in items:
                t = it.make()
                yield it.name, (t.to(dtype) if dtype is not None else t)
            return
        bucket: list = []
        size = 0

        def flush(bucket):
            with self._deepspeed.zero.GatheredParameters([p for it in bucket for p in it.params], modifier_rank=None):
                if gathered_views:
                    for it in bucket:
                        t = it.make()
                        yield it.name, (t.to(dtype) if dtype is not None else t)
                    return
                copies = []
                for it in bucket:
                    t = it.make()
                    copies.append((it.name, t.to(dtype) if dtype is not None else t.clone()))
            yield from copies

        for it in items:
            nbytes = sum(p.ds_numel * p.element_size() for p in it.params)
            if bucket and size + nbytes > bucket_bytes:
                yield from flush(bucket)
                bucket, size = [], 0
            bucket.append(it)
            size += nbytes
        if bucket:
            yield from flush(bucket)

    # ------------------------------------------------------------- LoRA

    def adapter_files(self) -> dict[str, bytes] | None:
        """The LoRA adapter in peft's format ({file name: bytes}: learner.lora
        adapter_files) on rank 0, None elsewhere. Every rank must call it in
        lockstep: under ZeRO-3 the adapter weights are gathered (one
        collective over the adapter parameters only, a small fraction of the
        model)."""
        from learner.lora import adapter_files, adapter_params

        if not self.lora:
            raise RuntimeError("adapter_files on a learner without LoRA (learner.lora.rank=0)")
        named = adapter_params(self.engine.module, hf_name)
        state = {}
        ctx = (self._deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None) if self.zero3
               else contextlib.nullcontext())
        with ctx:
            if self.rank == 0:
                state = {k: p.detach().to("cpu", copy=True) for k, p in named}
        return adapter_files(state, self._peft_config) if self.rank == 0 else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full CPU state dict on rank 0 (None elsewhere); all ranks call it."""
        out = {}
        for n, t in self.iter_full_params():
            if self.rank == 0:
                out[n] = t.to("cpu", copy=True)  # without ZeRO-3 the iterator yields the live weights
        return out if self.rank == 0 else None

    def export_hf(self, path: str, max_shard_size: int | str = EXPORT_MAX_SHARD_SIZE) -> str | None:
        """Write a Hugging Face checkpoint of the current weights with
        transformers' `save_pretrained`: safetensors shards of at most
        `max_shard_size` (with their index when there are several) in the
        training dtype (the parameters' own: bfloat16 under learner.dtype
        bfloat16, else float32), config.json, the source model's generation
        config and its tokenizer (tokenizer files and chat template, through
        the tokenizer's own save_pretrained). transformers and vLLM load it as
        they load the source model. All ranks call it (a ZeRO-3 gather); rank
        0 writes into a temp dir and renames it into place, so `path` is
        either the previous export or the complete new one. With LoRA the
        weights are merged (a plain checkpoint of the base architecture and
        names) and the adapter is also saved alone, in peft's format, in
        `adapter/` under it (loaders of the model read only the top level)."""
        state = self.full_state_dict()
        adapter = self.adapter_files() if self.lora else None  # all ranks: a ZeRO-3 gather
        if self.rank != 0:
            return None
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._save_pretrained(tmp, state, max_shard_size)
            if adapter is not None:
                from rollout.weight_sync import write_adapter

                write_adapter(tmp / "adapter", adapter)
            ckpt.fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return str(final)

    def _save_pretrained(self, out: Path, state: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
        """Rank 0: `state` (full HF-named tensors) saved as a model directory.
        The model that saves it is built on the meta device from the config
        (no memory, no DeepSpeed hooks); save_pretrained takes the weights
        from `state` and handles tied embeddings and sharding itself."""
        import copy

        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        module = self.engine.module
        saved = set(module.state_dict(keep_vars=True))
        for n, b in module.named_buffers():  # persistent buffers, if the model has any
            name = hf_name(n).removeprefix("base_model.model." if self.lora else "")  # peft's prefix
            if n in saved and name not in state:
                state[name] = b.detach().to("cpu", copy=True)
        config = copy.deepcopy(self.hf_config)
        config.use_cache = True  # off while training; on for whoever loads the export
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
        if (Path(self.model_path) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(self.model_path)
        model.save_pretrained(out, state_dict=state, max_shard_size=max_shard_size)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out)

    # --------------------------------------------------------- weight sync

    def init_weight_sync(self, client, backend: str, bucket_bytes: int, timeout_s: float,
                         dtype: str | None = None) -> str | None:
        """Rank 0 builds the sender for `backend` ("auto", "gloo", "nccl";
        "auto" resolved here, see learner/weight_sender.make_sender) and
        rendezvouses with every sampler; returns the transport it chose. Other
        ranks only record the dtype (and return None)."""
        self._sync_dtype = None if dtype is None else getattr(torch, dtype)
        self._sync_bucket_bytes = int(bucket_bytes)
        if self.rank != 0:
            return None
        from learner.weight_sender import make_sender

        # Called again after a sampler restart: tear the old group down first so
        # its store port and gloo sockets are released.
        if getattr(self, "_sender", None) is not None:
            try:
                self._sender.shutdown()
            except Exception:  # noqa: BLE001 - the old group may already be broken (a peer died)
                pass
            self._sender = None
        addr, port = node_address()
        self._sender = make_sender(client, backend, addr, port, bucket_bytes=bucket_bytes, timeout_s=timeout_s)
        self._sender.connect()
        return self._sender.backend

    def push_weights(self, version: int) -> dict:
        """Send the current weights as `version`. Every rank calls it in
        lockstep: all ranks run the gather iterator to the end (ZeRO-3
        collectives), rank 0 streams what it yields to the samplers. If rank 0's
        send fails part-way it still drains the iterator so the other ranks'
        gathers complete, then raises."""
        t0 = time.perf_counter()
        dt = self._sync_dtype
        specs = self.param_specs(dtype_name(dt) if dt is not None else None)
        # Other ranks only drain the iterator: no copy for them either.
        views = self.rank != 0 or getattr(self._sender, "copies_each_tensor_first", False)
        tensors = self.iter_full_params(getattr(self, "_sync_bucket_bytes", 64 << 20), dt, gathered_views=views)
        if self.rank == 0:
            if self._sender is None:
                raise RuntimeError("push_weights before init_weight_sync: call LearnerGroup.init_weight_sync("
                                   "client) once after the samplers are up")
            try:
                self._sender.send(version, specs, tensors)
            finally:
                for _ in tensors:
                    pass
            stats = dict(getattr(self._sender, "last_stats", {}) or {})
        else:
            for _ in tensors:
                pass
            stats = {}
        stats["time/learner_push_weights_s"] = time.perf_counter() - t0
        return stats

    # --------------------------------------------------------- checkpoints

    def save_checkpoint(self, path: str) -> None:
        """Write this rank's part of the training state into the learner
        checkpoint directory `path` (DeepSpeed's model/optimizer/scheduler
        files under `engine/`, this rank's RNG state; rank 0 adds meta.json).
        All ranks call it; the driver commits the checkpoint afterwards
        (cluster/checkpoint.py)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(d), tag="engine", client_state={"steps_done": self.steps_done},
                                    save_latest=False)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        try:
            import numpy as np

            rng["numpy"] = np.random.get_state()
        except ImportError:
            pass
        torch.save(rng, d / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            ckpt.write_meta(d, {"steps_done": self.steps_done, "world_size": self.world_size,
                                "zero_stage": int(self.ds_config["zero_optimization"]["stage"]),
                                "dtype": self.cfg.dtype, "model_path": self.model_path, "saved_at": time.time(),
                                "lora": dataclasses.asdict(self.cfg.lora)})

    def load_checkpoint(self, path: str) -> dict:
        """Restore the full training state from the learner checkpoint
        directory `path`. All ranks call it. Returns {"steps_done", "path"}."""
        d = Path(path)
        meta = ckpt.read_meta(d)
        stage = int(self.ds_config["zero_optimization"]["stage"])
        if meta["world_size"] != self.world_size or meta["zero_stage"] != stage:
            raise ckpt.CheckpointError(
                f"checkpoint {d} was written by {meta['world_size']} learner ranks with ZeRO stage "
                f"{meta['zero_stage']}; this group has {self.world_size} ranks with stage {stage}: resume with "
                f"learner.world_size={meta['world_size']} learner.zero_stage={meta['zero_stage']}")
        saved_lora = meta.get("lora", {}).get("rank", 0)
        if saved_lora != self.cfg.lora.rank:
            raise ckpt.CheckpointError(
                f"checkpoint {d} was written with learner.lora.rank={saved_lora}; this run has "
                f"learner.lora.rank={self.cfg.lora.rank}: resume with learner.lora.rank={saved_lora} (the adapters "
                "and the optimizer state are those of that rank)")
        load_path, _ = self.engine.load_checkpoint(str(d), tag="engine", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ckpt.CheckpointError(f"DeepSpeed found no engine state in {d}/engine")
        rng_file = d / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
            if "numpy" in rng:
                import numpy as np

                np.random.set_state(rng["numpy"])
        self.steps_done = int(meta["steps_done"])
        return {"steps_done": self.steps_done, "path": str(d)}

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self._sender is not None:
            self._sender.shutdown()
            self._sender = None
        if dist.is_initialized():
            dist.destroy_process_group()


# A zero-row batch for ranks that received no samples (dummy passes only).
_EMPTY = RolloutBatch(prompt_ids_B_T=[], completion_ids_B_T=[], sampler_logprobs_B_T=[], loss_mask_B_T=[],
                      policy_versions_B=[], prompt_index_B=[], finish_reasons_B=[])
