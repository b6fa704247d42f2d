"""The pipeline: one call each for the SFT policy, the pairs and the reward model; cached, checked
against the recipe (the preset's settings), and equal to running the recipe by hand. A tiny base
model and tiny settings."""

from dataclasses import replace

import pytest
import torch

from dpo_teach import pipeline
from dpo_teach.pairs import make_preference_pairs
from dpo_teach.presets import get_preset
from dpo_teach.reward import RewardModel, score_texts
from dpo_teach.settings import SETTINGS, PairsConfig, RewardConfig, SFTConfig

TINY_SETTINGS = replace(
    SETTINGS["tiny"],
    sft=SFTConfig(num_steps=3, batch_size=4, warmup_steps=1),
    pairs=PairsConfig(num_train_prompts=3, num_test_prompts=2, max_new_tokens=6),
    reward=RewardConfig(num_steps=3, batch_size=4, warmup_steps=1),
)


@pytest.fixture()
def tiny_preset(tmp_path, monkeypatch, tiny_model, tokenizer):
    """The "tiny" preset with a tiny random base model, tiny settings and an empty cache in tmp_path."""
    base = tmp_path / "base_model"
    tiny_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    monkeypatch.setenv("DPO_TEACH_CACHE", str(tmp_path / "cache"))
    return replace(get_preset("tiny", device="cpu"), model=str(base), settings=TINY_SETTINGS)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_recipes_exist_for_every_preset():
    for name in ("tiny", "gpt2"):
        settings = get_preset(name, device="cpu").settings
        assert settings == SETTINGS[name]
        assert settings.pairs.completions_per_prompt == 4 and settings.pairs.labels == "oracle"
    assert SETTINGS["gpt2"].sft.num_steps > SETTINGS["tiny"].sft.num_steps


def test_sft_policy_is_trained_once_then_loaded(tiny_preset, capsys, tiny_model):
    policy, tokenizer = pipeline.get_sft_policy(tiny_preset)
    assert "training it" in capsys.readouterr().out
    assert not same_weights(policy, tiny_model), "the SFT policy was fine-tuned"
    assert not policy.training and all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    again, _ = pipeline.get_sft_policy(tiny_preset)
    assert capsys.readouterr().out == "", "the second call loads from the cache"
    assert same_weights(policy, again)
    by_hand, _, history = pipeline.train_sft_policy(tiny_preset)  # the recipe, run again: same numbers
    assert same_weights(policy, by_hand)
    assert len(history["train/loss"]) == TINY_SETTINGS.sft.num_steps, "the preset's settings were used"
    assert pipeline.load_history(tiny_preset, "sft")["train/loss"] == history["train/loss"]


def test_a_changed_recipe_or_base_model_is_not_loaded(tiny_preset, capsys, tiny_model):
    policy, _ = pipeline.get_sft_policy(tiny_preset)
    changed = replace(tiny_preset, settings=replace(TINY_SETTINGS, sft=replace(TINY_SETTINGS.sft, num_steps=4)))
    capsys.readouterr()
    longer, _ = pipeline.get_sft_policy(changed)
    assert "training it" in capsys.readouterr().out and not same_weights(policy, longer)
    with torch.no_grad():
        tiny_model.transformer.wte.weight.add_(0.01)
    tiny_model.save_pretrained(tiny_preset.model)  # a new base model
    pipeline.get_sft_policy(tiny_preset)
    assert "training it" in capsys.readouterr().out


def test_preference_pairs_are_made_once_and_equal_the_recipe(tiny_preset, capsys):
    pairs = pipeline.get_preference_pairs(tiny_preset)
    assert set(pairs) == {"train", "test"}
    assert pairs["train"].column_names == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
    counts = pipeline.preference_pair_counts(tiny_preset)
    assert counts["train"]["prompts"] == 3 and counts["train"]["pairs"] == len(pairs["train"])
    capsys.readouterr()
    again = pipeline.get_preference_pairs(tiny_preset)
    assert capsys.readouterr().out == ""
    assert again["train"].to_dict() == pairs["train"].to_dict() and again["test"].to_dict() == pairs["test"].to_dict()
    policy, tokenizer = pipeline.get_sft_policy(tiny_preset)
    by_hand, _ = make_preference_pairs(policy, tokenizer, tiny_preset, TINY_SETTINGS.pairs)
    assert by_hand["train"].to_dict() == pairs["train"].to_dict()
    with torch.no_grad():  # another SFT policy is saved (say, notebook 05 re-run elsewhere): pairs are remade
        policy.transformer.wte.weight.add_(0.01)
    pipeline.save_sft_policy(policy, tokenizer, tiny_preset, {"train/loss": []})
    capsys.readouterr()
    pipeline.get_preference_pairs(tiny_preset)
    assert "no cached preference pairs" in capsys.readouterr().out


def test_reward_model_is_trained_once_and_equals_the_recipe(tiny_preset, capsys):
    reward_model = pipeline.get_reward_model(tiny_preset)
    assert isinstance(reward_model, RewardModel) and not reward_model.training
    assert "no cached reward model" in capsys.readouterr().out
    again = pipeline.get_reward_model(tiny_preset)
    assert capsys.readouterr().out == "" and same_weights(reward_model, again)
    policy, tokenizer = pipeline.get_sft_policy(tiny_preset)
    by_hand, history = pipeline.train_reward_recipe(tiny_preset, policy, tokenizer, pipeline.get_preference_pairs(tiny_preset))
    pairs = pipeline.get_preference_pairs(tiny_preset)["test"]
    torch.testing.assert_close(score_texts(reward_model, tokenizer, pairs["prompt"], pairs["chosen"]),
                               score_texts(by_hand, tokenizer, pairs["prompt"], pairs["chosen"]))
    assert len(history["train/loss"]) == TINY_SETTINGS.reward.num_steps, "the preset's settings were used"
    assert pipeline.load_history(tiny_preset, "reward")["train/loss"] == history["train/loss"]
