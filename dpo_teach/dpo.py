"""Direct Preference Optimization: the DPO loss (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

The loss is a pure function of four per-example sequence log-probabilities (summed over response
tokens, see docs/conventions.md), so the same code serves the exact bandit world of notebook 03 and the
GPT-2 policy of notebook 08.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_teach.logps import build_batch, model_sequence_logps
from dpo_teach.settings import DPOConfig
from dpo_teach.training import autocast, eval_fn_numbers, train
from dpo_teach.utils import shuffled_batches

__all__ = ["LOSS_TYPES", "DPOConfig", "as_records", "check_logps", "concatenated_batch", "dpo_batch_loss", "dpo_config",
           "dpo_loss", "dpo_metrics", "eval_callbacks", "evaluate_pairs", "make_evaluate", "pair_logps",
           "precompute_ref_logps", "probe_logps", "train_dpo"]

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _check_inputs(
    named: dict[str, Tensor], beta: float, loss_type: str, label_smoothing: float
) -> None:
    """Raise ValueError with a clear message for inputs dpo_loss cannot take."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
    check_logps(named)


def check_logps(named: dict[str, Tensor]) -> None:
    """Raise ValueError naming the argument when a tensor of per-example log-probs cannot be used:
    each must be a floating-point torch.Tensor of shape (B,), all of the same B (variants.py too)."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point tensor of log-probs, got dtype {value.dtype}"
            )
        if value.ndim != 1:
            raise ValueError(
                f"{name} must have shape (B,), one log-prob per example, got {tuple(value.shape)}"
            )
    shapes = {name: tuple(value.shape) for name, value in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the log-prob tensors must have the same shape (B,), got {shapes}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss per example, and the implicit rewards of the chosen and rejected responses.

    Args:
        policy_chosen_logps: log pi(y_w|x) under the policy, summed over response tokens. Shape: (B,)
        policy_rejected_logps: log pi(y_l|x) under the policy. Shape: (B,)
        ref_chosen_logps: log pi_ref(y_w|x) under the frozen reference model. Shape: (B,)
        ref_rejected_logps: log pi_ref(y_l|x) under the reference model. Shape: (B,)
        beta: strength of the KL regularisation towards pi_ref (the paper's beta).
        loss_type: "sigmoid" (DPO, Rafailov et al. 2023, Eq. 7), "hinge" (the hinge on log-ratios of RSO,
            Liu et al. 2023: relu(1 - beta h); not SLiC-HF's calibration loss on log-probs) or "ipo" (Azar et al. 2023, Eq. 17: (h - 1/(2 beta))^2; IPO's authors
            use length-normalised (mean) log-probs, so pass those for IPO).
        label_smoothing: eps of conservative DPO (the official DPO code, Mitchell 2023): the label
            is taken to be flipped with probability eps, giving
            -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). Sigmoid loss only.

    With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)), the sigmoid
    loss is -log sigma(beta h) (Eq. 7), computed with logsigmoid, so it is finite for any margin.

    Returns:
        losses: the loss of each example (take .mean() to train). Shape: (B,)
        chosen_rewards: implicit reward beta (log pi(y_w|x) - log pi_ref(y_w|x)), detached. Shape: (B,)
        rejected_rewards: implicit reward beta (log pi(y_l|x) - log pi_ref(y_l|x)), detached. Shape: (B,)
    """
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    _check_inputs(named, beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,) the margin of log-ratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # "ipo"
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------
# Training a language-model policy with DPO (notebook 08). The loss above does not change; what
# changes is where the four log-probs come from: sums of token log-probs of whole responses.


def concatenated_batch(records: list[dict], tokenizer, max_prompt_tokens: int | None = None,
                       max_response_tokens: int | None = None, start: int = 0) -> dict:
    """The chosen and the rejected responses of `records` in ONE right-padded batch of 2B rows:
    rows 0..B-1 are prompt + chosen, rows B..2B-1 are prompt + rejected."""
    halves = [build_batch(records, tokenizer, key, max_prompt_tokens, max_response_tokens, start=start)
              for key in ("chosen", "rejected")]
    width = max(h["input_ids"].shape[1] for h in halves)
    batch = {}
    for key in ("input_ids", "attention_mask", "labels", "loss_mask"):
        pad = tokenizer.pad_token_id if key in ("input_ids", "labels") else 0
        batch[key] = torch.cat([F.pad(h[key], (0, width - h[key].shape[1]), value=pad) for h in halves])  # (2B, T)
    batch["response_lengths"] = torch.cat([h["response_lengths"] for h in halves])  # (2B,)
    return batch


def pair_logps(model, batch: dict, average: bool = False) -> tuple[Tensor, Tensor]:
    """(chosen_logps, rejected_logps) of a concatenated batch, from one forward pass. Shapes: (B,)."""
    logps = model_sequence_logps(model, batch, average=average)  # (2B,)
    return logps.chunk(2)


def as_records(pairs) -> list[dict]:
    """Preference pairs as a list of dicts (from a datasets.Dataset or any sequence of dicts)."""
    if hasattr(pairs, "to_list"):  # a datasets.Dataset
        return pairs.to_list()
    return list(pairs)


@torch.no_grad()
def precompute_ref_logps(ref_model, tokenizer, pairs, batch_size: int = 64, average: bool = False,
                         max_prompt_tokens: int | None = None, max_response_tokens: int | None = None,
                         precision: str | None = None) -> tuple[Tensor, Tensor]:
    """Reference log-probs of every pair, computed once: (ref_chosen_logps, ref_rejected_logps),
    each (N,). The reference model is then never run during training. precision: the arithmetic
    of the forward passes, as the policy trains in it (default: the device's, training.autocast)."""
    ref_model.eval()
    records = as_records(pairs)
    chosen, rejected = [], []
    for start in range(0, len(records), batch_size):
        batch = concatenated_batch(records[start:start + batch_size], tokenizer, max_prompt_tokens,
                                   max_response_tokens, start=start)
        with autocast(next(ref_model.parameters()).device, precision):  # the arithmetic the policy trains in
            c, r = pair_logps(ref_model, batch, average)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def dpo_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, float]:
    """The batch means TRL's DPOTrainer logs, under the same names."""
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }


def dpo_batch_loss(policy, batch: dict, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
                   config: DPOConfig) -> tuple[Tensor, dict[str, float]]:
    """The loss of one DPO step and its metrics, top to bottom (the training loop then calls
    backward and the optimizer). batch: concatenated_batch of B pairs (2B rows, chosen first);
    ref_*_logps: the pairs' precomputed reference log-probs, (B,) each."""
    device = next(policy.parameters()).device
    logps = model_sequence_logps(policy, batch, average=config.average_logps)  # (2B,): ONE forward pass
    policy_chosen_logps, policy_rejected_logps = logps.chunk(2)  # (B,), (B,)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps.to(device), ref_rejected_logps.to(device),
        beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)  # (B,) each
    metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), metrics


@torch.no_grad()
def evaluate_pairs(policy, tokenizer, pairs, ref_logps: tuple[Tensor, Tensor], config: DPOConfig,
                   batch_size: int = 64, **lengths) -> dict[str, float]:
    """DPO metrics of `policy` on a whole set of pairs (e.g. the held-out pairs)."""
    was_training = policy.training
    policy.eval()
    records = as_records(pairs)
    parts = []
    for start in range(0, len(records), batch_size):
        batch = concatenated_batch(records[start:start + batch_size], tokenizer, start=start, **lengths)
        with autocast(next(policy.parameters()).device, config.precision):  # as the reference log-probs
            parts.append(pair_logps(policy, batch, config.average_logps))
    policy_chosen_logps = torch.cat([p[0] for p in parts]).cpu()
    policy_rejected_logps = torch.cat([p[1] for p in parts]).cpu()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, *ref_logps, beta=config.beta,
        loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    policy.train(was_training)
    return dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)


@torch.no_grad()
def probe_logps(model, tokenizer, records: list[dict], batch_size: int = 64, average: bool = False,
                max_prompt_tokens: int | None = None, max_response_tokens: int | None = None) -> Tensor:
    """log p(response | prompt) under `model` of each {"prompt", "response"} record, summed over
    the response's tokens (EOS included). Shape: (N,). A probe of learning dynamics (Ren &
    Sutherland, ICLR 2025): how training on some responses moves the probability of others."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(records), batch_size):
        batch = build_batch(records[start:start + batch_size], tokenizer, "response", max_prompt_tokens,
                            max_response_tokens, start=start)
        parts.append(model_sequence_logps(model, batch, average=average).cpu())
    model.train(was_training)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Training: train_dpo runs dpo_batch_loss in the shared loop (dpo_teach.training.train); the
# variants (variants.py) and online DPO (online.py) reuse the pieces below.


def eval_callbacks(policy, tokenizer, probes: dict[str, list[dict]] | None, eval_fn, **lengths) -> dict:
    """What every trainer measures at its evaluation points besides its held-out metrics:
    eval_fn(policy)'s numbers under their own names (see eval_fn_numbers) and the mean sequence
    log-prob of each probe set under "probe/<name>" (see probe_logps)."""
    results = eval_fn_numbers(policy, eval_fn) if eval_fn is not None else {}
    for name, records in (probes or {}).items():
        results[f"probe/{name}"] = probe_logps(policy, tokenizer, records, **lengths).mean().item()
    return results


def make_evaluate(policy, tokenizer, held_out, probes: dict[str, list[dict]] | None, eval_fn, **lengths):
    """The evaluate hook that DPO and its variants hand the training loop: held_out()'s metrics on the
    held-out pairs (when there are some), then eval_callbacks (eval_fn's numbers, the probes). None
    when there is nothing to measure."""
    if held_out is None and not probes and eval_fn is None:
        return None
    return lambda: {**(held_out() if held_out else {}), **eval_callbacks(policy, tokenizer, probes, eval_fn, **lengths)}


def train_dpo(policy, tokenizer, train_pairs, config: DPOConfig = DPOConfig(), ref_model=None,
              ref_logps: tuple[Tensor, Tensor] | None = None, eval_pairs=None,
              eval_ref_logps: tuple[Tensor, Tensor] | None = None, max_prompt_tokens: int | None = None,
              max_response_tokens: int | None = None, progress: bool = True,
              eval_fn=None, probes: dict[str, list[dict]] | None = None, optimizer=None,
              first_step: int = 0) -> dict[str, list]:
    """Train `policy` in place with DPO on preference pairs; return the history (dict of lists).

    Reference log-probs come from `ref_logps` (precomputed) or are computed once here from
    `ref_model`; either way the reference model is not run during training. Each step reads
    config.batch_size pairs from a seeded shuffle and runs dpo_batch_loss in the shared loop
    (dpo_teach.training.train), whose history format it returns: "step", "lr", "seconds",
    "sequences", "tokens", and "train/<m>" for TRL's metric names ("loss", "rewards/chosen", ...,
    "logps/rejected"). At "eval/step" (before training, every config.eval_every steps, after the
    last): the same metrics on eval_pairs as "eval/<m>", eval_fn(policy)'s numbers as "eval/<key>"
    (e.g. oracle reward and KL of fresh samples; in a forked random stream), and for each probe set
    the mean of its probe_logps as "eval/probe/<name>" (none of this changes training).
    optimizer and first_step carry a run on across calls (online DPO's rounds).
    """
    lengths = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    records = as_records(train_pairs)
    if ref_logps is None:
        if ref_model is None:
            raise ValueError("train_dpo needs ref_logps or a ref_model to compute them")
        ref_logps = precompute_ref_logps(ref_model, tokenizer, records, average=config.average_logps, **lengths)
    if eval_pairs is not None and eval_ref_logps is None:
        if ref_model is None:
            raise ValueError("train_dpo needs eval_ref_logps or a ref_model for the held-out pairs")
        eval_ref_logps = precompute_ref_logps(ref_model, tokenizer, eval_pairs, average=config.average_logps, **lengths)
    if len(ref_logps[0]) != len(records):
        raise ValueError(f"ref_logps has {len(ref_logps[0])} entries for {len(records)} pairs")

    def batch_loss(index: list[int]):
        batch = concatenated_batch([records[i] for i in index], tokenizer, **lengths)
        loss, metrics = dpo_batch_loss(policy, batch, ref_logps[0][index], ref_logps[1][index], config)
        return loss, metrics, 2 * len(index), int(batch["attention_mask"].sum())

    def held_out() -> dict[str, float]:
        return evaluate_pairs(policy, tokenizer, eval_pairs, eval_ref_logps, config, **lengths)

    evaluate = make_evaluate(policy, tokenizer, held_out if eval_pairs is not None else None, probes, eval_fn,
                             **lengths)
    return train(policy, batch_loss, shuffled_batches(len(records), config.batch_size, config.seed), config,
                 evaluate, optimizer=optimizer, first_step=first_step,
                 desc=f"DPO beta={config.beta}", progress=progress)


def dpo_config(preset=None, **overrides) -> DPOConfig:
    """The DPO configuration of a preset (default: the current one; settings.SETTINGS), with fields replaced."""
    from dataclasses import replace

    from dpo_teach.presets import get_preset

    return replace((preset or get_preset()).settings.dpo, **overrides)
