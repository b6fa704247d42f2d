"""Shared fixtures: the shipped tokenizer and small, seeded GPT-2 models (no network)."""

import pytest
import torch

from dpo_teach.models import load_base_model, load_tokenizer, tiny_gpt2
from dpo_teach.presets import get_preset


@pytest.fixture(scope="session")
def preset():
    return get_preset("tiny", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(preset):
    return load_tokenizer(preset)


@pytest.fixture()
def tiny_model(tokenizer):
    """A randomly initialised, very small GPT-2 on the course tokenizer (fast and seeded)."""
    from dataclasses import replace

    from dpo_teach.models import TinyGPT2Config

    torch.manual_seed(0)
    model = tiny_gpt2(tokenizer, replace(TinyGPT2Config(), n_embd=32, n_layer=2, n_head=2))
    return model.eval()


@pytest.fixture(scope="session")
def base_model(preset):
    model, _ = load_base_model(preset)
    return model
