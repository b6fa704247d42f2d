"""Exercise checks of notebook 03 (from RLHF to DPO): `implicit_reward`, `dpo_loss`, `rlhf_route`,
`reward_projection` and `plackett_luce_dpo_loss`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_teach import bandit
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

__all__ = [
    "check_dpo_loss",
    "check_implicit_reward",
    "check_plackett_luce_dpo_loss",
    "check_reward_projection",
    "check_rlhf_route",
]


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


# ---- The RLHF route, the projection of Theorem 1, Plackett-Luce DPO -------------------------------


def _rlhf_route(prefs: bandit.Preferences, pi_ref: Tensor, beta: float) -> Tensor:
    num_prompts, num_responses = pi_ref.shape
    reward = bandit.fit_bt_rewards(prefs, num_prompts, num_responses)
    return bandit.optimal_policy(pi_ref, reward, beta)


def _route_with(policy: Callable) -> Callable:
    """A wrong rlhf_route: `policy(pi_ref, fitted_reward, beta)` from the right reward fit."""

    def route(prefs: bandit.Preferences, pi_ref: Tensor, beta: float) -> Tensor:
        reward = bandit.fit_bt_rewards(prefs, *pi_ref.shape)
        return policy(pi_ref, reward, beta)

    return route


def check_rlhf_route(rlhf_route: Callable) -> None:
    """Check rlhf_route(prefs, pi_ref, beta) -> the optimal policy (P, K) of the BT rewards fitted to prefs."""

    def make_inputs(generator: torch.Generator) -> Inputs:
        num_prompts, num_responses = 3, 4
        reward = randn(generator, num_prompts, num_responses, scale=1.5)
        seed = int(torch.randint(10_000, (), generator=generator))
        # 2,000 pairs over 3 x 6 response pairs: every pair is compared in both directions, so the
        # reward fit has a unique finite answer (Ford 1957; bandit.comparison_reachability)
        prefs = bandit.sample_preferences(reward, 2_000, seed=seed)
        return {
            "prefs": prefs,
            "pi_ref": torch.softmax(randn(generator, num_prompts, num_responses), dim=-1),
            "beta": uniform(generator, 0.2, 0.6),
        }

    case = Case(
        name="rlhf_route",
        reference=_rlhf_route,
        make_inputs=make_inputs,
        shape_hint="Return the policy as a (P, K) table, one row per prompt.",
        atol=1e-8,
        mistakes=[
            Mistake(
                "beta is missing (the optimum at beta = 1)",
                _route_with(lambda q, r, beta: bandit.optimal_policy(q, r, 1.0)),
                "Pass beta to the closed form: pi = softmax(log pi_ref + r / beta).",
            ),
            Mistake(
                "beta multiplies the reward instead of dividing it",
                _route_with(lambda q, r, beta: torch.softmax(torch.log(q) + r * beta, dim=-1)),
                "pi* = pi_ref exp(r / beta) / Z: a small beta makes the reward count more.",
            ),
            Mistake(
                "the reference policy is left out of the optimum",
                _route_with(lambda q, r, beta: torch.softmax(r / beta, dim=-1)),
                "pi* = pi_ref exp(r / beta) / Z: start from log pi_ref.",
            ),
            Mistake(
                "it returns the fitted reward, not the policy",
                _route_with(lambda q, r, beta: r),
                "Step 2 turns the reward into its optimal policy with bandit.optimal_policy.",
            ),
            Mistake(
                "the softmax runs over the prompts instead of the responses",
                _route_with(lambda q, r, beta: torch.softmax(torch.log(q) + r / beta, dim=0)),
                "Each prompt's row must sum to 1: softmax over the last dimension.",
            ),
        ],
    )
    compare_with_reference(rlhf_route, case)


def _reward_projection(reward: Tensor, pi_ref: Tensor, beta: float) -> Tensor:
    return reward - beta * torch.logsumexp(torch.log(pi_ref) + reward / beta, dim=-1, keepdim=True)


def check_reward_projection(reward_projection: Callable) -> None:
    """Check reward_projection(reward, pi_ref, beta) -> r - beta log sum_y pi_ref(y|x) exp(r(x,y)/beta), (P, K).

    The projection in the proof of Theorem 1 of Rafailov et al. 2023.
    """

    def make_inputs(generator: torch.Generator) -> Inputs:
        return {
            "reward": randn(generator, 3, 5, scale=2.0) + randn(generator, 3, 1, scale=3.0),
            "pi_ref": torch.softmax(randn(generator, 3, 5), dim=-1),
            "beta": uniform(generator, 0.2, 0.8),
        }

    def lse(x: Tensor) -> Tensor:
        return torch.logsumexp(x, dim=-1, keepdim=True)

    small_beta = {
        "reward": torch.tensor([[9.0, -3.0, 0.5], [-8.0, 4.0, 2.0]], dtype=torch.float64),
        "pi_ref": torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64),
        "beta": 0.01,
    }
    case = Case(
        name="reward_projection",
        reference=_reward_projection,
        make_inputs=make_inputs,
        shape_hint="Subtract one number per prompt: keep the (P, K) shape (keepdim=True in the sum).",
        mistakes=[
            Mistake(
                "beta is missing in front of log Z",
                lambda r, q, beta: r - lse(torch.log(q) + r / beta),
                "The term subtracted is beta * log Z(x), in the units of the reward.",
            ),
            Mistake(
                "beta is missing inside Z",
                lambda r, q, beta: r - beta * lse(torch.log(q) + r),
                "Z(x) = sum_y pi_ref(y|x) exp(r(x, y) / beta).",
            ),
            Mistake(
                "beta log Z is added instead of subtracted",
                lambda r, q, beta: r + beta * lse(torch.log(q) + r / beta),
                "The projection is r - beta log Z(x).",
            ),
            Mistake(
                "pi_ref is left out of Z",
                lambda r, q, beta: r - beta * lse(r / beta),
                "Z(x) weights each exp(r / beta) by pi_ref(y|x): add log pi_ref inside the logsumexp.",
            ),
            Mistake(
                "it centres the reward (subtracts the mean) instead of projecting it",
                lambda r, q, beta: bandit.center_rewards(r),
                "Centring also picks one member of the class, but not the one whose Z is 1.",
            ),
            Mistake(
                "Z is summed over the prompts instead of the responses",
                lambda r, q, beta: r - beta * torch.logsumexp(torch.log(q) + r / beta, dim=0, keepdim=True),
                "Z(x) is one number per prompt: sum over the last dimension.",
            ),
        ],
        extremes=[
            Extreme(
                "beta = 0.01 with rewards of size 10",
                small_beta,
                "exp(r / beta) = exp(900) overflows. Compute log Z with torch.logsumexp(torch.log(pi_ref) + "
                "reward / beta, dim=-1, keepdim=True), which never exponentiates a large number.",
            )
        ],
    )
    compare_with_reference(reward_projection, case)


def _plackett_luce_dpo_loss(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    rewards = beta * (policy_logps - ref_logps)  # (B, K), ranked best first
    tails = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)  # log sum_{j >= k} exp(r_j)
    return (tails - rewards).sum(-1)


def check_plackett_luce_dpo_loss(plackett_luce_dpo_loss: Callable) -> None:
    """Check plackett_luce_dpo_loss(policy_logps, ref_logps, beta) -> (B,).

    Inputs (B, K): log-probs of the K responses of each ranking, best first. The loss of a ranking
    is the negative log-likelihood of Plackett-Luce over the implicit rewards (Rafailov et al. 2023,
    Appendix A.3).
    """

    def make_inputs(generator: torch.Generator) -> Inputs:
        num_responses = int(torch.randint(2, 6, (), generator=generator))
        ref_logps = -uniform(generator, 5.0, 40.0) * torch.rand(
            6, num_responses, generator=generator, dtype=torch.float64
        )
        return {
            "policy_logps": ref_logps + randn(generator, 6, num_responses, scale=3.0),
            "ref_logps": ref_logps,
            "beta": uniform(generator, 0.1, 0.8),
        }

    def reference_on(transform: Callable) -> Callable:
        return lambda p, q, beta: _plackett_luce_dpo_loss(*transform(p, q, beta))

    def rewards(p: Tensor, q: Tensor, beta: float) -> Tensor:
        return beta * (p - q)

    huge = torch.tensor([[5e3, 0.0, -5e3], [-5e3, 0.0, 5e3]], dtype=torch.float64)
    case = Case(
        name="plackett_luce_dpo_loss",
        reference=_plackett_luce_dpo_loss,
        make_inputs=make_inputs,
        shape_hint="One loss per ranking, shape (B,): sum over the K stages, not over the batch.",
        grad_inputs=("policy_logps",),
        mistakes=[
            Mistake(
                "beta is missing",
                reference_on(lambda p, q, beta: (p, q, 1.0)),
                "The implicit rewards are beta * (log pi - log pi_ref).",
            ),
            Mistake(
                "the ranking is read worst first",
                reference_on(lambda p, q, beta: (p.flip(-1), q.flip(-1), beta)),
                "Column 0 is the best response: it is picked first, from all K.",
            ),
            Mistake(
                "the reference model is forgotten",
                lambda p, q, beta: _plackett_luce_dpo_loss(p, torch.zeros_like(q), beta),
                "The implicit reward is a log-ratio to the reference: subtract ref_logps.",
            ),
            Mistake(
                "every stage normalises over all K responses (the ones already placed are not removed)",
                lambda p, q, beta: -torch.log_softmax(rewards(p, q, beta), dim=-1).sum(-1),
                "Stage k picks among the responses not placed yet: normalise over positions k, k+1, ..., K.",
            ),
            Mistake(
                "each stage normalises over the responses ranked above it instead of below",
                lambda p, q, beta: (
                    torch.logcumsumexp(rewards(p, q, beta), dim=-1) - rewards(p, q, beta)
                ).sum(-1),
                "Stage k picks response k from those still left: positions k to K (a reversed cumulative sum).",
            ),
            Mistake(
                "the stages are averaged instead of summed",
                lambda p, q, beta: _plackett_luce_dpo_loss(p, q, beta) / p.shape[-1],
                "The likelihood of a ranking is the product of its stages: sum their negative logs.",
            ),
            Mistake(
                "only the first stage is scored",
                lambda p, q, beta: -torch.log_softmax(rewards(p, q, beta), dim=-1)[:, 0],
                "A ranking says more than which response is best: score every stage.",
            ),
            Mistake(
                "the minus sign is missing (the loss is negative)",
                lambda p, q, beta: -_plackett_luce_dpo_loss(p, q, beta),
                "The loss is the negative log-likelihood, >= 0.",
            ),
        ],
        extremes=[
            Extreme(
                "log-ratios of +-5,000",
                {"policy_logps": -10.0 + huge, "ref_logps": torch.full((2, 3), -10.0, dtype=torch.float64),
                 "beta": 1.0},
                "exp(5000) overflows: compute each stage's log-normaliser with torch.logsumexp, or all of "
                "them at once with torch.logcumsumexp on the flipped rewards.",
            )
        ],
    )
    compare_with_reference(plackett_luce_dpo_loss, case)
