"""Presets: which model, which data and which sizes the course runs with, chosen once per notebook.

A preset is picked by `setup()` at the top of every notebook:

- "tiny" (the default on a CPU): the offline review world of this repository, a tiny GPT-2 that
  ships under data/base_model, sizes that fit a laptop CPU. Nothing is downloaded.
- "gpt2" (the default on a CUDA GPU): GPT-2 (124M) and IMDb reviews from the Hugging Face hub,
  the same code with other names and larger sizes. It needs the internet the first time.

Devices. The "gpt2" preset runs on a CUDA GPU when there is one (else on the CPU, slowly). The
"tiny" preset runs on the CPU everywhere, also where a GPU or Apple's mps exists: its budgets and
assertions are measured on a CPU and have not been checked elsewhere (on an H200 its DPO step takes
0.03x and its sampling 0.29x the time of 2 CPU threads: README, "On a GPU"). DPO_TEACH_DEVICE
("cpu", "cuda", "mps") overrides the device of either.

The environment variable DPO_TEACH_PRESET overrides the choice ("tiny" or "gpt2"). DPO_TEACH_MODEL
and DPO_TEACH_DATASET replace the model and the review data set of a preset with a hub name or a
local folder (dpo_teach.rehearse and the tests point the "gpt2" preset at local stand-ins this way).
DPO_TEACH_SCALE (a factor in (0, 1]) scales every count of the preset's settings down
(settings.scaled), for rehearsals that exercise every code path quickly.

Printed paths (setup()'s line, a Preset's repr) are relative to the repository's root when they lie
inside it, so that a notebook's committed output does not name the folder of the machine that ran
it; the Preset's fields keep the absolute path, which works from any working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dpo_teach.settings import SETTINGS, Settings, scaled
from dpo_teach.utils import seed_everything

__all__ = ["PRESET_ENV", "DEVICE_ENV", "MODEL_ENV", "DATASET_ENV", "DATA_ENV", "CACHE_ENV", "SCALE_ENV", "Preset", "cache_dir",
           "data_dir", "display_path", "find_device", "get_preset", "setup"]

PRESET_ENV = "DPO_TEACH_PRESET"
DEVICE_ENV = "DPO_TEACH_DEVICE"
MODEL_ENV = "DPO_TEACH_MODEL"
DATASET_ENV = "DPO_TEACH_DATASET"
DATA_ENV = "DPO_TEACH_DATA"
CACHE_ENV = "DPO_TEACH_CACHE"
SCALE_ENV = "DPO_TEACH_SCALE"
REPOSITORY = Path(__file__).resolve().parent.parent  # the root of the course: dpo_teach/, data/, notebooks/


def display_path(path: str | os.PathLike) -> str:
    """`path` as printed: relative to the repository's root when it is an absolute path inside it
    ("data/base_model"), else as given (a hub name such as "gpt2", a folder elsewhere)."""
    text = os.fspath(path)
    candidate = Path(text)
    if not candidate.is_absolute():
        return text
    for absolute in (Path(os.path.normpath(text)), candidate.resolve()):  # "..", then symbolic links, resolved
        try:
            return absolute.relative_to(REPOSITORY).as_posix()
        except ValueError:
            continue
    return text


def data_dir() -> Path:
    """The folder data/ of the repository (or $DPO_TEACH_DATA): the world, the base model."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parent.parent / "data"


def cache_dir() -> Path:
    """Where trained artefacts (SFT policy, preference pairs, reward model) are cached."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(__file__).resolve().parent.parent / "cache"


@dataclass(frozen=True)
class Preset:
    """Everything that differs between the CPU world and the GPU world: where the model and the data
    come from, and the preset's settings (dpo_teach.settings.SETTINGS[name])."""

    name: str  # "tiny" or "gpt2"
    device: str  # "cpu", "cuda" or "mps"
    model: str  # hub name or local folder of the base model (save_pretrained format)
    dataset: str  # "reviews" (this repository's world) or a hub name / local folder of IMDb-like data
    seed: int = 0  # seed used by setup() for python, numpy and torch
    settings: Settings = field(default=None, repr=False)  # every stage's settings (settings.py)

    def __post_init__(self):
        if self.settings is None:
            factor = float(os.environ.get(SCALE_ENV) or 1)
            object.__setattr__(self, "settings", scaled(SETTINGS[self.name], factor))

    def __repr__(self) -> str:  # the dataclass's repr, with model and dataset as display_path prints them
        return (f"Preset(name={self.name!r}, device={self.device!r}, model={display_path(self.model)!r}, "
                f"dataset={display_path(self.dataset)!r}, seed={self.seed!r})")

    # The lengths every stage shares, read from the settings.
    max_prompt_tokens = property(lambda self: self.settings.max_prompt_tokens)
    max_response_tokens = property(lambda self: self.settings.max_response_tokens)
    max_new_tokens = property(lambda self: self.settings.max_new_tokens)
    eval_prompts = property(lambda self: self.settings.eval_prompts)
    max_length = property(lambda self: self.settings.max_length)


def _base_presets(device: str) -> dict[str, Preset]:
    return {
        "tiny": Preset(name="tiny", device=device, model=str(data_dir() / "base_model"), dataset="reviews"),
        "gpt2": Preset(name="gpt2", device=device, model="gpt2", dataset="stanfordnlp/imdb"),
    }


def find_device(preset: str | None = None) -> str:
    """The device for `preset`: $DPO_TEACH_DEVICE if set; else "cuda" when a CUDA GPU exists and
    the preset is "gpt2" or not yet chosen; else "cpu" (mps only when asked for: nothing of the
    course is measured there, and it lacks the float64 the package uses in places)."""
    if os.environ.get(DEVICE_ENV):
        return os.environ[DEVICE_ENV]
    if torch.cuda.is_available() and preset in (None, "gpt2"):
        return "cuda"
    return "cpu"


def get_preset(name: str | None = None, device: str | None = None, **overrides) -> Preset:
    """The preset called `name` (default: $DPO_TEACH_PRESET, else "gpt2" where a CUDA GPU exists,
    else "tiny") on `device` (default: find_device(name))."""
    name = name or os.environ.get(PRESET_ENV) or ("gpt2" if find_device() == "cuda" else "tiny")
    device = device or find_device(name)
    presets = _base_presets(device)
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(presets)}")
    preset = presets[name]
    if os.environ.get(MODEL_ENV):
        preset = replace(preset, model=os.environ[MODEL_ENV])
    if os.environ.get(DATASET_ENV):
        preset = replace(preset, dataset=os.environ[DATASET_ENV])
    return replace(preset, **overrides)


def setup(preset: str | None = None, seed: int = 0, device: str | None = None, quiet: bool = False) -> Preset:
    """Call once at the top of a notebook: seeds everything, finds the device, picks the preset."""
    chosen = get_preset(preset, device=device, seed=seed)
    seed_everything(seed)
    if not quiet:
        print(f"dpo_teach: preset={chosen.name!r} device={chosen.device!r} seed={seed} "
              f"model={display_path(chosen.model)}")
    return chosen
