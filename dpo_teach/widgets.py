"""Interactive controls (ipywidgets) for the theory notebooks: move a slider, watch the formula respond.

ipywidgets is imported here, not in dpo_teach/__init__.py, so that the package imports without it.
Each function returns the `ipywidgets.interactive` widget (a slider above an Output area); display it
as the last expression of a cell. The plot is redrawn whenever the slider moves.
"""

from __future__ import annotations

import ipywidgets
import matplotlib.pyplot as plt
from torch import Tensor

from dpo_teach import bandit
from dpo_teach.plotting import plot_bradley_terry, plot_policy_bars

__all__ = ["bt_explorer", "beta_explorer"]


def bt_explorer(difference: float = 1.0) -> ipywidgets.interactive:
    """Notebook 01: a slider for r(y_w) - r(y_l); plots the BT win probability and the loss."""
    slider = ipywidgets.FloatSlider(
        value=difference,
        min=-8.0,
        max=8.0,
        step=0.1,
        description="r_w - r_l",
        continuous_update=True,
        readout_format=".1f",
    )

    def draw(difference: float) -> None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        plot_bradley_terry(axes, difference)
        fig.suptitle("Bradley-Terry: win probability and negative log-likelihood")
        fig.tight_layout()
        plt.show()

    return ipywidgets.interactive(draw, difference=slider)


def beta_explorer(pi_ref: Tensor, reward: Tensor, beta: float = 1.0) -> ipywidgets.interactive:
    """Notebook 02: a log-scale "beta" slider; plots pi_ref, r and pi* = pi_ref exp(r/beta)/Z for one prompt.

    pi_ref and reward are (K,) for a single prompt.
    """
    slider = ipywidgets.FloatLogSlider(
        value=beta,
        base=10,
        min=-2,
        max=2,
        step=0.05,
        description="beta",
        continuous_update=True,
        readout_format=".3g",
    )

    def draw(beta: float) -> None:
        policy = bandit.optimal_policy(pi_ref, reward, beta)
        kl = bandit.kl_divergence(policy, pi_ref).item()
        mean_reward = bandit.expected_reward(policy, reward).item()
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        plot_policy_bars(axes, pi_ref, reward, policy)
        fig.suptitle(
            f"beta = {beta:.3g}:  E_pi*[r] = {mean_reward:.3f},  KL(pi* || pi_ref) = {kl:.3f}"
        )
        fig.tight_layout()
        plt.show()

    return ipywidgets.interactive(draw, beta=slider)
