"""Exercise checks of notebook 09 (DPO against PPO on the frontier): `best_of_n_rewards` and
`on_frontier`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_teach.checks.engine import Case, Inputs, Mistake, compare_with_reference, randn

__all__ = ["check_best_of_n_rewards", "check_on_frontier"]


class _Frontier:
    """The references of notebook 09, imported on first use (dpo_teach.frontier pulls in the whole pipeline)."""

    def __getattr__(self, name):
        from dpo_teach import frontier

        return getattr(frontier, name)


_frontier = _Frontier()


def _best_of_n_inputs(generator: torch.Generator) -> Inputs:
    n_max, num_prompts = 6, 7
    scores = randn(generator, n_max, num_prompts)
    rewards = 0.5 * scores + randn(generator, n_max, num_prompts)  # the reward model is a noisy proxy
    return {"scores": scores, "rewards": rewards, "n": int(torch.randint(2, n_max, (), generator=generator))}


def check_best_of_n_rewards(best_of_n_rewards: Callable) -> None:
    """Check best_of_n_rewards(scores, rewards, n) -> (P,) oracle rewards of the samples that the
    reward model picks among the first n of each prompt; scores and rewards are (N_max, P)."""
    case = Case(
        name="best_of_n_rewards",
        reference=_frontier.best_of_n_rewards,
        make_inputs=_best_of_n_inputs,
        shape_hint="Return one oracle reward per prompt: shape (P,), where scores is (N_max, P).",
        mistakes=[
            Mistake("the sample is chosen by the oracle reward, not by the reward model",
                    lambda s, r, n: r[:n].max(dim=0).values,
                    "Best-of-N cannot see the oracle: pick with scores.argmax, then read the oracle reward of that sample."),
            Mistake("all N_max samples are used instead of the first n",
                    lambda s, r, n: _frontier.best_of_n_rewards(s, r, s.shape[0]),
                    "Only the first n samples of each prompt count: slice scores[:n] and rewards[:n]."),
            Mistake("it returns the reward model's score of the best sample, not its oracle reward",
                    lambda s, r, n: s[:n].max(dim=0).values,
                    "The frontier measures the oracle (ground-truth) reward of what the method picks."),
            Mistake("it averages the oracle rewards of the first n samples instead of picking one",
                    lambda s, r, n: r[:n].mean(dim=0), "Keep the single sample with the highest score."),
        ],
    )
    compare_with_reference(best_of_n_rewards, case)


def _frontier_inputs(generator: torch.Generator) -> Inputs:
    """Random points, plus ties on the frontier: a copy of a frontier point (both copies stay on it),
    a point with a frontier point's KL and a little less reward, and one with its reward and a little
    more KL (both off it: that point beats them), in a random order."""
    num = 10
    kls = randn(generator, num).abs() * 4
    rewards = 0.2 * kls.sqrt() + 0.2 * randn(generator, num)
    front = _frontier.on_frontier(kls, rewards).bool().nonzero().flatten()
    i, j = front[torch.randint(0, len(front), (2,), generator=generator)].tolist()
    kls = torch.cat([kls, kls[[i, j]], kls[j:j + 1] + 0.01])
    rewards = torch.cat([rewards, rewards[i:i + 1], rewards[j:j + 1] - 0.01, rewards[j:j + 1]])
    order = torch.randperm(len(kls), generator=generator)
    return {"kls": kls[order], "rewards": rewards[order]}


def check_on_frontier(on_frontier: Callable) -> None:
    """Check on_frontier(kls, rewards) -> (M,) bool: True for the points that no other point beats,
    i.e. no point has a KL as low or lower AND a reward as high or higher, and is better in one.
    The random points include copies of a point and ties in one coordinate."""
    def best_only(kls, rewards):
        return (rewards == rewards.max()).to(rewards.dtype)

    def lower_frontier(kls, rewards):
        return _frontier.on_frontier(kls, -rewards)

    def unbeaten(kls, rewards, strict_kl: bool, strict_reward: bool, self_too: bool):
        """[i]: no point j beats point i, when beating is written with these comparisons."""
        less_kl = kls.unsqueeze(0) < kls.unsqueeze(1) if strict_kl else kls.unsqueeze(0) <= kls.unsqueeze(1)
        more_reward = (rewards.unsqueeze(0) > rewards.unsqueeze(1) if strict_reward
                       else rewards.unsqueeze(0) >= rewards.unsqueeze(1))
        beats = less_kl & more_reward
        if not self_too:
            beats &= ~torch.eye(len(kls), dtype=torch.bool)
        return (~beats.any(dim=1)).to(rewards.dtype)

    strict = ("Point j beats point i only if it is at least as good in both AND strictly better in one: "
              "kl_j <= kl_i and r_j >= r_i and (kl_j < kl_i or r_j > r_i).")
    case = Case(
        name="on_frontier",
        reference=_frontier.on_frontier,
        make_inputs=_frontier_inputs,
        shape_hint="Return one True/False per point: shape (M,), like kls.",
        mistakes=[
            Mistake("only the single best-reward point is kept", best_only,
                    "A point with less reward can still be on the frontier if it costs less KL."),
            Mistake("it finds the lower frontier (lowest reward), not the upper one", lower_frontier,
                    "Better means more reward for the same or less KL."),
            Mistake("a point is beaten by any point at least as good in both coordinates, so two copies "
                    "of the same point knock each other off the frontier",
                    lambda k, r: unbeaten(k, r, False, False, self_too=False), strict),
            Mistake("every point beats itself (it is at least as good as itself in both coordinates), so "
                    "no point is on the frontier",
                    lambda k, r: unbeaten(k, r, False, False, self_too=True), strict),
            Mistake("a point is only beaten by one with strictly less KL and strictly more reward",
                    lambda k, r: unbeaten(k, r, True, True, self_too=True),
                    "A point with the same KL and less reward, or the same reward and more KL, is beaten too. "
                    + strict),
            Mistake("a point with the same KL and less reward is not beaten (< where <= belongs on the KL)",
                    lambda k, r: unbeaten(k, r, True, False, self_too=False), strict),
            Mistake("a point with the same reward and more KL is not beaten (> where >= belongs on the reward)",
                    lambda k, r: unbeaten(k, r, False, True, self_too=False), strict),
        ],
    )
    compare_with_reference(on_frontier, case)
