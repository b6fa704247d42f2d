"""Exercise checks of notebook 11 (when DPO goes wrong): `length_only_accuracy` and `repetition_rate`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach.checks.engine import Case, Extreme, Inputs, Mistake, compare_with_reference

__all__ = ["check_length_only_accuracy", "check_repetition_rate"]


# ---- length_only_accuracy -------------------------------------------------------------------------


def _length_only_accuracy(chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """The reference: the share of pairs whose chosen response is the longer one, a tie counted 1/2."""
    wins = (chosen_lengths > rejected_lengths).double()
    ties = (chosen_lengths == rejected_lengths).double()
    return (wins + 0.5 * ties).mean()


def _lengths(generator: torch.Generator) -> Inputs:
    size = int(torch.randint(8, 20, (), generator=generator))
    chosen = torch.randint(1, 10, (size,), generator=generator)
    rejected = torch.randint(1, 10, (size,), generator=generator)
    rejected[:2] = chosen[:2]  # every input has ties
    return {"chosen_lengths": chosen, "rejected_lengths": rejected}


def check_length_only_accuracy(length_only_accuracy: Callable) -> None:
    """Check length_only_accuracy(chosen_lengths, rejected_lengths) -> the accuracy, a 0-dimensional
    tensor, of the classifier "the longer response is the chosen one", a tie counted one half."""
    case = Case(
        name="length_only_accuracy",
        reference=_length_only_accuracy,
        make_inputs=_lengths,
        shape_hint="Return one number for the whole set of pairs: a 0-dimensional tensor (take the mean).",
        mistakes=[
            Mistake("ties are counted as right (>= instead of >)",
                    lambda c, r: (c >= r).double().mean(),
                    "A tie is a coin flip for a classifier that only sees lengths: count it one half."),
            Mistake("ties are counted as wrong",
                    lambda c, r: (c > r).double().mean(),
                    "A tie is a coin flip for a classifier that only sees lengths: count it one half."),
            Mistake("the shorter response is taken to be the chosen one",
                    lambda c, r: 1 - _length_only_accuracy(c, r),
                    "The classifier says 'chosen' for the LONGER response: a win is chosen_lengths > rejected_lengths."),
            Mistake("it returns a count, not a fraction",
                    lambda c, r: _length_only_accuracy(c, r) * len(c),
                    "Divide by the number of pairs (or take the mean)."),
        ],
    )
    compare_with_reference(length_only_accuracy, case)


# ---- repetition_rate --------------------------------------------------------------------------------


def _ngrams(ids: Tensor, n: int) -> list[tuple[int, ...]]:
    values = ids.tolist()
    return [tuple(values[i:i + n]) for i in range(len(values) - n + 1)]


def _repetition_rate(ids: Tensor, n: int) -> Tensor:
    """The reference: the share of the n-grams of `ids` that repeat an n-gram seen earlier in it."""
    grams = _ngrams(ids, n)
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return torch.tensor(repeats / len(grams) if grams else 0.0, dtype=torch.float64)


def _token_ids(generator: torch.Generator) -> Inputs:
    length = int(torch.randint(8, 24, (), generator=generator))
    return {"ids": torch.randint(0, 4, (length,), generator=generator),  # 4 token ids: repeats are common
            "n": int(torch.randint(2, 5, (), generator=generator))}


def _every_copy(ids: Tensor, n: int) -> Tensor:
    grams = _ngrams(ids, n)
    counted = sum(grams.count(g) > 1 for g in grams)
    return torch.tensor(counted / len(grams) if grams else 0.0, dtype=torch.float64)


def check_repetition_rate(repetition_rate: Callable) -> None:
    """Check repetition_rate(ids, n) -> the share (a 0-dimensional tensor) of the n-grams of the 1-D
    tensor `ids` that repeat an n-gram seen earlier in `ids`; 0 when `ids` has no n-gram."""
    case = Case(
        name="repetition_rate",
        reference=_repetition_rate,
        make_inputs=_token_ids,
        shape_hint="Return one number for the sequence: a 0-dimensional tensor.",
        mistakes=[
            Mistake("it returns the share of DISTINCT n-grams (distinct-n), not of repeated ones",
                    lambda ids, n: 1 - _repetition_rate(ids, n),
                    "A repeated n-gram is one seen before: count the n-grams already in a set when you reach them."),
            Mistake("the first occurrence of a repeated n-gram is counted too",
                    _every_copy,
                    "Count an n-gram only when it has been seen before: its first occurrence is new."),
            Mistake("it divides by the number of tokens, not of n-grams",
                    lambda ids, n: _repetition_rate(ids, n) * max(len(ids) - n + 1, 0) / len(ids),
                    "A sequence of L tokens has L - n + 1 n-grams: divide by that."),
            Mistake("n is ignored: it counts repeated single tokens",
                    lambda ids, n: _repetition_rate(ids, 1),
                    "An n-gram is n consecutive tokens: ids[i:i + n]."),
        ],
        extremes=[
            Extreme("a response shorter than n (it has no n-gram at all)",
                    {"ids": torch.tensor([3, 1]), "n": 3},
                    "With no n-gram there is nothing repeated: return 0.0 instead of dividing 0 by 0."),
        ],
    )
    compare_with_reference(repetition_rate, case)
