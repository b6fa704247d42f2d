"""Supervised fine-tuning (SFT): the loss, its batch for the shared training loop, and perplexity.

The SFT objective (docs/conventions.md, step 1) is the mean negative log-likelihood of the response tokens,

    L_SFT = -1/T sum_t log p(y_t | x, y_<t),

computed with the shared log-prob function (dpo_teach.logps.sequence_logps, average=True): prompt
tokens and padding are masked out, EOS counts (the model must learn where a response ends). For SFT
on whole reviews the prompt is "" and the completion is the review, so the model learns every token
of a review after the start token. The loop itself is dpo_teach.training.train.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dpo_teach.logps import check_text, model_sequence_logps, quiet_batch, sequence_logps
from dpo_teach.settings import SFTConfig
from dpo_teach.training import train
from dpo_teach.utils import shuffled_batches, to_device

__all__ = ["SFTConfig", "perplexity", "sft_batch_loss", "sft_loss", "token_perplexity", "train_sft"]


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each example's response tokens, L_SFT. Shape: (B,).

    logits (B, T, V), labels (B, T), loss_mask (B, T) as for sequence_logps. Each example is
    averaged over its own tokens, so short and long responses weigh the same in the batch mean.
    """
    return -sequence_logps(logits, labels, loss_mask, average=True)


def sft_batch_loss(model, batch: dict) -> torch.Tensor:
    """The loss of one SFT step: the mean over the batch of sft_loss (the training loop then calls
    backward and the optimizer). batch: build_batch's dict, its tensors on the model's device."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return sft_loss(logits, batch["labels"], batch["loss_mask"]).mean()  # the batch's mean


@torch.no_grad()
def token_perplexity(model, batches: Iterable[dict]) -> float:
    """exp(-sum of the masked tokens' log-probs / their number) over batches in build_batch's format
    (input_ids, attention_mask, labels, loss_mask). Every token weighs the same."""
    was_training = model.training
    model.eval()
    total_logps, total_tokens = 0.0, 0
    for batch in batches:
        total_logps += model_sequence_logps(model, batch).sum().item()
        total_tokens += int(batch["loss_mask"][:, 1:].sum())
    model.train(was_training)
    return math.exp(-total_logps / total_tokens)


def perplexity(model, tokenizer, records: list[dict], response_key: str = "completion", batch_size: int = 64,
               max_prompt_tokens: int | None = SFTConfig.max_prompt_tokens,
               max_response_tokens: int | None = SFTConfig.max_response_tokens) -> float:
    """Perplexity of the response tokens of all `records` (token_perplexity; not the mean of
    per-record perplexities). Responses are cut as in training (SFTConfig's lengths by default)."""
    return token_perplexity(model, (quiet_batch(records[start:start + batch_size], tokenizer, response_key,
                                                max_prompt_tokens, max_response_tokens, start=start)
                                    for start in range(0, len(records), batch_size)))


def train_sft(policy, tokenizer, records: list[dict], config: SFTConfig = SFTConfig(),
              response_key: str = "completion", eval_records: list[dict] | None = None,
              progress: bool = True) -> dict:
    """Fine-tune `policy` in place on `records` ({"prompt", response_key}) by minimising L_SFT.

    Batches are drawn without replacement from a seeded shuffle (reshuffled every epoch). Returns
    the history of dpo_teach.training.train: "step", "lr", "seconds", "sequences", "tokens",
    "train/loss", "train/truncated" (completions of the batch cut to config.max_response_tokens),
    and with eval_records "eval/step" and "eval/perplexity" (held-out perplexity before training,
    every config.eval_every steps and at the end).
    """
    if not records:
        raise ValueError("train_sft got no records")
    for i, record in enumerate(records):  # fail now, naming the record, rather than mid-training
        check_text(record, i, "prompt", allow_empty=True)
        check_text(record, i, response_key, allow_empty=False)
    device = next(policy.parameters()).device
    lengths = (config.max_prompt_tokens, config.max_response_tokens)

    def batch_loss(index: list[int]):
        batch = to_device(quiet_batch([records[i] for i in index], tokenizer, response_key, *lengths), device)
        loss = sft_batch_loss(policy, batch)
        metrics = {"loss": loss.item(), "truncated": batch["num_truncated_responses"]}
        return loss, metrics, len(index), int(batch["attention_mask"].sum())

    def evaluate() -> dict[str, float]:
        return {"perplexity": perplexity(policy, tokenizer, eval_records, response_key,
                                         max_prompt_tokens=lengths[0], max_response_tokens=lengths[1])}

    return train(policy, batch_loss, shuffled_batches(len(records), config.batch_size, config.seed), config,
                 evaluate if eval_records else None, desc="SFT", progress=progress)
