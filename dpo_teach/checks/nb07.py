"""Exercise checks of notebook 07 (PPO): GAE, the clipped policy loss and the KL-shaped reward.

Each check runs the learner's function and the reference of dpo_teach.ppo on seeded random
right-padded batches whose padding holds garbage (so a function that lets padding in is caught),
names the typical mistake when one reproduces the learner's output, and raises AssertionError.
The recipe is the one of dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach import ppo
from dpo_teach.checks.engine import Case, Inputs, Mistake, compare_with_reference

__all__ = ["check_clipped_policy_loss", "check_gae", "check_kl_penalty_rewards"]


def _right_padded_mask(generator: torch.Generator, batch: int = 6, width: int = 8) -> Tensor:
    """A (B, T) mask of ones then zeros; row 0 is full, the others have random lengths >= 1."""
    lengths = torch.randint(1, width, (batch,), generator=generator)
    lengths[0] = width
    return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()


def _with_garbage(generator: torch.Generator, mask: Tensor, scale: float = 1.0) -> Tensor:
    """Random values on the real tokens and large random values on the padding."""
    real = scale * torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    garbage = 50 * torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    return torch.where(mask.bool(), real, garbage)


# ---- GAE ------------------------------------------------------------------------------------------


def _gae_inputs(generator: torch.Generator) -> Inputs:
    mask = _right_padded_mask(generator)
    return {
        "rewards": _with_garbage(generator, mask),
        "values": _with_garbage(generator, mask),
        "mask": mask,
        "gamma": 0.8 + 0.2 * torch.rand((), generator=generator).item(),
        "lam": 0.5 + 0.45 * torch.rand((), generator=generator).item(),
    }


def _gae_unmasked(rewards, values, mask, gamma, lam):
    """GAE that runs straight through the padding: bootstraps from V and rewards after the end."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    m = mask.to(rewards.dtype)
    return advantages * m, (advantages + values) * m


def _gae_no_bootstrap(rewards, values, mask, gamma, lam):
    """delta_t = r_t - V_t: the next state's value is forgotten."""
    m = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        last = (rewards[:, t] - values[:, t] + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


def check_gae(gae: Callable) -> None:
    """Check gae(rewards, values, mask, gamma, lam) -> (advantages, returns), each (B, T)."""
    case = Case(
        name="gae",
        reference=ppo.gae,
        make_inputs=_gae_inputs,
        output_names=("advantages", "returns"),
        shape_hint="Return two tensors of the input's shape (B, T): advantages and returns.",
        mistakes=[
            Mistake("positions after the end of a response are not ignored: the value (or reward) "
                    "stored in the padding after the last token leaks in",
                    _gae_unmasked,
                    "After a response's last real token the episode is over: V = 0 there and A = 0 there. "
                    "Multiply by mask[:, t] so that nothing flows back from the padding."),
            Mistake("lam is ignored (this is the Monte Carlo advantage, lam = 1)",
                    lambda r, v, m, gamma, lam: ppo.gae(r, v, m, gamma, 1.0),
                    "A_t = delta_t + gamma * lam * A_{t+1}: lam weighs how far the sum looks ahead."),
            Mistake("lam is the one-step TD error (lam = 0): the advantages of later tokens are not added",
                    lambda r, v, m, gamma, lam: ppo.gae(r, v, m, gamma, 0.0),
                    "Run the recursion backwards from the last token: A_t = delta_t + gamma * lam * A_{t+1}."),
            Mistake("the discount gamma is missing", lambda r, v, m, gamma, lam: ppo.gae(r, v, m, 1.0, lam),
                    "delta_t = r_t + gamma * V_{t+1} - V_t and the recursion multiplies by gamma * lam."),
            Mistake("the next value V_{t+1} is missing from delta_t", _gae_no_bootstrap,
                    "delta_t = r_t + gamma * V_{t+1} - V_t: the value of the next state is the bootstrap."),
            Mistake("the returns do not add the values back (returns = advantages)",
                    lambda r, v, m, gamma, lam: (ppo.gae(r, v, m, gamma, lam)[0],) * 2,
                    "returns_t = A_t + V_t: the value head learns to predict the return, not the advantage."),
        ],
    )
    compare_with_reference(gae, case)


# ---- The clipped policy loss ----------------------------------------------------------------------


def _policy_inputs(generator: torch.Generator) -> Inputs:
    mask = _right_padded_mask(generator)
    old_logps = -torch.rand(mask.shape, generator=generator, dtype=torch.float64) * 4
    log_ratio = 0.4 * torch.randn(mask.shape, generator=generator, dtype=torch.float64)  # many ratios beyond 1 +- 0.2
    return {
        "logps": torch.where(mask.bool(), old_logps + log_ratio, old_logps + 30.0),  # padding: huge ratios
        "old_logps": old_logps,
        "advantages": _with_garbage(generator, mask),
        "mask": mask,
        "clip_range": 0.2,
    }


def _reference_policy_loss(logps, old_logps, advantages, mask, clip_range):
    return ppo.policy_loss(logps, old_logps, advantages, mask, clip_range)[0]


def _policy_variant(objective: Callable, reduce: Callable = ppo.masked_mean) -> Callable:
    def loss(logps, old_logps, advantages, mask, clip_range):
        ratio = torch.exp(torch.where(mask.bool(), logps - old_logps, torch.zeros_like(logps)))
        return -reduce(objective(ratio, advantages, clip_range), mask)

    return loss


def check_clipped_policy_loss(clipped_policy_loss: Callable) -> None:
    """Check clipped_policy_loss(logps, old_logps, advantages, mask, clip_range) -> scalar loss."""
    clip = lambda ratio, c: ratio.clamp(1 - c, 1 + c)
    case = Case(
        name="clipped_policy_loss",
        reference=_reference_policy_loss,
        make_inputs=_policy_inputs,
        shape_hint="Return one number (a 0-dimensional tensor): the mean over the valid tokens.",
        mistakes=[
            Mistake("the ratio is not clipped at all (plain importance-weighted policy gradient)",
                    _policy_variant(lambda r, a, c: r * a),
                    "Take min(ratio * A, clip(ratio, 1 - clip_range, 1 + clip_range) * A)."),
            Mistake("the max of the two objectives is taken instead of the min (the optimistic choice, "
                    "which does not stop the ratio from running away)",
                    _policy_variant(lambda r, a, c: torch.maximum(r * a, clip(r, c) * a)),
                    "PPO is pessimistic: objective = min(ratio * A, clip(ratio) * A), and the loss is its negative."),
            Mistake("only the clipped term is used (no gradient flows back for tokens outside the clip range, "
                    "even where the unclipped term is the smaller one)",
                    _policy_variant(lambda r, a, c: clip(r, c) * a),
                    "Keep both terms and take their min."),
            Mistake("the sign is flipped: this is the objective, not the loss",
                    lambda *args: -_reference_policy_loss(*args),
                    "The optimizer minimises: return minus the clipped objective."),
            Mistake("padding tokens are averaged in", _policy_variant(
                        lambda r, a, c: torch.minimum(r * a, clip(r, c) * a),
                        reduce=lambda x, m: torch.where(m.bool(), x, torch.zeros_like(x)).mean()),
                    "Average over the valid tokens only: (x * mask).sum() / mask.sum()."),
            Mistake("the ratio is logps - old_logps, not its exponential",
                    lambda lp, olp, a, m, c: -ppo.masked_mean(torch.minimum((lp - olp) * a, clip(lp - olp, c) * a), m),
                    "ratio = pi / pi_old = exp(logps - old_logps)."),
        ],
        grad_inputs=("logps",),
    )
    compare_with_reference(clipped_policy_loss, case)


# ---- The KL-shaped reward ------------------------------------------------------------------------


def _reward_inputs(generator: torch.Generator) -> Inputs:
    mask = _right_padded_mask(generator)
    return {
        "scores": torch.randn(mask.shape[0], generator=generator, dtype=torch.float64),
        "logps": _with_garbage(generator, mask),
        "ref_logps": _with_garbage(generator, mask),
        "mask": mask,
        "kl_coef": 0.05 + 0.3 * torch.rand((), generator=generator).item(),
    }


def _score_at(position: Callable) -> Callable:
    def rewards(scores, logps, ref_logps, mask, kl_coef):
        out = -kl_coef * (logps - ref_logps) * mask
        index = position(mask).clamp(max=mask.shape[1] - 1)
        out[torch.arange(len(scores)), index] += scores
        return out

    return rewards


def check_kl_penalty_rewards(kl_penalty_rewards: Callable) -> None:
    """Check kl_penalty_rewards(scores, logps, ref_logps, mask, kl_coef) -> per-token rewards (B, R)."""
    case = Case(
        name="kl_penalty_rewards",
        reference=ppo.kl_penalty_rewards,
        make_inputs=_reward_inputs,
        shape_hint="Return one reward per response token, shape (B, R), like logps.",
        mistakes=[
            Mistake("the score is put one position after the last real token, on the first padding "
                    "position: a GAE that masks padding (as ppo.gae does) never sees it there, and one that "
                    "runs through the padding passes it back only one step late, multiplied by gamma * lam",
                    _score_at(lambda m: m.sum(1).long()),
                    "The last real token sits at index length - 1, with length = mask.sum(1)."),
            Mistake("the score is put on the last column of the tensor, which is padding for short responses",
                    _score_at(lambda m: torch.full((len(m),), m.shape[1] - 1)),
                    "Responses have different lengths: find each one's last real token from mask.sum(1)."),
            Mistake("the KL penalty has the wrong sign (it rewards moving away from the reference)",
                    lambda s, lp, rlp, m, c: ppo.kl_penalty_rewards(s, rlp, lp, m, c),
                    "The reward is -kl_coef * (log pi - log pi_ref)."),
            Mistake("the KL penalty is also applied on padding positions",
                    lambda s, lp, rlp, m, c: ppo.kl_penalty_rewards(s, lp, rlp, m, c) - c * (lp - rlp) * (1 - m),
                    "Multiply the per-token penalty by the mask."),
            Mistake("the KL penalty is missing",
                    lambda s, lp, rlp, m, c: ppo.kl_penalty_rewards(s, lp, lp, m, c),
                    "Every response token earns -kl_coef * (logps - ref_logps)."),
        ],
    )
    compare_with_reference(kl_penalty_rewards, case)
