"""Small helpers every stage shares: padding both ways, position ids, seeding, batch order.

- right_pad: rows [ids | pad], the layout of training batches (build_batch) and of the reward model;
- left_pad: rows [pad | ids], the layout of prompts for generation (every row's last prompt token
  at the same position);
- position_ids_from_mask: positions counted over real tokens only, so left padding never shifts them;
- to_device: a batch (dict) with its tensors on the model's device, for a forward pass on a GPU;
- seed_everything: python, numpy and torch in one call;
- shuffled_batches: the seeded order in which a training run reads its data;
- TOKEN_COUNTS: tokens read with a gradient ("trained"), sampled ("generated") and read by forward
  passes without a gradient ("scored", count_scored) in this process so far, for throughput
  reports (dpo_teach.rehearse).
Masks always come from lengths, never from comparing ids with the pad id (docs/conventions.md).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

__all__ = ["TOKEN_COUNTS", "count_scored", "to_device", "left_pad", "position_ids_from_mask", "right_pad", "seed_everything", "shuffled_batches"]

TOKEN_COUNTS: Counter = Counter()  # "trained": read with a gradient (training.train, ppo); "generated": sampled;
#                                    "scored": read by a forward pass without a gradient (count_scored)


def count_scored(attention_mask: torch.Tensor) -> None:
    """Add the real tokens of a forward pass to TOKEN_COUNTS["scored"] when no gradient is recorded
    (evaluations, reference log-probs, reward scores); passes with a gradient count as "trained"."""
    if not torch.is_grad_enabled():
        TOKEN_COUNTS["scored"] += int(attention_mask.sum())


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A copy of `batch` with every tensor moved to `device` (other values kept): batches are built on
    the CPU; a model on a GPU needs its inputs there. On the CPU it changes nothing."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (ids, mask), both (B, longest row): row i is rows[i], then pad_id."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T)
    return ids, mask


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (ids, mask), both (B, longest row): pad_id, then row i."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only (left padding gets 0). Shape: (B, T)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that a run gives the same numbers on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def shuffled_batches(num_items: int, batch_size: int, seed: int):
    """Endless index lists of `batch_size` items: a seeded permutation, taken batch by batch, and a
    new permutation (a new epoch) whenever the rest of the current one is too short for a batch."""
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(num_items, generator=generator), 0
    while True:
        if cursor + batch_size > len(order):  # a new epoch: reshuffle
            order, cursor = torch.randperm(num_items, generator=generator), 0
        yield order[cursor:cursor + batch_size].tolist()
        cursor += batch_size
