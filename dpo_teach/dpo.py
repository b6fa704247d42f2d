"""Direct Preference Optimization: the DPO loss (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

The loss is a pure function of four per-example sequence log-probabilities (summed over response
tokens, see COURSE.md), so the same code serves the exact bandit world of notebook 03 and the
GPT-2 policy of notebook 08.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _check_inputs(
    named: dict[str, Tensor], beta: float, loss_type: str, label_smoothing: float
) -> None:
    """Raise ValueError with a clear message for inputs dpo_loss cannot take."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point tensor of log-probs, got dtype {value.dtype}"
            )
        if value.ndim != 1:
            raise ValueError(
                f"{name} must have shape (B,), one log-prob per example, got {tuple(value.shape)}"
            )
    shapes = {name: tuple(value.shape) for name, value in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the four log-prob tensors must have the same shape (B,), got {shapes}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss per example, and the implicit rewards of the chosen and rejected responses.

    Args:
        policy_chosen_logps: log pi(y_w|x) under the policy, summed over response tokens. Shape: (B,)
        policy_rejected_logps: log pi(y_l|x) under the policy. Shape: (B,)
        ref_chosen_logps: log pi_ref(y_w|x) under the frozen reference model. Shape: (B,)
        ref_rejected_logps: log pi_ref(y_l|x) under the reference model. Shape: (B,)
        beta: strength of the KL regularisation towards pi_ref (the paper's beta).
        loss_type: "sigmoid" (DPO, Rafailov et al. 2023, Eq. 7), "hinge" (SLiC, Zhao et al. 2023:
            relu(1 - beta h)) or "ipo" (Azar et al. 2023, Eq. 17: (h - 1/(2 beta))^2; IPO's authors
            use length-normalised (mean) log-probs, so pass those for IPO).
        label_smoothing: eps of conservative DPO (the official DPO code, Mitchell 2023): the label
            is taken to be flipped with probability eps, giving
            -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). Sigmoid loss only.

    With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)), the sigmoid
    loss is -log sigma(beta h) (Eq. 7), computed with logsigmoid, so it is finite for any margin.

    Returns:
        losses: the loss of each example (take .mean() to train). Shape: (B,)
        chosen_rewards: implicit reward beta (log pi(y_w|x) - log pi_ref(y_w|x)), detached. Shape: (B,)
        rejected_rewards: implicit reward beta (log pi(y_l|x) - log pi_ref(y_l|x)), detached. Shape: (B,)
    """
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _check_inputs(named, beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,) the margin of log-ratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # "ipo"
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
