"""Claims about results, checked where a notebook makes them.

A cell that states a result of training (SFT lowered the perplexity, the reward model ranks held-out
pairs better than chance, DPO raised the oracle reward by more than its confidence interval's width)
checks it with `claim(condition, message)`: an assert that says what was claimed.

Assertions about shapes, identities and conventions stay plain `assert`s: they hold for any model.
The difference matters in one place, the rehearsal of the GPU preset (dpo_teach.rehearse), which
runs every notebook on a briefly pretrained stand-in GPT-2 and, on a CPU, with every size scaled
down: too little training for every result to hold, enough to reach every line of code. It sets
DPO_TEACH_REHEARSAL=1, and there a claim that does not hold is counted and printed instead of
raised. Everywhere else, a claim that does not hold raises AssertionError.
"""

from __future__ import annotations

import os
from collections import Counter

__all__ = ["CLAIMS", "REHEARSAL_ENV", "claim"]

REHEARSAL_ENV = "DPO_TEACH_REHEARSAL"
CLAIMS: Counter = Counter()  # "met" and "unmet" claims in this process


def claim(condition, message: str) -> None:
    """Assert `condition`, a result the notebook states in words (`message`). In a rehearsal
    ($DPO_TEACH_REHEARSAL=1) an unmet claim is counted and printed, not raised."""
    if condition:
        CLAIMS["met"] += 1
        return
    CLAIMS["unmet"] += 1
    if os.environ.get(REHEARSAL_ENV) == "1":
        print(f"[rehearsal] claim not met: {message}")
        return
    raise AssertionError(message)
