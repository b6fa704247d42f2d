"""Exercise checks of notebook 04 (the model and the task): masks and sampling,
`loss_mask_from_lengths` and `top_k_logits`.

Each check runs the learner's function and the reference on seeded random inputs, names a typical
mistake when one reproduces the learner's output, and raises AssertionError with an explanation;
it prints one line when all is right. Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach.checks.engine import Case, Inputs, Mistake, compare_with_reference, loss_mask

__all__ = ["check_loss_mask", "check_top_k"]


def _lengths(generator: torch.Generator) -> Inputs:
    batch = int(torch.randint(2, 7, (), generator=generator))
    prompt_lengths = torch.randint(1, 6, (batch,), generator=generator)
    response_lengths = torch.randint(1, 8, (batch,), generator=generator)
    width = int((prompt_lengths + response_lengths).max()) + int(torch.randint(0, 3, (), generator=generator))
    return {"prompt_lengths": prompt_lengths, "response_lengths": response_lengths, "width": width}


def check_loss_mask(loss_mask_from_lengths: Callable) -> None:
    """Check loss_mask_from_lengths(prompt_lengths, response_lengths, width) -> (B, T) mask."""
    case = Case(
        name="loss_mask_from_lengths",
        reference=loss_mask,
        make_inputs=_lengths,
        shape_hint="Return one row per sequence and `width` columns: (B, width).",
        mistakes=[
            Mistake("the prompt tokens are included (this is the attention mask)",
                    lambda p, r, w: (torch.arange(w).unsqueeze(0) < (p + r).unsqueeze(1)).long(),
                    "Only response tokens (and the response's EOS) are scored: start at position prompt_length."),
            Mistake("the mask is one position too early (it includes the last prompt token)",
                    lambda p, r, w: loss_mask(p - 1, r, w),
                    "Position t of the loss mask marks token t itself; sequence_logps does the shift."),
            Mistake("the mask is one position too late (it leaves out the first response token and "
                    "covers the first padding position)",
                    lambda p, r, w: loss_mask(p + 1, r, w),
                    "Positions count from 0: the first response token sits at position prompt_length."),
            Mistake("the last response token (EOS) is left out",
                    lambda p, r, w: loss_mask(p, r - 1, w),
                    "The response's EOS is scored too: the model must learn where a response ends."),
            Mistake("the padding is included",
                    lambda p, r, w: (torch.arange(w).unsqueeze(0) >= p.unsqueeze(1)).long(),
                    "Stop at prompt_length + response_length: what follows is padding."),
        ],
    )
    compare_with_reference(loss_mask_from_lengths, case)


def _top_k_logits(logits: Tensor, k: int) -> Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest logit of each row
    return logits.masked_fill(logits < kth, float("-inf"))


def _logits(generator: torch.Generator) -> Inputs:
    vocab = int(torch.randint(5, 12, (), generator=generator))
    return {"logits": 2 * torch.randn(3, vocab, generator=generator, dtype=torch.float64),
            "k": int(torch.randint(1, vocab, (), generator=generator))}


def check_top_k(top_k_logits: Callable) -> None:
    """Check top_k_logits(logits, k): the k largest logits of each row kept, the others -inf."""

    def keep_smallest(logits, k):
        kth = torch.topk(logits, k, dim=-1, largest=False).values[..., -1:]
        return logits.masked_fill(logits > kth, float("-inf"))

    def zeroed(logits, k):
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, 0.0)

    case = Case(
        name="top_k_logits",
        reference=_top_k_logits,
        make_inputs=_logits,
        shape_hint="Return logits of the same shape as the input (B, V).",
        mistakes=[
            Mistake("the k SMALLEST logits are kept", keep_smallest, "Keep the k largest: torch.topk(logits, k)."),
            Mistake("the dropped logits are set to 0 instead of -inf", zeroed,
                    "A logit of 0 still has probability e^0 / Z > 0 after the softmax; -inf gives exactly 0."),
            Mistake("one token too many is kept", lambda x, k: _top_k_logits(x, min(k + 1, x.shape[-1])),
                    "Keep exactly k tokens per row: compare with the k-th largest logit, values[..., -1]."),
            Mistake("one token too few is kept", lambda x, k: _top_k_logits(x, max(k - 1, 1)),
                    "Keep exactly k tokens per row: compare with the k-th largest logit, values[..., -1]."),
        ],
    )
    compare_with_reference(top_k_logits, case)
