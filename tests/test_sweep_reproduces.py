"""The committed powered sweep (data/results/tiny/) can be reproduced: one of its configurations
(DPO, beta = 0.1, seed 0) is run again here and lands where the committed run did.

With the code, machine and library versions of the sweep the numbers are the same to float
precision. With other float rounding (another machine, other library versions) or a change of
training code that moves the weights by a little (the sweep's DPO optimizer decayed every weight by
0.01; since the shared training loop it decays none, as TRL does) the sampled responses diverge, so
the check is statistical: at every checkpoint, the re-run's mean oracle reward and KL may differ from
the committed ones by no more than the tolerance the sweep's own data give, i.e. a 99.9% paired
bootstrap interval of the difference over prompts, widened by the spread of that checkpoint over the
sweep's three seeds (a new machine is, for the sampling, close to a new seed).
"""

import math
from dataclasses import replace

import pytest
import torch

from dpo_teach import frontier, sweep
from dpo_teach.presets import get_preset
from dpo_teach.stats import paired_bootstrap
from dpo_teach.utils import seed_everything

BETA, SEED = 0.1, 0


@pytest.fixture(scope="module")
def committed():
    preset = get_preset("tiny", device="cpu")
    results = sweep.load_results(preset)
    runs = [r for r in results["runs"] if r.method == "DPO" and r.setting == f"beta={BETA:g}"]
    return preset, results, {r.seed: r for r in runs}


def tolerance(new: list[float], old: list[float], seeds: list[list[float]]) -> tuple[float, float]:
    """(|mean difference|, allowed): the 99.9% paired interval's half-width of mean(new - old) over
    prompts plus 3 standard deviations of the checkpoint's mean over the committed seeds."""
    interval = paired_bootstrap(lambda a, b: a.mean() - b.mean(), torch.tensor(new), torch.tensor(old),
                                num_resamples=1000, level=0.999)
    seed_std = torch.tensor([sum(s) / len(s) for s in seeds]).std().item()
    return abs(interval.estimate), (interval.high - interval.low) / 2 + 3 * seed_std


def test_committed_sweep_records_what_it_was_made_with(committed):
    preset, results, runs = committed
    meta = results["meta"]
    assert meta["sweep"] == json_ready(frontier.sweep_config(preset))
    for key in ("commit", "torch", "transformers", "machine", "eval_seed", "reward_model_cost", "finished"):
        assert key in meta, key
    assert sorted(runs) == list(frontier.sweep_config(preset).seeds)
    assert len(runs[SEED].points[-1].rewards) == frontier.sweep_config(preset).eval_prompts


def json_ready(config):
    import json
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config)))


def test_one_configuration_of_the_committed_sweep_reproduces(committed):
    """The re-run is checked at three of the committed run's checkpoints: the start, the middle
    (step 45) and the end (each checkpoint samples 512 responses; the training is the same whichever
    checkpoints are evaluated, since evaluations draw from a forked random stream)."""
    preset, results, runs = committed
    sweep_config = frontier.sweep_config(preset)
    experiment = frontier.Experiment(preset, sweep=replace(sweep_config, dpo_eval_every=45),
                                     parts={"reward_cost": results["meta"]["reward_model_cost"]},
                                     eval_seed=results["meta"]["eval_seed"])
    assert experiment.eval_prompts == results["meta"]["eval_prompts"]
    seed_everything(SEED)  # as run_job does
    rerun = experiment.dpo(BETA, SEED)
    old = runs[SEED]
    steps = [p.step for p in old.points]
    assert [p.step for p in rerun.points] == [0, 45, sweep_config.dpo_steps] and set(steps) >= {0, 45, steps[-1]}
    for new_point in rerun.points:
        i = steps.index(new_point.step)
        old_point = old.points[i]
        for key in ("rewards", "kls"):
            seeds = [getattr(runs[s].points[i], key) for s in sorted(runs)]
            gap, allowed = tolerance(getattr(new_point, key), getattr(old_point, key), seeds)
            assert gap <= allowed or math.isclose(gap, 0.0, abs_tol=1e-9), (
                f"step {new_point.step}: the re-run's mean {key} differs from the committed one by {gap:.4f}, "
                f"more than the sweep's tolerance {allowed:.4f}")
