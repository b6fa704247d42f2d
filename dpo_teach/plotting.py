"""Plot helpers shared by the theory notebooks and their widgets (matplotlib only, no global style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["plot_bradley_terry", "plot_policy_bars"]


def plot_bradley_terry(axes, difference: float, span: float = 8.0) -> None:
    """Two panels: the win probability sigma(d) and the loss -log sigma(d), with a marker at d."""
    d = torch.linspace(-span, span, 401, dtype=torch.float64)
    point = torch.tensor(difference, dtype=torch.float64)
    p, loss = torch.sigmoid(point).item(), -F.logsigmoid(point).item()
    ax_p, ax_loss = axes
    ax_p.plot(d, torch.sigmoid(d), color="tab:blue")
    ax_p.plot([difference], [p], "o", color="tab:red")
    ax_p.axhline(0.5, color="grey", lw=0.5)
    ax_p.set(
        xlabel="reward difference r(y_w) - r(y_l)",
        ylabel="p(y_w preferred)",
        title=f"win probability = {p:.3f}",
        ylim=(-0.02, 1.02),
    )
    ax_loss.plot(d, -F.logsigmoid(d), color="tab:orange")
    ax_loss.plot([difference], [loss], "o", color="tab:red")
    ax_loss.set(
        xlabel="reward difference r(y_w) - r(y_l)",
        ylabel="-log sigma(difference)",
        title=f"loss of this comparison = {loss:.3f}",
    )


def plot_policy_bars(
    axes, pi_ref: Tensor, reward: Tensor, policy: Tensor, policy_label: str = "pi*(y|x)"
) -> None:
    """Three bar panels for one prompt: pi_ref(y|x), r(x, y) and a policy, over the K responses."""
    k = torch.arange(pi_ref.shape[-1])
    labels = [f"y{i}" for i in k.tolist()]
    ax_ref, ax_r, ax_pi = axes
    ax_ref.bar(k, pi_ref, color="tab:grey")
    ax_ref.set(title="reference policy pi_ref(y|x)", ylim=(0, 1), ylabel="probability")
    ax_r.bar(k, reward, color=["tab:green" if v >= 0 else "tab:red" for v in reward.tolist()])
    ax_r.axhline(0, color="black", lw=0.5)
    ax_r.set(title="reward r(x, y)")
    ax_pi.bar(k, policy, color="tab:blue")
    ax_pi.set(title=policy_label, ylim=(0, 1), ylabel="probability")
    for ax in axes:
        ax.set_xticks(k.tolist(), labels)
        ax.set_xlabel("response y")
