"""Exercise checks of notebook 02 (the RLHF objective and its optimum): `kl_divergence`,
`rlhf_objective`, `objective_gradient` (the first-order condition) and `optimal_policy`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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

__all__ = [
    "ZERO_LOG_ZERO_HINT",
    "check_kl_divergence",
    "check_objective_gradient",
    "check_optimal_policy",
    "check_rlhf_objective",
]


def _policy(
    generator: torch.Generator, num_prompts: int, num_responses: int, scale: float = 1.0
) -> Tensor:
    return torch.softmax(randn(generator, num_prompts, num_responses, scale=scale), dim=-1)


def _policy_problem(generator: torch.Generator) -> Inputs:
    return {
        "policy": _policy(generator, 3, 5, scale=1.5),
        "pi_ref": _policy(generator, 3, 5),
        "reward": randn(generator, 3, 5, scale=2.0),
        "beta": uniform(generator, 0.2, 0.8),
    }


def _zero_policy_problem() -> Inputs:
    return {
        "policy": torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64),
        "pi_ref": torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64),
        "reward": torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]], dtype=torch.float64),
        "beta": 0.5,
    }


ZERO_LOG_ZERO_HINT = (
    "0 * log 0 counts as 0 (the limit of p log p as p -> 0), but p * torch.log(p) gives 0 * (-inf) = nan. "
    "Use torch.xlogy(p, p) - torch.xlogy(p, q), which treats 0 log 0 as 0."
)


def check_kl_divergence(kl_divergence: Callable) -> None:
    """Check kl_divergence(policy, pi_ref) -> KL(policy || pi_ref) per prompt, shape (P,)."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        problem = _policy_problem(generator)
        return {"policy": problem["policy"], "pi_ref": problem["pi_ref"]}

    zeros = _zero_policy_problem()
    case = Case(
        name="kl_divergence",
        reference=bandit.kl_divergence,
        make_inputs=make_inputs,
        shape_hint="Sum over the responses (the last dimension): one KL per prompt, shape (P,).",
        mistakes=[
            Mistake(
                "the KL is in the wrong direction, KL(pi_ref || policy)",
                lambda p, q: bandit.kl_divergence(q, p),
                "KL is not symmetric. RLHF penalises KL(pi || pi_ref) = sum_y pi(y) log(pi(y) / pi_ref(y)).",
            ),
            Mistake(
                "the terms are weighted by pi_ref instead of the policy",
                lambda p, q: (q * (torch.log(p) - torch.log(q))).sum(-1),
                "The expectation is over y ~ policy: weight each log-ratio by policy(y).",
            ),
            Mistake(
                "the log-ratios are not weighted by the policy",
                lambda p, q: (torch.log(p) - torch.log(q)).sum(-1),
                "KL = sum_y policy(y) log(policy(y) / pi_ref(y)).",
            ),
            Mistake(
                "the sign is flipped",
                lambda p, q: -bandit.kl_divergence(p, q),
                "KL(p || q) >= 0, with equality only when p == q.",
            ),
        ],
        extremes=[
            Extreme(
                "a policy with probability exactly 0 on some responses",
                {"policy": zeros["policy"], "pi_ref": zeros["pi_ref"]},
                ZERO_LOG_ZERO_HINT,
            )
        ],
    )
    compare_with_reference(kl_divergence, case)


def check_rlhf_objective(rlhf_objective: Callable) -> None:
    """Check rlhf_objective(policy, pi_ref, reward, beta) -> E_pi[r] - beta KL(pi || pi_ref), shape (P,)."""
    case = Case(
        name="rlhf_objective",
        reference=bandit.rlhf_objective,
        make_inputs=_policy_problem,
        shape_hint="One value per prompt, shape (P,): sum over the responses, not over the prompts.",
        mistakes=[
            Mistake(
                "beta is missing",
                lambda p, q, r, beta: bandit.expected_reward(p, r) - bandit.kl_divergence(p, q),
                "beta weighs the KL penalty: E[r] - beta * KL.",
            ),
            Mistake(
                "the KL is added instead of subtracted",
                lambda p, q, r, beta: (
                    bandit.expected_reward(p, r) + beta * bandit.kl_divergence(p, q)
                ),
                "The KL is a penalty for moving away from pi_ref: subtract it.",
            ),
            Mistake(
                "the KL is in the wrong direction, KL(pi_ref || policy)",
                lambda p, q, r, beta: (
                    bandit.expected_reward(p, r) - beta * bandit.kl_divergence(q, p)
                ),
                "The objective penalises KL(pi || pi_ref), with the policy first.",
            ),
            Mistake(
                "beta divides the KL instead of multiplying it",
                lambda p, q, r, beta: (
                    bandit.expected_reward(p, r) - bandit.kl_divergence(p, q) / beta
                ),
                "The objective is E[r] - beta * KL: a larger beta means a stronger pull to pi_ref.",
            ),
            Mistake(
                "the reward is not weighted by the policy",
                lambda p, q, r, beta: r.sum(-1) - beta * bandit.kl_divergence(p, q),
                "The expected reward is sum_y policy(y) r(y).",
            ),
        ],
        extremes=[
            Extreme(
                "a policy with probability exactly 0 on some responses",
                _zero_policy_problem(),
                ZERO_LOG_ZERO_HINT,
            )
        ],
    )
    compare_with_reference(rlhf_objective, case)


def check_optimal_policy(optimal_policy: Callable) -> None:
    """Check optimal_policy(pi_ref, reward, beta) -> pi_ref exp(reward / beta) / Z, shape (P, K)."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        problem = _policy_problem(generator)
        return {"pi_ref": problem["pi_ref"], "reward": problem["reward"], "beta": problem["beta"]}

    def tilt(pi_ref: Tensor, logits: Tensor, dim: int = -1) -> Tensor:
        return torch.softmax(torch.log(pi_ref) + logits, dim=dim)

    case = Case(
        name="optimal_policy",
        reference=bandit.optimal_policy,
        make_inputs=make_inputs,
        shape_hint="Return a distribution over the responses for each prompt: the same shape as pi_ref.",
        mistakes=[
            Mistake(
                "beta multiplies the reward instead of dividing it",
                lambda q, r, beta: tilt(q, r * beta),
                "pi* is proportional to pi_ref * exp(r / beta): a small beta sharpens pi* towards argmax r.",
            ),
            Mistake(
                "beta is missing",
                lambda q, r, beta: tilt(q, r),
                "pi* is proportional to pi_ref * exp(r / beta).",
            ),
            Mistake(
                "the reward has the wrong sign",
                lambda q, r, beta: tilt(q, -r / beta),
                "The optimal policy moves probability towards high reward: exp(+r / beta).",
            ),
            Mistake(
                "pi_ref is missing",
                lambda q, r, beta: torch.softmax(r / beta, dim=-1),
                "pi* = pi_ref * exp(r / beta) / Z: the reference policy is reweighted, not replaced.",
            ),
            Mistake(
                "pi_ref enters as if it were a log-probability",
                lambda q, r, beta: torch.softmax(q + r / beta, dim=-1),
                "pi_ref holds probabilities; inside a softmax it enters as torch.log(pi_ref).",
            ),
            Mistake(
                "the result is not normalised (Z(x) is missing)",
                lambda q, r, beta: q * torch.exp(r / beta),
                "Divide by Z(x) = sum_y pi_ref(y|x) exp(r(x,y) / beta) so each row sums to 1.",
            ),
            Mistake(
                "it is normalised over the prompts instead of the responses",
                lambda q, r, beta: tilt(q, r / beta, dim=0),
                "Normalise over the last dimension (the K responses of each prompt): dim=-1.",
            ),
        ],
        extremes=[
            Extreme(
                "beta = 0.01 and rewards in the hundreds",
                {
                    "pi_ref": torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64),
                    "reward": torch.tensor(
                        [[300.0, 299.0, -50.0], [10.0, 12.0, 11.5]], dtype=torch.float64
                    ),
                    "beta": 0.01,
                },
                "exp(r / beta) overflows to inf (inf / inf = nan). Work in log space: "
                "torch.softmax(torch.log(pi_ref) + reward / beta, dim=-1) subtracts the maximum first.",
            )
        ],
    )
    compare_with_reference(optimal_policy, case)


def _objective_gradient(policy: Tensor, pi_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    """dJ/dpi(y) = r(y) - beta (log(pi(y) / pi_ref(y)) + 1), each pi(y) a free variable."""
    return reward - beta * (torch.log(policy) - torch.log(pi_ref) + 1)


def check_objective_gradient(objective_gradient: Callable) -> None:
    """Check objective_gradient(policy, pi_ref, reward, beta) -> dJ_x / dpi(y|x), shape (P, K)."""
    case = Case(
        name="objective_gradient",
        reference=_objective_gradient,
        make_inputs=_policy_problem,
        shape_hint="One partial derivative per (prompt, response): the same shape as the policy, (P, K).",
        mistakes=[
            Mistake(
                "the +1 from differentiating pi log pi is missing",
                lambda p, q, r, beta: r - beta * (torch.log(p) - torch.log(q)),
                "d/dp [p log(p / q)] = log(p / q) + 1 (product rule): the p in front also depends on p.",
            ),
            Mistake(
                "beta is missing",
                lambda p, q, r, beta: r - (torch.log(p) - torch.log(q) + 1),
                "The KL term is beta * sum_y pi(y) log(pi(y) / pi_ref(y)): beta multiplies its derivative.",
            ),
            Mistake(
                "the log-ratio is upside down, log(pi_ref / pi)",
                lambda p, q, r, beta: r - beta * (torch.log(q) - torch.log(p) + 1),
                "The KL is sum_y pi(y) log(pi(y) / pi_ref(y)), the policy on top.",
            ),
            Mistake(
                "the KL term is added instead of subtracted",
                lambda p, q, r, beta: r + beta * (torch.log(p) - torch.log(q) + 1),
                "J = E_pi[r] - beta KL: the derivative of the penalty comes with a minus sign.",
            ),
            Mistake(
                "every term is still weighted by pi(y)",
                lambda p, q, r, beta: p * (r - beta * (torch.log(p) - torch.log(q) + 1)),
                "Differentiate with respect to pi(y): d/dpi(y) [pi(y) r(y)] = r(y), the weight goes away.",
            ),
        ],
    )
    compare_with_reference(objective_gradient, case)
