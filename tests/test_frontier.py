"""Tests of dpo_teach.frontier (notebook 09): the frontier arithmetic on hand-made numbers (best-of-N,
dominance, concave hulls, the paired gaps between frontiers), the ideal frontier against the exact
answer of a bandit, length, cost and the tables, the sweep sizes, and every method of Experiment
on a tiny random GPT-2 with injected ingredients."""

import copy
import json
import math
from dataclasses import replace

import datasets
import pytest
import torch

from dpo_teach import bandit, dpo, frontier, pipeline, ppo
from dpo_teach.cost import models_mb
from dpo_teach.frontier import MethodData, Point, Run
from dpo_teach.models import frozen_copy
from dpo_teach.reward import RewardModel, train_reward_model
from dpo_teach.settings import SETTINGS, DPOConfig, RewardConfig, SFTConfig
from dpo_teach.sft import train_sft
from dpo_teach.stats import Interval
from dpo_teach.world import load_prompts, oracle_reward

# ---- Best-of-N arithmetic -------------------------------------------------------------------------


def test_best_of_n_rewards_picks_by_the_scores_among_the_first_n():
    # (N_max=3, P=2): sample j of prompt i at [j, i]
    scores = torch.tensor([[0.1, 5.0], [0.9, 1.0], [0.5, 9.0]])
    rewards = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    assert frontier.best_of_n_rewards(scores, rewards, 1).tolist() == [10.0, 20.0]
    # prompt 1: the reward model's favourite overall (j=2) is not among the first 2 samples
    assert frontier.best_of_n_rewards(scores, rewards, 2).tolist() == [30.0, 20.0]
    # prompt 0: the reward model picks j=1 (reward 30), not the oracle's best j=2 (reward 50)
    assert frontier.best_of_n_rewards(scores, rewards, 3).tolist() == [30.0, 60.0]


def test_best_of_n_kl_known_values_and_growth():
    assert frontier.best_of_n_kl(1) == 0.0
    assert frontier.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert frontier.best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    values = [frontier.best_of_n_kl(n) for n in range(1, 65)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert all(v < math.log(n) for n, v in zip(range(2, 65), values[1:])), "below log N"


# ---- Dominance ------------------------------------------------------------------------------------

# (kl, reward) and whether the point is on the frontier
FRONTIER_CASE = [
    ((0.0, 0.0), True),  # the lowest KL with the best reward there
    ((1.0, 1.0), True),
    ((2.0, 1.0), False),  # same reward as (1, 1) at a larger KL
    ((1.5, 0.5), False),  # beaten by (1, 1) on both
    ((3.0, 2.0), True),
    ((3.0, 2.0), True),  # a duplicate: neither beats the other
    ((0.0, -1.0), False),  # same KL as (0, 0) with a lower reward
    ((4.0, 1.5), False),  # beaten by (3, 2)
]


def test_on_frontier_hand_made_points():
    kls = torch.tensor([kl for (kl, _), _ in FRONTIER_CASE], dtype=torch.float64)
    rewards = torch.tensor([r for (_, r), _ in FRONTIER_CASE], dtype=torch.float64)
    mask = frontier.on_frontier(kls, rewards)
    assert mask.dtype == torch.float64
    assert mask.tolist() == [1.0 if keep else 0.0 for _, keep in FRONTIER_CASE]
    single = frontier.on_frontier(torch.tensor([2.0]), torch.tensor([-3.0]))
    assert single.tolist() == [1.0] and single.dtype == torch.float32


def test_on_frontier_beating_must_be_strict():
    """Ties are not wins: equal points keep each other; a point equal in one coordinate and
    better in the other beats."""
    kls, rewards = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 0.5, 0.5])
    assert frontier.on_frontier(kls, rewards).tolist() == [1.0, 1.0, 1.0]
    assert frontier.on_frontier(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.6])).tolist() == [0.0, 1.0]
    assert frontier.on_frontier(torch.tensor([1.0, 0.9]), torch.tensor([0.5, 0.5])).tolist() == [0.0, 1.0]
    # a trade-off: neither beats the other
    assert frontier.on_frontier(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.6])).tolist() == [1.0, 1.0]


# ---- Concave frontier -------------------------------------------------------------------------------


def test_concave_frontier_hand_made_points():
    kls = [0.0, 1.0, 2.0, 3.0, 4.0, 1.5]
    rewards = [0.0, 1.0, 1.2, 2.0, 1.5, 0.5]
    # (2, 1.2) lies under the chord from (1, 1) to (3, 2) (1.5 at KL 2): a mixture of those two beats it;
    # (1.5, 0.5) lies under everything; (4, 1.5) comes after the highest reward
    assert frontier.concave_frontier(kls, rewards) == ([0.0, 1.0, 3.0], [0.0, 1.0, 2.0])
    order = [4, 2, 5, 0, 3, 1]
    shuffled = frontier.concave_frontier([kls[i] for i in order], [rewards[i] for i in order])
    assert shuffled == ([0.0, 1.0, 3.0], [0.0, 1.0, 2.0]), "any order"
    as_tensors = frontier.concave_frontier(torch.tensor(kls), torch.tensor(rewards, dtype=torch.float64))
    assert as_tensors == ([0.0, 1.0, 3.0], [0.0, 1.0, 2.0]) and all(type(v) is float for v in as_tensors[0])


def test_concave_frontier_drops_collinear_middle_points_and_duplicates():
    assert frontier.concave_frontier([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]) == ([0.0, 3.0], [0.0, 3.0])
    # the same point twice (e.g. every setting's step-0 SFT checkpoint): one vertex
    assert frontier.concave_frontier([0.0, 0.0, 2.0], [0.5, 0.5, 1.0]) == ([0.0, 2.0], [0.5, 1.0])


def test_concave_frontier_never_falls():
    # the best reward at the lowest KL: with more KL budget one stays there
    assert frontier.concave_frontier([0.0, 1.0, 2.0], [1.0, 0.5, 0.9]) == ([0.0], [1.0])
    # a flat stretch after the best reward is cut (the last vertex is the first point of highest reward)
    assert frontier.concave_frontier([0.0, 1.0, 2.0], [0.0, 1.0, 1.0]) == ([0.0, 1.0], [0.0, 1.0])


def test_concave_frontier_of_a_single_point():
    assert frontier.concave_frontier([0.7], [-0.2]) == ([0.7], [-0.2])
    assert frontier.concave_frontier(torch.tensor([0.0]), torch.tensor([0.25])) == ([0.0], [0.25])


def test_concave_frontier_drops_a_lower_point_at_the_lowest_kl():
    """Two checkpoints at the same lowest KL (e.g. best-of-1 next to the SFT point): the one with
    the lower reward is dominated and is not a vertex of the frontier."""
    xs, ys = frontier.concave_frontier([0.0, 0.0, 1.0], [0.0, 1.0, 2.0])
    assert (xs, ys) == ([0.0, 1.0], [1.0, 2.0])


@pytest.mark.parametrize("seed", range(5))
def test_concave_frontier_properties_on_random_points(seed):
    g = torch.Generator().manual_seed(seed)
    kls = 5 * torch.rand(12, generator=g, dtype=torch.float64)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    xs, ys = frontier.concave_frontier(kls, rewards)
    points = set(zip(kls.tolist(), rewards.tolist()))
    assert all((x, y) in points for x, y in zip(xs, ys)), "vertices are checkpoints"
    assert xs == sorted(xs) and len(set(xs)) == len(xs), "sorted by KL"
    assert xs[0] == kls.min().item() and ys[-1] == rewards.max().item()
    assert all(b > a for a, b in zip(ys, ys[1:])), "it rises up to the best reward"
    slopes = [(y2 - y1) / (x2 - x1) for x1, y1, x2, y2 in zip(xs, ys, xs[1:], ys[1:])]
    assert all(b < a for a, b in zip(slopes, slopes[1:])), "concave, no collinear vertex"
    for k, r in zip(kls.tolist(), rewards.tolist()):
        assert r <= frontier.frontier_at(xs, ys, k) + 1e-12, "every checkpoint is on or under it"


def test_frontier_at_interpolates_and_stays_flat():
    xs, ys = [0.0, 1.0, 3.0], [0.0, 1.0, 2.0]
    for kl, reward in ((0.0, 0.0), (1.0, 1.0), (3.0, 2.0)):
        assert frontier.frontier_at(xs, ys, kl) == pytest.approx(reward)
    assert frontier.frontier_at(xs, ys, 0.5) == pytest.approx(0.5)
    assert frontier.frontier_at(xs, ys, 2.0) == pytest.approx(1.5)
    assert frontier.frontier_at(xs, ys, 2.5) == pytest.approx(1.75)
    assert frontier.frontier_at(xs, ys, 3.01) == 2.0 and frontier.frontier_at(xs, ys, 100.0) == 2.0, "flat"
    assert math.isnan(frontier.frontier_at(xs, ys, -0.1)), "no checkpoint with so little KL"
    assert frontier.frontier_at(xs, ys, -1e-13) == pytest.approx(0.0), "rounding below the first KL is forgiven"
    # a single vertex (e.g. one best-of-N run)
    assert frontier.frontier_at([0.5], [0.2], 0.5) == 0.2 and frontier.frontier_at([0.5], [0.2], 9.0) == 0.2
    assert math.isnan(frontier.frontier_at([0.5], [0.2], 0.4))


# ---- Points and runs --------------------------------------------------------------------------------


def point(kl, reward, step=0, seconds=0.0, method="DPO", setting="beta=0.1", seed=0, reward_se=0.0, kl_se=0.0,
          sequences=0, rewards=(), kls=(), lengths=()):
    return Point(method, setting, seed, step, reward, reward_se, kl, kl_se, 0.0, seconds, sequences,
                 list(rewards), list(kls), list(lengths))


def make_run(setting, seed, rewards, kls=None, seconds=None, sequences=None, method="DPO"):
    kls = kls or [0.1 * i for i in range(len(rewards))]
    seconds = seconds or [float(i) for i in range(len(rewards))]
    sequences = sequences or [100 * i for i in range(len(rewards))]
    points = [point(k, r, step=10 * i, seconds=s, sequences=n, method=method, setting=setting, seed=seed)
              for i, (r, k, s, n) in enumerate(zip(rewards, kls, seconds, sequences))]
    return Run(method, setting, seed, points, {"seconds": seconds[-1]})


def test_run_to_dict_and_back_through_json():
    points = [point(0.0, 0.1, rewards=[0.1, 0.2, 0.0], kls=[0.0, 0.0, 0.0], lengths=[3.0, 4.0, 5.0]),
              point(1.5, 0.25, step=10, seconds=2.5, sequences=640, reward_se=0.05, kl_se=0.1,
                    rewards=[0.25, -0.5, 1.0], kls=[1.5, 2.0, 1.0], lengths=[6.0, 6.0, 2.0])]
    run = Run("DPO", "beta=0.1", 2, points, {"seconds": 2.5, "models_held": 1, "labels": 64})
    data = frontier.run_to_dict(run)
    assert set(data) == {"method", "setting", "seed", "points", "cost"}
    back = frontier.run_from_dict(json.loads(json.dumps(data)))
    assert back == run and all(isinstance(p, Point) for p in back.points) and back.final.sequences == 640


def test_run_to_dict_rounds_the_per_prompt_numbers_only():
    p = point(1 / 3, 2 / 3, rewards=[1 / 3, 2 / 3], kls=[1 / 7, 0.5], lengths=[1.0, 2.0])
    data = frontier.run_to_dict(Run("PPO", "kl_coef=0.1", 0, [p]))
    saved = data["points"][0]
    assert saved["rewards"] == [0.33333, 0.66667] and saved["kls"] == [0.14286, 0.5]
    assert saved["oracle_reward"] == 2 / 3 and saved["kl"] == 1 / 3, "means are kept exactly"
    assert frontier.run_to_dict(Run("PPO", "kl_coef=0.1", 0, [p]), digits=2)["points"][0]["rewards"] == [0.33, 0.67]
    assert p.rewards == [1 / 3, 2 / 3], "the run itself is not changed"


# ---- Stacking a method's checkpoints ----------------------------------------------------------------


def per_prompt_run(method, setting, seed, checkpoints):
    """A run whose checkpoints are given as (step, rewards (P,), kls (P,))."""
    points = [point(sum(k) / len(k), sum(r) / len(r), step=step, method=method, setting=setting, seed=seed,
                    rewards=r, kls=k, lengths=[float(len(r))] * len(r)) for step, r, k in checkpoints]
    return Run(method, setting, seed, points)


def test_method_data_stacks_seeds_checkpoints_and_prompts():
    def run(setting, seed, offset):  # 2 checkpoints, 3 prompts; values encode (setting, seed, step, prompt)
        return per_prompt_run("DPO", setting, seed, [
            (step, [offset + 10 * seed + step + 0.1 * p for p in range(3)], [step + 0.01 * p for p in range(3)])
            for step in (0, 5)])

    runs = [run("beta=1", 1, 200), run("beta=0.1", 0, 100), run("beta=0.1", 1, 100), run("beta=1", 0, 200),
            per_prompt_run("PPO", "kl_coef=0.1", 0, [(0, [9.0] * 3, [9.0] * 3)])]
    data = frontier.method_data(runs, "DPO")
    assert isinstance(data, MethodData) and data.method == "DPO" and data.seeds == [0, 1]
    assert data.labels == [("beta=1", 0), ("beta=1", 5), ("beta=0.1", 0), ("beta=0.1", 5)], "settings as they come"
    assert data.rewards.shape == data.kls.shape == data.lengths.shape == (2, 4, 3)
    assert data.rewards.dtype == torch.float64
    for s, seed in enumerate(data.seeds):
        for c, (setting, step) in enumerate(data.labels):
            offset = 200 if setting == "beta=1" else 100
            assert data.rewards[s, c].tolist() == pytest.approx([offset + 10 * seed + step + 0.1 * p for p in range(3)])
            assert data.kls[s, c].tolist() == pytest.approx([step + 0.01 * p for p in range(3)])
    assert data.lengths.eq(3.0).all()
    kl, reward = data.curve()  # each checkpoint's mean over seeds and prompts
    assert kl.tolist() == pytest.approx([0.01, 5.01, 0.01, 5.01])
    assert reward.tolist() == pytest.approx([205.1, 210.1, 105.1, 110.1])
    assert data.frontier() == frontier.concave_frontier(kl, reward)
    only = frontier.method_data(runs, "DPO", settings=["beta=0.1"])
    assert only.labels == [("beta=0.1", 0), ("beta=0.1", 5)] and only.rewards.shape == (2, 2, 3)
    torch.testing.assert_close(only.rewards, data.rewards[:, 2:])


def test_method_data_needs_every_seed_of_every_setting():
    runs = [per_prompt_run("DPO", setting, seed, [(0, [0.0, 1.0], [0.0, 0.0])])
            for setting, seed in (("beta=0.1", 0), ("beta=0.1", 1), ("beta=1", 0))]
    with pytest.raises(ValueError, match="seed 1"):
        frontier.method_data(runs, "DPO")
    assert frontier.method_data(runs, "DPO", settings=["beta=0.1"]).seeds == [0, 1]
    with pytest.raises(ValueError, match="PPO"):
        frontier.method_data(runs, "PPO")


# ---- Gaps between frontiers -------------------------------------------------------------------------

CURVE_KLS = [0.0, 1.0, 2.0, 4.0]  # checkpoint KLs of a made-up method, with a concave reward curve
CURVE_REWARDS = [0.0, 0.5, 0.8, 1.0]
NUM_PROMPTS = 40


def made_up_method(name, shift=0.0, seeds=(0, 1, 2), noise_seed=0, noise=0.05):
    """MethodData whose checkpoint c has per-prompt rewards CURVE_REWARDS[c] + shift + a large
    per-prompt offset (the same for every method: prompt difficulty) + small noise, and per-prompt
    KLs around CURVE_KLS[c] (exactly 0 at the SFT checkpoint)."""
    g = torch.Generator().manual_seed(noise_seed)
    offsets = torch.randn(NUM_PROMPTS, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    shape = (len(seeds), len(CURVE_KLS), NUM_PROMPTS)
    means = torch.tensor(CURVE_REWARDS, dtype=torch.float64).view(1, -1, 1)
    rewards = means + shift + offsets + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    kl_means = torch.tensor(CURVE_KLS, dtype=torch.float64).view(1, -1, 1)
    kls = kl_means * (1 + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64))
    labels = [("x", c) for c in range(len(CURVE_KLS))]
    return MethodData(name, labels, rewards, kls, torch.ones(shape, dtype=torch.float64), list(seeds))


GRID = [0.5, 1.5, 3.0]


def test_frontier_gap_finds_a_known_shift():
    above = made_up_method("A", shift=0.3, noise_seed=1)
    below = made_up_method("B", noise_seed=2)
    per_kl, mean = frontier.frontier_gap(above, below, GRID, num_resamples=200)
    assert len(per_kl) == len(GRID) and all(isinstance(i, Interval) for i in per_kl)
    for interval in per_kl:
        assert interval.low < 0.3 < interval.high and interval.above(0.0), interval
        assert interval.high - interval.low < 0.2, "paired: the prompt offsets cancel"
    assert mean.low < 0.3 < mean.high and mean.above(0.0) and mean.verdict("A", "B") == "A above B"
    reverse, _ = frontier.frontier_gap(below, above, GRID, num_resamples=200)
    assert all(i.below(0.0) for i in reverse)


def test_frontier_gap_of_equal_methods_is_not_resolved():
    a, b = made_up_method("A", noise_seed=1), made_up_method("B", noise_seed=2)  # the same truth
    per_kl, mean = frontier.frontier_gap(a, b, GRID, num_resamples=200)
    assert all(i.low < 0.0 < i.high for i in per_kl)
    assert mean.low < 0.0 < mean.high and mean.verdict() == "not resolved at this scale"
    same_per_kl, same_mean = frontier.frontier_gap(a, a, GRID, num_resamples=50)  # identical data
    assert all((i.estimate, i.low, i.high) == (0.0, 0.0, 0.0) for i in [*same_per_kl, same_mean])


def test_frontier_gap_is_deterministic_and_works_with_other_seeds():
    a, b = made_up_method("A", shift=0.3, noise_seed=1), made_up_method("B", noise_seed=2)
    first = frontier.frontier_gap(a, b, GRID, num_resamples=100, seed=5)
    assert frontier.frontier_gap(a, b, GRID, num_resamples=100, seed=5) == first
    assert frontier.frontier_gap(a, b, GRID, num_resamples=100, seed=6) != first
    # different seeds (or numbers of seeds): each method is averaged over its seeds, prompts still paired
    one_seed = made_up_method("B", seeds=(7,), noise_seed=2)
    per_kl, mean = frontier.frontier_gap(a, one_seed, GRID, num_resamples=100)
    assert all(i.low < 0.3 < i.high for i in per_kl) and mean.above(0.0)


def test_frontier_gap_below_the_first_checkpoint_is_unknown():
    a = made_up_method("A", shift=0.3, noise_seed=1)
    late = made_up_method("B", noise_seed=2)
    late = replace(late, kls=late.kls + 1.0)  # its least-KL checkpoint is at KL 1
    per_kl, _ = frontier.frontier_gap(a, late, [0.5, 3.0], num_resamples=50)
    assert math.isnan(per_kl[0].estimate) and per_kl[0].verdict() == "not resolved at this scale"
    assert per_kl[1].above(0.0)


def test_point_gap_of_a_policy_above_and_on_a_frontier():
    b = made_up_method("B", noise_seed=2)
    offsets = torch.randn(NUM_PROMPTS, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    kls = 1.0 + 0.2 * torch.randn(NUM_PROMPTS, generator=g, dtype=torch.float64)  # the frontier is 0.5 there
    rewards = 0.5 + 0.3 + offsets + 0.05 * torch.randn(NUM_PROMPTS, generator=g, dtype=torch.float64)
    gap = frontier.point_gap(rewards, kls, b, num_resamples=200)
    assert gap.low < 0.3 < gap.high and gap.above(0.0) and gap.high - gap.low < 0.2
    on = frontier.point_gap(rewards - 0.3, kls, b, num_resamples=200)
    assert on.low < 0.0 < on.high
    assert frontier.point_gap(rewards, kls, b, num_resamples=200) == gap, "deterministic"
    two_seeds = frontier.point_gap(torch.stack([rewards - 0.1, rewards + 0.1]), torch.stack([kls, kls]), b,
                                   num_resamples=200)
    assert two_seeds.estimate == pytest.approx(gap.estimate) and two_seeds.low == pytest.approx(gap.low), \
        "several seeds of the policy are averaged"


def test_frontier_band_holds_the_frontier_of_the_data():
    data = made_up_method("A", noise_seed=1)
    band = frontier.frontier_band(data, [-0.5, *GRID], num_resamples=200)
    assert len(band) == 4 and math.isnan(band[0].estimate), "below the first checkpoint: unknown"
    xs, ys = data.frontier()
    for interval, kl in zip(band[1:], GRID):
        assert interval.estimate == pytest.approx(frontier.frontier_at(xs, ys, kl))
        assert interval.low < interval.estimate < interval.high
    assert frontier.frontier_band(data, GRID, num_resamples=200) == band[1:], "deterministic"
    # without the prompt offsets the band is narrow and holds the true curve (0.25, 0.65, 0.9)
    offsets = torch.randn(NUM_PROMPTS, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    clean = frontier.frontier_band(replace(data, rewards=data.rewards - offsets), GRID, num_resamples=200)
    for interval, truth in zip(clean, (0.25, 0.65, 0.9)):
        assert interval.low < truth < interval.high and interval.high - interval.low < 0.1, interval


def test_length_controlled_takes_out_what_length_explains():
    curve = {3: 0.0, 5: 0.2, 10: 1.0}
    data = made_up_method("A", seeds=(0, 1), noise_seed=1)
    long = replace(data, lengths=torch.full_like(data.lengths, 10.0))
    sft_lengths = torch.tensor([[3.0, 5.0], [5.0, 3.0]])  # explained reward 0.1 on average
    adjusted = frontier.length_controlled(long, curve, sft_lengths)
    torch.testing.assert_close(adjusted.rewards, long.rewards - 0.9)
    assert adjusted.kls is long.kls and adjusted.labels == long.labels and adjusted.seeds == long.seeds
    assert adjusted.rewards is not long.rewards and torch.equal(long.rewards, data.rewards), "the input is kept"
    at_sft_length = replace(data, lengths=torch.full_like(data.lengths, 4.0))  # nearest known length: 3
    shifted = frontier.length_controlled(at_sft_length, curve, torch.tensor([3.0]))
    torch.testing.assert_close(shifted.rewards, data.rewards)  # the SFT length explains nothing extra


# ---- The ideal frontier against an exact bandit -------------------------------------------------------


def ref_samples(world, num_samples, seed=0):
    """(K, P) rewards of K i.i.d. samples of each prompt's pi_ref row."""
    idx = torch.multinomial(world.pi_ref, num_samples, replacement=True,
                            generator=torch.Generator().manual_seed(seed))  # (P, K)
    return world.reward.gather(1, idx).T


@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5])
def test_ideal_point_converges_to_the_exact_optimal_policy(beta):
    world = bandit.make_bandit(num_prompts=3, num_responses=6, seed=0)
    pi_star = bandit.optimal_policy(world.pi_ref, world.reward, beta)
    exact_reward = bandit.expected_reward(pi_star, world.reward)
    exact_kl = bandit.kl_divergence(pi_star, world.pi_ref)
    estimate = frontier.ideal_point(ref_samples(world, 20_000), beta)
    assert set(estimate) == {"reward", "kl", "ess"} and estimate["reward"].shape == (3,)
    torch.testing.assert_close(estimate["reward"], exact_reward, atol=0.06, rtol=0)
    torch.testing.assert_close(estimate["kl"], exact_kl, atol=0.04, rtol=0)
    few = frontier.ideal_point(ref_samples(world, 20), beta)
    error_few = (few["reward"] - exact_reward).abs().sum() + (few["kl"] - exact_kl).abs().sum()
    error_many = (estimate["reward"] - exact_reward).abs().sum() + (estimate["kl"] - exact_kl).abs().sum()
    assert error_many < error_few


@pytest.mark.parametrize("num_samples", [1, 2, 4, 16])
def test_ideal_point_kl_is_at_most_log_k_and_ess_between_1_and_k(num_samples):
    world = bandit.make_bandit(num_prompts=4, num_responses=8, seed=1, reward_scale=3.0)
    rewards = ref_samples(world, num_samples, seed=2)
    for beta in (10.0, 1.0, 0.1, 0.01):
        estimate = frontier.ideal_point(rewards, beta)
        assert (estimate["kl"] >= 0).all() and (estimate["kl"] <= math.log(num_samples) + 1e-9).all()
        assert (estimate["ess"] >= 1 - 1e-9).all() and (estimate["ess"] <= num_samples + 1e-9).all()
    # a tiny beta puts all the weight on each prompt's best sample: KL log K when the K rewards are distinct
    sharp = frontier.ideal_point(rewards, 1e-4)
    distinct = torch.tensor([len(set(rewards[:, p].tolist())) == num_samples for p in range(4)])
    torch.testing.assert_close(sharp["reward"], rewards.max(0).values)
    torch.testing.assert_close(sharp["kl"][distinct], torch.full((int(distinct.sum()),), math.log(num_samples),
                                                                 dtype=torch.float64))
    assert torch.allclose(sharp["ess"][distinct], torch.tensor(1.0, dtype=torch.float64)), "all weight on one sample"
    flat = frontier.ideal_point(rewards, 1e6)  # a huge beta: pi* = pi_ref
    torch.testing.assert_close(flat["reward"], rewards.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat["ess"], torch.full((4,), float(num_samples), dtype=torch.float64))
    assert flat["kl"].abs().max() < 1e-6


def test_ideal_frontier_averages_over_prompts():
    world = bandit.make_bandit(num_prompts=5, num_responses=6, seed=3)
    rewards = ref_samples(world, 64)
    betas = [4.0, 1.0, 0.25, 0.05]
    ideal = frontier.ideal_frontier(rewards, betas)
    assert ideal.betas == betas and ideal.num_samples == 64
    for i, beta in enumerate(betas):
        p = frontier.ideal_point(rewards, beta)
        assert ideal.kl[i] == pytest.approx(p["kl"].mean().item())
        assert ideal.reward[i] == pytest.approx(p["reward"].mean().item())
        assert ideal.ess[i] == pytest.approx(p["ess"].mean().item())
        assert ideal.reward_se[i] == pytest.approx(p["reward"].std().item() / math.sqrt(5))
    assert all(b > a for a, b in zip(ideal.kl, ideal.kl[1:])), "a smaller beta buys more KL"
    assert all(b > a for a, b in zip(ideal.reward, ideal.reward[1:])), "and more reward"
    assert all(b < a for a, b in zip(ideal.ess, ideal.ess[1:])), "on fewer effective samples"
    reliable = [k for k, e in zip(ideal.kl, ideal.ess) if e >= 6.4]
    assert ideal.reliable_kl == max(reliable)
    assert replace(ideal, ess=[1.0] * 4).reliable_kl == 0.0, "nothing reliable"


# ---- Length ---------------------------------------------------------------------------------------------


def test_length_reward_curve_and_what_length_explains():
    rewards = torch.tensor([[0.1, 0.5, 0.2], [0.3, -0.5, 0.4]], dtype=torch.float64)
    lengths = torch.tensor([[3.0, 10.0, 3.0], [5.0, 10.0, 3.0]], dtype=torch.float64)
    curve = frontier.length_reward_curve(rewards, lengths)
    assert list(curve) == [3, 5, 10] and all(type(k) is int for k in curve)
    assert curve[3] == pytest.approx(0.7 / 3) and curve[5] == pytest.approx(0.3) and curve[10] == pytest.approx(0.0)
    explained = frontier.length_explained(torch.tensor([[3.0, 5.0], [10.0, 3.0]]), curve)
    assert explained.shape == (2, 2) and explained.dtype == torch.float64
    torch.testing.assert_close(explained, torch.tensor([[curve[3], curve[5]], [curve[10], curve[3]]],
                                                       dtype=torch.float64))
    # a length never seen in the SFT samples takes the nearest one's value
    unseen = frontier.length_explained(torch.tensor([1.0, 4.2, 6.0, 8.0, 40.0]), curve)
    assert unseen.tolist() == pytest.approx([curve[3], curve[5], curve[5], curve[10], curve[10]])


# ---- Cost to reach a reward -----------------------------------------------------------------------------


def test_cost_to_reach_cheapest_checkpoint_per_seed_then_median():
    runs = [  # (setting, seed): rewards and sequences of the checkpoints
        make_run("beta=0.1", 0, [0.0, 0.5, 0.9], sequences=[0, 100, 200], seconds=[0.0, 5.0, 10.0]),
        make_run("beta=1", 0, [0.0, 0.95], sequences=[0, 150], seconds=[0.0, 7.0]),
        make_run("beta=0.1", 1, [0.0, 0.6, 0.7], sequences=[0, 100, 200], seconds=[0.0, 4.0, 8.0]),
        make_run("beta=1", 1, [0.0, 0.2, 0.95], sequences=[0, 100, 300], seconds=[0.0, 1.0, 2.0]),
        make_run("beta=0.1", 2, [0.0, 0.9], sequences=[0, 400], seconds=[0.0, 20.0]),
    ]
    reach = frontier.cost_to_reach(runs, 0.9)
    # seed 0: beta=0.1 at 200 or beta=1 at 150; seed 1: beta=1 at 300; seed 2: beta=0.1 at 400
    assert [(s["setting"], s["step"], s["sequences"]) for s in reach["per_seed"]] == \
        [("beta=1", 10, 150), ("beta=1", 20, 300), ("beta=0.1", 10, 400)]
    assert reach["per_seed"][0]["seconds"] == 7.0 and reach["per_seed"][0]["oracle_reward"] == 0.95
    assert reach["sequences"] == 300 and reach["seconds"] == 7.0 and reach["seeds"] == 3  # medians over seeds
    easy = frontier.cost_to_reach(runs, 0.5)
    assert [s["sequences"] for s in easy["per_seed"]] == [100, 100, 400] and easy["sequences"] == 100
    assert frontier.cost_to_reach(runs, -1.0)["sequences"] == 0, "the SFT start already reaches it"
    assert frontier.cost_to_reach(runs, 0.92) is None, "seed 2 never reaches it"
    two_seeds = frontier.cost_to_reach(runs[:4], 0.92)
    assert [s["sequences"] for s in two_seeds["per_seed"]] == [150, 300] and two_seeds["seeds"] == 2


# ---- Tables ---------------------------------------------------------------------------------------------


def test_seed_spread_over_final_checkpoints():
    runs = [make_run("beta=0.1", 0, [9.0, 1.0], kls=[9.0, 0.5]),  # the first points must not count
            make_run("beta=0.1", 1, [-9.0, 2.0], kls=[9.0, 1.0]),
            make_run("kl_coef=0.05", 0, [0.0, 3.0], kls=[0.0, 2.0], method="PPO"),
            make_run("beta=0.1", 2, [9.0, 4.0], kls=[9.0, 1.5])]
    rows = {(row["method"], row["setting"]): row for row in frontier.seed_spread(runs)}
    assert set(rows) == {("DPO", "beta=0.1"), ("PPO", "kl_coef=0.05")}
    row = rows["DPO", "beta=0.1"]
    assert row["seeds"] == 3
    assert row["reward_mean"] == pytest.approx(7 / 3)
    assert row["reward_std"] == pytest.approx(math.sqrt(7 / 3))  # sample std: sum of squares 42/9, over n-1 = 2
    assert (row["reward_min"], row["reward_max"]) == (1.0, 4.0)
    assert row["kl_mean"] == pytest.approx(1.0) and row["kl_std"] == pytest.approx(0.5)
    row = rows["PPO", "kl_coef=0.05"]
    assert row["seeds"] == 1 and row["reward_std"] == 0.0 and row["kl_std"] == 0.0
    assert row["reward_mean"] == row["reward_min"] == row["reward_max"] == 3.0 and row["kl_mean"] == 2.0


def test_mean_curve_means_and_standard_errors_over_seeds():
    runs = [make_run("beta=0.1", 0, [0.0, 1.0, 2.0], kls=[0.0, 1.0, 2.0]),
            make_run("beta=0.1", 1, [0.0, 3.0, 2.0], kls=[0.0, 3.0, 4.0])]
    kl, kl_se, reward, reward_se = frontier.mean_curve(runs)
    assert kl == pytest.approx([0.0, 2.0, 3.0]) and reward == pytest.approx([0.0, 2.0, 2.0])
    # std of two values a, b is |a - b| / sqrt(2); over sqrt(2) seeds: |a - b| / 2
    assert kl_se == pytest.approx([0.0, 1.0, 1.0]) and reward_se == pytest.approx([0.0, 1.0, 0.0])
    single = Run("DPO", "beta=0.1", 0, [point(0.0, 0.0, reward_se=0.1, kl_se=0.0),
                                       point(1.0, 0.5, reward_se=0.2, kl_se=0.3)])
    kl, kl_se, reward, reward_se = frontier.mean_curve([single])  # one seed: the checkpoints' own errors
    assert kl == pytest.approx([0.0, 1.0]) and kl_se == pytest.approx([0.0, 0.3])
    assert reward == pytest.approx([0.0, 0.5]) and reward_se == pytest.approx([0.1, 0.2])


# ---- Sweep sizes ----------------------------------------------------------------------------------


SWEEPS = {name: settings.sweep for name, settings in SETTINGS.items()}
LIVE_SWEEPS = {name: settings.live_sweep for name, settings in SETTINGS.items()}


def test_the_gpt2_default_sweep_is_a_reduced_paper_grid():
    """On the GPU preset notebook 09 runs settings.sweep by default: settings from the paper's grid
    (settings.paper_sweep, the opt-in), fewer of them, shorter runs."""
    default, paper = SWEEPS["gpt2"], SETTINGS["gpt2"].paper_sweep
    for name in ("dpo_betas", "ppo_kl_coefs", "ppo_target_kls", "ppo_gt_kl_coefs", "seeds", "best_of_n"):
        assert set(getattr(default, name)) <= set(getattr(paper, name)), name
    for name in ("dpo_steps", "ppo_steps", "preferred_ft_steps", "eval_prompts", "ideal_samples"):
        assert 0 < getattr(default, name) < getattr(paper, name), name
    assert 0.1 in default.dpo_betas and 0.1 in default.ppo_kl_coefs and 0.1 in default.ppo_gt_kl_coefs, \
        "notebook 09 compares DPO at beta 0.1 with PPO and PPO-GT at 0.1"
    assert SETTINGS["tiny"].paper_sweep is None, "the tiny preset's sweep is committed"


def test_tiny_sweep_is_smaller_than_the_paper_grid():
    tiny, full = SWEEPS["tiny"], SETTINGS["gpt2"].paper_sweep
    for name in ("dpo_betas", "ppo_kl_coefs", "ppo_target_kls", "ppo_gt_kl_coefs", "seeds", "best_of_n"):
        assert 0 < len(getattr(tiny, name)) <= len(getattr(full, name)), name
    for name in ("dpo_steps", "ppo_steps", "preferred_ft_steps", "eval_prompts"):
        assert 0 < getattr(tiny, name) < getattr(full, name), name
    for sweep in (tiny, full, *LIVE_SWEEPS.values()):
        assert 0 < sweep.dpo_eval_every <= sweep.dpo_steps and 0 < sweep.ppo_eval_every <= sweep.ppo_steps
        assert min(sweep.best_of_n) >= 1 and sweep.samples_per_prompt >= 1
        assert len(set(sweep.seeds)) >= 1 and len(set(sweep.seeds)) == len(sweep.seeds)
    assert len(tiny.seeds) >= 3 and tiny.ideal_samples > 0, "the powered sweep: several seeds, the ideal frontier"
    for name, powered in SWEEPS.items():  # the live sweep is a reduced one
        live = LIVE_SWEEPS[name]
        for field in ("dpo_steps", "ppo_steps", "preferred_ft_steps", "eval_prompts"):
            assert getattr(live, field) <= getattr(powered, field), (name, field)
        for field in ("dpo_betas", "ppo_kl_coefs", "ppo_target_kls", "ppo_gt_kl_coefs", "seeds", "best_of_n"):
            assert len(getattr(live, field)) <= len(getattr(powered, field)), (name, field)


def test_sweep_config_per_preset_with_overrides(preset):
    from dpo_teach.presets import get_preset

    assert frontier.sweep_config(preset) == SWEEPS["tiny"]
    assert frontier.live_sweep_config(preset) == LIVE_SWEEPS["tiny"]
    assert frontier.sweep_config(get_preset("gpt2", device="cpu")) == SWEEPS["gpt2"]
    assert frontier.live_sweep_config(get_preset("gpt2", device="cpu")) == LIVE_SWEEPS["gpt2"]
    other = replace(preset, settings=replace(preset.settings, sweep=replace(SWEEPS["tiny"], dpo_steps=3)))
    assert frontier.sweep_config(other).dpo_steps == 3, "read from the preset's settings"
    changed = frontier.sweep_config(preset, dpo_steps=4, seeds=(7,))
    assert changed.dpo_steps == 4 and changed.seeds == (7,)
    assert replace(changed, dpo_steps=SWEEPS["tiny"].dpo_steps, seeds=SWEEPS["tiny"].seeds) \
        == SWEEPS["tiny"], "the other fields are kept"
    assert SWEEPS["tiny"].dpo_steps != 4 and SETTINGS["tiny"].sweep.dpo_steps != 4, "the stored sweep is not changed"
    assert frontier.live_sweep_config(preset, eval_prompts=3).eval_prompts == 3
    with pytest.raises(TypeError):
        frontier.sweep_config(preset, no_such_field=1)


# ---- Experiment on a tiny random GPT-2 ------------------------------------------------------------

SWEEP = frontier.SweepConfig(dpo_betas=(0.1,), ppo_kl_coefs=(0.1,), ppo_target_kls=(), ppo_gt_kl_coefs=(),
                             seeds=(0,), best_of_n=(1, 2), dpo_steps=2, dpo_eval_every=1, ppo_steps=2,
                             ppo_eval_every=1, preferred_ft_steps=2, eval_prompts=4, samples_per_prompt=2)

PAIRS = [
    {"prompt": "I watched The City", "chosen": " and it was a wonderful, moving film.",
     "rejected": " and it was a dull, awful mess."},
    {"prompt": "What a", "chosen": " great story, I loved it.", "rejected": " boring story, I hated it."},
    {"prompt": "The House is", "chosen": " a beautiful and funny movie.", "rejected": " a terrible waste of time."},
    {"prompt": "The new", "chosen": " drama is brilliant.", "rejected": " drama is bad."},
    {"prompt": "Summer of Trains is an", "chosen": " excellent, warm comedy.", "rejected": " ugly, stupid comedy."},
    {"prompt": "I finally watched", "chosen": " it and enjoyed every minute.", "rejected": " it and regret it."},
]
DPO_BATCH = 8  # pairs per DPO (and Preferred-FT) step in these tests, instead of the tiny preset's 32
# 16 pairs: the 2 DPO steps of SWEEP, DPO_BATCH pairs each, use every pair once
TRAIN_PAIRS = (PAIRS * 3)[:16]
# what fitting the reward model cost, given: no real training-cost run in these tests
REWARD_COST = {"seconds": 3.0, "peak_memory_mb": 50.0, "forward_sequences": 100, "backward_sequences": 80,
               "labels": len(TRAIN_PAIRS), "pairs_read": 40}


@pytest.fixture()
def small_preset(preset):
    """The tiny preset with 6-token responses (in every stage's settings) and small DPO batches (fast)."""
    settings = preset.settings
    return replace(preset, settings=replace(settings, max_new_tokens=6, dpo=replace(settings.dpo, batch_size=DPO_BATCH),
                                            ppo=replace(settings.ppo, max_new_tokens=6),
                                            pairs=replace(settings.pairs, max_new_tokens=6)))


def make_reward_model(policy) -> RewardModel:
    """A reward model on the policy's trunk with a random head (from_policy's head starts at zero:
    every response would score 0, PPO would have no signal and best-of-N no preference)."""
    reward_model = RewardModel.from_policy(policy)
    with torch.no_grad():
        reward_model.score.weight.copy_(torch.randn(reward_model.score.weight.shape,
                                                    generator=torch.Generator().manual_seed(0)))
    return reward_model


def make_parts(tiny_model, tokenizer, preset, reward_model=True):
    parts = {"sft_policy": tiny_model, "tokenizer": tokenizer, "pairs": datasets.Dataset.from_list(TRAIN_PAIRS),
             "train_prompts": load_prompts(preset, "train", 32), "eval_prompts": load_prompts(preset, "test", 4),
             "reward_cost": dict(REWARD_COST)}
    if reward_model:
        parts["reward_model"] = make_reward_model(tiny_model)
    return parts


@pytest.fixture()
def experiment(tiny_model, tokenizer, small_preset):
    return frontier.Experiment(small_preset, SWEEP, parts=make_parts(tiny_model, tokenizer, small_preset))


def numbers(p: Point) -> tuple:
    """What a checkpoint measured (everything but its labels, the wall time and the cost)."""
    return p.step, p.oracle_reward, p.oracle_reward_se, p.kl, p.kl_se, p.length, p.rewards, p.kls, p.lengths


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before: dict) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_experiment_uses_the_injected_parts(experiment, tiny_model, small_preset):
    assert experiment.sft_policy is tiny_model and experiment.sweep == SWEEP
    assert experiment.ref_model is not tiny_model and unchanged(experiment.ref_model, snapshot(tiny_model))
    assert not any(p.requires_grad for p in experiment.ref_model.parameters())
    assert len(experiment.pairs) == len(TRAIN_PAIRS) and experiment.eval_prompts == load_prompts(small_preset, "test", 4)
    assert isinstance(experiment.reward_model, RewardModel)
    assert experiment.reward_model_cost() == REWARD_COST, "the given cost: no training run"


def test_evaluate_samples_per_prompt_means_of_the_same_seeded_samples(experiment):
    samples = experiment.evaluate_samples(experiment.sft_policy)
    assert set(samples) == {"rewards", "kls", "lengths"}
    assert all(v.shape == (4,) and v.dtype == torch.float64 for v in samples.values())
    # samples_per_prompt=2: the prompts are answered twice in one batch, and each prompt gets the mean
    from dpo_teach.evaluation import evaluate_policy

    prompts = experiment.eval_prompts
    direct = evaluate_policy(experiment.sft_policy, experiment.ref_model, experiment.tokenizer, prompts * 2,
                             max_new_tokens=6, seed=experiment.eval_seed,
                             max_prompt_tokens=experiment.preset.max_prompt_tokens)
    rewards = direct["rewards"].to(torch.float64)
    torch.testing.assert_close(samples["rewards"], (rewards[:4] + rewards[4:]) / 2)
    lengths = direct["generation"].response_mask.sum(1).to(torch.float64)
    torch.testing.assert_close(samples["lengths"], (lengths[:4] + lengths[4:]) / 2)
    assert (samples["lengths"] >= 1).all() and (samples["lengths"] <= 6).all()
    again = experiment.evaluate_samples(experiment.sft_policy)
    assert all(torch.equal(samples[k], again[k]) for k in samples), "the same sampling seed every time"


def test_sft_point_has_kl_zero_and_is_the_evaluation_of_the_sft_policy(experiment, tiny_model):
    run = experiment.sft()
    assert (run.method, run.setting, run.seed, len(run.points)) == ("SFT", "-", 0, 1)
    p = run.final
    assert p.kl == 0.0 and p.kl_se == 0.0 and p.kls == [0.0] * 4, "the reference is the SFT policy"
    assert p.step == 0 and p.seconds == 0.0 and p.sequences == 0
    assert len(p.rewards) == len(p.lengths) == 4 and all(-1.0 <= r <= 1.0 for r in p.rewards)
    assert p.oracle_reward == pytest.approx(sum(p.rewards) / 4)
    assert p.oracle_reward_se == pytest.approx(torch.tensor(p.rewards).std().item() / 2) and p.oracle_reward_se > 0
    assert p.length == pytest.approx(sum(p.lengths) / 4)
    again = experiment.evaluate(experiment.sft_policy)  # recomputed, same sampling seed
    assert again == pytest.approx({"oracle_reward": p.oracle_reward, "oracle_reward_se": p.oracle_reward_se,
                                   "kl": 0.0, "kl_se": 0.0, "length": p.length})
    assert experiment.sft_samples() is experiment.sft_samples(), "computed once"
    other_seed = frontier.Experiment(experiment.preset, SWEEP, eval_seed=99, parts={
        "sft_policy": experiment.sft_policy, "tokenizer": experiment.tokenizer, "pairs": experiment.pairs,
        "eval_prompts": experiment.eval_prompts, "train_prompts": experiment.train_prompts})
    assert other_seed.sft().final.rewards != p.rewards, "the evaluation seed sets the samples"
    assert run.cost == {"seconds": 0.0, "models_held": 1, "sequences_generated": 0, "forward_sequences": 0,
                        "backward_sequences": 0, "peak_memory_mb": models_mb([tiny_model])}
    assert run.cost["peak_memory_mb"] > 0


def test_dpo_run_checkpoints_cost_and_untouched_sft_policy(experiment, tiny_model):
    before = snapshot(tiny_model)
    sft_point = experiment.sft().final
    run = experiment.dpo(beta=0.1, seed=0)
    assert (run.method, run.setting, run.seed) == ("DPO", "beta=0.1", 0)
    assert [p.step for p in run.points] == list(range(SWEEP.dpo_steps + 1))
    assert numbers(run.points[0]) == numbers(sft_point) and run.points[0].seconds == 0.0
    assert all(p.method == "DPO" and p.setting == "beta=0.1" for p in run.points)
    seconds = [p.seconds for p in run.points]
    assert all(b > a for a, b in zip(seconds, seconds[1:])) and run.cost["seconds"] == seconds[-1]
    assert run.final.kl != 0.0 and len(run.final.kls) == 4, "later checkpoints are evaluations of the trained policy"
    cost = run.cost
    assert cost["models_held"] == 1 and cost["sequences_generated"] == 0
    assert dpo.dpo_config(experiment.preset).batch_size == DPO_BATCH
    assert SWEEP.dpo_steps * DPO_BATCH == len(TRAIN_PAIRS), "each pair once: the reference scored each once"
    assert cost["backward_sequences"] == 2 * len(TRAIN_PAIRS)  # chosen and rejected of every pair
    assert cost["forward_sequences"] == 2 * cost["backward_sequences"]  # the policy's, and the reference's pass
    assert cost["labels"] == len(TRAIN_PAIRS) and cost["pairs_read"] == len(TRAIN_PAIRS)
    # a checkpoint's sequences: the reference pass, then forward + backward of the pairs read so far
    read = 2 * DPO_BATCH  # sequences per step: chosen and rejected
    assert [p.sequences for p in run.points] == [0, 2 * len(TRAIN_PAIRS) + 2 * read, 2 * len(TRAIN_PAIRS) + 4 * read]
    assert run.final.sequences == cost["forward_sequences"] + cost["backward_sequences"]
    assert unchanged(tiny_model, before), "DPO trains a copy of the SFT policy"
    assert unchanged(experiment.ref_model, before)


def test_dpo_reference_log_probs_are_those_of_the_reference_model(experiment):
    chosen, rejected = experiment.ref_logps()
    expected = dpo.precompute_ref_logps(experiment.ref_model, experiment.tokenizer, TRAIN_PAIRS,
                                        **experiment.lengths)
    torch.testing.assert_close(chosen, expected[0])
    torch.testing.assert_close(rejected, expected[1])
    assert experiment.ref_logps()[0] is chosen, "computed once, shared by all runs"


def test_ppo_run_checkpoints_and_cost(experiment, tiny_model, small_preset):
    before = snapshot(tiny_model)
    sft_point = experiment.sft().final
    run = experiment.ppo(kl_coef=0.1, seed=0)
    assert (run.method, run.setting, run.seed) == ("PPO", "kl_coef=0.1", 0)
    assert [p.step for p in run.points] == list(range(SWEEP.ppo_steps + 1))
    assert numbers(run.points[0]) == numbers(sft_point) and run.points[0].method == "PPO"
    seconds = [p.seconds for p in run.points]
    assert seconds[0] == 0.0 and all(b > a for a, b in zip(seconds, seconds[1:])) and run.cost["seconds"] == seconds[-1]
    assert run.points[1].seconds > REWARD_COST["seconds"], "the reward model's training is charged"
    assert run.final.kl != 0.0 and len(run.final.kls) == 4
    cost = run.cost
    assert cost["models_held"] == 3  # policy with value head, reference, reward model
    assert cost["reward_model_seconds"] == REWARD_COST["seconds"] and cost["labels"] == len(TRAIN_PAIRS)
    batch_size = ppo.PPOConfig().batch_size
    assert cost["sequences_generated"] == SWEEP.ppo_steps * batch_size
    assert cost["forward_sequences"] > cost["backward_sequences"] > REWARD_COST["backward_sequences"]
    sequences = [p.sequences for p in run.points]
    assert sequences[0] == 0 and all(b > a for a, b in zip(sequences, sequences[1:]))
    assert sequences[-1] == (cost["sequences_generated"] + cost["forward_sequences"] + cost["backward_sequences"])
    assert unchanged(tiny_model, before) and unchanged(experiment.ref_model, before)


class FakeTrainPPO:
    """A stand-in for ppo.train_ppo: records its arguments, calls eval_fn where train_ppo would (before
    training, every eval_every rollout batches and after the last), and
    returns a history (train_ppo's format) with made-up cost counters: per rollout batch 1.5 seconds,
    10 sequences with a gradient, 90 more forward passes without one, batch_size sequences generated."""

    def __init__(self):
        self.calls = []

    def __call__(self, policy, ref_model, reward, tokenizer, prompts, config, eval_fn=None, progress=True):
        self.calls.append({"policy": policy, "ref_model": ref_model, "reward": reward, "prompts": prompts,
                           "config": config})
        history = {key: [] for key in ("step", "seconds", "sequences", "inference_sequences", "generated_sequences",
                                       "train/kl_coef", "eval/step")}
        eval_fn(policy)  # before training, as train_ppo does
        history["eval/step"].append(0)
        for step in range(1, config.num_steps + 1):
            history["step"].append(step - 1)
            history["seconds"].append(1.5 * step)
            history["sequences"].append(10 * step)
            history["inference_sequences"].append(90 * step)
            history["generated_sequences"].append(config.batch_size * step)
            history["train/kl_coef"].append(config.kl_coef * (2 ** step if config.target_kl is not None else 1))
            if step % config.eval_every == 0 or step == config.num_steps:
                eval_fn(policy)
                history["eval/step"].append(step)
        return history


def fake_evaluations(experiment, monkeypatch):
    """evaluate_samples replaced by numbers that say which call made them: call i gives rewards i + p/10."""
    count = []

    def evaluate_samples(policy):
        i = len(count)
        count.append(policy)
        return {"rewards": torch.tensor([i + p / 10 for p in range(4)], dtype=torch.float64),
                "kls": torch.full((4,), float(i), dtype=torch.float64),
                "lengths": torch.full((4,), 3.0, dtype=torch.float64)}

    monkeypatch.setattr(experiment, "evaluate_samples", evaluate_samples)
    return count


@pytest.mark.parametrize("variant", ["reward model", "ground truth", "target kl"])
def test_ppo_passes_its_settings_and_books_the_costs(experiment, monkeypatch, variant):
    fake, evaluated = FakeTrainPPO(), fake_evaluations(experiment, monkeypatch)
    monkeypatch.setattr(ppo, "train_ppo", fake)
    sweep = replace(SWEEP, ppo_steps=5, ppo_eval_every=2)
    experiment.sweep = sweep
    kwargs = {"ground truth": {"ground_truth": True}, "target kl": {"target_kl": 4.0}}.get(variant, {})
    experiment.sft_samples()  # the SFT policy's evaluation comes first, and is reused
    run = experiment.ppo(kl_coef=0.05, seed=3, **kwargs)
    (call,) = fake.calls
    config = call["config"]
    assert (config.kl_coef, config.seed, config.num_steps, config.eval_every) == (0.05, 3, 5, 2)
    assert config.target_kl == (4.0 if variant == "target kl" else None)
    assert config.max_new_tokens == experiment.preset.max_new_tokens == 6
    assert config.max_prompt_tokens == experiment.preset.max_prompt_tokens
    assert call["prompts"] is experiment.train_prompts and call["ref_model"] is experiment.ref_model
    assert call["policy"] is not experiment.sft_policy and all(p.requires_grad for p in call["policy"].parameters())
    ground_truth = variant == "ground truth"
    assert call["reward"] is (ppo.oracle_fn if ground_truth else experiment.reward_model)
    assert run.method == ("PPO-GT" if ground_truth else "PPO") and run.seed == 3
    assert run.setting == ("target_kl=4" if variant == "target kl" else "kl_coef=0.05")
    # the SFT evaluation, then one per checkpoint of train_ppo (steps 2, 4 and the last, 5)
    assert len(evaluated) == 4 and evaluated[0] is experiment.sft_policy
    assert all(policy is call["policy"] for policy in evaluated[1:])
    assert [p.step for p in run.points] == [0, 2, 4, 5]
    assert [p.oracle_reward for p in run.points] == pytest.approx([0.15, 1.15, 2.15, 3.15])
    assert [p.kl for p in run.points] == [0.0, 1.0, 2.0, 3.0]
    rm = {"seconds": 0.0, "forward_sequences": 0, "backward_sequences": 0} if ground_truth else REWARD_COST
    batch = config.batch_size
    for p in run.points[1:]:  # generated + the loop's forward and backward passes + the reward model's
        assert p.sequences == (batch * p.step + 110 * p.step + rm["forward_sequences"] + rm["backward_sequences"])
        assert p.seconds == pytest.approx(1.5 * p.step + rm["seconds"])
    assert run.points[0].sequences == 0 and run.points[0].seconds == 0.0
    cost = run.cost
    assert cost["seconds"] == pytest.approx(7.5 + rm["seconds"]) and cost["reward_model_seconds"] == rm["seconds"]
    assert cost["sequences_generated"] == 5 * batch
    assert cost["forward_sequences"] == 500 + rm["forward_sequences"]
    assert cost["backward_sequences"] == 50 + rm["backward_sequences"]
    assert cost["models_held"] == (2 if ground_truth else 3)
    assert cost["labels"] == (0 if ground_truth else len(TRAIN_PAIRS))
    assert cost["final_kl_coef"] == (0.05 * 32 if variant == "target kl" else 0.05)
    assert cost["peak_memory_mb"] >= (0.0 if ground_truth else REWARD_COST["peak_memory_mb"])


def test_preferred_ft_is_one_checkpoint_after_its_steps(experiment, tiny_model):
    before = snapshot(tiny_model)
    run = experiment.preferred_ft(seed=0)
    assert (run.method, run.setting, len(run.points)) == ("Preferred-FT", "chosen only", 1)
    p = run.final
    assert p.step == SWEEP.preferred_ft_steps and p.seconds > 0 and p.seconds == run.cost["seconds"]
    assert p.kl != 0.0 and p.kl_se > 0, "the fine-tuned policy moved away from the reference"
    sequences = SWEEP.preferred_ft_steps * DPO_BATCH  # DPO's batch size
    assert run.cost["models_held"] == 1 and run.cost["sequences_generated"] == 0
    assert run.cost["forward_sequences"] == run.cost["backward_sequences"] == sequences
    assert p.sequences == 2 * sequences
    assert unchanged(tiny_model, before)


def test_best_of_n_picks_the_reward_models_favourite(experiment, monkeypatch):
    generations = []

    def recording_generate(*args, **kwargs):
        generations.append(frontier_generate(*args, **kwargs))
        return generations[-1]

    frontier_generate = frontier.generate
    monkeypatch.setattr(frontier, "generate", recording_generate)
    runs = experiment.best_of_n((1, 2), seed=5)
    assert [(r.method, r.setting, r.seed) for r in runs] == [("Best-of-N", "N=1", 5), ("Best-of-N", "N=2", 5)]
    assert len(generations) == 2, "sample j of every prompt, for j < max N"
    prompts = experiment.eval_prompts
    assert all(g.prompts == prompts for g in generations)
    score = ppo.reward_model_fn(experiment.reward_model, experiment.tokenizer.pad_token_id)
    scores = torch.stack([score(g) for g in generations])  # (N, P)
    rewards = torch.stack([oracle_reward(g.full_texts) for g in generations]).to(torch.float64)
    lengths = torch.stack([g.response_mask.sum(1) for g in generations]).to(torch.float64)
    assert (scores[1] > scores[0]).any() and (scores[1] < scores[0]).any(), "both samples get picked somewhere"
    for n, run in zip((1, 2), runs):
        best = scores[:n].argmax(0)
        picked = rewards[best, torch.arange(4)]
        p = run.final
        assert p.rewards == pytest.approx(picked.tolist()) and p.lengths == lengths[best, torch.arange(4)].tolist()
        assert p.oracle_reward == pytest.approx(picked.mean().item())
        assert p.oracle_reward_se == pytest.approx(picked.std().item() / 2)
        assert p.kl == pytest.approx(frontier.best_of_n_kl(n)) and p.kl_se == 0.0 and p.step == 0
        assert p.kls == pytest.approx([frontier.best_of_n_kl(n)] * 4), "the analytic KL for every prompt"
        assert run.cost["sequences_generated"] == n * 4
        assert run.cost["forward_sequences"] == n * 4 + REWARD_COST["forward_sequences"]
        assert run.cost["backward_sequences"] == REWARD_COST["backward_sequences"]
        assert p.sequences == 2 * n * 4 + REWARD_COST["forward_sequences"] + REWARD_COST["backward_sequences"]
        assert run.cost["models_held"] == 2 and run.cost["reward_model_seconds"] == REWARD_COST["seconds"]
    sampling = [r.cost["seconds"] - REWARD_COST["seconds"] for r in runs]
    assert sampling[0] == pytest.approx(sampling[1] / 2), "N samples cost N / N_max of the sampling"
    assert lengths.max() <= experiment.preset.max_new_tokens


def test_best_of_one_is_plain_sampling(tiny_model, tokenizer, small_preset):
    sweep = replace(SWEEP, samples_per_prompt=1)  # one sample per prompt: the same batch as best-of-N's
    experiment = frontier.Experiment(small_preset, sweep, parts=make_parts(tiny_model, tokenizer, small_preset))
    (run,) = experiment.best_of_n((1,), seed=experiment.eval_seed)  # the seed of every evaluation
    sft_point = experiment.sft().final
    assert run.final.kl == 0.0
    assert run.final.rewards == pytest.approx(sft_point.rewards, abs=1e-6)
    assert run.final.lengths == sft_point.lengths


def test_ideal_samples_are_seeded_sft_samples(experiment):
    samples = experiment.ideal_samples(num_samples=3)
    assert set(samples) == {"rewards", "lengths"} and samples["rewards"].shape == samples["lengths"].shape == (3, 4)
    assert samples["rewards"].dtype == torch.float64
    assert (samples["lengths"] >= 1).all() and (samples["lengths"] <= 6).all()
    again = experiment.ideal_samples(num_samples=2)
    torch.testing.assert_close(again["rewards"], samples["rewards"][:2])  # sample k has seed 99 + k
    assert not torch.equal(experiment.ideal_samples(num_samples=1, seed=5)["rewards"], samples["rewards"][:1])


def test_the_same_seed_gives_the_same_numbers(tiny_model, tokenizer, small_preset):
    """Two Experiments on equal ingredients give the same numbers (train_ppo's own determinism is
    tested in tests/test_ppo.py; Experiment.ppo passes the seed on, see above)."""
    first = frontier.Experiment(small_preset, SWEEP, parts=make_parts(tiny_model, tokenizer, small_preset))
    second_model = copy.deepcopy(tiny_model)
    second = frontier.Experiment(small_preset, SWEEP, parts=make_parts(second_model, tokenizer, small_preset))
    dpo_a, dpo_b = first.dpo(0.1), second.dpo(0.1)
    assert [numbers(p) for p in dpo_a.points] == [numbers(p) for p in dpo_b.points]
    assert [p.sequences for p in dpo_a.points] == [p.sequences for p in dpo_b.points]
    bon_a, bon_b = first.best_of_n((1, 2)), second.best_of_n((1, 2))
    assert [numbers(r.final) for r in bon_a] == [numbers(r.final) for r in bon_b]
    other = second.best_of_n((1, 2), seed=1)
    assert [numbers(r.final) for r in other] != [numbers(r.final) for r in bon_a], "the seed matters"


# ---- Training inside torch.no_grad ---------------------------------------------------------------------


def quick_reward_model(tiny_model, tokenizer, calls):
    """A stand-in for pipeline.get_reward_model: fits a fresh reward model for 2 steps, as the
    pipeline does when nothing is cached."""
    def get_reward_model(preset=None):
        reward_model = RewardModel.from_policy(tiny_model)
        before = snapshot(reward_model)
        train_reward_model(reward_model, tokenizer, TRAIN_PAIRS[:8], RewardConfig(num_steps=2, batch_size=4,
                                                                                   warmup_steps=0, lr=1e-2))
        calls.append(not unchanged(reward_model, before))
        return reward_model.eval()

    return get_reward_model


@pytest.mark.parametrize("outer_no_grad", [False, True])
def test_best_of_n_trains_the_reward_model_when_it_is_missing(tiny_model, tokenizer, small_preset, monkeypatch,
                                                              outer_no_grad):
    """The reward model is trained on first use, although best-of-N samples and scores under
    torch.no_grad (and even when the caller itself runs under no_grad)."""
    calls = []
    monkeypatch.setattr(pipeline, "get_reward_model", quick_reward_model(tiny_model, tokenizer, calls))
    experiment = frontier.Experiment(small_preset, SWEEP,
                                     parts=make_parts(tiny_model, tokenizer, small_preset, reward_model=False))
    if outer_no_grad:
        with torch.no_grad():
            runs = experiment.best_of_n((1, 2), seed=0)
    else:
        runs = experiment.best_of_n((1, 2), seed=0)
    assert calls == [True], "trained once, and its parameters moved"
    assert [r.setting for r in runs] == ["N=1", "N=2"] and all(len(r.final.rewards) == 4 for r in runs)
    assert isinstance(experiment.reward_model, RewardModel) and calls == [True], "kept, not trained again"
    assert torch.is_grad_enabled()


def test_training_functions_train_even_under_no_grad(tiny_model, tokenizer):
    """train_reward_model, train_sft and train_dpo enable gradients themselves: called inside torch.no_grad
    (e.g. from an evaluation), they still fit their model."""
    reward_model = RewardModel.from_policy(tiny_model)
    before = snapshot(reward_model)
    with torch.no_grad():
        history = train_reward_model(reward_model, tokenizer, TRAIN_PAIRS[:8],
                                     RewardConfig(num_steps=2, batch_size=4, warmup_steps=0, lr=1e-2))
    assert len(history["train/loss"]) == 2 and not unchanged(reward_model, before)
    policy = copy.deepcopy(tiny_model)
    before = snapshot(policy)
    records = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
    with torch.no_grad():
        history = train_sft(policy, tokenizer, records, SFTConfig(num_steps=2, batch_size=3, lr=1e-2,
                                                                  warmup_steps=0, eval_every=2))
    assert len(history["train/loss"]) == 2 and not unchanged(policy, before)
    policy = copy.deepcopy(tiny_model)
    before = snapshot(policy)
    with torch.no_grad():
        history = dpo.train_dpo(policy, tokenizer, TRAIN_PAIRS[:8], DPOConfig(num_steps=2, batch_size=4, lr=1e-2,
                                                                                 warmup_steps=1, eval_every=0),
                                ref_model=frozen_copy(tiny_model), progress=False)
    assert len(history["train/loss"]) == 2 and not unchanged(policy, before)
