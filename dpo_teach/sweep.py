"""The powered frontier sweep: every method, setting and seed of the preset's settings.sweep, with every
checkpoint's per-prompt rewards, KLs and lengths written to data/results/<preset>/.

    python -m dpo_teach.sweep --preset tiny          # about 40 minutes on 2 CPU cores
    python -m dpo_teach.sweep --preset tiny --list   # what it would run, and what is done
    python -m dpo_teach.sweep --preset gpt2 --full   # the paper's grid (settings.paper_sweep): hours on a T4

It is resumable: each run is written to its own file as soon as it finishes, and a later call skips
the runs whose file exists (delete a file to run it again). sweep.json records what the results were
made with: the sweep, the preset, the evaluation seed, the package's commit, the versions of torch
and transformers, the machine and its thread count. Notebook 09 loads the results with
load_results and draws its conclusions from them.

The "tiny" preset's sweep is committed under data/results/tiny/. A preset without committed results
(the GPU one) runs its sweep in notebook 09 into the cache (cache_results_dir), where notebook 10
finds it (find_results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from dpo_teach.frontier import (
    Experiment,
    Run,
    SweepConfig,
    paper_sweep_config,
    run_from_dict,
    run_to_dict,
    sweep_config,
)
from dpo_teach.presets import Preset, cache_dir, data_dir, get_preset
from dpo_teach.utils import seed_everything

__all__ = ["FULL_SWEEP_ENV", "results_dir", "cache_results_dir", "find_results", "jobs", "run_job", "run_sweep",
           "load_results", "main"]

FULL_SWEEP_ENV = "DPO_TEACH_FULL_SWEEP"  # "1": notebook 09 runs settings.paper_sweep instead of settings.sweep


def results_dir(preset: Preset | None = None) -> Path:
    """data/results/<preset>/: where the committed sweep of a preset lives."""
    return data_dir() / "results" / (preset or get_preset()).name


def cache_results_dir(preset: Preset | None = None, full: bool = False) -> Path:
    """Where notebook 09 runs a preset's sweep when none is committed: the cache, one folder for the
    default sweep ("sweep") and one for the paper's grid ("paper_sweep")."""
    return cache_dir() / (preset or get_preset()).name / ("paper_sweep" if full else "sweep")


def find_results(preset: Preset | None = None) -> Path:
    """The folder of a preset's sweep: the committed one if there is one, else the paper's grid run
    in the cache if it finished, else the default sweep run in the cache."""
    preset = preset or get_preset()
    if (results_dir(preset) / "sweep.json").exists():
        return results_dir(preset)
    full = cache_results_dir(preset, full=True) / "sweep.json"
    if full.exists() and "finished" in json.loads(full.read_text()):
        return full.parent
    return cache_results_dir(preset)


def jobs(sweep: SweepConfig) -> list[tuple[str, str, dict]]:
    """Every run of the sweep as (file name, method, keyword arguments), cheapest kinds first."""
    out = [("sft.json", "sft", {})]
    out += [(f"best_of_n__seed{s}.json", "best_of_n", {"ns": list(sweep.best_of_n), "seed": s}) for s in sweep.seeds]
    out += [(f"preferred_ft__seed{s}.json", "preferred_ft", {"seed": s}) for s in sweep.seeds]
    out += [(f"dpo__beta{b:g}__seed{s}.json", "dpo", {"beta": b, "seed": s}) for b in sweep.dpo_betas for s in sweep.seeds]
    out += [(f"ppo__kl_coef{c:g}__seed{s}.json", "ppo", {"kl_coef": c, "seed": s})
            for c in sweep.ppo_kl_coefs for s in sweep.seeds]
    out += [(f"ppo__target_kl{t:g}__seed{s}.json", "ppo", {"kl_coef": 0.1, "target_kl": t, "seed": s})
            for t in sweep.ppo_target_kls for s in sweep.seeds]
    out += [(f"ppo_gt__kl_coef{c:g}__seed{s}.json", "ppo", {"kl_coef": c, "seed": s, "ground_truth": True})
            for c in sweep.ppo_gt_kl_coefs for s in sweep.seeds]
    return out


def run_job(experiment: Experiment, method: str, kwargs: dict) -> list[Run]:
    """One job of `jobs`: the runs it makes (best-of-N makes one per N)."""
    seed_everything(kwargs.get("seed", 0))
    kwargs = dict(kwargs)
    if method == "best_of_n":
        return experiment.best_of_n(tuple(kwargs.pop("ns")), **kwargs)
    return [getattr(experiment, method)(**kwargs)]


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dpo_teach"], cwd=root, capture_output=True,
                               text=True, check=True)
        return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")))
    tmp.replace(path)  # a run's file appears whole or not at all (resumable)


def run_sweep(preset: Preset | None = None, sweep: SweepConfig | None = None, out: Path | None = None,
              only: str | None = None, progress: bool = True) -> Path:
    """Run every job of the sweep whose file is missing under `out`; return `out`."""
    preset = preset or get_preset()
    sweep = sweep or sweep_config(preset)
    out = Path(out or results_dir(preset))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    meta_path = out / "sweep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and meta["sweep"] != json.loads(json.dumps(asdict(sweep))):
        raise ValueError(f"{meta_path} holds another sweep; choose another folder or delete it")
    parts = {"reward_cost": meta["reward_model_cost"]} if meta else {}
    experiment = Experiment(preset, sweep, parts=parts)
    if meta is None:
        meta = {"sweep": asdict(sweep), "preset": asdict(preset), "eval_seed": experiment.eval_seed,
                "eval_prompts": experiment.eval_prompts, "commit": _commit(),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "machine": {"platform": platform.platform(), "processor": platform.machine(),
                            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "reward_model_cost": experiment.reward_model_cost()}
        _write_json(meta_path, meta)
    todo = [(name, method, kwargs) for name, method, kwargs in jobs(sweep)
            if not (out / "runs" / name).exists() and (only is None or name.startswith(only))]
    if sweep.ideal_samples and not (out / "ideal.json").exists() and (only is None or only == "ideal"):
        todo.append(("ideal.json", "ideal", {}))
    for name, method, kwargs in tqdm(todo, desc=f"sweep {preset.name}", disable=not progress):
        start = time.perf_counter()
        if method == "ideal":
            samples = experiment.ideal_samples()
            _write_json(out / name, {key: [[round(v, 5) for v in row] for row in value.tolist()]
                                     for key, value in samples.items()})
            continue
        runs = run_job(experiment, method, kwargs)
        _write_json(out / "runs" / name, {"runs": [run_to_dict(r) for r in runs], "commit": _commit(),
                                          "seconds": time.perf_counter() - start})
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_json(meta_path, meta)
    return out


def load_results(preset: Preset | None = None, folder: Path | None = None) -> dict:
    """The results of a sweep (in `folder`, default find_results(preset)): {"meta": sweep.json, "runs": [Run, ...], "ideal": {"rewards", "lengths"}
    ((K, P) tensors, or None)}. Raises FileNotFoundError when the folder holds no sweep."""
    folder = Path(folder or find_results(preset))
    meta = json.loads((folder / "sweep.json").read_text())
    runs = []
    for path in sorted((folder / "runs").glob("*.json")):
        runs += [run_from_dict(r) for r in json.loads(path.read_text())["runs"]]
    ideal = None
    if (folder / "ideal.json").exists():
        ideal = {k: torch.tensor(v, dtype=torch.float64) for k, v in json.loads((folder / "ideal.json").read_text()).items()}
    return {"meta": meta, "runs": runs, "ideal": ideal}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="tiny or gpt2 (default: the one setup() picks)")
    parser.add_argument("--out", default=None, help="output folder (default: data/results/<preset>)")
    parser.add_argument("--only", default=None, help="run only the jobs whose file name starts with this")
    parser.add_argument("--list", action="store_true", help="list the jobs and whether each is done")
    parser.add_argument("--full", action="store_true", help="the paper's grid (settings.paper_sweep), where a preset has one")
    args = parser.parse_args(argv)
    from dpo_teach.presets import setup

    preset = setup(args.preset)
    sweep = paper_sweep_config(preset) if args.full else sweep_config(preset)
    out = Path(args.out or results_dir(preset))
    if args.list:
        for name, _, _ in jobs(sweep):
            print(f"{'done' if (out / 'runs' / name).exists() else 'todo'}  {name}")
        return
    print(f"sweep of preset {preset.name!r} into {out}")
    run_sweep(preset, sweep, out)


if __name__ == "__main__":
    main()
