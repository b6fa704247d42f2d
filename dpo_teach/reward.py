"""A Bradley-Terry reward model: a GPT-2 trunk with a scalar head, its loss, training and evaluation.

The reward model r_phi(x, y) reads prompt + response and returns one number: a linear head on the
hidden state of the LAST REAL token (the EOS that ends the response). Which position that is comes
from the attention mask (lengths), never from comparing ids with the pad id. It is fit to preference
pairs by maximum likelihood under the Bradley-Terry model (docs/conventions.md, step 2):

    p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)),   L_R = -log sigma(r(x, y_w) - r(x, y_l)).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model

from dpo_teach.logps import encode_prompt, encode_response, quiet_batch
from dpo_teach.models import disable_dropout
from dpo_teach.settings import RewardConfig
from dpo_teach.training import train
from dpo_teach.utils import (
    count_scored,
    position_ids_from_mask,
    right_pad,
    shuffled_batches,
    to_device,
)

__all__ = ["RewardConfig", "RewardModel", "bradley_terry_loss", "last_token_index", "pair_batch", "pair_rewards",
           "pairwise_accuracy", "reward_model_batch_loss", "score_texts", "train_reward_model"]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of "chosen beats rejected" under Bradley-Terry. Shape: (B,).

    -log sigma(r_chosen - r_rejected), computed with logsigmoid (exact for any margin).
    chosen_rewards, rejected_rewards: (B,).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) position of each row, for right or left padding. Shape: (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (attention_mask.long() * positions).argmax(dim=1)


class RewardModel(nn.Module):
    """GPT-2 trunk (`transformer`) + linear `score` head on the last real token's hidden state."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.score.weight)  # every response starts with reward 0: the BT loss starts at log 2
        nn.init.zeros_(self.score.bias)
        disable_dropout(self)

    @classmethod
    def from_policy(cls, policy) -> RewardModel:
        """A reward model whose trunk is a copy of `policy`'s (a GPT2LMHeadModel, e.g. the SFT policy)."""
        model = cls(copy.deepcopy(policy.config))
        model.transformer.load_state_dict(policy.transformer.state_dict())
        return model.to(next(policy.parameters()).device).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward of each sequence: input_ids, attention_mask (B, T), padded on either side. Shape: (B,),
        float32 (also under autocast)."""
        count_scored(attention_mask)
        position_ids = position_ids_from_mask(attention_mask)  # (B, T): padding never shifts positions
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        with torch.autocast(hidden.device.type, enabled=False):  # the head in float32, also under autocast
            return self.score(hidden[torch.arange(len(hidden), device=hidden.device), last].float()).squeeze(-1)  # (B,)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pair_batch(tokenizer, pairs: list[dict], config: RewardConfig = RewardConfig()) -> dict:
    """The chosen responses of `pairs`, then the rejected ones, in one right-padded batch (2B rows)."""
    records = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    records += [{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs]
    return quiet_batch(records, tokenizer, "response", config.max_prompt_tokens, config.max_response_tokens)


def pair_rewards(reward_model: RewardModel, tokenizer, pairs: list[dict], config: RewardConfig = RewardConfig(),
                 batch: dict | None = None):
    """(chosen_rewards, rejected_rewards), each (B,), from one forward pass over both halves
    (`batch`: pair_batch of the pairs, when the caller has built it already)."""
    batch = batch if batch is not None else pair_batch(tokenizer, pairs, config)
    device = _device(reward_model)
    rewards = reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,)
    return rewards[: len(pairs)], rewards[len(pairs):]


def reward_model_batch_loss(reward_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one reward-model step, the mean Bradley-Terry loss of the batch's pairs, and the
    pairs' margins r_chosen - r_rejected (B,), detached, for the metrics. batch: pair_batch of B
    pairs (2B rows, the chosen responses first), its tensors on the model's device."""
    rewards = reward_model(batch["input_ids"], batch["attention_mask"])  # (2B,): one forward pass
    chosen_rewards, rejected_rewards = rewards.chunk(2)  # (B,), (B,)
    loss = bradley_terry_loss(chosen_rewards, rejected_rewards).mean()
    return loss, (chosen_rewards - rejected_rewards).detach()


def _rows(pairs, indices) -> list[dict]:
    """Records of a datasets.Dataset or a list of dicts, by index."""
    if isinstance(pairs, list):
        return [pairs[i] for i in indices]
    columns = pairs[list(indices)]
    return [{"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(columns["prompt"], columns["chosen"], columns["rejected"])]


@torch.no_grad()
def pairwise_accuracy(reward_model: RewardModel, tokenizer, pairs, config: RewardConfig = RewardConfig(),
                      batch_size: int = 64) -> float:
    """Share of pairs where the reward model scores chosen above rejected; a tie counts one half
    (what a coin flip would get), so a model that scores everything alike has accuracy 0.5."""
    was_training = reward_model.training
    reward_model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        rows = _rows(pairs, range(start, min(start + batch_size, len(pairs))))
        chosen, rejected = pair_rewards(reward_model, tokenizer, rows, config)
        correct += (chosen > rejected).sum().item() + 0.5 * (chosen == rejected).sum().item()
    reward_model.train(was_training)
    return correct / len(pairs)


@torch.no_grad()
def score_texts(reward_model: RewardModel, tokenizer, prompts: list[str], responses: list[str],
                batch_size: int = 64, max_prompt_tokens: int | None = RewardConfig.max_prompt_tokens,
                max_response_tokens: int | None = RewardConfig.max_response_tokens) -> torch.Tensor:
    """Reward of each (prompt, response), tokenized as in training (EOS + prompt, response + EOS);
    an empty response is just EOS. Shape: (N,)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    was_training = reward_model.training
    reward_model.eval()
    device = _device(reward_model)
    scores = []
    for start in range(0, len(prompts), batch_size):
        rows = [encode_prompt(p, tokenizer, max_prompt_tokens)[0] + encode_response(r, tokenizer, max_response_tokens)[0]
                for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
        input_ids, attention_mask = right_pad(rows, tokenizer.pad_token_id)  # (b, T), (b, T)
        scores.append(reward_model(input_ids.to(device), attention_mask.to(device)).cpu())
    reward_model.train(was_training)
    return torch.cat(scores)


def train_reward_model(reward_model: RewardModel, tokenizer, pairs, config: RewardConfig = RewardConfig(),
                       eval_pairs=None, progress: bool = True) -> dict:
    """Fit `reward_model` in place to `pairs` ({"prompt", "chosen", "rejected"}) with the BT loss.

    Returns the history of dpo_teach.training.train: "step", "lr", "seconds", "sequences",
    "tokens", "train/loss", "train/accuracy" (of the training batch; a tie counts one half),
    "train/margin" (mean r_chosen - r_rejected of the batch), and with eval_pairs "eval/step" and
    "eval/accuracy" (held-out pairwise accuracy before training, every config.eval_every steps and
    at the end).
    """
    if len(pairs) == 0:
        raise ValueError("train_reward_model got no pairs")
    fields = set(pairs.column_names) if hasattr(pairs, "column_names") else set(pairs[0])
    if not {"prompt", "chosen", "rejected"} <= fields:
        raise ValueError(f"pairs need the fields 'prompt', 'chosen', 'rejected'; got {sorted(fields)}")

    def batch_loss(index: list[int]):
        rows = _rows(pairs, index)
        batch = to_device(pair_batch(tokenizer, rows, config), _device(reward_model))
        loss, margin = reward_model_batch_loss(reward_model, batch)  # (), (B,)
        metrics = {"loss": loss.item(), "accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(),
                   "margin": margin.mean().item()}
        return loss, metrics, 2 * len(rows), int(batch["attention_mask"].sum())

    def evaluate() -> dict[str, float]:
        return {"accuracy": pairwise_accuracy(reward_model, tokenizer, eval_pairs, config)}

    has_eval = eval_pairs is not None and len(eval_pairs) > 0
    return train(reward_model, batch_loss, shuffled_batches(len(pairs), config.batch_size, config.seed), config,
                 evaluate if has_eval else None, desc="reward model", progress=progress)
