"""Notebook 03's theory: the checks of rlhf_route, reward_projection and plackett_luce_dpo_loss,
and the bandit helpers they rest on (comparison_reachability, sample_rankings)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dpo_teach import bandit, checks
from dpo_teach.checks import nb03
from dpo_teach.dpo import dpo_loss


def route(prefs, pi_ref, beta):
    return bandit.optimal_policy(pi_ref, bandit.fit_bt_rewards(prefs, *pi_ref.shape), beta)


def projection(reward, pi_ref, beta):
    return reward - beta * torch.logsumexp(torch.log(pi_ref) + reward / beta, dim=-1, keepdim=True)


def pl_loop(policy_logps, ref_logps, beta):
    """Plackett-Luce DPO written stage by stage, another way to the same answer."""
    u = beta * (policy_logps - ref_logps)
    stages = [torch.logsumexp(u[:, k:], dim=-1) - u[:, k] for k in range(u.shape[-1])]
    return torch.stack(stages, dim=-1).sum(-1)


def pl_naive(policy_logps, ref_logps, beta):
    u = beta * (policy_logps - ref_logps)
    stages = [-torch.log(torch.exp(u[:, k]) / torch.exp(u[:, k:]).sum(-1)) for k in range(u.shape[-1])]
    return torch.stack(stages, dim=-1).sum(-1)


def not_written(*args):
    raise NotImplementedError()


RIGHT = [
    (checks.check_rlhf_route, route),
    (checks.check_reward_projection, projection),
    (checks.check_plackett_luce_dpo_loss, pl_loop),
    (checks.check_plackett_luce_dpo_loss, nb03._plackett_luce_dpo_loss),
]


@pytest.mark.parametrize("check, function", RIGHT)
def test_right_answers_pass(check, function, capsys):
    check(function)
    assert "is correct" in capsys.readouterr().out


WRONG = [
    (checks.check_rlhf_route, lambda p, q, b: route(p, q, 1.0), "beta is missing"),
    (checks.check_rlhf_route, lambda p, q, b: torch.softmax(bandit.fit_bt_rewards(p, *q.shape) / b, -1),
     "reference policy is left out"),
    (checks.check_rlhf_route, lambda p, q, b: bandit.fit_bt_rewards(p, *q.shape), "fitted reward"),
    (checks.check_rlhf_route, not_written, "not written yet"),
    (checks.check_reward_projection, lambda r, q, b: r - b * torch.logsumexp(torch.log(q) + r, -1, keepdim=True),
     "beta is missing inside"),
    (checks.check_reward_projection,
     lambda r, q, b: r - b * torch.log((q * torch.exp(r / b)).sum(-1, keepdim=True)), "logsumexp"),
    (checks.check_reward_projection, lambda r, q, b: bandit.center_rewards(r), "centres"),
    (checks.check_reward_projection, lambda r, q, b: r - b * torch.logsumexp(r / b, -1, keepdim=True),
     "pi_ref is left out"),
    (checks.check_reward_projection, lambda r, q, b: projection(r, q, b)[:, 0], "keepdim"),
    (checks.check_reward_projection, not_written, "not written yet"),
    (checks.check_plackett_luce_dpo_loss, pl_naive, "logcumsumexp"),
    (checks.check_plackett_luce_dpo_loss, lambda p, q, b: pl_loop(p.flip(-1), q.flip(-1), b), "worst first"),
    (checks.check_plackett_luce_dpo_loss, lambda p, q, b: pl_loop(p, q, 1.0), "beta is missing"),
    (checks.check_plackett_luce_dpo_loss, lambda p, q, b: -F.log_softmax(b * (p - q), -1).sum(-1),
     "all K responses"),
    (checks.check_plackett_luce_dpo_loss, lambda p, q, b: pl_loop(p, q, b).sum(), "shape"),
    (checks.check_plackett_luce_dpo_loss, lambda p, q, b: pl_loop(p.detach(), q, b), "no gradient"),
    (checks.check_plackett_luce_dpo_loss, not_written, "not written yet"),
]


@pytest.mark.parametrize("check, function, expected", WRONG)
def test_wrong_answers_are_named(check, function, expected):
    with pytest.raises(AssertionError, match=expected):
        check(function)


def test_plackett_luce_reduces_to_dpo_at_two_responses():
    generator = torch.Generator().manual_seed(0)
    policy, ref = (torch.randn(9, 2, generator=generator, dtype=torch.float64) for _ in range(2))
    expected, _, _ = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.3)
    torch.testing.assert_close(nb03._plackett_luce_dpo_loss(policy, ref, 0.3), expected)


def test_rlhf_route_inputs_pin_the_fit():
    """The check's random data sets compare every pair both ways: the fit is unique (Ford 1957)."""
    case_inputs = []
    generator = torch.Generator().manual_seed(0)
    original = nb03.compare_with_reference
    try:
        nb03.compare_with_reference = lambda learner, case: case_inputs.extend(
            case.make_inputs(generator) for _ in range(case.num_trials))
        checks.check_rlhf_route(route)
    finally:
        nb03.compare_with_reference = original
    for inputs in case_inputs:
        counts = bandit.win_counts(inputs["prefs"], *inputs["pi_ref"].shape)
        assert bandit.comparison_reachability(counts).all()


def test_comparison_reachability():
    prefs = bandit.Preferences(prompt=torch.tensor([0, 0, 0, 1, 1]), chosen=torch.tensor([0, 1, 2, 0, 1]),
                               rejected=torch.tensor([1, 2, 0, 1, 2]))
    reach = bandit.comparison_reachability(bandit.win_counts(prefs, 2, 3))
    assert reach[0].all(), "0 > 1 > 2 > 0: a cycle, strongly connected"
    assert reach[1].tolist() == [[True, True, True], [False, True, True], [False, False, True]]


def test_sample_rankings_follows_plackett_luce():
    reward = torch.tensor([[1.0, -0.5, 0.3]], dtype=torch.float64)
    prompt, ranking = bandit.sample_rankings(reward, 100_000, seed=3)
    assert (prompt == 0).all() and ranking.shape == (100_000, 3)
    assert (ranking.sort(-1).values == torch.arange(3)).all(), "each row is a permutation"
    for order in itertools.permutations(range(3)):
        exact, left = 1.0, list(order)
        for k in order:
            exact *= (torch.exp(reward[0, k]) / torch.exp(reward[0, left]).sum()).item()
            left.remove(k)
        frequency = (ranking == torch.tensor(order)).all(-1).double().mean().item()
        assert abs(frequency - exact) < 4 * (exact * (1 - exact) / 100_000) ** 0.5 + 1e-3
