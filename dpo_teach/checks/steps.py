"""Checks of the training steps the learner writes: SFT (notebook 05), the reward model's
Bradley-Terry step (06) and DPO (08), and of notebook 08's DPO batch loss.

A training step is a function `step(model, optimizer, batch, *rest)` that computes the mean loss of
one batch, clears the old gradients, backpropagates, steps the optimizer and returns the loss (a
number; notebook 08's DPO step returns its dict of metrics, whose "loss" is the number). A step
cannot be checked by its output alone: a step that forgets `loss.backward()` still returns the
right loss. So `check_training_step` runs the learner's step and the reference step from the same
model, with the same plain SGD optimizer, for a few steps on different batches, and compares the
returned losses AND the parameters after every step. When they differ it replays the typical
slips of a training step (zero_grad missing, the optimizer stepping before backward, a sum where
the mean belongs, ...) from the same start and names the one that reproduces the learner's run.
The batches must come out of the step unchanged, and a loss computed without gradients (under
torch.no_grad(), or from detached tensors) is named as such.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dpo_teach.checks.engine import Mistake, lm_batch, tiny_gpt2

__all__ = ["StepCase", "check_dpo_batch_loss", "check_dpo_step", "check_reward_model_step",
           "check_sft_step", "check_training_step", "reference_step"]

LossFunction = Callable[..., Tensor]  # loss(model, batch, *rest) -> the batch's mean loss (0-dim, with its graph)


@dataclass(frozen=True)
class StepCase:
    """What check_training_step needs to know about one step exercise."""

    name: str  # the step function's name, as the learner wrote it
    loss: LossFunction  # the reference's mean loss of one batch
    make_calls: Callable[[torch.Generator], tuple[torch.nn.Module, list[tuple]]]  # model, [(batch, *rest) per step]
    wrong_losses: Sequence[Mistake] = ()  # typical wrong losses (Mistake.function has the signature of `loss`)
    returns: str = "the loss, loss.item()"  # what the step should return, for the message
    argument_names: Sequence[str] = ("batch",)  # of the arguments after (model, optimizer), for messages
    lr: float = 0.1  # of the plain SGD optimizer the check hands the step
    rtol: float = 1e-4
    atol: float = 1e-6
    seed: int = 0


def reference_step(loss: LossFunction) -> Callable:
    """The training step that `loss` defines: mean loss, zero_grad, backward, optimizer step."""
    def step(model, optimizer, *args):
        value = loss(model, *args)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        return value.item()
    return step


def _step_without_zero_grad(loss: LossFunction) -> Callable:
    def step(model, optimizer, *args):
        value = loss(model, *args)
        value.backward()
        optimizer.step()
        return value.item()
    return step


def _slips(case: StepCase) -> list[tuple[str, str, Callable]]:
    """(description, hint, step) of the typical wrong steps, the case's wrong losses first."""
    slips = [(m.description, m.hint, reference_step(m.function)) for m in case.wrong_losses]
    slips.append(("the gradients of earlier steps are never cleared, so they add up from step to step",
                  "Call optimizer.zero_grad() before loss.backward().", _step_without_zero_grad(case.loss)))
    return slips


def _tensors(value, prefix: str) -> dict[str, Tensor]:
    """Every tensor in `value` (a tensor, or a dict/tuple/list of them), by a readable name."""
    if isinstance(value, Tensor):
        return {prefix: value}
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(_tensors(item, f"{prefix}[{key!r}]" if prefix else str(key)))
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            found.update(_tensors(item, f"{prefix}[{i}]"))
    return found


def _number(case: StepCase, value, step: int) -> float:
    """The loss a step returned, as a float; an AssertionError that says what is wrong otherwise."""
    if isinstance(value, dict):
        if "loss" not in value:
            raise AssertionError(f"{case.name} returned a dict without a 'loss' entry at step {step}: "
                                 f"return {case.returns}.")
        value = value["loss"]
    if isinstance(value, Tensor):
        raise AssertionError(f"{case.name} returned a tensor at step {step}: return a plain number, loss.item() "
                             "(a tensor would keep the step's whole graph alive).")
    if isinstance(value, (int, float)):
        return float(value)
    raise AssertionError(f"{case.name} returned {type(value).__name__} at step {step}: return {case.returns}.")


def _parameters(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _run(case: StepCase, step_function: Callable, learner: bool = True):
    """(losses, parameters after each step) of `step_function` from the case's start; checks, for
    the learner, that no input is changed in place and that the loss had a gradient."""
    generator = torch.Generator().manual_seed(case.seed)
    start, calls = case.make_calls(generator)
    model = copy.deepcopy(start).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=case.lr)
    losses, parameters = [], [_parameters(model)]
    for number, arguments in enumerate(calls, start=1):
        named = dict(zip(case.argument_names, arguments, strict=True))
        pristine = {name: t.clone() for name, t in _tensors(named, "").items()}
        try:
            returned = step_function(model, optimizer, *arguments)
        except NotImplementedError as error:
            if not learner:
                raise
            raise AssertionError(
                f"{case.name} is not written yet: replace `raise NotImplementedError()` by your code.") from error
        except RuntimeError as error:
            if not learner:
                raise
            if "does not require grad" in str(error):
                raise AssertionError(
                    f"{case.name}: loss.backward() found no gradient to follow: the loss was computed under "
                    "torch.no_grad(), or from detached tensors (.detach(), .item(), .numpy()). Compute it "
                    "with gradients, so that the step can train the model.") from error
            if "modified by an inplace operation" in str(error):
                raise AssertionError(
                    f"{case.name}: loss.backward() failed at step {number} because the parameters changed after "
                    "the loss was computed: optimizer.step() must come after loss.backward(). The order is: "
                    "loss, optimizer.zero_grad(), loss.backward(), optimizer.step().") from error
            raise AssertionError(f"{case.name} raised RuntimeError at step {number}: {error}") from error
        except Exception as error:
            if not learner:
                raise
            raise AssertionError(f"{case.name} raised {type(error).__name__} at step {number}: {error}") from error
        for name, before in pristine.items():
            if not torch.equal(before, _tensors(named, "")[name]):
                raise AssertionError(f"{case.name} changed its input {name} in place at step {number}: "
                                     "leave the inputs as they are (compute new tensors instead).")
        losses.append(_number(case, returned, number) if learner else float(returned))
        parameters.append(_parameters(model))
    return losses, parameters


def _replay(case: StepCase, slip: Callable):
    """_run of a typical wrong step; None when that wrong step cannot even run (nothing to compare)."""
    try:
        return _run(case, slip, learner=False)
    except RuntimeError:
        return None


def _same(a: tuple[list, list], b: tuple[list, list] | None, case: StepCase, upto: int) -> bool:
    if b is None:
        return False
    (losses_a, params_a), (losses_b, params_b) = a, b
    return all(math.isclose(x, y, rel_tol=case.rtol, abs_tol=case.atol) for x, y in zip(losses_a[:upto], losses_b[:upto])) \
        and all(torch.allclose(x, y, rtol=case.rtol, atol=case.atol) for x, y in zip(params_a[:upto + 1], params_b[:upto + 1]))


def check_training_step(step: Callable, case: StepCase) -> None:
    """Check the learner's training step against the reference step of `case` (module docstring)."""
    expected = _run(case, reference_step(case.loss), learner=False)
    got = _run(case, step)
    losses, parameters = got
    for number in range(1, len(losses) + 1):
        if _same(got, expected, case, number):
            continue
        for description, hint, slip in _slips(case):
            if _same(got, _replay(case, slip), case, number):
                raise AssertionError(f"{case.name} is not right yet: it looks like {description}. {hint}".strip())
        if torch.equal(parameters[number], parameters[number - 1]):
            raise AssertionError(
                f"{case.name} is not right yet: the model's parameters did not change at step {number}. A step "
                "must call loss.backward() (to compute the gradients) and then optimizer.step() (to apply them), "
                "with optimizer.zero_grad() before backward, not between backward and step.")
        want, have = expected[0][number - 1], losses[number - 1]
        if not math.isclose(have, want, rel_tol=case.rtol, abs_tol=case.atol):
            raise AssertionError(f"{case.name} is not right yet: at step {number} it returned the loss {have:.6g}, "
                                 f"but the batch's mean loss is {want:.6g}.")
        raise AssertionError(
            f"{case.name} is not right yet: it returned the right loss at step {number}, but the parameters "
            "after the step are not the reference's: the gradient it applied is not that of the loss it "
            "returned (is the loss that goes backward the batch's mean?).")
    print(f"✓ {case.name} is correct: from the same model it takes the reference's {len(losses)} steps "
          "(the same losses and the same parameters after every step).")


# ---- The three steps of the course --------------------------------------------------------------


def _sft_calls(generator: torch.Generator):
    return tiny_gpt2(generator), [(lm_batch(generator, 4),) for _ in range(3)]


def _sft_mean(model, batch, reduce=torch.mean, average=True):
    from dpo_teach.logps import sequence_logps

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return reduce(-sequence_logps(logits, batch["labels"], batch["loss_mask"], average=average))


def check_sft_step(sft_step: Callable) -> None:
    """Check sft_step(model, optimizer, batch) -> the batch's mean SFT loss as a number, after one
    optimizer step on it (notebook 05)."""
    check_training_step(sft_step, StepCase(
        name="sft_step", loss=_sft_mean, make_calls=_sft_calls,
        wrong_losses=[
            Mistake("the examples' losses are summed, not averaged, before backward",
                    lambda model, batch: _sft_mean(model, batch, reduce=torch.sum),
                    "Take the mean over the batch: sft_loss(...).mean()."),
            Mistake("each example's loss is the sum of its tokens' negative log-probs, not their mean",
                    lambda model, batch: _sft_mean(model, batch, average=False),
                    "sft_loss averages over each example's own tokens (sequence_logps(..., average=True))."),
        ]))


def _reward_calls(generator: torch.Generator):
    from dpo_teach.reward import RewardModel

    config = tiny_gpt2(generator).config
    with torch.random.fork_rng():  # the trunk's weights from the check's own seed
        torch.manual_seed(int(torch.randint(0, 10_000, (), generator=generator)))
        model = RewardModel(config)
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=generator)  # a head that is not zero yet
    calls = []
    for _ in range(3):
        batch = lm_batch(generator, 6)  # 3 pairs: rows 0-2 chosen, rows 3-5 rejected
        calls.append(({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},))
    return model, calls


def _bt_mean(model, batch, swap=False, reduce=torch.mean):
    from dpo_teach.reward import bradley_terry_loss

    chosen, rejected = model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    return reduce(bradley_terry_loss(rejected, chosen) if swap else bradley_terry_loss(chosen, rejected))


def check_reward_model_step(reward_model_step: Callable) -> None:
    """Check reward_model_step(reward_model, optimizer, batch) -> the batch's mean Bradley-Terry loss
    as a number, after one optimizer step on it; batch: the chosen rows, then the rejected rows
    (notebook 06)."""
    check_training_step(reward_model_step, StepCase(
        name="reward_model_step", loss=_bt_mean, make_calls=_reward_calls,
        wrong_losses=[
            Mistake("chosen and rejected are swapped", lambda model, batch: _bt_mean(model, batch, swap=True),
                    "The first half of the rows are the chosen responses: rewards.chunk(2) gives "
                    "(chosen, rejected)."),
            Mistake("the pairs' losses are summed, not averaged, before backward",
                    lambda model, batch: _bt_mean(model, batch, reduce=torch.sum),
                    "Take the mean over the pairs: bradley_terry_loss(...).mean()."),
        ]))


def _dpo_calls(generator: torch.Generator, config=None):
    from dpo_teach.settings import DPOConfig

    model = tiny_gpt2(generator)
    config = config or DPOConfig(beta=0.5)
    calls = []
    for _ in range(3):
        batch = lm_batch(generator, 6)  # 3 pairs: rows 0-2 chosen, rows 3-5 rejected
        with torch.no_grad():  # a reference that is not the starting model, so the loss is not log 2
            logps = _sequence_sums(model, batch) + torch.randn(6, generator=generator)
        calls.append((batch, logps[:3].clone(), logps[3:].clone(), config))
    return model, calls


def _sequence_sums(model, batch, average=False):
    from dpo_teach.logps import model_sequence_logps

    return model_sequence_logps(model, batch, average=average)


def _dpo_mean(policy, batch, ref_chosen_logps, ref_rejected_logps, config, beta=None, average=None,
              swap=False, reduce=torch.mean):
    from dpo_teach.dpo import dpo_loss

    logps = _sequence_sums(policy, batch, config.average_logps if average is None else average)
    chosen, rejected = logps.chunk(2)
    if swap:
        chosen, rejected = rejected, chosen
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                            beta=config.beta if beta is None else beta, loss_type=config.loss_type,
                            label_smoothing=config.label_smoothing)
    return reduce(losses)


_DPO_SLIPS = [
    Mistake("beta is not passed to dpo_loss (its default, 0.1, is used instead of config.beta)",
            lambda p, b, rc, rr, c: _dpo_mean(p, b, rc, rr, c, beta=0.1), "Pass beta=config.beta to dpo_loss."),
    Mistake("beta is missing (the loss uses beta = 1)",
            lambda p, b, rc, rr, c: _dpo_mean(p, b, rc, rr, c, beta=1.0), "Pass beta=config.beta to dpo_loss."),
    Mistake("the token log-probs are averaged, not summed",
            lambda p, b, rc, rr, c: _dpo_mean(p, b, rc, rr, c, average=True),
            "DPO sums the response tokens' log-probs (average=config.average_logps, which is False)."),
    Mistake("chosen and rejected are swapped", lambda p, b, rc, rr, c: _dpo_mean(p, b, rc, rr, c, swap=True),
            "The first half of the rows are the chosen responses: logps.chunk(2) gives (chosen, rejected)."),
    Mistake("the pairs' losses are summed, not averaged",
            lambda p, b, rc, rr, c: _dpo_mean(p, b, rc, rr, c, reduce=torch.sum),
            "Train on the mean over the pairs: losses.mean()."),
]


def check_dpo_step(dpo_step: Callable) -> None:
    """Check dpo_step(policy, optimizer, batch, ref_chosen_logps, ref_rejected_logps, config) ->
    the metrics of dpo_batch_loss, after one optimizer step on the batch's mean DPO loss (notebook 08)."""
    check_training_step(dpo_step, StepCase(
        name="dpo_step", loss=_dpo_mean, make_calls=_dpo_calls, wrong_losses=_DPO_SLIPS,
        returns="the metrics of dpo_batch_loss (a dict with 'loss')",
        argument_names=("batch", "ref_chosen_logps", "ref_rejected_logps", "config")))


def check_dpo_batch_loss(dpo_batch_loss: Callable) -> None:
    """Check dpo_batch_loss(policy, batch, ref_chosen_logps, ref_rejected_logps, config) -> (the mean
    DPO loss with its graph, TRL's metrics) on a concatenated batch (notebook 08): the loss, its
    gradient with respect to the policy's parameters, and every metric."""
    from dpo_teach.dpo import dpo_batch_loss as reference
    from dpo_teach.settings import DPOConfig

    generator = torch.Generator().manual_seed(1)
    configs = [DPOConfig(beta=0.1), DPOConfig(beta=0.5), DPOConfig(beta=2.0), DPOConfig(beta=0.5, label_smoothing=0.2),
               DPOConfig(beta=0.5, loss_type="ipo", average_logps=True)]
    for config in configs:
        model, calls = _dpo_calls(generator, config)
        batch, ref_chosen, ref_rejected, config = calls[0]
        expected_loss, expected_metrics = reference(model, batch, ref_chosen, ref_rejected, config)
        expected_grads = torch.autograd.grad(expected_loss, list(model.parameters()))
        expected_loss = float(expected_loss.detach())
        named = {"batch": batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        pristine = {name: t.clone() for name, t in _tensors(named, "").items()}
        try:
            result = dpo_batch_loss(model, batch, ref_chosen, ref_rejected, config)
        except NotImplementedError as error:
            raise AssertionError("dpo_batch_loss is not written yet: replace `raise NotImplementedError()` "
                                 "by your code.") from error
        except Exception as error:
            raise AssertionError(f"dpo_batch_loss raised {type(error).__name__}: {error}") from error
        for name, before in pristine.items():
            if not torch.equal(before, _tensors(named, "")[name]):
                raise AssertionError(f"dpo_batch_loss changed its input {name} in place: compute new tensors instead.")
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
            raise AssertionError("dpo_batch_loss should return two things: (the mean loss, the dict of metrics).")
        loss, metrics = result
        if not (isinstance(loss, Tensor) and loss.ndim == 0):
            raise AssertionError("dpo_batch_loss's loss should be a 0-dimensional tensor: losses.mean().")
        if not math.isclose(float(loss.detach()), expected_loss, rel_tol=1e-5, abs_tol=1e-6):
            for mistake in _DPO_SLIPS:
                wrong = mistake.function(model, batch, ref_chosen, ref_rejected, config).detach()
                if math.isclose(float(loss.detach()), float(wrong), rel_tol=1e-5, abs_tol=1e-6):
                    raise AssertionError(f"dpo_batch_loss is not right yet: it looks like {mistake.description}. "
                                         f"{mistake.hint}")
            for field, value in (("label_smoothing", config.label_smoothing), ("loss_type", config.loss_type),
                                 ("average_logps", config.average_logps)):
                if value != getattr(DPOConfig(), field):
                    raise AssertionError(f"dpo_batch_loss is not right yet: with {field}={value!r} in the config the "
                                         f"loss is {float(loss.detach()):.6g}, expected {expected_loss:.6g}. Pass "
                                         "every setting of the config on: average=config.average_logps to "
                                         "model_sequence_logps, beta, loss_type and label_smoothing to dpo_loss.")
            raise AssertionError(f"dpo_batch_loss is not right yet (beta = {config.beta}): the loss is "
                                 f"{float(loss.detach()):.6g}, expected {expected_loss:.6g}.")
        if not loss.requires_grad:
            raise AssertionError("dpo_batch_loss: the loss has no gradient (torch.no_grad(), .detach() or .item() "
                                 "on the way): the training step could not train the policy with it.")
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        if any(g is None or not torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(grads, expected_grads)):
            raise AssertionError("dpo_batch_loss: the loss has the right value but not the right gradient: only the "
                                 "policy's log-probs may carry gradients (the reference log-probs are constants).")
        missing = sorted(set(expected_metrics) - set(metrics))
        if missing:
            raise AssertionError(f"dpo_batch_loss's metrics lack {missing}: use dpo_metrics(...).")
        for key, value in expected_metrics.items():  # the loss above told beta's slips apart from the rest
            if not (isinstance(metrics[key], float) and math.isclose(metrics[key], value, rel_tol=1e-5, abs_tol=1e-6)):
                raise AssertionError(f"dpo_batch_loss's metric {key!r} is {metrics[key]!r}, expected {value:.6g} "
                                     "(plain Python numbers: dpo_metrics(...) makes them).")
    print("✓ dpo_batch_loss is correct: the loss, its gradient and every metric match the reference at "
          "beta = 0.1, 0.5 and 2, with label smoothing, and for IPO on mean log-probs.")
