"""dpo_teach.settings: one table of every stage's settings per preset; the dataclass defaults are the
"tiny" preset's; the lengths agree across the stages of a preset; a preset reads them from there."""

from dataclasses import FrozenInstanceError, fields, replace

import pytest

from dpo_teach.presets import get_preset
from dpo_teach.settings import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    RESPONSE_TOKENS,
    SETTINGS,
    DPOConfig,
    PairsConfig,
    PPOConfig,
    RewardConfig,
    Settings,
    SFTConfig,
    SweepConfig,
)
from dpo_teach.training import TrainConfig

STAGES = {"sft": SFTConfig, "pairs": PairsConfig, "reward": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig,
          "sweep": SweepConfig, "live_sweep": SweepConfig}


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_every_preset_has_every_stage(name):
    settings = SETTINGS[name]
    assert isinstance(settings, Settings)
    for stage, config_class in STAGES.items():
        assert type(getattr(settings, stage)) is config_class, stage
    for stage in ("sft", "reward", "ppo", "dpo"):
        assert isinstance(getattr(settings, stage), TrainConfig), stage
    assert get_preset(name, device="cpu").settings is settings


def test_tiny_settings_are_the_dataclass_defaults():
    tiny = SETTINGS["tiny"]
    for stage in ("sft", "pairs", "reward", "ppo", "dpo"):
        assert getattr(tiny, stage) == STAGES[stage](), stage
    assert (tiny.max_prompt_tokens, tiny.max_response_tokens, tiny.max_new_tokens) == (
        PROMPT_TOKENS, RESPONSE_TOKENS, NEW_TOKENS)


@pytest.mark.parametrize("name", ["tiny", "gpt2"])
def test_lengths_agree_across_the_stages_of_a_preset(name):
    preset = get_preset(name, device="cpu")
    s = preset.settings
    assert s.ppo.max_new_tokens == s.pairs.max_new_tokens == s.max_new_tokens == preset.max_new_tokens
    assert (s.sft.max_prompt_tokens == s.pairs.max_prompt_tokens == s.reward.max_prompt_tokens
            == s.ppo.max_prompt_tokens == s.max_prompt_tokens == preset.max_prompt_tokens)
    assert s.reward.max_response_tokens == s.max_response_tokens == preset.max_response_tokens
    assert s.max_new_tokens <= s.max_response_tokens, "sampled responses fit the pairs' responses"
    assert preset.max_length == s.max_length == s.max_prompt_tokens + s.max_response_tokens
    assert preset.eval_prompts == s.eval_prompts


def test_gpt2_ppo_samples_as_many_tokens_as_the_preset():
    preset = get_preset("gpt2", device="cpu")
    assert preset.settings.ppo.max_new_tokens == preset.max_new_tokens


def test_schedules_of_the_stages():
    for settings in SETTINGS.values():
        assert settings.sft.schedule == settings.reward.schedule == "cosine"
        assert settings.dpo.schedule == settings.ppo.schedule == "constant"
        assert settings.ppo.weight_decay == settings.dpo.weight_decay == 0.0


def test_stage_modules_give_the_same_classes():
    from dpo_teach import dpo, pairs, ppo, reward, sft

    assert (sft.SFTConfig, pairs.PairsConfig, reward.RewardConfig, ppo.PPOConfig, dpo.DPOConfig) == (
        SFTConfig, PairsConfig, RewardConfig, PPOConfig, DPOConfig)


def test_a_presets_lengths_are_read_from_its_settings():
    preset = get_preset("tiny", device="cpu")
    with pytest.raises((AttributeError, FrozenInstanceError)):
        preset.max_new_tokens = 6
    with pytest.raises(TypeError):
        replace(preset, max_new_tokens=6)  # not a field: the settings are changed instead
    changed = replace(preset, settings=replace(preset.settings, max_new_tokens=6, eval_prompts=3))
    assert changed.max_new_tokens == 6 and changed.eval_prompts == 3
    assert preset.max_new_tokens == NEW_TOKENS and SETTINGS["tiny"].max_new_tokens == NEW_TOKENS, "nothing shared changed"
    assert {f.name for f in fields(changed)} >= {"name", "device", "model", "dataset", "settings"}
