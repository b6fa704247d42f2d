"""A Bradley-Terry reward model: a GPT-2 trunk with a scalar head, its loss, training and evaluation.

The reward model r_phi(x, y) reads prompt + response and returns one number: a linear head on the
hidden state of the LAST REAL token (the EOS that ends the response). Which position that is comes
from the attention mask (lengths), never from comparing ids with the pad id. It is fit to preference
pairs by maximum likelihood under the Bradley-Terry model (docs/conventions.md, step 2):

    p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)),   L_R = -log sigma(r(x, y_w) - r(x, y_l)).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2Model

from dpo_teach.evaluation import position_ids_from_mask
from dpo_teach.logps import (
    build_batch,
    encode_prompt,
    encode_response,
    gradient_step,
    shuffled_batches,
)
from dpo_teach.models import disable_dropout
from dpo_teach.sft import lr_at, make_optimizer


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
        """Reward of each sequence: input_ids, attention_mask (B, T), padded on either side. Shape: (B,)."""
        position_ids = position_ids_from_mask(attention_mask)  # (B, T): padding never shifts positions
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        return self.score(hidden[torch.arange(len(hidden), device=hidden.device), last]).squeeze(-1)  # (B,)


@dataclass(frozen=True)
class RewardConfig:
    """How the reward model is trained (CPU-sized defaults; pipeline.RECIPES holds the per-preset ones)."""

    num_steps: int = 150  # optimizer steps
    batch_size: int = 32  # preference pairs per step
    lr: float = 5e-4  # peak learning rate of AdamW
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping
    max_prompt_tokens: int = 16  # prompts are cut from the left to this many tokens
    max_response_tokens: int = 48  # responses are cut from the right to this many tokens
    eval_every: int = 50  # held-out accuracy every this many steps (when eval pairs are given)
    seed: int = 0  # seeds the order of the pairs


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pair_rewards(reward_model: RewardModel, tokenizer, pairs: list[dict], config: RewardConfig = RewardConfig()):
    """(chosen_rewards, rejected_rewards), each (B,), from one forward pass over both halves."""
    records = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs]
    records += [{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = build_batch(records, tokenizer, response_key="response", max_prompt_tokens=config.max_prompt_tokens,
                            max_response_tokens=config.max_response_tokens)
    device = _device(reward_model)
    rewards = reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,)
    return rewards[: len(pairs)], rewards[len(pairs):]


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
                batch_size: int = 64, max_prompt_tokens: int | None = 16,
                max_response_tokens: int | None = 48) -> torch.Tensor:
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
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        scores.append(reward_model(input_ids.to(device), attention_mask.to(device)).cpu())
    reward_model.train(was_training)
    return torch.cat(scores)


@torch.enable_grad()  # training needs gradients even when called inside no_grad (e.g. lazily)
def train_reward_model(reward_model: RewardModel, tokenizer, pairs, config: RewardConfig = RewardConfig(),
                       eval_pairs=None) -> dict:
    """Fit `reward_model` in place to `pairs` ({"prompt", "chosen", "rejected"}) with the BT loss.

    Returns the history, a dict of lists: "step", "loss", "accuracy" (of the training batch),
    "margin" (mean r_chosen - r_rejected of the batch), "lr", and with eval_pairs "eval_step" and
    "eval_accuracy" (held-out pairwise accuracy every config.eval_every steps and at the end).
    """
    if len(pairs) == 0:
        raise ValueError("train_reward_model got no pairs")
    fields = set(pairs.column_names) if hasattr(pairs, "column_names") else set(pairs[0])
    if not {"prompt", "chosen", "rejected"} <= fields:
        raise ValueError(f"pairs need the fields 'prompt', 'chosen', 'rejected'; got {sorted(fields)}")
    optimizer = make_optimizer(reward_model, config)
    history = {"step": [], "loss": [], "accuracy": [], "margin": [], "lr": [], "eval_step": [], "eval_accuracy": []}

    def evaluate(step: int) -> None:
        if eval_pairs is not None and len(eval_pairs):
            history["eval_step"].append(step)
            history["eval_accuracy"].append(pairwise_accuracy(reward_model, tokenizer, eval_pairs, config))

    evaluate(0)
    batches = shuffled_batches(len(pairs), config.batch_size, config.seed)
    reward_model.train()
    bar = tqdm(range(config.num_steps), desc="reward model")
    for step, index in zip(bar, batches):
        rows = _rows(pairs, index)
        chosen_rewards, rejected_rewards = pair_rewards(reward_model, tokenizer, rows, config)  # (B,), (B,)
        loss = bradley_terry_loss(chosen_rewards, rejected_rewards).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        gradient_step(reward_model, optimizer, loss, config.max_grad_norm)
        margin = (chosen_rewards - rejected_rewards).detach()
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["accuracy"].append(((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item())
        history["margin"].append(margin.mean().item())
        history["lr"].append(lr_at(step, config))
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.num_steps:
            evaluate(step + 1)
            reward_model.train()
    reward_model.eval()
    return history
