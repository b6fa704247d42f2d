"""Exercise checks of notebook 12 (scaling out): `combine_means` and `zero_bytes_per_parameter`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach.checks.engine import Case, Inputs, Mistake, compare_with_reference

__all__ = ["check_combine_means", "check_zero_bytes_per_parameter"]


# ---- combine_means --------------------------------------------------------------------------------


def _combine_means(sizes: Tensor, means: Tensor) -> Tensor:
    """The reference: each piece's means weighted by its share of the examples."""
    return (sizes.double().unsqueeze(1) * means).sum(dim=0) / sizes.sum()


def _pieces(generator: torch.Generator) -> Inputs:
    pieces = int(torch.randint(2, 7, (), generator=generator))
    sizes = torch.randint(1, 40, (pieces,), generator=generator)
    sizes[0] = 1  # a small piece next to larger ones: an unweighted mean is visibly wrong
    means = torch.randn(pieces, int(torch.randint(1, 6, (), generator=generator)), generator=generator,
                        dtype=torch.float64)
    return {"sizes": sizes, "means": means}


def check_combine_means(combine_means: Callable) -> None:
    """Check combine_means(sizes, means) -> (M,): the means over all examples, from the sizes (K,)
    of K pieces of the data and each piece's means of M metrics (K, M)."""
    case = Case(
        name="combine_means",
        reference=_combine_means,
        make_inputs=_pieces,
        shape_hint="One mean per metric: shape (M,), the number of columns of `means`.",
        mistakes=[
            Mistake("it takes the plain mean of the pieces' means", lambda s, m: m.mean(dim=0),
                    "A piece of 1 example would count as much as a piece of 40: weight each piece's mean by "
                    "its size."),
            Mistake("it sums size x mean without dividing by the number of examples",
                    lambda s, m: (s.double().unsqueeze(1) * m).sum(dim=0),
                    "size x mean is a piece's total; divide the sum of the totals by the total size."),
            Mistake("it divides by the number of pieces, not by the number of examples",
                    lambda s, m: (s.double().unsqueeze(1) * m).sum(dim=0) / len(s),
                    "The mean over examples divides by the examples: sizes.sum()."),
            Mistake("it combines over the metrics instead of over the pieces",
                    lambda s, m: (s.double().unsqueeze(1) * m).sum(dim=1) / s.sum(),
                    "The pieces are the rows of `means` (dim 0); keep one number per metric (column)."),
        ],
    )
    compare_with_reference(combine_means, case)


# ---- zero_bytes_per_parameter -----------------------------------------------------------------------

# Mixed-precision training with Adam (Rajbhandari et al. 2020, ZeRO, Section 3.1): 16-bit weights and
# gradients (2 bytes each) and K = 12 bytes of optimizer state (a float32 master copy of the weights,
# Adam's first and second moments).
WEIGHTS, GRADIENTS, OPTIMIZER = 2, 2, 12


def _zero_bytes_per_parameter(stage: int, devices: int) -> Tensor:
    """The reference: stage 1 shards the optimizer state over the devices, stage 2 the gradients
    too, stage 3 the weights too."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO has stages 0 to 3, not {stage}")
    weights = WEIGHTS / devices if stage >= 3 else WEIGHTS
    gradients = GRADIENTS / devices if stage >= 2 else GRADIENTS
    optimizer = OPTIMIZER / devices if stage >= 1 else OPTIMIZER
    return torch.tensor(weights + gradients + optimizer, dtype=torch.float64)


def _stage_and_devices(generator: torch.Generator) -> Inputs:
    return {"stage": int(torch.randint(0, 4, (), generator=generator)),
            "devices": int(2 ** torch.randint(1, 8, (), generator=generator))}


def check_zero_bytes_per_parameter(zero_bytes_per_parameter: Callable) -> None:
    """Check zero_bytes_per_parameter(stage, devices) -> the bytes per parameter that one of
    `devices` devices holds for weights, gradients and Adam's state under ZeRO stage `stage` (0: no
    sharding): a number (a float, or a 0-dimensional tensor)."""

    def as_number(stage: int, devices: int) -> Tensor:
        return torch.as_tensor(zero_bytes_per_parameter(stage, devices), dtype=torch.float64)

    case = Case(
        name="zero_bytes_per_parameter",
        reference=_zero_bytes_per_parameter,
        make_inputs=_stage_and_devices,
        num_trials=24,  # every stage, several device counts
        shape_hint="Return one number (a float).",
        mistakes=[
            Mistake("Adam's state is counted as 8 bytes (the float32 master copy of the weights is missing)",
                    lambda st, d: _zero_bytes_per_parameter(st, d) - (OPTIMIZER - 8) / (d if st >= 1 else 1),
                    "Mixed precision keeps a float32 copy of every weight for the update (4 bytes) besides "
                    "Adam's two moments (4 + 4): 12 bytes."),
            Mistake("every stage shards everything",
                    lambda st, d: torch.tensor(16.0 / d if st else 16.0, dtype=torch.float64),
                    "Stage 1 shards only the optimizer state, stage 2 adds the gradients, stage 3 the weights."),
            Mistake("the stages shard one thing too many (stage 1 already shards the gradients)",
                    lambda st, d: _zero_bytes_per_parameter(min(3, st + 1), d) if st else _zero_bytes_per_parameter(0, d),
                    "Stage 1 shards the optimizer state only; the gradients join at stage 2, the weights at 3."),
            Mistake("the stages shard one thing too few (stage 3 does not shard the weights)",
                    lambda st, d: _zero_bytes_per_parameter(max(0, st - 1), d),
                    "Stage 3 (FSDP's full sharding) shards the weights as well: every state is divided by the devices."),
        ],
    )
    compare_with_reference(as_number, case)
