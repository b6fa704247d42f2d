"""Direct Preference Optimization: the DPO loss (Rafailov et al. 2023, arXiv 2305.18290) and its variants.

The loss is a pure function of four per-example sequence log-probabilities (summed over response
tokens, see docs/conventions.md), so the same code serves the exact bandit world of notebook 03 and the
GPT-2 policy of notebook 08.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dpo_teach.logps import build_batch, gradient_step, model_sequence_logps, shuffled_batches

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
    _check_logps(named)


def _check_logps(named: dict[str, Tensor]) -> None:
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


@dataclass(frozen=True)
class DPOConfig:
    """One DPO run. CPU-sized defaults (the "tiny" preset); presets replace fields."""

    beta: float = 0.1  # strength of the pull towards the reference model (the paper's beta)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO), "hinge" (RSO's hinge) or "ipo"
    label_smoothing: float = 0.0  # eps of conservative DPO (sigmoid loss only)
    average_logps: bool = False  # mean instead of sum of token log-probs (IPO-style); sum is the paper's
    num_steps: int = 60  # optimizer steps (60 x 32 pairs: each pair of the tiny preset at most once)
    batch_size: int = 32  # preference pairs per step (2 x batch_size sequences in one forward pass)
    lr: float = 1e-4  # peak learning rate of AdamW (linear warm-up, then constant, as in the paper)
    warmup_steps: int = 10  # linear warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 30  # steps between evaluations on the held-out pairs (0: never)
    seed: int = 0  # seeds the order of the pairs


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


def _records(pairs) -> list[dict]:
    if hasattr(pairs, "to_list"):  # a datasets.Dataset
        return pairs.to_list()
    return list(pairs)


@torch.no_grad()
def precompute_ref_logps(ref_model, tokenizer, pairs, batch_size: int = 64, average: bool = False,
                         max_prompt_tokens: int | None = None, max_response_tokens: int | None = None
                         ) -> tuple[Tensor, Tensor]:
    """Reference log-probs of every pair, computed once: (ref_chosen_logps, ref_rejected_logps),
    each (N,). The reference model is then never run during training."""
    ref_model.eval()
    records = _records(pairs)
    chosen, rejected = [], []
    for start in range(0, len(records), batch_size):
        batch = concatenated_batch(records[start:start + batch_size], tokenizer, max_prompt_tokens,
                                   max_response_tokens, start=start)
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
    """Mean DPO loss of one concatenated batch (one forward pass) and its metrics."""
    device = next(policy.parameters()).device
    policy_chosen_logps, policy_rejected_logps = pair_logps(policy, batch, config.average_logps)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps.to(device), ref_rejected_logps.to(device),
        beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), metrics


@torch.no_grad()
def evaluate_pairs(policy, tokenizer, pairs, ref_logps: tuple[Tensor, Tensor], config: DPOConfig,
                   batch_size: int = 64, **lengths) -> dict[str, float]:
    """DPO metrics of `policy` on a whole set of pairs (e.g. the held-out pairs)."""
    was_training = policy.training
    policy.eval()
    records = _records(pairs)
    parts = []
    for start in range(0, len(records), batch_size):
        batch = concatenated_batch(records[start:start + batch_size], tokenizer, start=start, **lengths)
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
# The training loop: train_dpo, the variants (variants.py) and online DPO (online.py) share it.
# What differs between them is one batch's loss (batch_step) and what is measured (evaluate).


def make_optimizer(policy, config: DPOConfig):
    """AdamW with a linear warm-up over config.warmup_steps, then a constant learning rate (as in
    the DPO paper). Returns (optimizer, schedule)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    return optimizer, schedule


@torch.enable_grad()  # training needs gradients even when called inside no_grad (e.g. lazily)
def training_loop(policy, num_items: int, batch_size: int, config: DPOConfig, batch_step, evaluate=None,
                  optimizer_schedule=None, desc: str = "", progress: bool = True) -> dict[str, list]:
    """config.num_steps optimizer steps on seeded batches of item indices (logps.shuffled_batches).

    batch_step(indices) -> (loss, metrics, sequences, tokens): the mean loss of the batch (with its
    graph), its metrics, and how many sequences and tokens the policy read. evaluate() -> dict of
    numbers, recorded under their own names with "eval_step" before training, every
    config.eval_every steps and after the last step. `optimizer_schedule` = (optimizer, schedule)
    carries them over from an earlier call (online rounds); by default a fresh make_optimizer.

    Returns the history (dict of lists): "step", "seconds" (training time, evaluations excluded),
    cumulative "sequences" and "tokens", each key of the batch metrics, and the evaluations.
    """
    optimizer, schedule = optimizer_schedule or make_optimizer(policy, config)
    history: dict[str, list] = {"step": [], "seconds": [], "sequences": [], "tokens": []}

    def record_eval(step: int) -> float:
        """Record evaluate()'s numbers at `step` (nothing if it has none); return the seconds it took."""
        start = time.perf_counter()
        policy.eval()
        results = evaluate()
        if results:
            history.setdefault("eval_step", []).append(step)
            for key, value in results.items():
                history.setdefault(key, []).append(value)
        policy.train()
        return time.perf_counter() - start

    evaluating = evaluate is not None and config.eval_every
    if evaluating:  # the starting point
        record_eval(0)
    batches = shuffled_batches(num_items, batch_size, config.seed)
    sequences, tokens, eval_seconds, start = 0, 0, 0.0, time.perf_counter()
    policy.train()
    for step, index in zip(tqdm(range(config.num_steps), desc=desc, disable=not progress), batches):
        loss, metrics, batch_sequences, batch_tokens = batch_step(index)
        gradient_step(policy, optimizer, loss, config.max_grad_norm)
        schedule.step()
        sequences, tokens = sequences + batch_sequences, tokens + batch_tokens
        history["step"].append(step)
        history["seconds"].append(time.perf_counter() - start - eval_seconds)  # evaluations excluded
        history["sequences"].append(sequences)
        history["tokens"].append(tokens)
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        if evaluating and ((step + 1) % config.eval_every == 0 or step == config.num_steps - 1):
            eval_seconds += record_eval(step + 1)
    policy.eval()
    return history


def dpo_batch_step(policy, tokenizer, records: list[dict], ref_logps: tuple[Tensor, Tensor], config: DPOConfig,
                   **lengths):
    """training_loop's batch_step for DPO on `records` with their precomputed reference log-probs:
    one concatenated batch of the chosen and rejected responses, one forward pass, dpo_batch_loss."""
    def batch_step(index: list[int]):
        batch = concatenated_batch([records[i] for i in index], tokenizer, **lengths)
        loss, metrics = dpo_batch_loss(policy, batch, ref_logps[0][index], ref_logps[1][index], config)
        return loss, metrics, 2 * len(index), int(batch["attention_mask"].sum())

    return batch_step


def eval_fn_numbers(policy, eval_fn) -> dict[str, float]:
    """The numbers of eval_fn(policy) (other values, e.g. sample texts, are dropped; a single number
    is named "value"), computed in a forked random stream: sampling inside eval_fn does not change
    the random numbers training draws afterwards."""
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        results = eval_fn(policy)
    if not isinstance(results, dict):
        results = {"value": results}
    return {key: value for key, value in results.items() if isinstance(value, (int, float))}


def eval_callbacks(policy, tokenizer, probes: dict[str, list[dict]] | None, eval_fn, **lengths) -> dict:
    """What every trainer records at its evaluation points besides its held-out metrics:
    eval_fn(policy)'s numbers under "eval/<key>" (see eval_fn_numbers) and the mean sequence
    log-prob of each probe set under "probe/<name>" (see probe_logps)."""
    results = {}
    if eval_fn is not None:
        results.update({f"eval/{key}": value for key, value in eval_fn_numbers(policy, eval_fn).items()})
    for name, records in (probes or {}).items():
        results[f"probe/{name}"] = probe_logps(policy, tokenizer, records, **lengths).mean().item()
    return results


def make_evaluate(policy, tokenizer, held_out, probes: dict[str, list[dict]] | None, eval_fn, **lengths):
    """training_loop's evaluate: held_out()'s metrics (on the held-out pairs) under "eval/<key>",
    then eval_callbacks. None when there is nothing to measure (no held_out, probes or eval_fn)."""
    if held_out is None and not probes and eval_fn is None:
        return None

    def evaluate() -> dict[str, float]:
        results = {f"eval/{key}": value for key, value in held_out().items()} if held_out else {}
        return {**results, **eval_callbacks(policy, tokenizer, probes, eval_fn, **lengths)}

    return evaluate


def train_dpo(policy, tokenizer, train_pairs, config: DPOConfig = DPOConfig(), ref_model=None,
              ref_logps: tuple[Tensor, Tensor] | None = None, eval_pairs=None,
              eval_ref_logps: tuple[Tensor, Tensor] | None = None, max_prompt_tokens: int | None = None,
              max_response_tokens: int | None = None, progress: bool = True,
              eval_fn=None, probes: dict[str, list[dict]] | None = None) -> dict[str, list]:
    """Train `policy` in place with DPO on preference pairs; return the history (dict of lists).

    Reference log-probs come from `ref_logps` (precomputed) or are computed once here from
    `ref_model`; either way the reference model is not run during training. History keys: "step",
    TRL's metric names ("loss", "rewards/chosen", ..., "logps/rejected") for each training batch,
    the same names prefixed "eval/" before training and every `eval_every` steps (with "eval_step"), and the cost
    counters "seconds" (training only, evaluations excluded), "sequences" and "tokens" (what the
    policy read). eval_fn(policy) -> dict of numbers (e.g. oracle reward and KL of fresh samples)
    is called at the same points as the held-out evaluation (before training and every
    `eval_every` steps), in a forked random stream; its numbers go under "eval/<key>". probes maps
    a name to {"prompt", "response"} records: at the same points, the mean of their probe_logps
    under the policy goes under "probe/<name>" (it changes nothing in training).
    """
    lengths = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    records = _records(train_pairs)
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

    def held_out() -> dict[str, float]:
        return evaluate_pairs(policy, tokenizer, eval_pairs, eval_ref_logps, config, **lengths)

    batch_step = dpo_batch_step(policy, tokenizer, records, ref_logps, config, **lengths)
    evaluate = make_evaluate(policy, tokenizer, held_out if eval_pairs is not None else None, probes, eval_fn,
                             **lengths)
    return training_loop(policy, len(records), config.batch_size, config, batch_step, evaluate,
                         desc=f"DPO beta={config.beta}", progress=progress)


DPO_CONFIGS = {
    # CPU: under a minute on 2 cores; 1,920 of the tiny preset's ~2,400 training pairs, each once.
    "tiny": DPOConfig(),
    # GPU, GPT-2 (124M): the paper's batch of 64 pairs, its learning rate of 1e-6 and 150 warm-up steps.
    "gpt2": DPOConfig(num_steps=1000, batch_size=64, lr=1e-6, warmup_steps=150, eval_every=100),
}


def dpo_config(preset=None, **overrides) -> DPOConfig:
    """The DPO configuration of a preset (default: the current one), with fields replaced."""
    from dataclasses import replace

    from dpo_teach.presets import get_preset

    preset = preset or get_preset()
    return replace(DPO_CONFIGS[preset.name], **overrides)
