"""Exercise checks of notebook 06 (the reward model): reading the last token and rank correlation,
`last_token_index` and `spearman`.

Each check runs the learner's function and the reference on seeded random inputs, names a typical
mistake when one reproduces the learner's output, and raises AssertionError with an explanation;
it prints one line when all is right. Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_teach.checks.engine import Case, Extreme, Inputs, Mistake, compare_with_reference
from dpo_teach.evaluation import spearman_correlation
from dpo_teach.reward import last_token_index

__all__ = ["check_last_token_index", "check_spearman"]


def _masks(generator: torch.Generator) -> Inputs:
    batch, width = 6, 10
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    positions = torch.arange(width).unsqueeze(0)
    left = torch.rand(batch, generator=generator) < 0.5  # some rows left-padded, some right-padded
    right_mask = positions < lengths.unsqueeze(1)
    left_mask = positions >= (width - lengths).unsqueeze(1)
    return {"attention_mask": torch.where(left.unsqueeze(1), left_mask, right_mask).long()}


def check_last_token_index(learner_last_token_index: Callable) -> None:
    """Check last_token_index(attention_mask) -> index of each row's last real token, shape (B,)."""
    case = Case(
        name="last_token_index",
        reference=last_token_index,
        make_inputs=_masks,
        shape_hint="Return one index per row, shape (B,).",
        mistakes=[
            Mistake("it returns the number of real tokens (one past the last one)",
                    lambda m: m.sum(1), "Indices start at 0: the last of n tokens of a right-padded row is n - 1."),
            Mistake("it assumes right padding (length - 1), which is wrong for left-padded rows",
                    lambda m: m.sum(1) - 1,
                    "A left-padded row's last real token is at the END. Take the largest position whose mask is 1."),
            Mistake("it returns the FIRST real token", lambda m: m.argmax(1),
                    "argmax returns the first maximum; multiply the mask by the positions first."),
        ],
    )
    compare_with_reference(learner_last_token_index, case)


def _scores(generator: torch.Generator) -> Inputs:
    x = torch.randn(20, generator=generator, dtype=torch.float64)
    y = torch.exp(2 * x) + 0.5 * torch.randn(20, generator=generator, dtype=torch.float64)  # monotone + noise
    return {"x": x, "y": y}


def check_spearman(spearman: Callable) -> None:
    """Check spearman(x, y) -> Spearman rank correlation of two (N,) tensors without ties."""

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return (x * y).sum() / (x.norm() * y.norm())

    case = Case(
        name="spearman",
        reference=spearman_correlation,
        make_inputs=_scores,
        rtol=1e-5,
        atol=1e-7,
        shape_hint="Return one number: a 0-dimensional tensor.",
        mistakes=[
            Mistake("it is the Pearson correlation of the raw values", pearson,
                    "Replace each value by its rank first (the rank of the smallest is 0)."),
            Mistake("it uses argsort once, which gives the ORDER of the indices, not the ranks",
                    lambda x, y: pearson(x.argsort().double(), y.argsort().double()),
                    "The rank of x[i] is argsort(argsort(x))[i]."),
        ],
        extremes=[Extreme("already sorted inputs",
                          {"x": torch.arange(8, dtype=torch.float64), "y": torch.arange(8, dtype=torch.float64) ** 3})],
    )
    compare_with_reference(spearman, case)
