"""Supervised fine-tuning (SFT): the loss, a plain training loop, and held-out perplexity.

The SFT objective (docs/conventions.md, step 1) is the mean negative log-likelihood of the response tokens,

    L_SFT = -1/T sum_t log p(y_t | x, y_<t),

computed with the shared log-prob function (dpo_teach.logps.sequence_logps, average=True): prompt
tokens and padding are masked out, EOS counts (the model must learn where a response ends). For SFT
on whole reviews the prompt is "" and the completion is the review, so the model learns every token
of a review after the start token.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dpo_teach.logps import (
    _check_text,
    build_batch,
    gradient_step,
    model_sequence_logps,
    sequence_logps,
    shuffled_batches,
)


@dataclass(frozen=True)
class SFTConfig:
    """How the policy is fine-tuned (CPU-sized defaults; pipeline.RECIPES holds the per-preset ones)."""

    num_steps: int = 200  # optimizer steps
    batch_size: int = 32  # records per step
    lr: float = 5e-4  # peak learning rate of AdamW
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # AdamW weight decay on matrices (the model is already pretrained)
    max_grad_norm: float = 1.0  # gradient clipping
    max_prompt_tokens: int = 16  # prompts are cut from the left to this many tokens
    max_response_tokens: int = 96  # completions are cut from the right (whole reviews fit)
    eval_every: int = 50  # held-out perplexity every this many steps (when eval records are given)
    seed: int = 0  # seeds the order of the training records


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each example's response tokens, L_SFT. Shape: (B,).

    logits (B, T, V), labels (B, T), loss_mask (B, T) as for sequence_logps. Each example is
    averaged over its own tokens, so short and long responses weigh the same in the batch mean.
    """
    return -sequence_logps(logits, labels, loss_mask, average=True)


def lr_at(step: int, config) -> float:
    """Learning rate at `step`: linear warm-up to config.lr, then cosine decay to 10% of it."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.num_steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and layer norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


def quiet_batch(records: list[dict], tokenizer, response_key: str, config) -> dict:
    """build_batch without its truncation warning (the caller counts truncations instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_batch(records, tokenizer, response_key=response_key,
                           max_prompt_tokens=config.max_prompt_tokens,
                           max_response_tokens=config.max_response_tokens)


@torch.no_grad()
def perplexity(model, tokenizer, records: list[dict], response_key: str = "completion",
               batch_size: int = 64, max_prompt_tokens: int | None = 16,
               max_response_tokens: int | None = 96) -> float:
    """exp(-sum of response-token log-probs / number of response tokens) over all `records`.

    Every token weighs the same (not the mean of per-record perplexities).
    """
    was_training = model.training
    model.eval()
    total_logps, total_tokens = 0.0, 0
    for start in range(0, len(records), batch_size):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = build_batch(records[start:start + batch_size], tokenizer, response_key=response_key,
                                max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                                start=start)
        total_logps += model_sequence_logps(model, batch).sum().item()
        total_tokens += int(batch["loss_mask"][:, 1:].sum())
    model.train(was_training)
    return math.exp(-total_logps / total_tokens)


@torch.enable_grad()  # training needs gradients even when called inside no_grad (e.g. lazily)
def train_sft(policy, tokenizer, records: list[dict], config: SFTConfig = SFTConfig(),
              response_key: str = "completion", eval_records: list[dict] | None = None) -> dict:
    """Fine-tune `policy` in place on `records` ({"prompt", response_key}) by minimising L_SFT.

    Batches are drawn without replacement from a seeded shuffle (reshuffled every epoch). Returns
    the history, a dict of lists: "step", "loss", "lr", and, when eval_records are given,
    "eval_step" and "eval_perplexity" (held-out perplexity every config.eval_every steps and at the
    end). "num_truncated" counts the completions cut to config.max_response_tokens.
    """
    if not records:
        raise ValueError("train_sft got no records")
    for i, record in enumerate(records):  # fail now, naming the record, rather than mid-training
        _check_text(record, i, "prompt", allow_empty=True)
        _check_text(record, i, response_key, allow_empty=False)
    device = next(policy.parameters()).device
    optimizer = make_optimizer(policy, config)
    history = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_perplexity": [], "num_truncated": 0}

    def evaluate(step: int) -> None:
        if eval_records:
            history["eval_step"].append(step)
            history["eval_perplexity"].append(perplexity(
                policy, tokenizer, eval_records, response_key, max_prompt_tokens=config.max_prompt_tokens,
                max_response_tokens=config.max_response_tokens))

    evaluate(0)
    batches = shuffled_batches(len(records), config.batch_size, config.seed)
    policy.train()
    bar = tqdm(range(config.num_steps), desc="SFT")
    for step, index in zip(bar, batches):
        batch_records = [records[i] for i in index]
        batch = quiet_batch(batch_records, tokenizer, response_key, config)
        history["num_truncated"] += batch["num_truncated_responses"]
        logits = policy(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device)).logits  # (B, T, V)
        loss = sft_loss(logits, batch["labels"].to(device), batch["loss_mask"].to(device)).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        gradient_step(policy, optimizer, loss, config.max_grad_norm)
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["lr"].append(lr_at(step, config))
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.num_steps:
            policy.eval()
            evaluate(step + 1)
            policy.train()
    policy.eval()
    return history
