"""Exercise checks of notebook 01 (preferences and Bradley-Terry): `bt_probability`, `bt_nll` and
`flip_nll` (the likelihood of the label-flip model).

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dpo_teach import bandit
from dpo_teach.checks.engine import (
    Case,
    Extreme,
    Inputs,
    Mistake,
    compare_with_reference,
    randn,
    uniform,
)

__all__ = ["check_bt_nll", "check_bt_probability", "check_flip_nll"]


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


def _flip_nll(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, eps: float) -> torch.Tensor:
    """-log(eps + (1 - 2 eps) sigma(r_w - r_l)), in log space so that eps = 0 gives bt_nll exactly."""
    logsig = F.logsigmoid(reward_chosen - reward_rejected)
    log_eps = torch.full_like(logsig, math.log(eps) if eps > 0 else -math.inf)
    return -torch.logaddexp(log_eps, math.log1p(-2 * eps) + logsig)


def _flip_inputs(generator: torch.Generator) -> Inputs:
    return {**_reward_pairs(generator), "eps": uniform(generator, 0.02, 0.45)}


def check_flip_nll(flip_nll: Callable) -> None:
    """Check flip_nll(reward_chosen, reward_rejected, eps) -> -log(eps + (1 - 2 eps) sigma(r_w - r_l))."""
    case = Case(
        name="flip_nll",
        reference=_flip_nll,
        make_inputs=_flip_inputs,
        shape_hint="Return one loss per comparison, shape (N,).",
        mistakes=[
            Mistake(
                "the label-smoothed loss -(1 - eps) log sigma(d) - eps log sigma(-d) (conservative DPO's "
                "loss), which is a different model",
                lambda rw, rl, eps: -(1 - eps) * F.logsigmoid(rw - rl) - eps * F.logsigmoid(rl - rw),
                "Label smoothing averages two log-likelihoods. The flip model has one probability of what "
                "was observed, eps + (1 - 2 eps) sigma(d): take -log of that mixture.",
            ),
            Mistake(
                "eps is ignored (this is the plain Bradley-Terry loss)",
                lambda rw, rl, eps: -F.logsigmoid(rw - rl),
                "With flips, the label 'y_w preferred' has probability eps + (1 - 2 eps) sigma(r_w - r_l).",
            ),
            Mistake(
                "the weight of sigma is (1 - eps) instead of (1 - 2 eps)",
                lambda rw, rl, eps: -torch.log(eps + (1 - eps) * torch.sigmoid(rw - rl)),
                "(1 - eps) sigma(d) + eps (1 - sigma(d)) = eps + (1 - 2 eps) sigma(d): "
                "the flipped labels take eps * sigma(d) away.",
            ),
            Mistake(
                "the chosen and rejected rewards are swapped",
                lambda rw, rl, eps: _flip_nll(rl, rw, eps),
                "The observed label is 'y_w preferred': its probability grows with r_w - r_l.",
            ),
            Mistake(
                "the minus sign is missing (this is the log-likelihood, not its negative)",
                lambda rw, rl, eps: -_flip_nll(rw, rl, eps),
                "A negative log-likelihood is >= 0.",
            ),
        ],
        extremes=[
            Extreme(
                "eps = 0 and margins of +-10,000",
                {**_huge_margins(), "eps": 0.0},
                "With eps = 0 the loss is bt_nll, and log(sigmoid(-10000)) = log(0) = -inf. Stay in log "
                "space: log(eps + (1 - 2 eps) sigma(d)) = torch.logaddexp(log eps, log(1 - 2 eps) + "
                "logsigmoid(d)), with log 0 = -inf allowed for the first term.",
            )
        ],
        grad_inputs=("reward_chosen", "reward_rejected"),
    )
    compare_with_reference(flip_nll, case)
