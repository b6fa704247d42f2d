"""Exercise checks of notebook 01 (preferences and Bradley-Terry): `bt_probability` and `bt_nll`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dpo_teach import bandit
from dpo_teach.checks.engine import Case, Extreme, Inputs, Mistake, compare_with_reference, randn

__all__ = ["check_bt_nll", "check_bt_probability"]


def _reward_pairs(generator: torch.Generator) -> Inputs:
    return {
        "reward_chosen": randn(generator, 8, scale=3.0),
        "reward_rejected": randn(generator, 8, scale=3.0),
    }


def _huge_margins() -> Inputs:
    return {
        "reward_chosen": torch.tensor([1e4, -1e4, 800.0, 0.0], dtype=torch.float64),
        "reward_rejected": torch.tensor([-1e4, 1e4, 0.0, 800.0], dtype=torch.float64),
    }


def check_bt_probability(bt_probability: Callable) -> None:
    """Check bt_probability(reward_chosen, reward_rejected) -> p(y_w > y_l), shape (N,)."""
    case = Case(
        name="bt_probability",
        reference=bandit.bt_probability,
        make_inputs=_reward_pairs,
        shape_hint="Return one probability per comparison, shape (N,).",
        mistakes=[
            Mistake(
                "the chosen and rejected rewards are swapped",
                lambda rw, rl: torch.sigmoid(rl - rw),
                "p(y_w > y_l) = sigma(r_w - r_l) grows with the chosen reward r_w.",
            ),
            Mistake(
                "the sigmoid is missing",
                lambda rw, rl: rw - rl,
                "The reward difference can be any real number; sigma maps it to a probability in (0, 1).",
            ),
            Mistake(
                "the rewards are added instead of subtracted",
                lambda rw, rl: torch.sigmoid(rw + rl),
                "Only the difference r_w - r_l enters the Bradley-Terry model.",
            ),
        ],
        extremes=[
            Extreme(
                "rewards of +-10,000",
                _huge_margins(),
                "exp(r) overflows to inf for r > 709 in float64 (inf / inf = nan). Apply "
                "torch.sigmoid to the difference r_w - r_l instead of exponentiating each reward.",
            )
        ],
    )
    compare_with_reference(bt_probability, case)


def check_bt_nll(bt_nll: Callable) -> None:
    """Check bt_nll(reward_chosen, reward_rejected) -> -log sigma(r_w - r_l), shape (N,)."""
    case = Case(
        name="bt_nll",
        reference=bandit.bt_nll,
        make_inputs=_reward_pairs,
        shape_hint="Return one loss per comparison, shape (N,); average later, when training.",
        mistakes=[
            Mistake(
                "the chosen and rejected rewards are swapped",
                lambda rw, rl: -F.logsigmoid(rl - rw),
                "The likelihood of the observed preference is sigma(r_w - r_l), chosen first.",
            ),
            Mistake(
                "the minus sign is missing (this is the log-likelihood, not its negative)",
                lambda rw, rl: F.logsigmoid(rw - rl),
                "A negative log-likelihood is >= 0: -log sigma(r_w - r_l).",
            ),
            Mistake(
                "the log is missing",
                lambda rw, rl: -torch.sigmoid(rw - rl),
                "The loss is -log of the probability, not minus the probability.",
            ),
            Mistake(
                "it is 1 minus the probability instead of -log of it",
                lambda rw, rl: 1 - torch.sigmoid(rw - rl),
                "Maximum likelihood multiplies probabilities, so the loss sums -log p.",
            ),
        ],
        extremes=[
            Extreme(
                "margins of +-10,000",
                _huge_margins(),
                "torch.log(torch.sigmoid(z)) breaks for large negative z: sigmoid(-10000) rounds to 0 "
                "and log(0) = -inf. Use torch.nn.functional.logsigmoid(z), which is exact for any z.",
            )
        ],
    )
    compare_with_reference(bt_nll, case)
