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

from dpo_teach.checks.engine import (
    Case,
    Extreme,
    Inputs,
    Mistake,
    compare_with_reference,
    loss_mask,
)

__all__ = ["check_loss_mask", "check_sequence_logps", "check_top_k"]


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


def _logits_batch(generator: torch.Generator) -> Inputs:
    """Random logits (B, T, V) with labels and a loss mask of prompt + response + padding rows."""
    lengths = _lengths(generator)
    batch, width = len(lengths["prompt_lengths"]), lengths["width"]
    vocab = int(torch.randint(5, 12, (), generator=generator))
    return {
        "logits": 3.0 * torch.randn(batch, width, vocab, generator=generator, dtype=torch.float64),
        "labels": torch.randint(0, vocab, (batch, width), generator=generator),
        "loss_mask": loss_mask(lengths["prompt_lengths"], lengths["response_lengths"], width),
    }


def _sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor, average: bool = False, shift: int = 1,
                    mask_shift: int = 1, normalise: bool = True) -> Tensor:
    """sequence_logps and its typical slips: shift 0 scores token t with the logits at t; mask_shift 0
    aligns the mask with the logits instead of the labels; normalise False gathers raw logits."""
    width = logits.shape[1]
    scores = logits.log_softmax(-1) if normalise else logits
    scores, labels = scores[:, : width - shift], labels[:, shift:]
    mask = mask[:, mask_shift: width - shift + mask_shift].to(logits.dtype)
    summed = (torch.gather(scores, 2, labels.unsqueeze(2)).squeeze(2) * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def check_sequence_logps(sequence_logps: Callable) -> None:
    """Check sequence_logps(logits, labels, loss_mask, average=False) -> (B,): the summed (or, with
    average=True, the mean) log-prob of each row's masked tokens, token t scored by the logits at t - 1."""
    slips = [
        Mistake("the labels are not shifted: token t is scored by the logits at position t",
                lambda lg, lb, m: _sequence_logps(lg, lb, m, shift=0, mask_shift=0),
                "The logits at position t - 1 predict token t: drop the last position of the logits and "
                "the first of the labels (and of the mask)."),
        Mistake("the mask is not shifted with the labels: it leaves out the first response token and counts "
                "the position after the response's EOS",
                lambda lg, lb, m: _sequence_logps(lg, lb, m, mask_shift=0),
                "loss_mask is aligned with the labels: slice it as the labels, loss_mask[:, 1:]."),
        Mistake("the raw logits are gathered, not log-probabilities",
                lambda lg, lb, m: _sequence_logps(lg, lb, m, normalise=False),
                "Take logits.log_softmax(dim=-1) first, then gather the label's entry."),
        Mistake("the log-probs are averaged, not summed", lambda lg, lb, m: _sequence_logps(lg, lb, m, average=True),
                "The default is the sum over the response's tokens (average=False)."),
        Mistake("the padding and prompt tokens are counted too (the mask is not applied)",
                lambda lg, lb, m: _sequence_logps(lg, lb, torch.ones_like(m)),
                "Multiply each token's log-prob by the (shifted) loss mask before summing."),
    ]
    huge = _logits_batch(torch.Generator().manual_seed(5))
    huge["logits"] = huge["logits"] * 400  # logits of about +-1,000: softmax(...).log() gives log(0) = -inf
    compare_with_reference(sequence_logps, Case(
        name="sequence_logps", reference=lambda lg, lb, m: _sequence_logps(lg, lb, m), make_inputs=_logits_batch,
        shape_hint="Return one number per row: shape (B,).", mistakes=slips, grad_inputs=("logits",),
        extremes=[Extreme("logits of about +-1,000", huge,
                          "Use logits.log_softmax(dim=-1): softmax(...).log() underflows to log(0) = -inf.")]))
    compare_with_reference(lambda lg, lb, m: sequence_logps(lg, lb, m, average=True), Case(
        name="sequence_logps (average=True)", reference=lambda lg, lb, m: _sequence_logps(lg, lb, m, average=True),
        make_inputs=_logits_batch, shape_hint="Return one number per row: shape (B,).",
        mistakes=[Mistake("the mean divides by the row's length, not by its number of masked tokens",
                          lambda lg, lb, m: _sequence_logps(lg, lb, m) / (lg.shape[1] - 1),
                          "Divide each row's sum by the number of its counted tokens (loss_mask[:, 1:].sum(-1)).")],
        grad_inputs=("logits",)))
