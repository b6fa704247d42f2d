"""Tests of dpo_teach.stats: the Interval's claims, and the paired bootstrap (determinism, coverage
on simulated data, what pairing buys, joint resampling of prompts and seeds, input checks)."""

import math

import pytest
import torch

from dpo_teach.stats import Interval, paired_bootstrap, resample_indices


def mean_difference(a, b):
    return a.mean() - b.mean()


# ---- Interval -------------------------------------------------------------------------------------


def test_interval_above_below_and_verdict():
    up, down, across = Interval(0.5, 0.1, 0.9), Interval(-0.5, -0.9, -0.1), Interval(0.1, -0.2, 0.4)
    assert up.above() and not up.below() and up.verdict("DPO", "PPO") == "DPO above PPO"
    assert down.below() and not down.above() and down.verdict("DPO", "PPO") == "PPO above DPO"
    assert not across.above() and not across.below()
    assert across.verdict("DPO", "PPO") == "not resolved at this scale"
    assert up.verdict("A", "B", word="drifts further than") == "A drifts further than B"
    assert down.verdict("A", "B", word="drifts further than") == "B drifts further than A"
    assert up.level == 0.95, "the default level"


def test_interval_thresholds_are_strict():
    touching = Interval(0.5, 0.0, 1.0)  # the interval reaches 0: "greater than 0" is not supported
    assert not touching.above() and touching.above(-0.01) and not touching.below()
    assert touching.verdict() == "not resolved at this scale"
    assert Interval(-0.5, -1.0, 0.0).verdict() == "not resolved at this scale"
    assert Interval(2.0, 1.5, 2.5).above(1.0) and not Interval(2.0, 1.5, 2.5).above(1.5)
    assert Interval(2.0, 1.5, 2.5).below(3.0) and not Interval(2.0, 1.5, 2.5).below(2.5)
    unknown = Interval(math.nan, math.nan, math.nan)  # e.g. a frontier outside its KL range
    assert not unknown.above() and not unknown.below() and unknown.verdict() == "not resolved at this scale"


def test_interval_str():
    assert str(Interval(0.1234, -0.05, 0.3)) == "+0.123 [-0.050, +0.300]"
    assert str(Interval(-2.0, -2.5, -1.5, level=0.9)) == "-2.000 [-2.500, -1.500]"


# ---- paired_bootstrap -------------------------------------------------------------------------------


def normal(*shape, seed=0, std=1.0):
    return std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_estimate_is_the_statistic_of_the_data_and_the_interval_contains_it():
    a, b = normal(50, seed=1) + 0.5, normal(50, seed=2)
    interval = paired_bootstrap(mean_difference, a, b, num_resamples=300)
    assert interval.estimate == pytest.approx((a.mean() - b.mean()).item(), abs=1e-12)
    assert interval.low < interval.estimate < interval.high and interval.level == 0.95
    wider = paired_bootstrap(mean_difference, a, b, num_resamples=300, level=0.99)
    assert wider.low < interval.low and wider.high > interval.high and wider.level == 0.99


def test_deterministic_for_a_seed():
    a, b = normal(40, seed=1), normal(40, seed=2)
    first = paired_bootstrap(mean_difference, a, b, num_resamples=200, seed=3)
    assert paired_bootstrap(mean_difference, a, b, num_resamples=200, seed=3) == first
    assert paired_bootstrap(mean_difference, a.tolist(), b.tolist(), num_resamples=200, seed=3) == first, \
        "lists are taken as tensors"
    other = paired_bootstrap(mean_difference, a, b, num_resamples=200, seed=4)
    assert other.estimate == first.estimate and (other.low, other.high) != (first.low, first.high)


def test_resample_indices_are_seeded_and_in_range():
    prompts, seeds = resample_indices(7, 3, 50, seed=5)
    assert prompts.shape == (50, 7) and seeds.shape == (50, 3)
    assert prompts.min() >= 0 and prompts.max() <= 6 and seeds.min() >= 0 and seeds.max() <= 2
    again = resample_indices(7, 3, 50, seed=5)
    assert torch.equal(prompts, again[0]) and torch.equal(seeds, again[1])
    assert not torch.equal(prompts, resample_indices(7, 3, 50, seed=6)[0])
    assert len(prompts.unique(dim=0)) > 40, "with replacement, a different draw per resample"


def test_coverage_of_the_truth_is_near_the_nominal_level():
    """200 simulated experiments (30 prompts, true mean 1): the 90% interval of the mean holds the
    truth in about 90% of them (the percentile bootstrap is a little short for small samples)."""
    hits = 0
    for rep in range(200):
        x = 1.0 + normal(30, seed=1000 + rep)
        interval = paired_bootstrap(lambda v: v.mean(), x, num_resamples=200, level=0.9, seed=rep)
        hits += interval.low <= 1.0 <= interval.high
    assert 0.8 <= hits / 200 <= 0.97, hits


def test_pairing_cancels_what_the_prompts_share():
    """a and b share large per-prompt offsets (prompt difficulty): the paired interval of
    mean(a - b) is far narrower than the one of the same numbers with b's prompts shuffled."""
    num_prompts, delta = 60, 0.2
    offset = normal(num_prompts, seed=0, std=5.0)
    a = offset + delta + normal(num_prompts, seed=1, std=0.1)
    b = offset + normal(num_prompts, seed=2, std=0.1)
    paired = paired_bootstrap(lambda x, y: (x - y).mean(), a, b, num_resamples=500)
    shuffled = b[torch.randperm(num_prompts, generator=torch.Generator().manual_seed(3))]
    unpaired = paired_bootstrap(lambda x, y: (x - y).mean(), a, shuffled, num_resamples=500)
    assert paired.estimate == pytest.approx(unpaired.estimate), "the same means"
    assert paired.low < delta < paired.high and paired.above(0.0)
    assert (paired.high - paired.low) < 0.05 * (unpaired.high - unpaired.low)
    assert not unpaired.above(0.0), "without pairing the difference is lost in the prompt offsets"


def test_one_draw_of_prompts_and_seeds_for_every_sample():
    """Each resample applies the same prompt indices (last dimension) and seed indices (first
    dimension) to every input, whatever its shape: (P,), (1, P), (S, P) or (S, C, P)."""
    num_seeds, num_checkpoints, num_prompts, num_resamples = 3, 2, 5, 20
    p_only = normal(num_prompts, seed=1)
    one_seed = normal(1, num_prompts, seed=2)
    seeds_prompts = normal(num_seeds, num_prompts, seed=3)
    checkpoints = normal(num_seeds, num_checkpoints, num_prompts, seed=4)
    calls = []

    def record(*xs):
        calls.append(xs)
        return sum(x.sum() for x in xs)

    paired_bootstrap(record, p_only, one_seed, seeds_prompts, checkpoints, num_resamples=num_resamples, seed=7)
    assert len(calls) == num_resamples + 1
    assert all(torch.equal(x, y) for x, y in zip(calls[0], (p_only, one_seed, seeds_prompts, checkpoints))), \
        "the estimate is the statistic of the data itself"
    prompt_idx, seed_idx = resample_indices(num_prompts, num_seeds, num_resamples, seed=7)
    for r, (x1, x2, x3, x4) in enumerate(calls[1:]):
        p, s = prompt_idx[r], seed_idx[r]
        assert torch.equal(x1, p_only[p])
        assert torch.equal(x2, one_seed[:, p]), "a single seed is not resampled over seeds"
        assert torch.equal(x3, seeds_prompts[s][:, p])
        assert torch.equal(x4, checkpoints[s][:, :, p])
    assert any(len(set(seed_idx[r].tolist())) < num_seeds for r in range(num_resamples)), "seeds are resampled"


def test_seeds_are_resampled_jointly_across_inputs():
    """b = a + 1 where a has large per-seed and per-prompt effects: when seeds and prompts are drawn
    jointly, every resample of mean(b) - mean(a) is exactly 1; seeds resampled alone still vary."""
    a = normal(3, 8, seed=0) + 10.0 * torch.arange(3, dtype=torch.float64).unsqueeze(1)  # (S, P)
    b = a + 1.0
    joint = paired_bootstrap(lambda x, y: y.mean() - x.mean(), a, b, num_resamples=200)
    assert joint.low == pytest.approx(1.0) and joint.high == pytest.approx(1.0)
    per_checkpoint = torch.stack([b, b + 2.0], dim=1)  # (S, C, P) against (S, P)
    joint = paired_bootstrap(lambda x, y: y[:, 1].mean() - x.mean(), a, per_checkpoint, num_resamples=200)
    assert joint.low == pytest.approx(3.0) and joint.high == pytest.approx(3.0)
    seed_effect = torch.arange(3, dtype=torch.float64).unsqueeze(1).expand(3, 8)  # varies over seeds only
    spread = paired_bootstrap(lambda x: x.mean(), seed_effect, num_resamples=200)
    assert spread.low < 1.0 < spread.high, "the seeds are resampled"


def test_vector_statistics_give_one_interval_per_component():
    a, b = normal(30, seed=1), normal(30, seed=2) + 3.0
    intervals = paired_bootstrap(lambda x, y: torch.stack([x.mean(), y.mean()]), a, b, num_resamples=200,
                                 vector=True)
    assert isinstance(intervals, list) and len(intervals) == 2 and all(isinstance(i, Interval) for i in intervals)
    assert intervals[0].estimate == pytest.approx(a.mean().item()) and intervals[1].low > 2.0
    alone = paired_bootstrap(lambda x, y: x.mean(), a, b, num_resamples=200)
    assert intervals[0] == alone, "the same resamples as a scalar statistic"
    single = paired_bootstrap(lambda x: x.mean(), a, num_resamples=50, vector=True)
    assert isinstance(single, list) and len(single) == 1
    with pytest.raises(ValueError, match="vector=True"):
        paired_bootstrap(lambda x, y: torch.stack([x.mean(), y.mean()]), a, b, num_resamples=20)


def test_nan_resamples_are_left_out():
    x = torch.arange(10, dtype=torch.float64)
    # NaN when the resample's largest value is below 9 (about a third of the resamples)
    interval = paired_bootstrap(lambda v: v.mean() if v.max() == 9 else math.nan, x, num_resamples=300)
    assert math.isfinite(interval.low) and math.isfinite(interval.high) and interval.estimate == 4.5
    never = paired_bootstrap(lambda v: torch.tensor(math.nan), x, num_resamples=20)
    assert math.isnan(never.estimate) and math.isnan(never.low) and math.isnan(never.high)
    assert never.verdict() == "not resolved at this scale"


def test_input_checks():
    with pytest.raises(ValueError, match="prompts"):
        paired_bootstrap(mean_difference, torch.zeros(5), torch.zeros(6))
    with pytest.raises(ValueError, match="prompts"):
        paired_bootstrap(mean_difference, torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="seeds"):
        paired_bootstrap(mean_difference, torch.zeros(2, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="seeds"):
        paired_bootstrap(mean_difference, torch.zeros(2, 4, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap(lambda: 0.0)
    # one seed, or none, goes with any number of seeds
    interval = paired_bootstrap(mean_difference, torch.ones(1, 5), torch.zeros(3, 5), num_resamples=20)
    assert interval.estimate == 1.0
    assert paired_bootstrap(mean_difference, torch.ones(5), torch.zeros(3, 2, 5), num_resamples=20).estimate == 1.0
