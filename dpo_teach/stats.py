"""Confidence intervals for comparisons of noisy measurements: the paired bootstrap.

Every comparison the course draws from sampled rewards or KLs ("A buys more reward than B", "A
drifts further than B", "no difference") rests on an interval, never on a bare `a > b`:

    interval = paired_bootstrap(lambda a, b: a.mean() - b.mean(), rewards_a, rewards_b)
    interval.verdict("A", "B")   # "A above B", "B above A" or "not resolved at this scale"

*Paired*: the measurements of A and B were made on the same held-out prompts (and, where there are
several seeds, the same seeds), so each resample draws ONE set of prompt indices (and one set of seed
indices) and applies it to every input. What the two methods share, the difficulty of each prompt,
then cancels in the difference instead of widening the interval.

Inputs are tensors of shape (P,) (one number per prompt) or (S, P) (seeds x prompts). The interval is
the percentile interval of the statistic over `num_resamples` resamples, seeded: the same inputs
give the same interval on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Interval", "paired_bootstrap", "resample_indices"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval [low, high] at `level`."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def above(self, threshold: float = 0.0) -> bool:
        """True when the whole interval lies above threshold: the claim "greater" is supported."""
        return self.low > threshold

    def below(self, threshold: float = 0.0) -> bool:
        """True when the whole interval lies below threshold: the claim "smaller" is supported."""
        return self.high < threshold

    def verdict(self, a: str = "A", b: str = "B", word: str = "above") -> str:
        """What the interval of a difference A - B allows one to say."""
        if self.above(0.0):
            return f"{a} {word} {b}"
        if self.below(0.0):
            return f"{b} {word} {a}"
        return "not resolved at this scale"

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def resample_indices(num_prompts: int, num_seeds: int, num_resamples: int, seed: int = 0):
    """(prompt_idx (R, P), seed_idx (R, S)): indices drawn with replacement, one row per resample."""
    generator = torch.Generator().manual_seed(seed)
    prompt_idx = torch.randint(num_prompts, (num_resamples, num_prompts), generator=generator)
    seed_idx = torch.randint(num_seeds, (num_resamples, num_seeds), generator=generator)
    return prompt_idx, seed_idx


def _take(x: torch.Tensor, prompts: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """x resampled along its first (seeds) and last (prompts) dimension: (P,), (S, P) or (S, C, P)."""
    x = x.index_select(-1, prompts)
    if x.dim() == 1 or x.shape[0] == 1:  # one seed (e.g. the SFT policy): nothing to resample over seeds
        return x
    return x[seeds]


def paired_bootstrap(statistic: Callable[..., torch.Tensor | float], *samples: torch.Tensor,
                     num_resamples: int = 2000, level: float = 0.95, seed: int = 0,
                     vector: bool = False) -> Interval | list[Interval]:
    """The bootstrap interval of statistic(*samples), resampling prompts (and seeds) jointly.

    Every sample is (P,), (S, P) or (S, C, P) (C: checkpoints) with the same P; those with S > 1
    must share S (seed s of one method is resampled together with seed s of the other). Returns the
    statistic on the data itself and the percentile interval at `level` over the resamples; with
    vector=True the statistic returns a vector (D,) and the result is one Interval per component.
    NaN values of a resample (e.g. a frontier outside its KL range) are left out of the interval.
    """
    if not samples:
        raise ValueError("paired_bootstrap needs at least one sample")
    samples = tuple(torch.as_tensor(s, dtype=torch.float64) for s in samples)
    num_prompts = {s.shape[-1] for s in samples}
    if len(num_prompts) != 1:
        raise ValueError(f"paired samples must share their prompts (last dimension), got sizes {sorted(num_prompts)}")
    num_seeds = {s.shape[0] for s in samples if s.dim() >= 2 and s.shape[0] > 1}
    if len(num_seeds) > 1:
        raise ValueError(f"paired samples must share their seeds (first dimension), got sizes {sorted(num_seeds)}")
    (p,), s = num_prompts, (num_seeds.pop() if num_seeds else 1)
    estimate = torch.as_tensor(statistic(*samples), dtype=torch.float64).reshape(-1)  # (D,)
    prompt_idx, seed_idx = resample_indices(p, s, num_resamples, seed)
    values = torch.stack([torch.as_tensor(statistic(*(_take(x, prompt_idx[r], seed_idx[r]) for x in samples)),
                                          dtype=torch.float64).reshape(-1) for r in range(num_resamples)])  # (R, D)
    alpha = (1 - level) / 2
    intervals = []
    for d in range(values.shape[1]):
        column = values[:, d][torch.isfinite(values[:, d])]
        if len(column) == 0:
            intervals.append(Interval(estimate[d].item(), math.nan, math.nan, level))
            continue
        low, high = torch.quantile(column, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
        intervals.append(Interval(estimate[d].item(), low, high, level))
    if vector:
        return intervals
    if len(intervals) != 1:
        raise ValueError("the statistic returned a vector: pass vector=True")
    return intervals[0]
