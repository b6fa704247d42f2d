"""The pipeline up to where RLHF and DPO split: SFT policy, preference pairs, reward model.

One call each gives a later notebook what notebooks 05 and 06 produced:

    policy, tokenizer = get_sft_policy(preset)  # notebook 05
    pairs = get_preference_pairs(preset)  # notebook 06: DatasetDict, splits "train" and "test"
    reward_model = get_reward_model(preset)  # notebook 06

Each loads from cache_dir()/<preset name>/ when the cached artefact was made with the same recipe
(the recipe and a fingerprint of the base model are stored beside it and compared), and otherwise
makes it with exactly the recipe of the preset's settings (preset.settings.sft, .pairs, .reward;
dpo_teach.settings) and saves it. Everything is seeded: the same recipe on the same machine gives the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import datasets
import transformers
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from dpo_teach.models import load_base_model
from dpo_teach.pairs import make_preference_pairs
from dpo_teach.presets import Preset, cache_dir, get_preset
from dpo_teach.reward import RewardModel, train_reward_model
from dpo_teach.sft import train_sft
from dpo_teach.world import load_reviews


def sft_records(preset: Preset, split: str = "train") -> list[dict]:
    """SFT data: whole reviews as completions of the empty prompt."""
    return [{"prompt": "", "completion": text} for text in load_reviews(preset, split)]


# ---- Cache bookkeeping --------------------------------------------------------------------------


def artefact_dir(preset: Preset, name: str) -> Path:
    return cache_dir() / preset.name / name


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def base_fingerprint(preset: Preset) -> dict:
    """What identifies the base model: its name, and a hash of its weights when it is a local folder."""
    fingerprint = {"preset": preset.name, "model": preset.model, "dataset": preset.dataset}
    weights = _sha256(Path(preset.model) / "model.safetensors")
    if weights is not None:
        fingerprint["weights_sha256"] = weights
    return fingerprint


def _key(preset: Preset, *stages: str) -> dict:
    """The full recipe of an artefact: the base model, the configs of every stage it depends on, and,
    for what is made from the SFT policy, a hash of the cached SFT weights (a re-trained SFT policy,
    e.g. by notebook 05 on another machine, invalidates the pairs and the reward model made from it)."""
    key = {"base": base_fingerprint(preset)}
    for stage in stages:
        key[stage] = asdict(getattr(preset.settings, stage))
    if "pairs" in stages:
        key["sft_weights_sha256"] = _sha256(artefact_dir(preset, "sft_policy") / "model.safetensors")
    return json.loads(json.dumps(key))  # as it reads back from JSON


def _cached(preset: Preset, name: str, key: dict) -> dict | None:
    """The stored meta data of an artefact made with `key`, or None (missing or another recipe)."""
    meta = artefact_dir(preset, name) / "meta.json"
    if not meta.exists():
        return None
    stored = json.loads(meta.read_text())
    return stored if stored.get("recipe") == key else None


def _save(preset: Preset, name: str, key: dict, write, extra: dict) -> Path:
    """Write an artefact into a temporary folder, then move it in place (never half-written)."""
    final = artefact_dir(preset, name)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _no_progress_bars():
        write(tmp)
    (tmp / "meta.json").write_text(json.dumps({"recipe": key, **extra}, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


@contextmanager
def _no_progress_bars():
    """Silence the progress bars of transformers and datasets while saving and loading (restored after)."""
    hf_on, ds_on = transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_on:
            transformers.utils.logging.enable_progress_bar()
        if ds_on:
            datasets.enable_progress_bars()


def load_history(preset: Preset | None = None, stage: str = "sft") -> dict:
    """The training history stored with the cached "sft" policy or "reward" model."""
    preset = preset or get_preset()
    name = {"sft": "sft_policy", "reward": "reward_model"}[stage]
    return json.loads((artefact_dir(preset, name) / "meta.json").read_text())["history"]


# ---- SFT policy (notebook 05) -------------------------------------------------------------------


def train_sft_policy(preset: Preset, eval_records: list[dict] | None = None):
    """The SFT recipe: the base model fine-tuned with preset.settings.sft. Returns (policy, tokenizer, history)."""
    policy, tokenizer = load_base_model(preset)
    history = train_sft(policy, tokenizer, sft_records(preset), preset.settings.sft, eval_records=eval_records)
    return policy, tokenizer, history


def save_sft_policy(policy, tokenizer, preset: Preset, history: dict) -> Path:
    def write(folder):
        policy.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return _save(preset, "sft_policy", _key(preset, "sft"), write, {"history": history})


def get_sft_policy(preset: Preset | None = None):
    """(policy, tokenizer): the SFT policy of notebook 05, from the cache or trained and cached.
    Eval mode, dropout off, on the preset's device."""
    preset = preset or get_preset()
    if _cached(preset, "sft_policy", _key(preset, "sft")) is None:
        print(f"dpo_teach: no cached SFT policy for preset {preset.name!r}: training it with the recipe of notebook 05")
        policy, tokenizer, history = train_sft_policy(preset)
        save_sft_policy(policy, tokenizer, preset, history)
    with _no_progress_bars():
        return load_base_model(replace(preset, model=str(artefact_dir(preset, "sft_policy"))))


# ---- Preference pairs (notebook 06) -------------------------------------------------------------


def save_preference_pairs(pairs: datasets.DatasetDict, counts: dict, preset: Preset) -> Path:
    return _save(preset, "preference_pairs", _key(preset, "sft", "pairs"),
                 lambda folder: pairs.save_to_disk(str(folder / "data")), {"counts": counts})


def get_preference_pairs(preset: Preset | None = None) -> datasets.DatasetDict:
    """The preference pairs of notebook 06 (splits "train" and "test"), from the cache or made and cached."""
    preset = preset or get_preset()
    if _cached(preset, "preference_pairs", _key(preset, "sft", "pairs")) is None:
        policy, tokenizer = get_sft_policy(preset)
        print(f"dpo_teach: no cached preference pairs for preset {preset.name!r}: sampling them as notebook 06 does")
        pairs, counts = make_preference_pairs(policy, tokenizer, preset, preset.settings.pairs)
        save_preference_pairs(pairs, counts, preset)
    return datasets.load_from_disk(str(artefact_dir(preset, "preference_pairs") / "data"))


def preference_pair_counts(preset: Preset | None = None) -> dict:
    """The counts (pairs, ties, identical, ...) of the cached preference pairs, per split."""
    preset = preset or get_preset()
    get_preference_pairs(preset)
    return json.loads((artefact_dir(preset, "preference_pairs") / "meta.json").read_text())["counts"]


# ---- Reward model (notebook 06) -----------------------------------------------------------------


def train_reward_recipe(preset: Preset, policy, tokenizer, pairs: datasets.DatasetDict, eval_pairs=None):
    """The reward-model recipe: a RewardModel initialised from the SFT policy, trained on the
    training pairs with preset.settings.reward. Returns (reward_model, history)."""
    reward_model = RewardModel.from_policy(policy)
    history = train_reward_model(reward_model, tokenizer, pairs["train"], preset.settings.reward,
                                 eval_pairs=eval_pairs)
    return reward_model, history


def save_reward_model(reward_model: RewardModel, preset: Preset, history: dict) -> Path:
    def write(folder):
        reward_model.config.to_json_file(folder / "config.json")
        save_file({k: v.contiguous() for k, v in reward_model.state_dict().items()}, folder / "model.safetensors")
    return _save(preset, "reward_model", _key(preset, "sft", "pairs", "reward"), write, {"history": history})


def get_reward_model(preset: Preset | None = None) -> RewardModel:
    """The reward model of notebook 06, from the cache or trained and cached. Eval mode, dropout off."""
    preset = preset or get_preset()
    if _cached(preset, "reward_model", _key(preset, "sft", "pairs", "reward")) is None:
        pairs = get_preference_pairs(preset)
        policy, tokenizer = get_sft_policy(preset)
        print(f"dpo_teach: no cached reward model for preset {preset.name!r}: training it as notebook 06 does")
        reward_model, history = train_reward_recipe(preset, policy, tokenizer, pairs)
        save_reward_model(reward_model, preset, history)
    folder = artefact_dir(preset, "reward_model")
    reward_model = RewardModel(GPT2Config.from_json_file(folder / "config.json"))
    reward_model.load_state_dict(load_file(folder / "model.safetensors"))
    return reward_model.to(preset.device).eval()


__all__ = ["sft_records", "get_sft_policy", "get_preference_pairs",
           "get_reward_model", "preference_pair_counts", "load_history", "train_sft_policy",
           "save_sft_policy", "save_preference_pairs", "train_reward_recipe", "save_reward_model"]
