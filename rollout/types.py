"""Types the rollout stage produces. Plain dataclasses of lists that pickle
across Ray actor boundaries; no vllm, torch or deepspeed import here, so the
learner (which must never import vllm) can import this module.

Shape suffixes: B = samples in a batch, T = completion tokens of one sample
(ragged: each sample has its own T), K = teacher top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Completion:
    """One sampled completion of one prompt, as a sampler actor returns it."""

    prompt_index: int  # index of the prompt in the request that produced it
    sample_index: int  # 0..n-1 among the n samples of that prompt
    prompt_ids: list[int]
    completion_ids: list[int]
    # log p_sampler(x_t | x_<t) of each sampled token, under the distribution
    # the token was actually drawn from (temperature/top-p/top-k applied:
    # vLLM's logprobs_mode="processed_logprobs").
    sampler_logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    policy_version: int  # weight version of the sampler that produced it

    def __post_init__(self) -> None:
        if len(self.completion_ids) != len(self.sampler_logprobs):
            raise ValueError(
                f"completion has {len(self.completion_ids)} tokens but "
                f"{len(self.sampler_logprobs)} sampler logprobs"
            )


@dataclasses.dataclass
class RolloutBatch:
    """A scored batch of B samples, the unit the learner trains on.

    Column lists are parallel (index b is one sample); token-level lists are
    ragged and each of length T_b = len(completion_ids_B_T[b])."""

    prompt_ids_B_T: list[list[int]]
    completion_ids_B_T: list[list[int]]
    sampler_logprobs_B_T: list[list[float]]
    # 1 where a completion token is trained on, 0 where it is not (e.g. a
    # token whose teacher score is missing, or past a truncation).
    loss_mask_B_T: list[list[int]]
    policy_versions_B: list[int]
    prompt_index_B: list[int]  # position of the prompt in the run's prompt stream
    finish_reasons_B: list[str]
    # log p_teacher(x_t | x_<t) of each completion token; None for an SFT batch.
    teacher_logprobs_B_T: list[list[float]] | None = None
    # Teacher top-k support at each completion position (forward KL / JSD).
    teacher_top_ids_B_T_K: list[list[list[int]]] | None = None
    teacher_top_logprobs_B_T_K: list[list[list[float]]] | None = None
    answers_B: list[Any] | None = None  # carried through from the prompt source
    metadata_B: list[dict] | None = None
    # The task reward R of each sample (reward.fn), when the run has one.
    rewards_B: list[float] | None = None
    # reward.coef * (R - mean R of the prompt's samples): the sequence-level
    # reward advantage every token of the sample gets (learner/losses.py);
    # None when reward.coef is 0, so the loss is exactly the distillation one.
    reward_advantages_B: list[float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return len(self.completion_ids_B_T)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent column."""
        B = len(self.completion_ids_B_T)
        cols = {
            "prompt_ids_B_T": self.prompt_ids_B_T,
            "sampler_logprobs_B_T": self.sampler_logprobs_B_T,
            "loss_mask_B_T": self.loss_mask_B_T,
            "policy_versions_B": self.policy_versions_B,
            "prompt_index_B": self.prompt_index_B,
            "finish_reasons_B": self.finish_reasons_B,
        }
        optional = {
            "teacher_logprobs_B_T": self.teacher_logprobs_B_T,
            "teacher_top_ids_B_T_K": self.teacher_top_ids_B_T_K,
            "teacher_top_logprobs_B_T_K": self.teacher_top_logprobs_B_T_K,
            "answers_B": self.answers_B,
            "metadata_B": self.metadata_B,
            "rewards_B": self.rewards_B,
            "reward_advantages_B": self.reward_advantages_B,
        }
        cols.update({k: v for k, v in optional.items() if v is not None})
        for name, col in cols.items():
            if len(col) != B:
                raise ValueError(f"RolloutBatch.{name} has {len(col)} rows, expected {B} (one per sample)")
        token_cols = ["sampler_logprobs_B_T", "loss_mask_B_T", "teacher_logprobs_B_T",
                      "teacher_top_ids_B_T_K", "teacher_top_logprobs_B_T_K"]
        for name in token_cols:
            col = cols.get(name)
            if col is None:
                continue
            for b, (row, ids) in enumerate(zip(col, self.completion_ids_B_T, strict=True)):
                if len(row) != len(ids):
                    raise ValueError(
                        f"RolloutBatch.{name}[{b}] has {len(row)} entries but the sample has "
                        f"{len(ids)} completion tokens"
                    )

    @property
    def num_tokens(self) -> int:
        return sum(len(p) + len(c) for p, c in zip(self.prompt_ids_B_T, self.completion_ids_B_T, strict=True))

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(m) for m in self.loss_mask_B_T)

    def select(self, idx: list[int]) -> "RolloutBatch":
        """The sub-batch of rows `idx` (every column filtered together)."""
        def pick(col):
            return None if col is None else [col[i] for i in idx]

        return RolloutBatch(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        out = {}
        for f in dataclasses.fields(RolloutBatch):
            cols = [getattr(b, f.name) for b in batches]
            if all(c is None for c in cols):
                out[f.name] = None
            elif any(c is None for c in cols):
                raise ValueError(f"cannot concat batches where only some have {f.name}")
            else:
                out[f.name] = [x for c in cols for x in c]
        return RolloutBatch(**out)
