"""Tests of dpo_teach.frontier (notebook 09): the frontier arithmetic on hand-made numbers, the sweep
sizes, every method of Experiment on a tiny random GPT-2 with injected ingredients, and the cache of
the sweep's runs."""

import math
import warnings
from dataclasses import asdict, replace

import datasets
import pytest
import torch

from dpo_teach import dpo, frontier, pipeline, ppo
from dpo_teach.frontier import Point, Run
from dpo_teach.reward import RewardModel
from dpo_teach.sft import SFTConfig
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


# ---- Frontier arithmetic --------------------------------------------------------------------------


def point(kl, reward, step=0, seconds=0.0, method="DPO", setting="beta=0.1", seed=0, reward_se=0.0, kl_se=0.0):
    return Point(method, setting, seed, step, reward, reward_se, kl, kl_se, seconds)


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


def test_upper_frontier_is_sorted_by_kl_and_matches_on_frontier():
    points = [point(kl, r, step=i) for i, ((kl, r), _) in enumerate(FRONTIER_CASE)]
    shuffled = [points[i] for i in (7, 4, 2, 0, 6, 5, 1, 3)]
    front = frontier.upper_frontier(shuffled)
    assert [(p.kl, p.oracle_reward) for p in front] == [(0.0, 0.0), (1.0, 1.0), (3.0, 2.0), (3.0, 2.0)]
    assert sorted(p.step for p in front) == [i for i, (_, keep) in enumerate(FRONTIER_CASE) if keep]
    assert all(p in shuffled for p in front), "the points themselves, not copies with other fields"


def test_reward_at_kl_interpolates_between_checkpoints():
    points = [point(3.0, 2.0), point(0.0, 0.0), point(1.0, 1.0)]  # any order
    for kl, reward in ((0.0, 0.0), (1.0, 1.0), (3.0, 2.0)):
        assert frontier.reward_at_kl(points, kl) == pytest.approx(reward)
    assert frontier.reward_at_kl(points, 0.5) == pytest.approx(0.5)
    assert frontier.reward_at_kl(points, 2.0) == pytest.approx(1.5)
    assert frontier.reward_at_kl(points, 2.5) == pytest.approx(1.75)
    assert frontier.reward_at_kl(points, -0.1) is None
    assert frontier.reward_at_kl(points, 3.01) is None


def make_run(setting, seed, rewards, kls=None, seconds=None, method="DPO"):
    kls = kls or [0.1 * i for i in range(len(rewards))]
    seconds = seconds or [float(i) for i in range(len(rewards))]
    points = [point(k, r, step=10 * i, seconds=s, method=method, setting=setting, seed=seed)
              for i, (r, k, s) in enumerate(zip(rewards, kls, seconds))]
    return Run(method, setting, seed, points, {"seconds": seconds[-1]})


def test_cost_to_reach_returns_the_cheapest_checkpoint():
    runs = [make_run("beta=0.1", 0, [0.0, 0.5, 0.9], kls=[0.0, 1.0, 2.0], seconds=[0.0, 5.0, 10.0]),
            make_run("beta=1", 1, [0.0, 0.95], kls=[0.0, 0.5], seconds=[0.0, 7.0])]
    reach = frontier.cost_to_reach(runs, 0.5)
    assert reach == {"setting": "beta=0.1", "seed": 0, "step": 10, "seconds": 5.0, "oracle_reward": 0.5, "kl": 1.0}
    reach = frontier.cost_to_reach(runs, 0.9)  # run 0 reaches it at 10 s, run 1 at 7 s
    assert reach == {"setting": "beta=1", "seed": 1, "step": 10, "seconds": 7.0, "oracle_reward": 0.95, "kl": 0.5}
    assert frontier.cost_to_reach(runs, 0.92)["setting"] == "beta=1"
    assert frontier.cost_to_reach(runs, -1.0)["seconds"] == 0.0
    assert frontier.cost_to_reach(runs, 0.96) is None
    assert frontier.cost_to_reach([], 0.0) is None


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
    assert frontier.mean_curve([single]) == pytest.approx(([0.0, 1.0], [0.0, 0.3], [0.0, 0.5], [0.1, 0.2]))


def test_points_table_flattens_every_checkpoint():
    runs = [make_run("beta=0.1", 0, [0.0, 1.0]), make_run("N=2", 0, [0.5], method="Best-of-N")]
    table = frontier.points_table(runs)
    assert len(table) == 3 and table[2]["method"] == "Best-of-N" and table[1]["oracle_reward"] == 1.0
    assert set(table[0]) == set(asdict(runs[0].points[0]))


# ---- Sweep sizes ----------------------------------------------------------------------------------


def test_tiny_sweep_is_smaller_than_the_gpt2_sweep():
    tiny, full = frontier.SWEEPS["tiny"], frontier.SWEEPS["gpt2"]
    for name in ("dpo_betas", "ppo_kl_coefs", "seeds", "best_of_n"):
        assert 0 < len(getattr(tiny, name)) <= len(getattr(full, name)), name
    for name in ("dpo_steps", "ppo_steps", "preferred_ft_steps", "eval_prompts"):
        assert 0 < getattr(tiny, name) < getattr(full, name), name
    for sweep in (tiny, full):
        assert sweep.dpo_steps % sweep.dpo_eval_every == 0 and sweep.ppo_steps % sweep.ppo_eval_every == 0
        assert min(sweep.best_of_n) >= 1
    assert full.ppo_gt and not tiny.ppo_gt


def test_sweep_config_per_preset_with_overrides(preset):
    from dpo_teach.presets import get_preset

    assert frontier.sweep_config(preset) == frontier.SWEEPS["tiny"]
    assert frontier.sweep_config(get_preset("gpt2", device="cpu")) == frontier.SWEEPS["gpt2"]
    changed = frontier.sweep_config(preset, dpo_steps=4, seeds=(7,))
    assert changed.dpo_steps == 4 and changed.seeds == (7,)
    assert replace(changed, dpo_steps=frontier.SWEEPS["tiny"].dpo_steps, seeds=frontier.SWEEPS["tiny"].seeds) \
        == frontier.SWEEPS["tiny"], "the other fields are kept"
    assert frontier.SWEEPS["tiny"].dpo_steps != 4, "the stored sweep is not changed"
    with pytest.raises(TypeError):
        frontier.sweep_config(preset, no_such_field=1)


# ---- Experiment on a tiny random GPT-2 ------------------------------------------------------------

SWEEP = frontier.SweepConfig(dpo_betas=(0.1,), ppo_kl_coefs=(0.1,), seeds=(0,), best_of_n=(1, 2), dpo_steps=2,
                             dpo_eval_every=1, ppo_steps=2, ppo_eval_every=1, preferred_ft_steps=2, eval_prompts=4)

PAIRS = [
    {"prompt": "I watched The City", "chosen": " and it was a wonderful, moving film.",
     "rejected": " and it was a dull, awful mess."},
    {"prompt": "What a", "chosen": " great story, I loved it.", "rejected": " boring story, I hated it."},
    {"prompt": "The House is", "chosen": " a beautiful and funny movie.", "rejected": " a terrible waste of time."},
    {"prompt": "The new", "chosen": " drama is brilliant.", "rejected": " drama is bad."},
    {"prompt": "Summer of Trains is an", "chosen": " excellent, warm comedy.", "rejected": " ugly, stupid comedy."},
    {"prompt": "I finally watched", "chosen": " it and enjoyed every minute.", "rejected": " it and regret it."},
]
# 64 pairs: the 2 DPO steps of SWEEP, 32 pairs each (the tiny preset's batch), use every pair once
TRAIN_PAIRS = (PAIRS * 11)[:64]


@pytest.fixture()
def small_preset(preset):
    return replace(preset, max_new_tokens=6)


def make_reward_model(policy) -> RewardModel:
    """A reward model on the policy's trunk with a random head (from_policy's head starts at zero:
    every response would score 0, PPO would have no signal and best-of-N no preference)."""
    reward_model = RewardModel.from_policy(policy)
    with torch.no_grad():
        reward_model.score.weight.copy_(torch.randn(reward_model.score.weight.shape,
                                                    generator=torch.Generator().manual_seed(0)))
    return reward_model


def make_parts(tiny_model, tokenizer, preset):
    return {"sft_policy": tiny_model, "tokenizer": tokenizer, "pairs": datasets.Dataset.from_list(TRAIN_PAIRS),
            "train_prompts": load_prompts(preset, "train", 8), "eval_prompts": load_prompts(preset, "test", 4),
            "reward_model": make_reward_model(tiny_model)}


@pytest.fixture()
def experiment(tiny_model, tokenizer, small_preset):
    return frontier.Experiment(small_preset, SWEEP, parts=make_parts(tiny_model, tokenizer, small_preset))


def numbers(p: Point) -> tuple:
    """What a checkpoint measured (everything but its labels and the wall time)."""
    return p.step, p.oracle_reward, p.oracle_reward_se, p.kl, p.kl_se


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


def test_sft_point_has_kl_zero_and_is_the_evaluation_of_the_sft_policy(experiment):
    run = experiment.sft()
    assert (run.method, run.setting, len(run.points)) == ("SFT", "-", 1)
    p = run.final
    assert p.kl == 0.0 and p.kl_se == 0.0 and p.step == 0 and p.seconds == 0.0
    assert -1.0 <= p.oracle_reward <= 1.0 and p.oracle_reward_se > 0
    again = experiment.evaluate(experiment.sft_policy)  # recomputed, same sampling seed
    assert again == {"oracle_reward": p.oracle_reward, "oracle_reward_se": p.oracle_reward_se, "kl": 0.0, "kl_se": 0.0}
    other_seed = frontier.Experiment(experiment.preset, SWEEP, eval_seed=99, parts={
        "sft_policy": experiment.sft_policy, "tokenizer": experiment.tokenizer, "pairs": experiment.pairs,
        "eval_prompts": experiment.eval_prompts, "train_prompts": experiment.train_prompts})
    assert other_seed.sft().final.oracle_reward != p.oracle_reward, "the evaluation seed sets the samples"
    assert run.cost == {"seconds": 0.0, "models_held": 1, "tokens_generated": 0, "forward_sequences": 0,
                        "backward_sequences": 0, "peak_memory_mb": 0.0}


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
    assert run.final.kl != 0.0, "later checkpoints are evaluations of the trained policy"
    cost = run.cost
    assert cost["models_held"] == 1 and cost["tokens_generated"] == 0
    batch_size = dpo.dpo_config(experiment.preset).batch_size
    assert SWEEP.dpo_steps * batch_size == len(TRAIN_PAIRS), "each pair once: the reference scored each once"
    assert cost["backward_sequences"] == 2 * len(TRAIN_PAIRS)  # chosen and rejected of every pair
    assert cost["forward_sequences"] == 2 * cost["backward_sequences"]  # the policy's, and the reference's pass
    assert unchanged(tiny_model, before), "DPO trains a copy of the SFT policy"
    assert unchanged(experiment.ref_model, before)
    assert experiment.evaluate(tiny_model) == experiment.sft_evaluation()


def test_dpo_reference_log_probs_are_those_of_the_reference_model(experiment):
    chosen, rejected = experiment.ref_logps(len(TRAIN_PAIRS))
    expected = dpo.precompute_ref_logps(experiment.ref_model, experiment.tokenizer, TRAIN_PAIRS)
    torch.testing.assert_close(chosen, expected[0])
    torch.testing.assert_close(rejected, expected[1])
    assert experiment.ref_logps(len(TRAIN_PAIRS))[0] is chosen, "computed once, shared by all runs"
    torch.testing.assert_close(experiment.ref_logps(3)[0], expected[0][:3])


def test_dpo_counts_one_reference_pass_over_the_pairs(tokenizer, tiny_model, small_preset):
    pairs = TRAIN_PAIRS[:40]  # 2 steps of 32 pairs: 24 of them are used twice
    parts = dict(make_parts(tiny_model, tokenizer, small_preset), pairs=datasets.Dataset.from_list(pairs))
    cost = frontier.Experiment(small_preset, SWEEP, parts=parts).dpo(0.1).cost
    assert cost["backward_sequences"] == 2 * SWEEP.dpo_steps * dpo.dpo_config(small_preset).batch_size
    assert cost["forward_sequences"] == cost["backward_sequences"] + 2 * len(pairs)


def test_dpo_reference_log_probs_are_cut_like_the_policys(tokenizer, tiny_model, small_preset):
    long_pairs = [dict(pair, chosen=pair["chosen"] + " It was very good." * 20) for pair in PAIRS]
    parts = dict(make_parts(tiny_model, tokenizer, small_preset), pairs=datasets.Dataset.from_list(long_pairs))
    experiment = frontier.Experiment(small_preset, SWEEP, parts=parts)
    with pytest.warns(UserWarning, match="truncated"):
        expected = dpo.precompute_ref_logps(experiment.ref_model, tokenizer, long_pairs,
                                            max_prompt_tokens=small_preset.max_prompt_tokens,
                                            max_response_tokens=small_preset.max_response_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same truncation warning, once fixed
        torch.testing.assert_close(experiment.ref_logps(len(long_pairs))[0], expected[0])


def test_ppo_run_checkpoints_and_cost(experiment, tiny_model, small_preset):
    before = snapshot(tiny_model)
    sft_point = experiment.sft().final
    run = experiment.ppo(kl_coef=0.1, seed=0)
    assert (run.method, run.setting, run.seed) == ("PPO", "kl_coef=0.1", 0)
    assert [p.step for p in run.points] == list(range(SWEEP.ppo_steps + 1))
    assert numbers(run.points[0]) == numbers(sft_point) and run.points[0].method == "PPO"
    seconds = [p.seconds for p in run.points]
    assert seconds[0] == 0.0 and all(b > a for a, b in zip(seconds, seconds[1:])) and run.cost["seconds"] == seconds[-1]
    assert run.final.kl != 0.0
    cost = run.cost
    assert cost["models_held"] == 3  # policy with value head, reference, reward model
    most = SWEEP.ppo_steps * len(experiment.train_prompts) * small_preset.max_new_tokens
    assert 0 < cost["tokens_generated"] <= most, "responses of at most the preset's max_new_tokens"
    assert cost["forward_sequences"] > cost["backward_sequences"] > 0
    assert unchanged(tiny_model, before) and unchanged(experiment.ref_model, before)

    gt = experiment.ppo(kl_coef=0.1, seed=0, ground_truth=True)
    assert (gt.method, gt.setting) == ("PPO-GT", "kl_coef=0.1") and gt.cost["models_held"] == 2
    assert numbers(gt.points[0]) == numbers(sft_point)


def test_preferred_ft_is_one_checkpoint_after_its_steps(experiment, tiny_model):
    before = snapshot(tiny_model)
    run = experiment.preferred_ft(seed=0)
    assert (run.method, run.setting, len(run.points)) == ("Preferred-FT", "chosen only", 1)
    p = run.final
    assert p.step == SWEEP.preferred_ft_steps and p.seconds > 0 and p.seconds == run.cost["seconds"]
    assert p.kl != 0.0 and p.kl_se > 0, "the fine-tuned policy moved away from the reference"
    sequences = SWEEP.preferred_ft_steps * SFTConfig().batch_size
    assert run.cost["models_held"] == 1 and run.cost["tokens_generated"] == 0
    assert run.cost["forward_sequences"] == run.cost["backward_sequences"] == sequences
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
    (g,) = generations
    prompts = experiment.eval_prompts
    assert len(set(prompts)) == len(prompts) and sorted(g.prompts) == sorted(prompts * 2)
    # independently of the layout: for each prompt, its samples in the order they were drawn
    scores = ppo.reward_model_fn(experiment.reward_model, experiment.tokenizer.pad_token_id)(g)
    rewards = oracle_reward(g.full_texts)
    rows = {prompt: [j for j, q in enumerate(g.prompts) if q == prompt] for prompt in prompts}
    assert any(scores[rows[q][1]] > scores[rows[q][0]] for q in prompts), "some pick is not the first sample"
    for n, run in zip((1, 2), runs):
        picked = torch.tensor([rewards[max(rows[q][:n], key=lambda j: scores[j].item())].item() for q in prompts])
        p = run.final
        assert p.oracle_reward == pytest.approx(picked.mean().item(), abs=1e-6)
        assert p.oracle_reward_se == pytest.approx(picked.std().item() / math.sqrt(len(prompts)), abs=1e-6)
        assert p.kl == frontier.best_of_n_kl(n) and p.kl_se == 0.0 and p.step == 0
        first_n = [j for q in prompts for j in rows[q][:n]]
        assert run.cost["tokens_generated"] == int(g.response_mask[first_n].sum())
        assert run.cost["forward_sequences"] == 2 * n * len(prompts) and run.cost["backward_sequences"] == 0
        assert run.cost["models_held"] == 2
    assert runs[0].final.kl == 0.0
    assert runs[0].cost["seconds"] == pytest.approx(runs[1].cost["seconds"] / 2)
    assert g.response_mask.sum(1).max() <= experiment.preset.max_new_tokens


def test_best_of_one_is_plain_sampling(experiment):
    (run,) = experiment.best_of_n((1,), seed=experiment.eval_seed)  # the seed of every evaluation
    sft_point = experiment.sft().final
    assert run.final.kl == 0.0
    assert run.final.oracle_reward == pytest.approx(sft_point.oracle_reward, abs=1e-6)
    assert run.final.oracle_reward_se == pytest.approx(sft_point.oracle_reward_se, abs=1e-6)


def test_the_same_seed_gives_the_same_numbers(tiny_model, tokenizer, small_preset):
    import copy

    first = frontier.Experiment(small_preset, SWEEP, parts=make_parts(tiny_model, tokenizer, small_preset))
    second_model = copy.deepcopy(tiny_model)
    second = frontier.Experiment(small_preset, SWEEP, parts=make_parts(second_model, tokenizer, small_preset))
    dpo_a, dpo_b, dpo_c = first.dpo(0.1), first.dpo(0.1), second.dpo(0.1)  # again, and in a fresh Experiment
    assert [numbers(p) for p in dpo_a.points] == [numbers(p) for p in dpo_b.points] \
        == [numbers(p) for p in dpo_c.points]
    ppo_a, ppo_b = first.ppo(0.1, seed=0), second.ppo(0.1, seed=0)
    assert [numbers(p) for p in ppo_a.points] == [numbers(p) for p in ppo_b.points]
    assert ppo_a.cost["tokens_generated"] == ppo_b.cost["tokens_generated"]
    other = second.ppo(0.1, seed=1)
    assert numbers(other.points[0]) == numbers(ppo_a.points[0])  # the shared SFT start
    assert [numbers(p) for p in other.points[1:]] != [numbers(p) for p in ppo_a.points[1:]], "the seed matters"
    assert numbers(first.preferred_ft(0).final) == numbers(second.preferred_ft(0).final)
    bon_a, bon_b = first.best_of_n((1, 2)), second.best_of_n((1, 2))
    assert [numbers(r.final) for r in bon_a] == [numbers(r.final) for r in bon_b]


# ---- The sweep's runs in the cache ------------------------------------------------------------------


@pytest.fixture()
def cache_preset(tmp_path, monkeypatch, tiny_model, tokenizer, preset):
    """The tiny preset with a small local base model and an empty cache in tmp_path."""
    base = tmp_path / "base_model"
    tiny_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    monkeypatch.setenv("DPO_TEACH_CACHE", str(tmp_path / "cache"))
    return replace(preset, model=str(base))


def stored_runs():
    return [make_run("beta=0.1", 0, [0.0, 0.25, 0.5], kls=[0.0, 1.5, 3.25], seconds=[0.0, 1.5, 3.0]),
            make_run("kl_coef=0.05", 1, [0.0, -0.125], method="PPO"),
            Run("Best-of-N", "N=4", 0, [point(frontier.best_of_n_kl(4), 0.75, method="Best-of-N", setting="N=4")],
                {"seconds": 1.0, "peak_memory_mb": 12.5, "models_held": 2, "tokens_generated": 1234,
                 "forward_sequences": 512, "backward_sequences": 0})]


def test_save_and_load_runs_round_trip(cache_preset, tmp_path):
    sweep = replace(SWEEP, seeds=(0, 1))
    assert frontier.load_runs(cache_preset, sweep) is None, "nothing stored yet"
    runs = stored_runs()
    folder = frontier.save_runs(runs, cache_preset, sweep)
    assert folder == tmp_path / "cache" / "tiny" / "frontier_runs" and (folder / "meta.json").exists()
    loaded = frontier.load_runs(cache_preset, sweep)
    assert loaded == runs and all(isinstance(p, Point) for r in loaded for p in r.points)
    assert loaded[2].final.kl == frontier.best_of_n_kl(4)
    assert frontier.load_runs(cache_preset, replace(sweep, dpo_steps=3)) is None, "another sweep"
    assert frontier.load_runs(cache_preset, replace(sweep, seeds=(0,))) is None
    assert frontier.load_runs(cache_preset) is None, "the preset's own sweep is another sweep"


def test_runs_made_from_other_models_are_not_loaded(cache_preset, tiny_model):
    runs = stored_runs()
    frontier.save_runs(runs, cache_preset, SWEEP)
    assert frontier.load_runs(cache_preset, SWEEP) == runs
    reward_weights = pipeline.artefact_dir(cache_preset, "reward_model") / "model.safetensors"
    reward_weights.parent.mkdir(parents=True)
    reward_weights.write_bytes(b"another reward model")
    assert frontier.load_runs(cache_preset, SWEEP) is None, "a re-trained reward model"
    frontier.save_runs(runs, cache_preset, SWEEP)
    assert frontier.load_runs(cache_preset, SWEEP) == runs
    sft_weights = pipeline.artefact_dir(cache_preset, "sft_policy") / "model.safetensors"
    sft_weights.parent.mkdir(parents=True)
    sft_weights.write_bytes(b"another SFT policy")
    assert frontier.load_runs(cache_preset, SWEEP) is None, "a re-trained SFT policy"
    frontier.save_runs(runs, cache_preset, SWEEP)
    with torch.no_grad():
        tiny_model.transformer.wte.weight.add_(0.01)
    tiny_model.save_pretrained(cache_preset.model)
    assert frontier.load_runs(cache_preset, SWEEP) is None, "another base model"
