"""dpo_teach.bandit: the exact world of notebooks 01-03 and the facts the derivation rests on."""

import pytest
import torch

from dpo_teach import bandit


@pytest.fixture
def world():
    return bandit.make_bandit(num_prompts=3, num_responses=5, seed=0)


def test_make_bandit_is_seeded_and_normalised(world):
    again = bandit.make_bandit(num_prompts=3, num_responses=5, seed=0)
    assert torch.equal(world.pi_ref, again.pi_ref) and torch.equal(world.reward, again.reward)
    assert world.pi_ref.dtype == torch.float64
    torch.testing.assert_close(world.pi_ref.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (world.num_prompts, world.num_responses) == (3, 5)


def test_optimal_policy_is_the_closed_form(world):
    beta = 0.7
    pi_star = bandit.optimal_policy(world.pi_ref, world.reward, beta)
    unnormalised = world.pi_ref * torch.exp(world.reward / beta)
    torch.testing.assert_close(pi_star, unnormalised / unnormalised.sum(-1, keepdim=True))
    log_z = bandit.log_partition(world.pi_ref, world.reward, beta)
    torch.testing.assert_close(
        torch.log(pi_star), torch.log(world.pi_ref) + world.reward / beta - log_z[:, None]
    )


def test_optimal_policy_limits(world):
    torch.testing.assert_close(
        bandit.optimal_policy(world.pi_ref, world.reward, 1e6), world.pi_ref, atol=1e-5, rtol=0
    )
    greedy = bandit.optimal_policy(world.pi_ref, world.reward, 1e-4)
    assert torch.equal(greedy.argmax(-1), world.reward.argmax(-1))
    assert (greedy.max(-1).values > 1 - 1e-9).all()


def test_optimal_policy_is_stable_for_tiny_beta():
    pi_ref = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    reward = torch.tensor([[500.0, 499.0]], dtype=torch.float64)
    pi_star = bandit.optimal_policy(pi_ref, reward, 1e-3)
    assert torch.isfinite(pi_star).all()
    torch.testing.assert_close(pi_star, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_objective_identity(world):
    """objective(pi) = -beta KL(pi || pi*) + beta log Z, for any policy."""
    beta = 0.5
    policy = torch.softmax(
        torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1
    )
    pi_star = bandit.optimal_policy(world.pi_ref, world.reward, beta)
    log_z = bandit.log_partition(world.pi_ref, world.reward, beta)
    lhs = bandit.rlhf_objective(policy, world.pi_ref, world.reward, beta)
    torch.testing.assert_close(lhs, -beta * bandit.kl_divergence(policy, pi_star) + beta * log_z)
    torch.testing.assert_close(
        bandit.rlhf_objective(pi_star, world.pi_ref, world.reward, beta), beta * log_z
    )


def test_kl_divergence_handles_zeros():
    policy = torch.tensor([1.0, 0.0], dtype=torch.float64)
    pi_ref = torch.tensor([0.25, 0.75], dtype=torch.float64)
    torch.testing.assert_close(
        bandit.kl_divergence(policy, pi_ref), torch.log(torch.tensor(4.0, dtype=torch.float64))
    )
    assert bandit.kl_divergence(pi_ref, pi_ref).item() == 0.0


def test_bt_shift_invariance_and_stability():
    rw = torch.tensor([2.0, -1.0, 1e4], dtype=torch.float64)
    rl = torch.tensor([0.5, 3.0, -1e4], dtype=torch.float64)
    torch.testing.assert_close(
        bandit.bt_probability(rw + 7.0, rl + 7.0), bandit.bt_probability(rw, rl)
    )
    torch.testing.assert_close(
        bandit.bt_probability(rw, rl) + bandit.bt_probability(rl, rw),
        torch.ones(3, dtype=torch.float64),
    )
    nll = bandit.bt_nll(rl, rw)
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll[2], torch.tensor(2e4, dtype=torch.float64))


def test_sample_preferences_follows_bradley_terry():
    reward = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    prefs = bandit.sample_preferences(reward, 20000, seed=0)
    assert len(prefs) == 20000 and (prefs.chosen != prefs.rejected).all()
    win_rate = (prefs.chosen == 1).double().mean()
    assert abs(win_rate - torch.sigmoid(torch.tensor(1.0))) < 0.01
    noisy = bandit.sample_preferences(reward, 20000, seed=0, label_noise=0.2)
    expected = 0.8 * torch.sigmoid(torch.tensor(1.0)) + 0.2 * torch.sigmoid(torch.tensor(-1.0))
    assert abs((noisy.chosen == 1).double().mean() - expected) < 0.01
    again = bandit.sample_preferences(reward, 20000, seed=0)
    assert torch.equal(prefs.chosen, again.chosen)


def test_sample_preferences_uses_the_proposal(world):
    prefs = bandit.sample_preferences(world.reward, 5000, seed=0, proposal=world.pi_ref)
    counts = torch.zeros(3, 5)
    counts.index_put_((prefs.prompt, prefs.chosen), torch.ones(5000), accumulate=True)
    counts.index_put_((prefs.prompt, prefs.rejected), torch.ones(5000), accumulate=True)
    # the response that pi_ref likes most takes part in the most comparisons
    assert torch.equal(counts.argmax(-1), world.pi_ref.argmax(-1))


def test_fit_bt_rewards_recovers_rewards(world):
    prefs = bandit.sample_preferences(world.reward, 50000, seed=0)
    fitted = bandit.fit_bt_rewards(prefs, 3, 5)
    torch.testing.assert_close(
        fitted.mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0
    )
    assert (fitted - bandit.center_rewards(world.reward)).abs().max() < 0.1


def test_tabular_dpo_equals_the_rlhf_route(world):
    """DPO on the pairs == optimal policy of the BT reward fitted on the same pairs; both near pi*."""
    beta = 1.0
    prefs = bandit.sample_preferences(world.reward, 5000, seed=0, proposal=world.pi_ref)
    pi_dpo = bandit.train_tabular_dpo(world.pi_ref, prefs, beta)
    pi_rlhf = bandit.optimal_policy(world.pi_ref, bandit.fit_bt_rewards(prefs, 3, 5), beta)
    torch.testing.assert_close(pi_dpo, pi_rlhf, atol=1e-7, rtol=0)
    pi_star = bandit.optimal_policy(world.pi_ref, world.reward, beta)
    assert bandit.kl_divergence(pi_dpo, pi_star).max() < 0.05
    assert (
        bandit.kl_divergence(pi_dpo, pi_star) < 0.1 * bandit.kl_divergence(world.pi_ref, pi_star)
    ).all()


def test_beta_explorer_has_a_beta_slider_that_redraws(world, monkeypatch):
    """The browser test moves the first slider of notebook 02, described "beta"; it must redraw."""
    import ipywidgets
    import matplotlib.pyplot as plt

    from dpo_teach import widgets

    explorer = widgets.beta_explorer(world.pi_ref[0], world.reward[0], beta=1.0)
    slider = explorer.children[0]
    assert isinstance(slider, ipywidgets.FloatLogSlider) and slider.description == "beta"
    drawn = []
    monkeypatch.setattr(
        plt, "show", lambda: drawn.append(plt.gcf().axes[2].patches[2].get_height())
    )
    slider.value = 0.01
    slider.value = 100.0
    assert (
        len(drawn) == 2 and drawn[0] > 0.99 and drawn[1] < 0.05
    )  # pi*(y2 | x0): argmax r, then ~pi_ref
    plt.close("all")


def test_bt_explorer_draws(monkeypatch):
    import matplotlib.pyplot as plt

    from dpo_teach import widgets

    explorer = widgets.bt_explorer(difference=0.0)
    titles = []
    monkeypatch.setattr(plt, "show", lambda: titles.append(plt.gcf().axes[0].get_title()))
    explorer.children[0].value = 2.0
    assert titles == ["win probability = 0.881"]
    plt.close("all")
