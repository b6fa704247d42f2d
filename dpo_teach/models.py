"""Models: the tiny GPT-2 of the offline world, its tokenizer, and loading a preset's base model.

Every model whose log-probabilities enter a loss or a KL (policy, reference, value, reward) runs
without dropout: with dropout, log-probs are noisy and "policy == reference" no longer gives a DPO
loss of log 2. `load_base_model` therefore returns models with dropout switched off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from dpo_teach.presets import Preset, get_preset

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "TinyGPT2Config", "tiny_gpt2", "wrap_tokenizer", "disable_dropout",
           "load_tokenizer", "load_base_model", "frozen_copy", "count_parameters"]

EOS_TOKEN = "<|endoftext|>"  # ends every document and every response; also starts every prompt
PAD_TOKEN = "<|pad|>"  # a separate pad token: padding never hides a real EOS


@dataclass(frozen=True)
class TinyGPT2Config:
    """Shape of the tiny GPT-2 pretrained by `python -m dpo_teach.pretrain`."""

    vocab_size: int = 4096  # byte-level BPE vocabulary learnt on the world's text
    n_positions: int = 128  # longest sequence the model can read (prompt + response fit easily)
    n_embd: int = 256  # width of the residual stream
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block (64 dimensions each)


def tiny_gpt2(tokenizer, config: TinyGPT2Config = TinyGPT2Config()) -> GPT2LMHeadModel:
    """A freshly initialised tiny GPT-2 for `tokenizer`, with dropout off."""
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(gpt2_config)


def wrap_tokenizer(tokenizer_object) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers.Tokenizer` as a transformers fast tokenizer with EOS and pad."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
    )


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set p = 0 in every dropout layer of `model` (in place) and return it."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_tokenizer(preset: Preset | None = None):
    """The preset's tokenizer, right-padding by default, with a pad token."""
    preset = preset or get_preset()
    tokenizer = AutoTokenizer.from_pretrained(preset.model)
    if tokenizer.pad_token is None:  # GPT-2 has none: reuse EOS (masks come from lengths, not ids)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(preset: Preset | None = None):
    """(model, tokenizer) of the preset's base model, on the preset's device, dropout off, eval mode.

    The "tiny" preset reads data/base_model (no network); the "gpt2" preset reads the hub name or
    local folder in `preset.model`.
    """
    preset = preset or get_preset()
    tokenizer = load_tokenizer(preset)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a one-second load is noise
    try:
        model = GPT2LMHeadModel.from_pretrained(preset.model)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    model.to(preset.device)
    model.eval()
    return model, tokenizer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` for use as the reference model: eval mode, no gradients."""
    ref_model = copy.deepcopy(model)
    ref_model.eval()
    ref_model.requires_grad_(False)
    return ref_model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
