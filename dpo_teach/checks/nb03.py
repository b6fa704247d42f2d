"""Exercise checks of notebook 03 (from RLHF to DPO): `implicit_reward` and `dpo_loss`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_teach.checks.engine import (
    Case,
    Extreme,
    Inputs,
    Mistake,
    compare_with_reference,
    dpo_inputs,
    randn,
    uniform,
)
from dpo_teach.dpo import dpo_loss

__all__ = ["check_dpo_loss", "check_implicit_reward"]


def _implicit_reward(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    return beta * (policy_logps - ref_logps)


def check_implicit_reward(implicit_reward: Callable) -> None:
    """Check implicit_reward(policy_logps, ref_logps, beta) -> beta (log pi - log pi_ref), shape (B,)."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        ref_logps = -uniform(generator, 5.0, 40.0) * torch.rand(
            8, generator=generator, dtype=torch.float64
        )
        policy_logps = ref_logps + randn(generator, 8, scale=2.0)
        return {
            "policy_logps": policy_logps,
            "ref_logps": ref_logps,
            "beta": uniform(generator, 0.05, 0.8),
        }

    case = Case(
        name="implicit_reward",
        reference=_implicit_reward,
        make_inputs=make_inputs,
        shape_hint="One reward per example, shape (B,).",
        mistakes=[
            Mistake(
                "beta is missing", lambda p, q, beta: p - q, "r_hat = beta * (log pi - log pi_ref)."
            ),
            Mistake(
                "the reference model is forgotten",
                lambda p, q, beta: beta * p,
                "The reward is the log-ratio to the reference: subtract ref_logps.",
            ),
            Mistake(
                "policy and reference are swapped",
                lambda p, q, beta: beta * (q - p),
                "r_hat = beta * (log pi - log pi_ref): the policy comes first.",
            ),
            Mistake(
                "beta divides instead of multiplying",
                lambda p, q, beta: (p - q) / beta,
                "r_hat = beta * (...).",
            ),
            Mistake(
                "it divides log-probs instead of subtracting them",
                lambda p, q, beta: beta * p / q,
                "log(pi / pi_ref) = log pi - log pi_ref: with log-probs, a ratio becomes a difference.",
            ),
        ],
    )
    compare_with_reference(implicit_reward, case)


def _sigmoid_dpo(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    return dpo_loss(pc, pr, rc, rr, beta=beta)


def _dpo_variant(loss: Callable, reward: Callable) -> Callable:
    """A wrong dpo_loss: `loss(pc, pr, rc, rr, beta)` and `reward(policy, ref, beta)`."""
    return lambda pc, pr, rc, rr, beta: (
        loss(pc, pr, rc, rr, beta),
        reward(pc, rc, beta),
        reward(pr, rr, beta),
    )


def _h(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    return (pc - rc) - (pr - rr)


def check_dpo_loss(dpo_loss_fn: Callable) -> None:
    """Check dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta).

    It must return (losses, chosen_rewards, rejected_rewards), each of shape (B,), as the sigmoid
    DPO loss of Rafailov et al. 2023, Eq. 7.
    """
    right = _implicit_reward
    huge = torch.tensor([1e4, -1e4, 500.0, -500.0], dtype=torch.float64)
    case = Case(
        name="dpo_loss",
        reference=_sigmoid_dpo,
        make_inputs=dpo_inputs,
        output_names=("losses", "chosen_rewards", "rejected_rewards"),
        shape_hint="Return one value per example, shape (B,); take the mean later, in the training loop.",
        grad_inputs=("policy_chosen_logps", "policy_rejected_logps"),
        mistakes=[
            Mistake(
                "beta is missing",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(_h(pc, pr, rc, rr)),
                    lambda p, q, beta: p - q,
                ),
                "The margin is beta * (log-ratio of chosen - log-ratio of rejected), and each reward is beta * log-ratio.",
            ),
            Mistake(
                "chosen and rejected are swapped (or the reference is subtracted the wrong way round)",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(-beta * _h(pc, pr, rc, rr)), right
                ),
                "The loss should fall when the chosen response gains log-ratio: -log sigma(beta * h) with "
                "h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).",
            ),
            Mistake(
                "the reference model is forgotten",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)),
                    lambda p, q, beta: beta * p,
                ),
                "DPO compares log-ratios to the reference: subtract ref_chosen_logps and ref_rejected_logps.",
            ),
            Mistake(
                "the minus sign is missing (the loss is negative)",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: F.logsigmoid(beta * _h(pc, pr, rc, rr)), right
                ),
                "The loss is -log sigma(beta * h) >= 0.",
            ),
            Mistake(
                "beta multiplies the loss instead of the margin",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -beta * F.logsigmoid(_h(pc, pr, rc, rr)), right
                ),
                "beta goes inside the sigmoid: -log sigma(beta * h).",
            ),
            Mistake(
                "beta is missing from the rewards",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)),
                    lambda p, q, beta: p - q,
                ),
                "The implicit reward is beta * (log pi - log pi_ref).",
            ),
            Mistake(
                "the rewards forget the reference model",
                _dpo_variant(
                    lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * _h(pc, pr, rc, rr)),
                    lambda p, q, beta: beta * p,
                ),
                "The implicit reward is beta * (log pi - log pi_ref).",
            ),
        ],
        extremes=[
            Extreme(
                "margins of +-10,000",
                {
                    "policy_chosen_logps": -10.0 + huge / 2,
                    "policy_rejected_logps": -10.0 - huge / 2,
                    "ref_chosen_logps": torch.full((4,), -10.0, dtype=torch.float64),
                    "ref_rejected_logps": torch.full((4,), -10.0, dtype=torch.float64),
                    "beta": 1.0,
                },
                "torch.log(torch.sigmoid(z)) breaks for large negative z: sigmoid(-10000) rounds to 0 and "
                "log(0) = -inf. Use torch.nn.functional.logsigmoid(z), which is exact for any z.",
            )
        ],
    )
    compare_with_reference(dpo_loss_fn, case)
