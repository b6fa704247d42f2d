"""One training loop for every stage that learns from a fixed data set, and the history it records.

Pretraining, SFT, the reward model, DPO and its variants, and the rounds of online DPO differ only
in what one batch costs: each hands `train` a `batch_loss(batch) -> (loss, metrics, sequences,
tokens)`, and the loop does the rest, the same way for all of them:

    for step, batch in zip(range(config.num_steps), batches):
        set the learning rate to lr_at(step, config)      # linear warm-up, then cosine or constant
        loss, metrics, sequences, tokens = batch_loss(batch)
        gradient_step(model, optimizer, loss, config.max_grad_norm)   # zero, backward, clip, step
        record the step; every config.eval_every steps: record evaluate()

PPO keeps its own outer loop (sample a rollout, then several updates on it; dpo_teach.ppo) but
uses the same optimizer, gradient step and history format.

The history is a dict of lists, one vocabulary for every stage:
  "step"        optimizer steps taken before this one (from 0)
  "lr"          the learning rate of the step
  "seconds"     training time so far (evaluations excluded)
  "sequences"   sequences the trained model has read with a gradient so far (forward + backward)
  "tokens"      their real (not padding) tokens so far
  "train/<m>"   the batch's metric m (e.g. "train/loss", "train/rewards/margins")
  "eval/step"   steps taken at each evaluation (0 = before training; then every eval_every steps
                and after the last step)
A run continued over several calls (online DPO's rounds) numbers its steps on, from first_step;
"seconds", "sequences" and "tokens" count from the start of each call.
  "eval/<m>"    evaluate()'s number m at those points (e.g. "eval/perplexity", "eval/loss")

Precision. On a CPU everything runs in float32. On a CUDA GPU the forward passes of training, of
sampling and of the evaluations run during training (record_eval) run under autocast
(`autocast(device)`): bfloat16 on GPUs that have it in hardware (compute capability 8 and later:
A100, L4, H100), else float16 with a gradient scaler (`GradScaler`) against underflow, e.g. on a T4.
The weights and the optimizer's state stay float32, the heads (LM, value, reward) run in float32, so
every log-probability, loss and KL is float32. Evaluations called outside training (e.g. KL and
perplexity in a notebook cell) run in float32. DPO_TEACH_PRECISION ("float32", "bfloat16",
"float16") overrides the default.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dpo_teach.utils import TOKEN_COUNTS

__all__ = ["PRECISIONS", "PRECISION_ENV", "SCHEDULES", "TrainConfig", "append", "autocast", "default_precision", "grad_scaler", "eval_fn_numbers", "gradient_step", "lr_at", "make_optimizer", "record_eval", "train"]

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("float32", "bfloat16", "float16")
PRECISION_ENV = "DPO_TEACH_PRECISION"


def default_precision(device: str | torch.device) -> str:
    """The arithmetic of forward passes on `device`: $DPO_TEACH_PRECISION if set; else on CUDA
    "bfloat16" where the GPU has it in hardware (Ampere and later) and "float16" where not (a T4,
    which would only emulate bfloat16); else "float32" (CPU, mps)."""
    chosen = os.environ.get(PRECISION_ENV)
    if chosen:
        if chosen not in PRECISIONS:
            raise ValueError(f"{PRECISION_ENV}={chosen!r}: choose one of {PRECISIONS}")
        return chosen
    if torch.device(device).type == "cuda":  # bfloat16 in hardware from compute capability 8 (Ampere) on
        return "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
    return "float32"


def autocast(device: str | torch.device, precision: str | None = None):
    """A context in which forward passes on `device` run in `precision` (default:
    default_precision(device)); float32 is no autocast at all."""
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {PRECISIONS}")
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, precision))


def grad_scaler(device: str | torch.device, precision: str | None = None) -> torch.amp.GradScaler | None:
    """A gradient scaler for float16 (its small range lets small gradients underflow to zero); None
    for float32 and bfloat16, which need none."""
    if (precision or default_precision(device)) != "float16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


@dataclass(frozen=True)
class TrainConfig:
    """What every training run needs; the stage configurations (dpo_teach.settings) extend it."""

    num_steps: int = 100  # optimizer steps
    batch_size: int = 32  # examples per step
    lr: float = 1e-4  # peak learning rate of AdamW
    warmup_steps: int = 10  # linear warm-up from lr / warmup_steps to lr
    schedule: str = "cosine"  # after warm-up: "cosine" decay to 10% of lr, or "constant"
    weight_decay: float = 0.0  # AdamW weight decay, on matrices only (not biases, not layer norms)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decay rates
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 50  # steps between evaluations (0: never)
    seed: int = 0  # seeds the order of the data
    precision: str | None = None  # "float32", "bfloat16", "float16"; None: default_precision(device)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: choose one of {SCHEDULES}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: choose one of {PRECISIONS}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (from 0): linear warm-up to config.lr over
    config.warmup_steps, then constant, or a cosine decay that reaches 10% of config.lr at step
    config.num_steps (one past the last step)."""
    if config.schedule == "constant":
        return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.num_steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only (not biases, layer norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=config.adam_betas)


def gradient_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                  max_grad_norm: float, scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimizer step on `loss`: clear old gradients, backpropagate, clip the gradient norm of
    `model`'s parameters to max_grad_norm, step. Every training loop of the course uses it.
    With a float16 `scaler` the loss is scaled up before backward and the gradients unscaled before
    clipping; a step whose gradients overflowed is skipped and the scale lowered."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def append(history: dict[str, list], values: dict, prefix: str = "") -> None:
    """Append each value to history[prefix + name] (new names start a list)."""
    for name, value in values.items():
        history.setdefault(prefix + name, []).append(value)


def record_eval(history: dict[str, list], model: torch.nn.Module, evaluate: Callable[[], dict], step: int) -> float:
    """Run evaluate() with the model in eval mode (under the device's default autocast), record its numbers under "eval/<name>" with
    "eval/step" = step (recorded even when evaluate() gives no number, e.g. an eval_fn that keeps
    its results itself), and give the seconds it took (so that training time can leave it out)."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    with autocast(next(model.parameters()).device):
        results = evaluate() or {}
    model.train(was_training)
    append(history, {"step": step, **results}, prefix="eval/")
    return time.perf_counter() - start


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


@torch.enable_grad()  # training needs gradients even when called inside no_grad (e.g. lazily)
def train(model: torch.nn.Module, batch_loss: Callable, batches: Iterable, config: TrainConfig,
          evaluate: Callable[[], dict] | None = None, optimizer: torch.optim.Optimizer | None = None,
          first_step: int = 0, desc: str = "", progress: bool = True) -> dict[str, list]:
    """Train `model` in place for config.num_steps steps; return the history (module docstring).

    batches: what batch_loss reads, one item per step (e.g. the endless index lists of
    utils.shuffled_batches; a finite one that runs out ends the run early, after its last item). batch_loss(batch) -> (mean loss with its graph, dict of numbers,
    sequences read, tokens read). evaluate() -> dict of numbers, called before training, every
    config.eval_every steps and after the last step (in eval mode, time not counted). optimizer:
    carried over from an earlier call (online DPO's rounds), with `first_step` the steps already
    taken (the schedule continues); by default a fresh make_optimizer(model, config). batch_loss
    runs under autocast(device, config.precision) (float32 on a CPU: no autocast).
    """
    optimizer = optimizer or make_optimizer(model, config)
    device = next(model.parameters()).device
    scaler = grad_scaler(device, config.precision)
    history: dict[str, list] = {"step": [], "lr": [], "seconds": [], "sequences": [], "tokens": []}
    evaluating = evaluate is not None and config.eval_every > 0
    if evaluating:
        record_eval(history, model, evaluate, first_step)
    sequences = tokens = 0
    eval_seconds, start = 0.0, time.perf_counter()
    model.train()
    bar = tqdm(range(config.num_steps), desc=desc, disable=not progress)
    for step, batch in zip(bar, batches):
        lr = lr_at(first_step + step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, config.precision):
            loss, metrics, batch_sequences, batch_tokens = batch_loss(batch)
        gradient_step(model, optimizer, loss, config.max_grad_norm, scaler)
        sequences, tokens = sequences + batch_sequences, tokens + batch_tokens
        TOKEN_COUNTS["trained"] += batch_tokens
        append(history, {"step": first_step + step, "lr": lr, "seconds": time.perf_counter() - start - eval_seconds,
                         "sequences": sequences, "tokens": tokens})
        append(history, metrics, prefix="train/")
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if evaluating and ((step + 1) % config.eval_every == 0 or step + 1 == config.num_steps):
            eval_seconds += record_eval(history, model, evaluate, first_step + step + 1)
    model.eval()
    return history
