"""A small exact "bandit" world: a few prompts, K candidate responses each, everything computed exactly.

In this world a policy is a table pi(y|x) of shape (P, K) (P prompts, K responses per prompt), the
reference policy pi_ref(y|x) and the true reward r*(x, y) are tables of the same shape, and every
quantity of the argument (expected reward, KL, the RLHF objective, the optimal policy, the partition
function Z(x)) is a sum over K terms: no sampling, no approximation. Preference data is sampled from
the Bradley-Terry model of r* (Bradley & Terry 1952), so we know the truth the fits should recover.

Notebooks 01-03 use it to check every step of the derivation of DPO (Rafailov et al. 2023,
arXiv 2305.18290) on a problem small enough to solve exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_teach.dpo import dpo_loss

__all__ = ["Bandit", "Preferences", "make_bandit", "optimal_policy", "log_partition", "kl_divergence",
           "expected_reward", "rlhf_objective", "bt_probability", "bt_nll", "sample_preferences",
           "center_rewards", "win_counts", "fit_bt_rewards", "train_tabular_dpo"]


@dataclass(frozen=True)
class Bandit:
    """The world: for each prompt x, K candidate responses y with pi_ref(y|x) and r*(x, y)."""

    pi_ref: Tensor  # (P, K) reference policy pi_ref(y|x); each row sums to 1
    reward: Tensor  # (P, K) true reward r*(x, y)

    @property
    def num_prompts(self) -> int:
        return self.pi_ref.shape[0]

    @property
    def num_responses(self) -> int:
        return self.pi_ref.shape[1]


@dataclass(frozen=True)
class Preferences:
    """Preference pairs (x, y_w, y_l) as indices: response `chosen` was preferred to `rejected`."""

    prompt: Tensor  # (N,) long, index of the prompt x
    chosen: Tensor  # (N,) long, index of the preferred response y_w
    rejected: Tensor  # (N,) long, index of the other response y_l

    def __len__(self) -> int:
        return self.prompt.shape[0]


def make_bandit(
    num_prompts: int = 3,
    num_responses: int = 5,
    seed: int = 0,
    reward_scale: float = 1.5,
    dtype: torch.dtype = torch.float64,
) -> Bandit:
    """A random world: pi_ref = softmax of standard normal logits, r* ~ N(0, reward_scale^2)."""
    generator = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(num_prompts, num_responses, generator=generator, dtype=dtype)  # (P, K)
    reward = reward_scale * torch.randn(
        num_prompts, num_responses, generator=generator, dtype=dtype
    )
    return Bandit(pi_ref=torch.softmax(ref_logits, dim=-1), reward=reward)


# ---- The KL-regularised objective and its optimum (notebook 02) ------------------------------------


def optimal_policy(pi_ref: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """pi*(y|x) = pi_ref(y|x) exp(r(x,y) / beta) / Z(x), the optimum of the KL-regularised objective.

    Computed as softmax(log pi_ref + reward / beta) over the last dimension: softmax subtracts the
    maximum before exponentiating, so a small beta or a large reward does not overflow.
    Shape: pi_ref and reward (..., K) -> (..., K). Rafailov et al. 2023, Eq. 4.
    """
    return torch.softmax(torch.log(pi_ref) + reward / beta, dim=-1)


def log_partition(pi_ref: Tensor, reward: Tensor, beta: float) -> Tensor:
    """log Z(x) = log sum_y pi_ref(y|x) exp(r(x,y) / beta), computed stably. Shape: (..., K) -> (...)."""
    return torch.logsumexp(torch.log(pi_ref) + reward / beta, dim=-1)


def kl_divergence(policy: torch.Tensor, pi_ref: torch.Tensor) -> torch.Tensor:
    """KL(policy || pi_ref) = sum_y policy(y) log(policy(y) / pi_ref(y)), with 0 log 0 = 0.

    Shape: (..., K) -> (...).
    """
    return (torch.xlogy(policy, policy) - torch.xlogy(policy, pi_ref)).sum(dim=-1)


def expected_reward(policy: Tensor, reward: Tensor) -> Tensor:
    """E_{y ~ policy(.|x)} r(x, y). Shape: (..., K) -> (...)."""
    return (policy * reward).sum(dim=-1)


def rlhf_objective(policy: torch.Tensor, pi_ref: torch.Tensor, reward: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """E_{y ~ policy} r(x,y) - beta KL(policy(.|x) || pi_ref(.|x)), per prompt. Shape: (..., K) -> (...).

    The KL-regularised objective of RLHF (Ziegler et al. 2019; Rafailov et al. 2023, Eq. 3).
    """
    return (policy * reward).sum(dim=-1) - beta * kl_divergence(policy, pi_ref)


# ---- Bradley-Terry preferences (notebook 01) --------------------------------------------------------


def bt_probability(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """p(y_w > y_l) = sigma(r(y_w) - r(y_l)) under Bradley-Terry (1952). Shape: (N,) -> (N,)."""
    return torch.sigmoid(reward_chosen - reward_rejected)


def bt_nll(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigma(r(y_w) - r(y_l)), per comparison, via logsigmoid (finite for any margin).

    Shape: (N,) -> (N,). The negative log-likelihood of one observed preference under Bradley-Terry.
    """
    return -F.logsigmoid(reward_chosen - reward_rejected)


def sample_preferences(
    reward: Tensor,
    num_pairs: int,
    seed: int = 0,
    proposal: Tensor | None = None,
    label_noise: float = 0.0,
) -> Preferences:
    """Sample `num_pairs` labelled pairs: prompt uniform, two distinct responses, label from BT(reward).

    The two responses of a pair are drawn without replacement from `proposal` (P, K) (for DPO, the
    reference policy, as in the paper), or uniformly when it is None. The first one is chosen with
    probability sigma(r(y1) - r(y2)); with probability `label_noise` the label is then flipped,
    like an annotator who sometimes clicks the wrong button.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
    generator = torch.Generator().manual_seed(seed)
    num_prompts, num_responses = reward.shape
    if proposal is None:
        proposal = torch.ones(num_prompts, num_responses, dtype=reward.dtype)
    prompt = torch.randint(num_prompts, (num_pairs,), generator=generator)  # (N,)
    pair = torch.multinomial(proposal[prompt], 2, replacement=False, generator=generator)  # (N, 2)
    y1, y2 = pair[:, 0], pair[:, 1]
    p_first = bt_probability(reward[prompt, y1], reward[prompt, y2])  # (N,)
    first_wins = torch.rand(num_pairs, generator=generator, dtype=reward.dtype) < p_first
    flip = torch.rand(num_pairs, generator=generator, dtype=reward.dtype) < label_noise
    first_wins = first_wins ^ flip
    chosen = torch.where(first_wins, y1, y2)
    rejected = torch.where(first_wins, y2, y1)
    return Preferences(prompt=prompt, chosen=chosen, rejected=rejected)


def center_rewards(reward: Tensor) -> Tensor:
    """Subtract each prompt's mean reward: the representative of r up to a function of x alone."""
    return reward - reward.mean(dim=-1, keepdim=True)


def win_counts(prefs: Preferences, num_prompts: int, num_responses: int) -> Tensor:
    """counts[x, w, l] = how many times response w was preferred to l for prompt x. Shape: (P, K, K)."""
    counts = torch.zeros(num_prompts, num_responses, num_responses, dtype=torch.long)
    ones = torch.ones(len(prefs), dtype=torch.long)
    counts.index_put_((prefs.prompt, prefs.chosen, prefs.rejected), ones, accumulate=True)
    return counts


def _precise_lbfgs(parameter: Tensor, num_steps: int) -> torch.optim.LBFGS:
    """Full-batch L-BFGS with tolerances tight enough to compare its answer with closed forms."""
    return torch.optim.LBFGS([parameter], lr=1.0, max_iter=num_steps, tolerance_grad=1e-12,
                             tolerance_change=1e-15, line_search_fn="strong_wolfe")


def fit_bt_rewards(
    prefs: Preferences,
    num_prompts: int,
    num_responses: int,
    num_steps: int = 100,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Maximum-likelihood Bradley-Terry rewards (P, K) from preference pairs, centred per prompt.

    Minimises the mean of bt_nll over the pairs with L-BFGS (the problem is convex), grouping
    identical pairs through win_counts so that a fit on 100,000 pairs takes milliseconds. Only reward
    differences within a prompt are identifiable, so the result is centred: mean zero per prompt.
    If one response wins every comparison it takes part in, the MLE does not exist (its reward
    grows without bound) and the result depends on num_steps.
    """
    counts = win_counts(prefs, num_prompts, num_responses).to(dtype)  # (P, K, K)
    reward = torch.zeros(num_prompts, num_responses, dtype=dtype, requires_grad=True)
    optimizer = _precise_lbfgs(reward, num_steps)

    def closure() -> Tensor:
        # mean over pairs of bt_nll, grouped: counts[x, w, l] pairs share the same term
        optimizer.zero_grad()
        nll = bt_nll(reward[:, :, None], reward[:, None, :])  # (P, K, K): -log sigma(r_w - r_l)
        loss = (counts * nll).sum() / len(prefs)
        loss.backward()
        return loss

    optimizer.step(closure)
    return center_rewards(reward.detach())


# ---- Tabular DPO (notebook 03) -----------------------------------------------------------------------


def train_tabular_dpo(
    pi_ref: Tensor,
    prefs: Preferences,
    beta: float,
    num_steps: int = 100,
) -> Tensor:
    """Train a tabular policy (free logits per prompt) with the DPO loss; return pi_DPO (P, K).

    The policy starts at pi_ref. Each step takes the full batch of pairs; L-BFGS solves this
    smooth problem to high precision, so the result can be compared with closed forms.
    """
    ref_logps = torch.log(pi_ref)  # (P, K)
    logits = ref_logps.clone().requires_grad_(True)  # (P, K), the policy's parameters
    optimizer = _precise_lbfgs(logits, num_steps)

    def closure() -> Tensor:
        optimizer.zero_grad()
        policy_logps = torch.log_softmax(logits, dim=-1)  # (P, K)
        losses, _, _ = dpo_loss(
            policy_logps[prefs.prompt, prefs.chosen],
            policy_logps[prefs.prompt, prefs.rejected],
            ref_logps[prefs.prompt, prefs.chosen],
            ref_logps[prefs.prompt, prefs.rejected],
            beta=beta,
        )
        loss = losses.mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(logits.detach(), dim=-1)


# ---- When the data pin the optimum down, and rankings (notebook 03) ---------------------------------


def comparison_reachability(counts: Tensor) -> Tensor:
    """reach[x, i, j]: a chain of observed wins leads from response i to j. counts (P, K, K) -> (P, K, K) bool.

    counts is win_counts(...): i reaches j when i beat j, or i beat some k that beat j, and so on;
    every response reaches itself. A prompt's comparison graph is strongly connected when reach is
    all True: then its Bradley-Terry MLE exists and is unique up to a constant (Ford 1957). When j
    reaches i but i does not reach j, the responses that i reaches never beat any response outside
    them, so lowering all their rewards together raises the likelihood without end: the fit sends
    pi(i|x) / pi(j|x) to 0.
    """
    num_responses = counts.shape[-1]
    reach = (counts > 0) | torch.eye(num_responses, dtype=torch.bool)  # (P, K, K): at most one step
    for _ in range(max(1, (num_responses - 1).bit_length())):  # squaring doubles the chain length
        reach = (reach.double() @ reach.double()) > 0
    return reach


def sample_rankings(reward: Tensor, num_rankings: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Full rankings of all K responses from the Plackett-Luce model of `reward` (Plackett 1975; Luce 1959).

    Prompt uniform; the ranking lists the responses from best to worst. Plackett-Luce picks the
    first response with probability softmax(r), the next from the rest in the same way, and so on;
    sorting the rewards perturbed by independent standard Gumbel noise draws exactly such a ranking
    (Yellott 1977). Returns prompt (N,) and ranking (N, K), both long.
    """
    generator = torch.Generator().manual_seed(seed)
    num_prompts, num_responses = reward.shape
    prompt = torch.randint(num_prompts, (num_rankings,), generator=generator)  # (N,)
    uniform = torch.rand(num_rankings, num_responses, generator=generator, dtype=reward.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(reward.dtype).tiny)))  # (N, K)
    ranking = torch.argsort(reward[prompt] + gumbel, dim=-1, descending=True)  # (N, K)
    return prompt, ranking


__all__ += ["comparison_reachability", "sample_rankings"]
