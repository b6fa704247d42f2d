"""The theory exercises added to notebooks 01 (flip_nll) and 02 (objective_gradient), and the facts
those notebooks state about them, in exact tabular arithmetic."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_teach import bandit, checks


def flip_nll(reward_chosen, reward_rejected, eps):
    margin = reward_chosen - reward_rejected
    return -torch.logaddexp(torch.log(torch.full_like(margin, eps)), math.log1p(-2 * eps) + F.logsigmoid(margin))


def objective_gradient(policy, pi_ref, reward, beta):
    return reward - beta * (torch.log(policy) - torch.log(pi_ref) + 1)


@pytest.mark.parametrize("check, function", [(checks.check_flip_nll, flip_nll),
                                             (checks.check_objective_gradient, objective_gradient)])
def test_right_answers_pass(check, function, capsys):
    check(function)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("check, function, message", [
    (checks.check_flip_nll, lambda rw, rl, eps: -(1 - eps) * F.logsigmoid(rw - rl) - eps * F.logsigmoid(rl - rw),
     "label-smoothed"),
    (checks.check_flip_nll, lambda rw, rl, eps: -F.logsigmoid(rw - rl), "eps is ignored"),
    (checks.check_flip_nll, lambda rw, rl, eps: -torch.log(eps + (1 - eps) * torch.sigmoid(rw - rl)), "1 - 2 eps"),
    (checks.check_flip_nll, lambda rw, rl, eps: flip_nll(rl, rw, eps), "swapped"),
    (checks.check_flip_nll, lambda rw, rl, eps: -torch.log(eps + (1 - 2 * eps) * torch.sigmoid(rw - rl)),
     "inf or nan for eps = 0"),
    (checks.check_flip_nll, lambda rw, rl, eps: flip_nll(rw, rl, eps).detach(), "gradient"),
    (checks.check_objective_gradient, lambda p, q, r, beta: r - beta * torch.log(p / q), r"\+1"),
    (checks.check_objective_gradient, lambda p, q, r, beta: r - (torch.log(p / q) + 1), "beta is missing"),
    (checks.check_objective_gradient, lambda p, q, r, beta: r - beta * (torch.log(q / p) + 1), "upside down"),
    (checks.check_objective_gradient, lambda p, q, r, beta: p * (r - beta * (torch.log(p / q) + 1)), "weighted"),
    (checks.check_objective_gradient, lambda p, q, r, beta: r.sum(-1), "shape"),
])
def test_mistakes_are_named(check, function, message):
    with pytest.raises(AssertionError, match=message):
        check(function)


def test_objective_gradient_is_the_autograd_gradient_and_vanishes_on_the_simplex_at_pi_star():
    world = bandit.make_bandit(num_prompts=3, num_responses=5, seed=0)
    for beta in (0.3, 2.5):
        policy = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1).requires_grad_(True)
        bandit.rlhf_objective(policy, world.pi_ref, world.reward, beta).sum().backward()
        assert torch.allclose(policy.grad, objective_gradient(policy.detach(), world.pi_ref, world.reward, beta))
        pi_star = bandit.optimal_policy(world.pi_ref, world.reward, beta)
        log_z = bandit.log_partition(world.pi_ref, world.reward, beta)
        expected = (beta * (log_z - 1))[:, None].expand(3, 5)
        assert torch.allclose(objective_gradient(pi_star, world.pi_ref, world.reward, beta), expected, atol=1e-12)


def test_label_smoothing_shrinks_more_and_the_flip_likelihood_not_at_all():
    """Population fits (infinite data, uniform pairs) on labels flipped with probability eps."""
    world = bandit.make_bandit(num_prompts=3, num_responses=5, seed=0)
    eps = 0.25
    margins = world.reward[:, :, None] - world.reward[:, None, :]
    counts = (eps + (1 - 2 * eps) * torch.sigmoid(margins)) * (1 - torch.eye(5, dtype=torch.float64))
    truth = bandit.center_rewards(world.reward)

    def fit(loss_of_margin):
        reward = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([reward], max_iter=200, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure():
            optimizer.zero_grad()
            loss = (counts * loss_of_margin(reward[:, :, None] - reward[:, None, :])).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted = bandit.center_rewards(reward.detach())
        return ((fitted * truth).sum() / (truth * truth).sum()).item()

    plain = fit(lambda d: -F.logsigmoid(d))
    smoothed = fit(lambda d: -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d))
    flipped = fit(lambda d: flip_nll(d, torch.zeros_like(d), eps))
    assert abs(flipped - 1) < 1e-6
    assert smoothed < plain - 0.1 < 0.9


def test_kl_estimators_as_losses_have_the_stated_gradients():
    """With samples from pi_theta held fixed: grad E[k1] = 0, grad E[k2] = grad KL(pi||ref),
    grad E[k3] = grad KL(ref||pi); and E[k1] = E[k3] = KL(pi||ref)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, dtype=torch.float64, generator=generator).requires_grad_(True)
    ref = torch.softmax(torch.randn(4, 6, dtype=torch.float64, generator=generator), -1)

    def gradient(make_loss):
        logits.grad = None
        make_loss().backward()
        return logits.grad.clone()

    def estimator(k):
        def loss():
            log_ratio = torch.log(ref) - torch.log_softmax(logits, -1)  # log(pi_ref / pi)
            return (torch.softmax(logits, -1).detach() * k(log_ratio)).sum()
        return loss

    k1, k2, k3 = (lambda lr: -lr), (lambda lr: lr ** 2 / 2), (lambda lr: torch.expm1(lr) - lr)
    forward = lambda: bandit.kl_divergence(torch.softmax(logits, -1), ref).sum()  # noqa: E731
    reverse = lambda: bandit.kl_divergence(ref, torch.softmax(logits, -1)).sum()  # noqa: E731
    assert gradient(estimator(k1)).abs().max() < 1e-14
    assert torch.allclose(gradient(estimator(k2)), gradient(forward), atol=1e-14)
    assert torch.allclose(gradient(estimator(k3)), gradient(reverse), atol=1e-14)
    assert not torch.allclose(gradient(estimator(k3)), gradient(forward), atol=1e-3)
    assert torch.allclose(estimator(k1)(), forward()) and torch.allclose(estimator(k3)(), forward())
