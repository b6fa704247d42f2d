"""Exercise checks of notebook 10 (beyond DPO): `ipo_loss` and `log_odds`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach.checks.engine import (
    Case,
    Extreme,
    Inputs,
    Mistake,
    compare_with_reference,
    dpo_inputs,
    randn,
)

__all__ = ["check_ipo_loss", "check_log_odds"]


def _ipo_reference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    from dpo_teach.variants import ipo_loss

    return ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)[0]


def check_ipo_loss(ipo_loss: Callable) -> None:
    """Check ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    -> (B,) per-example IPO losses (h - 1/(2 beta))^2, h the difference of the two log-ratios."""
    def margin(pc, pr, rc, rr):
        return (pc - rc) - (pr - rr)

    case = Case(
        name="ipo_loss",
        reference=_ipo_reference,
        make_inputs=dpo_inputs,
        shape_hint="Return one loss per pair, shape (B,), without averaging.",
        grad_inputs=("policy_chosen_logps", "policy_rejected_logps"),
        mistakes=[
            Mistake("the target margin is 1/beta instead of 1/(2 beta)",
                    lambda pc, pr, rc, rr, b: (margin(pc, pr, rc, rr) - 1 / b) ** 2,
                    "IPO's regression target is h = 1 / (2 * beta)."),
            Mistake("the margin is multiplied by beta, as in DPO's sigmoid",
                    lambda pc, pr, rc, rr, b: (b * margin(pc, pr, rc, rr) - 1 / (2 * b)) ** 2,
                    "IPO regresses the raw difference of log-ratios h on 1/(2 beta): no beta in front of h."),
            Mistake("the reference model is left out",
                    lambda pc, pr, rc, rr, b: ((pc - pr) - 1 / (2 * b)) ** 2,
                    "h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))."),
            Mistake("chosen and rejected are swapped",
                    lambda pc, pr, rc, rr, b: (-margin(pc, pr, rc, rr) - 1 / (2 * b)) ** 2,
                    "The chosen response's log-ratio comes first: h = log-ratio(y_w) - log-ratio(y_l)."),
            Mistake("the square is missing",
                    lambda pc, pr, rc, rr, b: margin(pc, pr, rc, rr) - 1 / (2 * b),
                    "IPO is a squared loss: (h - 1/(2 beta)) ** 2."),
            Mistake("the losses are averaged over the batch",
                    lambda pc, pr, rc, rr, b: ((margin(pc, pr, rc, rr) - 1 / (2 * b)) ** 2).mean(),
                    "Return one loss per pair; the training loop takes the mean."),
        ],
    )
    compare_with_reference(ipo_loss, case)


def _mean_logps(generator: torch.Generator) -> Inputs:
    return {"mean_logps": -(randn(generator, 10).abs() * 3 + 1e-3)}


def _log_odds_reference(mean_logps: Tensor) -> Tensor:
    from dpo_teach.variants import log_odds

    return log_odds(mean_logps)


def check_log_odds(log_odds: Callable) -> None:
    """Check log_odds(mean_logps) -> log(p / (1 - p)) for p = exp(mean_logps), finite for any mean_logps < 0."""
    case = Case(
        name="log_odds",
        reference=_log_odds_reference,
        make_inputs=_mean_logps,
        shape_hint="Return one log-odds per response, the shape of mean_logps.",
        grad_inputs=("mean_logps",),
        mistakes=[
            Mistake("it returns log((1 - p) / p), the log-odds upside down",
                    lambda m: -_log_odds_reference(m), "log odds = log p - log(1 - p)."),
            Mistake("it returns the odds p / (1 - p), not their log",
                    lambda m: torch.exp(_log_odds_reference(m)), "Stay in log space: log p - log(1 - p)."),
            Mistake("log(1 - p) is missing: it returns log p", lambda m: m,
                    "The odds divide p by 1 - p: subtract log(1 - p)."),
        ],
        extremes=[
            Extreme(
                "responses almost certain under the model (mean log-prob -1e-20, so p rounds to 1)",
                {"mean_logps": torch.tensor([-1e-20, -1e-17, -1e-9, -50.0], dtype=torch.float64)},
                "1 - exp(x) rounds to 0 when x is close to 0, and log(0) = -inf. Use torch.log(-torch.expm1(x)) "
                "(expm1 is exact near 0) for x close to 0, and torch.log1p(-torch.exp(x)) for very negative x.",
            )
        ],
        rtol=1e-6,
        atol=1e-8,
    )
    compare_with_reference(log_odds, case)
