"""Tests of dpo_teach.sweep: the job list, and run_sweep / load_results with a stand-in Experiment
(no training: the bookkeeping of files, resuming, refusing another sweep's folder)."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from dpo_teach import sweep as sweep_module
from dpo_teach.frontier import Point, Run, run_to_dict
from dpo_teach.settings import SETTINGS, SweepConfig
from dpo_teach.sweep import jobs, load_results, run_job, run_sweep

SMALL = SweepConfig(dpo_betas=(0.05, 0.1, 1.0), ppo_kl_coefs=(0.05, 0.1), ppo_target_kls=(4.0,),
                    ppo_gt_kl_coefs=(0.1,), seeds=(0, 1), best_of_n=(2, 4), dpo_steps=4, dpo_eval_every=2,
                    ppo_steps=4, ppo_eval_every=2, preferred_ft_steps=4, eval_prompts=3, samples_per_prompt=1,
                    ideal_samples=2)


def expected_jobs(sweep: SweepConfig) -> list[tuple[str, tuple]]:
    """(method, sorted keyword arguments) of every run the sweep must make, written out independently."""
    out = [("sft", ())]
    for s in sweep.seeds:
        out.append(("best_of_n", (("ns", tuple(sweep.best_of_n)), ("seed", s))))
        out.append(("preferred_ft", (("seed", s),)))
        out += [("dpo", (("beta", b), ("seed", s))) for b in sweep.dpo_betas]
        out += [("ppo", (("kl_coef", c), ("seed", s))) for c in sweep.ppo_kl_coefs]
        out += [("ppo", (("kl_coef", 0.1), ("seed", s), ("target_kl", t))) for t in sweep.ppo_target_kls]
        out += [("ppo", (("ground_truth", True), ("kl_coef", c), ("seed", s))) for c in sweep.ppo_gt_kl_coefs]
    return out


def key(method: str, kwargs: dict) -> tuple:
    return method, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


@pytest.mark.parametrize("name", ["small", "tiny", "gpt2", "no ppo"])
def test_jobs_list_every_run_once_with_unique_file_names(name):
    sweep = {"small": SMALL, "tiny": SETTINGS["tiny"].sweep, "gpt2": SETTINGS["gpt2"].sweep,
             "no ppo": replace(SMALL, ppo_kl_coefs=(), ppo_target_kls=(), ppo_gt_kl_coefs=())}[name]
    listed = jobs(sweep)
    names = [n for n, _, _ in listed]
    assert len(set(names)) == len(names), "one file per run"
    assert all(n.endswith(".json") and "/" not in n and " " not in n for n in names)
    keys = [key(method, kwargs) for _, method, kwargs in listed]
    assert len(set(keys)) == len(keys), "no run twice"
    assert sorted(keys, key=repr) == sorted(expected_jobs(sweep), key=repr), "every run of the sweep"
    assert listed[0] == ("sft.json", "sft", {})
    methods = [m for _, m, _ in listed]
    assert methods.index("best_of_n") < methods.index("preferred_ft") < methods.index("dpo"), "cheapest first"


def test_job_file_names_say_what_ran():
    names = {key(m, k): n for n, m, k in jobs(SMALL)}
    assert names[key("dpo", {"beta": 0.05, "seed": 1})] == "dpo__beta0.05__seed1.json"
    assert names[key("ppo", {"kl_coef": 0.1, "seed": 0})] == "ppo__kl_coef0.1__seed0.json"
    assert names[key("ppo", {"kl_coef": 0.1, "seed": 0, "target_kl": 4.0})] == "ppo__target_kl4__seed0.json"
    assert names[key("ppo", {"kl_coef": 0.1, "seed": 0, "ground_truth": True})] == "ppo_gt__kl_coef0.1__seed0.json"
    assert names[key("best_of_n", {"ns": [2, 4], "seed": 1})] == "best_of_n__seed1.json"


# ---- A stand-in Experiment ------------------------------------------------------------------------------


def make_point(method, setting, seed, step, value):
    rewards = [round(value + 0.125 * p, 5) for p in range(3)]
    return Point(method, setting, seed, step, sum(rewards) / 3, 0.01, 0.5 * step, 0.02, 4.0, 1.5 * step, 10 * step,
                 rewards, [0.5 * step] * 3, [4.0, 5.0, 3.0])


def make_run(method, setting, seed, steps=(0, 2, 4)):
    points = [make_point(method, setting, seed, step, 0.1 * step + seed) for step in steps]
    return Run(method, setting, seed, points, {"seconds": 1.5 * steps[-1], "models_held": 1})


class FakeExperiment:
    """Records what run_sweep asks of it; every method returns made-up runs, no training."""

    instances = []

    def __init__(self, preset=None, sweep=None, eval_seed=1234, parts=None):
        self.preset, self.sweep, self.parts, self.eval_seed = preset, sweep, parts or {}, eval_seed
        self.eval_prompts = ["I watched", "The new", "What a"]
        self.calls = []
        self.made = {}  # (method, setting, seed) -> Run
        FakeExperiment.instances.append(self)

    def _record(self, name, run, **kwargs):
        self.calls.append((name, kwargs, torch.initial_seed()))
        self.made[(run.method, run.setting, run.seed)] = run
        return run

    def reward_model_cost(self):
        self.calls.append(("reward_model_cost", {}, None))
        return {"seconds": 2.0, "peak_memory_mb": 10.0, "forward_sequences": 8, "backward_sequences": 8}

    def sft(self):
        return self._record("sft", make_run("SFT", "-", 0, steps=(0,)))

    def best_of_n(self, ns, seed=0):
        self.calls.append(("best_of_n", {"ns": ns, "seed": seed}, torch.initial_seed()))
        runs = [make_run("Best-of-N", f"N={n}", seed, steps=(0,)) for n in ns]
        self.made.update({(r.method, r.setting, r.seed): r for r in runs})
        return runs

    def preferred_ft(self, seed=0):
        return self._record("preferred_ft", make_run("Preferred-FT", "chosen only", seed, steps=(4,)), seed=seed)

    def dpo(self, beta, seed=0):
        return self._record("dpo", make_run("DPO", f"beta={beta:g}", seed), beta=beta, seed=seed)

    def ppo(self, kl_coef, seed=0, ground_truth=False, target_kl=None):
        method = "PPO-GT" if ground_truth else "PPO"
        setting = f"target_kl={target_kl:g}" if target_kl is not None else f"kl_coef={kl_coef:g}"
        return self._record("ppo", make_run(method, setting, seed), kl_coef=kl_coef, seed=seed,
                            ground_truth=ground_truth, target_kl=target_kl)

    def ideal_samples(self):
        self.calls.append(("ideal_samples", {}, None))
        k = self.sweep.ideal_samples
        return {"rewards": torch.arange(3 * k, dtype=torch.float64).view(k, 3) / 3,
                "lengths": torch.full((k, 3), 5.0, dtype=torch.float64)}


@pytest.fixture()
def fake(monkeypatch):
    FakeExperiment.instances = []
    monkeypatch.setattr(sweep_module, "Experiment", FakeExperiment)
    return FakeExperiment


def trained(experiment) -> list[str]:
    return [name for name, _, _ in experiment.calls if name not in ("reward_model_cost",)]


def test_run_sweep_writes_every_run_and_load_results_reads_them_back(fake, preset, tmp_path):
    out = run_sweep(preset, SMALL, out=tmp_path / "results", progress=False)
    assert out == tmp_path / "results"
    (experiment,) = fake.instances
    assert experiment.preset == preset and experiment.sweep == SMALL and experiment.parts == {}
    files = sorted(p.name for p in (out / "runs").iterdir())
    assert files == sorted(n for n, _, _ in jobs(SMALL)) and (out / "ideal.json").exists()
    assert not list(out.rglob("*.tmp")), "no half-written files left"
    assert len(trained(experiment)) == len(jobs(SMALL)) + 1, "each job once, and the ideal samples"
    # each job runs with its own seed set (seed_everything), so that a resumed sweep gives the same runs
    for name, kwargs, torch_seed in experiment.calls:
        if "seed" in kwargs:
            assert torch_seed == kwargs["seed"], name
    dpo_calls = sorted((k["beta"], k["seed"]) for n, k, _ in experiment.calls if n == "dpo")
    assert dpo_calls == sorted((b, s) for b in SMALL.dpo_betas for s in SMALL.seeds)
    assert ("best_of_n", {"ns": (2, 4), "seed": 1}) in [(n, k) for n, k, _ in experiment.calls]

    results = load_results(folder=out)
    meta = results["meta"]
    assert meta["sweep"] == json.loads(json.dumps(asdict(SMALL))) and meta["preset"]["name"] == preset.name
    assert meta["eval_seed"] == 1234 and meta["eval_prompts"] == experiment.eval_prompts
    assert meta["reward_model_cost"]["seconds"] == 2.0 and meta["torch"] == torch.__version__
    assert "started" in meta and "finished" in meta and meta["commit"]
    runs = results["runs"]
    assert len(runs) == len(experiment.made) and all(isinstance(r, Run) for r in runs)
    assert {(r.method, r.setting, r.seed): r for r in runs} == experiment.made, "every run, exactly"
    ideal = experiment.ideal_samples()
    assert set(results["ideal"]) == {"rewards", "lengths"}
    torch.testing.assert_close(results["ideal"]["rewards"], ideal["rewards"], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["ideal"]["lengths"], ideal["lengths"])


def test_run_sweep_resumes_and_reuses_the_reward_model_cost(fake, preset, tmp_path):
    out = run_sweep(preset, SMALL, out=tmp_path, progress=False)
    first_meta = json.loads((out / "sweep.json").read_text())
    again = run_sweep(preset, SMALL, out=tmp_path, progress=False)
    assert again == out
    second = fake.instances[-1]
    assert trained(second) == [], "nothing left to run"
    assert ("reward_model_cost", {}, None) not in second.calls
    assert second.parts == {"reward_cost": first_meta["reward_model_cost"]}, "measured once, in sweep.json"
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["started"] == first_meta["started"] and meta["commit"] == first_meta["commit"]
    (out / "runs" / "dpo__beta0.1__seed1.json").unlink()
    (out / "ideal.json").unlink()
    run_sweep(preset, SMALL, out=tmp_path, progress=False)
    third = fake.instances[-1]
    assert [(n, k) for n, k, _ in third.calls] == [("dpo", {"beta": 0.1, "seed": 1}), ("ideal_samples", {})]
    assert len(load_results(folder=out)["runs"]) == len(fake.instances[0].made)


def test_run_sweep_only_runs_the_jobs_asked_for(fake, preset, tmp_path):
    run_sweep(preset, SMALL, out=tmp_path, only="dpo", progress=False)
    experiment = fake.instances[-1]
    assert trained(experiment) == ["dpo"] * (len(SMALL.dpo_betas) * len(SMALL.seeds))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == \
        sorted(n for n, _, _ in jobs(SMALL) if n.startswith("dpo"))
    assert not (tmp_path / "ideal.json").exists()
    run_sweep(preset, SMALL, out=tmp_path, only="ideal", progress=False)
    assert trained(fake.instances[-1]) == ["ideal_samples"] and (tmp_path / "ideal.json").exists()
    no_ideal = replace(SMALL, ideal_samples=0)
    run_sweep(preset, no_ideal, out=tmp_path / "other", progress=False)
    assert "ideal_samples" not in trained(fake.instances[-1]) and not (tmp_path / "other" / "ideal.json").exists()


def test_run_sweep_refuses_a_folder_of_another_sweep_before_any_work(fake, preset, tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": asdict(replace(SMALL, dpo_steps=8)),
                                                     "reward_model_cost": {"seconds": 1.0}}))
    with pytest.raises(ValueError, match="another sweep"):
        run_sweep(preset, SMALL, out=tmp_path, progress=False)
    assert fake.instances == [], "refused before the Experiment (and its models) is built"
    assert not list((tmp_path / "runs").glob("*.json"))


def test_run_job_dispatches_and_leaves_the_job_alone():
    experiment = FakeExperiment(sweep=SMALL)
    for name, method, kwargs in jobs(SMALL):
        before = json.dumps(kwargs)
        runs = run_job(experiment, method, kwargs)
        assert json.dumps(kwargs) == before, name
        assert isinstance(runs, list) and all(isinstance(r, Run) for r in runs)
        assert len(runs) == (len(SMALL.best_of_n) if method == "best_of_n" else 1)
    assert len(experiment.made) == len(jobs(SMALL)) - len(SMALL.seeds) + len(SMALL.seeds) * len(SMALL.best_of_n)


# ---- load_results on a folder written by hand ----------------------------------------------------------------


def test_load_results_of_a_hand_written_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": asdict(SMALL), "eval_seed": 7}))
    best = [make_run("Best-of-N", "N=2", 0, steps=(0,)), make_run("Best-of-N", "N=4", 0, steps=(0,))]
    dpo_run = make_run("DPO", "beta=0.1", 1)
    (tmp_path / "runs" / "b.json").write_text(json.dumps({"runs": [run_to_dict(dpo_run)], "seconds": 1.0}))
    (tmp_path / "runs" / "a.json").write_text(json.dumps({"runs": [run_to_dict(r) for r in best], "seconds": 2.0}))
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    results = load_results(folder=tmp_path)
    assert results["meta"]["eval_seed"] == 7 and results["ideal"] is None
    assert results["runs"] == [*best, dpo_run], "files in name order, runs in file order"
    assert all(isinstance(p, Point) for r in results["runs"] for p in r.points)


def test_load_results_without_a_sweep(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results(folder=tmp_path)
