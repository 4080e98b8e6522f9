"""Splitting a scored batch across learner ranks and into micro-batches, and
turning a micro-batch into padded tensors. Pure functions (no distributed
state): `LearnerGroup` plans on the driver, `LearnerWorker` collates.

Plan (`plan_micro_batches`):
1. Samples go to ranks longest first, each to the rank with the fewest tokens
   so far (LPT scheduling): ranks get about the same number of tokens.
2. On each rank, samples sorted by length (longest first) fill micro-batches
   greedily while `rows * longest_row <= micro_batch_tokens` (the padded size),
   so rows of one micro-batch have similar lengths: little padding.
3. Every rank gets the same number of micro-batches (the maximum over ranks):
   a rank with fewer gets empty ones, which the worker runs as a zero-weight
   dummy forward/backward. ZeRO-3 gathers parameters in every forward and
   ZeRO-2/3 reduce gradients in every backward, as collectives, so all ranks
   must run the same number of passes or they deadlock.

Tested in tests/unit/test_checkpoint.py.
"""

from __future__ import annotations

import dataclasses

import torch

from rollout.types import RolloutBatch


def sequence_lengths(batch: RolloutBatch) -> list[int]:
    return [len(p) + len(c) for p, c in zip(batch.prompt_ids_B_T, batch.completion_ids_B_T, strict=True)]


def split_across_ranks(lengths: list[int], world_size: int) -> list[list[int]]:
    """Row indices per rank, balanced by tokens (longest-first greedy)."""
    loads = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], len(out[r]), r))
        out[r].append(i)
        loads[r] += lengths[i]
    return out


def pack_micro_batches(rows: list[int], lengths: list[int], micro_batch_tokens: int) -> list[list[int]]:
    """Greedy packing of `rows` into micro-batches whose padded size
    (rows x longest) is within `micro_batch_tokens`; a single longer row gets a
    micro-batch of its own."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in sorted(rows, key=lambda i: (-lengths[i], i)):
        new_longest = max(longest, lengths[i])
        if cur and (len(cur) + 1) * new_longest > micro_batch_tokens:
            out.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        out.append(cur)
    return out


def plan_micro_batches(lengths: list[int], world_size: int, micro_batch_tokens: int) -> list[list[list[int]]]:
    """plan[rank][m] = global row indices of micro-batch m on `rank`; every
    rank has the same number of micro-batches (empty = dummy)."""
    if micro_batch_tokens <= 0:
        raise ValueError(f"micro_batch_tokens must be > 0, got {micro_batch_tokens}")
    per_rank = [pack_micro_batches(rows, lengths, micro_batch_tokens)
                for rows in split_across_ranks(lengths, world_size)]
    n = max(1, max(len(m) for m in per_rank))
    return [m + [[] for _ in range(n - len(m))] for m in per_rank]


def rank_shard(batch: RolloutBatch, micro_batches: list[list[int]]) -> tuple[RolloutBatch | None, list[list[int]]]:
    """One rank's part of `batch` for its `micro_batches` (global row indices,
    as plan_micro_batches gives them): the rows it trains (None when it has
    only dummy passes) and its micro-batches as indices into those rows."""
    rows = sorted(i for mb in micro_batches for i in mb)
    local = {g: j for j, g in enumerate(rows)}
    return (batch.select(rows) if rows else None), [[local[i] for i in mb] for mb in micro_batches]


@dataclasses.dataclass
class MicroBatch:
    """Padded tensors of one micro-batch (b rows, L = longest prompt+completion,
    T = longest completion)."""

    input_ids_B_L: torch.Tensor  # prompt + completion, right-padded with pad_id
    attention_mask_B_L: torch.Tensor
    # Position in the sequence whose logits predict completion token t
    # (prompt_len - 1 + t); prompt_len - 1 at padding.
    predict_pos_B_T: torch.Tensor
    completion_ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor  # float, loss mask (0 at padding)
    sampler_lp_B_T: torch.Tensor
    teacher_lp_B_T: torch.Tensor | None
    teacher_top_ids_B_T_K: torch.Tensor | None
    teacher_top_lp_B_T_K: torch.Tensor | None
    num_rows: int  # 0 for a dummy micro-batch

    def to(self, device) -> "MicroBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def _pad(rows: list[list], width: int, value, dtype) -> torch.Tensor:
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def collate(batch: RolloutBatch, rows: list[int], pad_id: int = 0) -> MicroBatch:
    """Padded tensors of `batch` rows `rows`; an empty `rows` gives a one-token
    dummy micro-batch with an all-zero mask."""
    if not rows:
        z = torch.zeros(1, 1)
        return MicroBatch(torch.full((1, 2), pad_id, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                          torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), pad_id, dtype=torch.long),
                          z, z.clone(), z.clone() if batch.teacher_logprobs_B_T is not None else None,
                          None, None, num_rows=0)
    prompts = [batch.prompt_ids_B_T[i] for i in rows]
    comps = [batch.completion_ids_B_T[i] for i in rows]
    L = max(len(p) + len(c) for p, c in zip(prompts, comps, strict=True))
    T = max(1, max(len(c) for c in comps))
    seqs = [list(p) + list(c) for p, c in zip(prompts, comps, strict=True)]
    input_ids = _pad(seqs, L, pad_id, torch.long)
    attn = _pad([[1] * len(s) for s in seqs], L, 0, torch.long)
    # Padding repeats the row's first predicting position, so the smallest entry
    # is the earliest position any row needs logits at (the worker asks the
    # model for logits from there on only).
    pos = torch.tensor([[len(p) - 1 + t for t in range(len(c))] + [len(p) - 1] * (T - len(c))
                        for p, c in zip(prompts, comps, strict=True)], dtype=torch.long)
    for p in prompts:
        if len(p) == 0:
            raise ValueError("a sample has an empty prompt: the first completion token needs at least one "
                             "prompt token to be predicted from (add a BOS or chat-template prefix)")
    mask = _pad([batch.loss_mask_B_T[i] for i in rows], T, 0, torch.float32)
    top_ids = top_lp = None
    if batch.teacher_top_ids_B_T_K is not None and batch.teacher_top_logprobs_B_T_K is not None:
        k = max((len(x) for i in rows for x in batch.teacher_top_ids_B_T_K[i]), default=1)
        # Positions with fewer than K entries are padded with id 0 at -inf
        # (an absent category, see losses._topk_categories).
        top_ids = torch.tensor([[list(x) + [0] * (k - len(x)) for x in batch.teacher_top_ids_B_T_K[i]]
                                + [[0] * k] * (T - len(batch.teacher_top_ids_B_T_K[i])) for i in rows],
                               dtype=torch.long)
        neg = float("-inf")
        top_lp = torch.tensor([[list(x) + [neg] * (k - len(x)) for x in batch.teacher_top_logprobs_B_T_K[i]]
                               + [[0.0] * k] * (T - len(batch.teacher_top_logprobs_B_T_K[i])) for i in rows],
                              dtype=torch.float32)
    return MicroBatch(
        input_ids_B_L=input_ids,
        attention_mask_B_L=attn,
        predict_pos_B_T=pos,
        completion_ids_B_T=_pad(comps, T, pad_id, torch.long),
        mask_B_T=mask,
        sampler_lp_B_T=_pad([batch.sampler_logprobs_B_T[i] for i in rows], T, 0.0, torch.float32),
        teacher_lp_B_T=(None if batch.teacher_logprobs_B_T is None
                        else _pad([batch.teacher_logprobs_B_T[i] for i in rows], T, 0.0, torch.float32)),
        teacher_top_ids_B_T_K=top_ids,
        teacher_top_lp_B_T_K=top_lp,
        num_rows=len(rows),
    )
