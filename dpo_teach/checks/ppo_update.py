"""Check of notebook 07's PPO update: ppo_minibatch_steps, PPO's update on one rollout batch.

The learner's function takes evaluate(index) -> (logps, values, entropy) of the current policy on
some rows, a model and an optimizer, the rollout's tensors and a PPOConfig, and takes
num_epochs x num_minibatches gradient steps. Its output alone cannot show that it is right (an
update that forgets optimizer.zero_grad() returns plausible statistics), so the check runs it and
the reference, dpo_teach.ppo.ppo_minibatch_steps, from the same small model (a linear layer that
gives the logits and the value of every position from fixed features, float64) with the same
plain SGD optimizer, the same generator and the same global random state, and compares:

1. the minibatches it asked `evaluate` for (how many, which rows, in which order), which names a
   missing epoch loop, unshuffled rows, or a shuffle that does not use the given generator;
2. the parameters after the update and the returned statistics. When they differ it replays the
   typical slips from the same start (no zero_grad, the value loss missing or not scaled by
   vf_coef, whitening over padding or per minibatch or not at all, the mask ignored, a detached
   policy loss, the entropy bonus's sign, no gradient clipping) and names the one that reproduces
   the learner's result, with a hint.

The rollout's tensors hold large garbage on the padding, so that anything that lets padding in
shows; `evaluate` trims the all-padding columns at the right, as the language model's does, so the
other tensors must be cut to its width. Two configurations are run, the second with whitening and
value clipping off and more epochs and minibatches, so that a function that ignores the config is
caught. Inputs changed in place are named.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo_teach import ppo
from dpo_teach.settings import PPOConfig

__all__ = ["check_ppo_minibatch_steps"]

NAME = "ppo_minibatch_steps"
STATS = ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "value_clip_fraction")
CONFIGS = (
    PPOConfig(num_epochs=2, num_minibatches=2, clip_range=0.2, value_clip=0.2, vf_coef=0.5, entropy_coef=0.05,
              max_grad_norm=0.5, whiten_advantages=True),
    PPOConfig(num_epochs=3, num_minibatches=4, clip_range=0.1, value_clip=None, vf_coef=0.3, entropy_coef=0.02,
              max_grad_norm=0.5, whiten_advantages=False),
)
LR = 0.5  # of the plain SGD optimizer handed to the update
RTOL, ATOL = 1e-6, 1e-9


class _TinyPolicy(nn.Module):
    """Logits over a vocabulary of V and a value at every position, from fixed features: (B, T, D) -> ..."""

    def __init__(self, generator: torch.Generator, features: int = 4, vocab: int = 5):
        super().__init__()
        self.layer = nn.Linear(features, vocab + 1, dtype=torch.float64)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(vocab + 1, features, generator=generator, dtype=torch.float64))
            self.layer.bias.copy_(0.5 * torch.randn(vocab + 1, generator=generator, dtype=torch.float64))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.layer(features)
        return out[..., :-1], out[..., -1]  # logits (B, T, V), values (B, T)


@dataclass
class _Problem:
    model: _TinyPolicy
    features: Tensor  # (B, T, D)
    tokens: Tensor  # (B, T) the sampled tokens
    inputs: dict[str, Tensor]  # old_logps, old_values, advantages, returns, mask: (B, T)


def _problem(seed: int = 0, batch: int = 8, width: int = 6) -> _Problem:
    generator = torch.Generator().manual_seed(seed)
    model = _TinyPolicy(generator)
    features = torch.randn(batch, width, 4, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, 5, (batch, width), generator=generator)
    lengths = torch.randint(1, width, (batch,), generator=generator)
    lengths[1] = width - 1  # no row is full: the last column is padding everywhere, so evaluate trims it
    mask = (torch.arange(width) < lengths[:, None]).long()
    with torch.no_grad():
        logits, values = model(features)
        logps = torch.gather(logits.log_softmax(-1), 2, tokens[..., None]).squeeze(-1)
    noise = lambda scale: scale * torch.randn(batch, width, generator=generator, dtype=torch.float64)  # noqa: E731
    garbage = lambda: 50 * torch.randn(batch, width, generator=generator, dtype=torch.float64)  # noqa: E731
    real = mask.bool()
    inputs = {
        "old_logps": torch.where(real, logps + noise(0.3), garbage()),  # many ratios beyond 1 +- clip_range
        "old_values": torch.where(real, values + noise(0.3), garbage()),
        "advantages": torch.where(real, 0.7 + noise(2.0), garbage()),  # mean and scale far from 0 and 1
        "returns": torch.where(real, values + noise(1.0), garbage()),
        "mask": mask,
    }
    return _Problem(model, features, tokens, inputs)


def _evaluator(problem: _Problem, model: _TinyPolicy, calls: list[list[int]]) -> Callable:
    """evaluate(index) on `model`, recording the rows it is asked for; trims the all-padding columns."""
    mask = problem.inputs["mask"]

    def evaluate(index):
        index = torch.as_tensor(index)
        calls.append(index.tolist())
        width = int(mask[index].sum(1).max())
        logits, values = model(problem.features[index, :width])
        logps = torch.gather(logits.log_softmax(-1), 2, problem.tokens[index, :width, None]).squeeze(-1)
        return logps, values, ppo.entropy_from_logits(logits)

    return evaluate


@dataclass
class _Run:
    stats: object
    parameters: Tensor
    calls: list[list[int]]


def _parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _run(function: Callable, config: PPOConfig, learner: bool) -> _Run:
    problem = _problem()
    model = copy.deepcopy(problem.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    calls: list[list[int]] = []
    given = {k: v.clone() for k, v in problem.inputs.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # so that a shuffle that ignores `generator` is reproducible too
        try:
            stats = function(_evaluator(problem, model, calls), model, optimizer, *given.values(), config,
                             torch.Generator().manual_seed(2))
        except NotImplementedError as error:
            if not learner:
                raise
            raise AssertionError(f"{NAME} is not written yet: replace `raise NotImplementedError()` by your code.") \
                from error
        except Exception as error:
            if not learner:
                raise
            hint = ""
            if isinstance(error, RuntimeError) and "size of tensor" in str(error):
                hint = (" evaluate(index) returns tensors of shape (b, width), with width <= T (the padding columns "
                        "at the right are trimmed): cut the minibatch's rows of the other tensors to that width, "
                        "x[index, :width].")
            if isinstance(error, RuntimeError) and "does not require grad" in str(error):
                hint = (" The loss has no gradient: it was computed under torch.no_grad() or from detached "
                        "tensors (.detach(), .item()).")
            raise AssertionError(f"{NAME} raised {type(error).__name__}: {error}.{hint}") from error
    if learner:
        for name, value in problem.inputs.items():
            if not torch.equal(value, given[name]):
                raise AssertionError(
                    f"{NAME} changed its input {name} in place: compute new tensors instead "
                    "(advantages = whiten(advantages, mask), not advantages -= ...).")
    return _Run(stats, _parameters(model), calls)


# ---- The reference with one slip at a time --------------------------------------------------------


def _slipped(slip: str) -> Callable:
    """ppo_minibatch_steps with one typical slip (the minibatches are the reference's)."""

    def update(evaluate, model, optimizer, old_logps, old_values, advantages, returns, mask, config, generator=None,
               scaler=None):
        full = torch.ones_like(mask)
        if config.whiten_advantages and slip == "whiten_padding":
            advantages = ppo.whiten(advantages, full)
        elif (config.whiten_advantages or slip == "whiten_always") and slip not in ("no_whitening",
                                                                                     "whiten_per_minibatch"):
            advantages = ppo.whiten(advantages, mask)
        stats = {key: [] for key in STATS}
        for _ in range(config.num_epochs):
            for index in torch.randperm(len(mask), generator=generator).chunk(config.num_minibatches):
                logps, values, entropy = evaluate(index)
                width = logps.shape[1]
                rows = (index, slice(0, width))
                m = full[rows] if slip == "mask_ignored" else mask[rows]
                a = advantages[rows]
                if config.whiten_advantages and slip == "whiten_per_minibatch":
                    a = ppo.whiten(a, m)
                pg, clip_fraction, approx_kl = ppo.policy_loss(logps, old_logps[rows], a, m, config.clip_range)
                vf, value_clip_fraction = ppo.value_loss(values, old_values[rows], returns[rows], m, config.value_clip)
                ent = ppo.masked_mean(entropy, m)
                vf_coef = {"no_value_loss": 0.0, "value_loss_unscaled": 1.0}.get(slip, config.vf_coef)
                entropy_coef = -config.entropy_coef if slip == "entropy_sign" else config.entropy_coef
                loss = (pg.detach() if slip == "policy_detached" else pg) + vf_coef * vf - entropy_coef * ent
                if slip != "no_zero_grad":
                    optimizer.zero_grad()
                loss.backward()
                if slip != "no_grad_clipping":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                for key, value in zip(stats, (pg, vf, ent, clip_fraction, approx_kl, value_clip_fraction), strict=True):
                    stats[key].append(float(value.detach()))
        return {key: sum(v) / len(v) for key, v in stats.items()}

    return update


SLIPS = [  # (slip, it looks like ..., hint)
    ("no_zero_grad", "the gradients are never cleared, so each step adds the gradients of all earlier steps",
     "Call optimizer.zero_grad() before loss.backward() in every step (training.gradient_step does it)."),
    ("no_value_loss", "the value loss is missing from the loss, so the value head never learns",
     "loss = policy_loss + config.vf_coef * value_loss - config.entropy_coef * entropy."),
    ("value_loss_unscaled", "the value loss is added without its weight config.vf_coef",
     "loss = policy_loss + config.vf_coef * value_loss - ...: with a shared trunk the weight keeps the value "
     "loss from dominating the policy's gradient."),
    ("whiten_padding", "the advantages are whitened over every position, padding included",
     "whiten(advantages, mask): the mean and the standard deviation are taken over the valid tokens only."),
    ("whiten_per_minibatch", "the advantages are whitened per minibatch instead of once over the whole batch",
     "Whiten once, before the epochs: every minibatch then sees the advantages on the same scale."),
    ("no_whitening", "the advantages are not whitened although config.whiten_advantages is True",
     "if config.whiten_advantages: advantages = whiten(advantages, mask), once, before the epochs."),
    ("whiten_always", "the advantages are whitened although config.whiten_advantages is False",
     "Whiten only when config.whiten_advantages is True."),
    ("mask_ignored", "the mask is ignored: the losses average over padding positions too",
     "Pass mask[index, :width] to policy_loss, value_loss and masked_mean."),
    ("policy_detached", "the policy loss carries no gradient (detached, or computed under torch.no_grad()): "
     "only the value loss and the entropy move the model",
     "Compute the policy loss from the log-probs that evaluate(index) returns, with their graph."),
    ("entropy_sign", "the entropy bonus has the wrong sign (it is added to the loss, which lowers the entropy)",
     "loss = ... - config.entropy_coef * entropy: minimising the loss should raise the entropy."),
    ("no_grad_clipping", "the gradient norm is not clipped to config.max_grad_norm",
     "Use training.gradient_step(model, optimizer, loss, config.max_grad_norm, scaler): it clears, "
     "backpropagates, clips and steps."),
]


# ---- Comparing -------------------------------------------------------------------------------------


def _stats_of(run: _Run) -> dict[str, float] | None:
    if not isinstance(run.stats, dict) or set(run.stats) != set(STATS):
        return None
    try:
        return {k: float(v) for k, v in run.stats.items()}
    except (TypeError, ValueError):
        return None


def _same(a: _Run, b: _Run) -> bool:
    stats_a, stats_b = _stats_of(a), _stats_of(b)
    return (a.calls == b.calls and torch.allclose(a.parameters, b.parameters, rtol=RTOL, atol=ATOL)
            and stats_a is not None and stats_b is not None
            and all(math.isclose(stats_a[k], stats_b[k], rel_tol=RTOL, abs_tol=ATOL) for k in STATS))


def _check_minibatches(got: _Run, expected: _Run, config: PPOConfig) -> None:
    steps = config.num_epochs * config.num_minibatches
    if got.calls == expected.calls:
        return
    where = f"(num_epochs = {config.num_epochs}, num_minibatches = {config.num_minibatches}, B = 8)"
    if len(got.calls) != steps:
        raise AssertionError(
            f"{NAME} is not right yet: it asked evaluate for {len(got.calls)} minibatches, but PPO takes "
            f"num_epochs x num_minibatches = {steps} steps {where}, one evaluate(index) each: loop over the "
            "epochs, and in each epoch over torch.randperm(B, generator=generator).chunk(config.num_minibatches).")
    if all(sorted(call) == call for call in got.calls) and sorted(sum(got.calls[:config.num_minibatches], [])) \
            == sum(got.calls[:config.num_minibatches], []):
        raise AssertionError(
            f"{NAME} is not right yet: its minibatches take the rows in order {got.calls[:2]}...: they are not "
            "shuffled. Draw a new order every epoch: torch.randperm(B, generator=generator).chunk(num_minibatches).")
    raise AssertionError(
        f"{NAME} is not right yet: its minibatches {got.calls[:2]}... are not those of "
        "torch.randperm(B, generator=generator).chunk(config.num_minibatches), one new permutation per epoch "
        f"(expected {expected.calls[:2]}...). Shuffle with the generator you are given, so that a seeded run "
        "is reproducible and does not disturb other random draws.")


def _explain(got: _Run, expected: _Run, config: PPOConfig) -> str:
    for slip, description, hint in SLIPS:
        try:
            replay = _run(_slipped(slip), config, learner=False)
        except RuntimeError:
            continue
        if _same(got, replay):
            return f"it looks like {description}. {hint}"
    stats = _stats_of(got)
    if stats is None:
        return (f"it returned {got.stats!r:.200}, not a dict of the mean statistics {', '.join(STATS)} "
                "(floats, each the mean over the gradient steps).")
    if torch.allclose(got.parameters, expected.parameters, rtol=RTOL, atol=ATOL):
        wrong = [k for k in STATS if not math.isclose(stats[k], _stats_of(expected)[k], rel_tol=RTOL, abs_tol=ATOL)]
        return (f"the parameters after the update are right, but the statistics {wrong} are not: got "
                f"{[round(stats[k], 6) for k in wrong]}, expected {[round(_stats_of(expected)[k], 6) for k in wrong]}. "
                "Return, for each, the mean over all num_epochs x num_minibatches steps of the value at each step.")
    if torch.equal(got.parameters, _parameters(_problem().model)):
        return ("the model's parameters did not change: each step must call loss.backward() and "
                "optimizer.step() (training.gradient_step does both, with zero_grad and clipping).")
    return ("the parameters after the update are not the reference's: check the loss, "
            "policy_loss + config.vf_coef * value_loss - config.entropy_coef * entropy, with whitened "
            "advantages when config.whiten_advantages, the masks cut to each minibatch's rows and width, "
            "and one training.gradient_step per minibatch.")


def check_ppo_minibatch_steps(ppo_minibatch_steps: Callable) -> None:
    """Check ppo_minibatch_steps(evaluate, model, optimizer, old_logps, old_values, advantages, returns,
    mask, config, generator=None, scaler=None) -> dict of mean statistics (module docstring)."""
    for number, config in enumerate(CONFIGS, start=1):
        expected = _run(ppo.ppo_minibatch_steps, config, learner=False)
        got = _run(ppo_minibatch_steps, config, learner=True)
        if _same(got, expected):
            continue
        _check_minibatches(got, expected, config)
        setting = (f"(configuration {number}: whiten_advantages={config.whiten_advantages}, "
                   f"value_clip={config.value_clip}, vf_coef={config.vf_coef}, entropy_coef={config.entropy_coef})")
        raise AssertionError(f"{NAME} is not right yet {setting}: {_explain(got, expected, config)}")
    print(f"✓ {NAME} is correct: from the same model, in {len(CONFIGS)} configurations, it takes the reference's "
          "gradient steps on the same minibatches, with the same statistics and the same parameters after the update.")
