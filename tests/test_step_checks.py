"""The checks of the training steps the learner writes (dpo_teach/checks/steps.py): right steps pass,
and each typical slip of a training step fails with a message that names it."""

import functools
import re

import pytest
import torch

from dpo_teach import checks, dpo
from dpo_teach.logps import model_sequence_logps, sequence_logps
from dpo_teach.reward import bradley_terry_loss


def _sft_loss(model, batch, reduce=torch.mean):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return reduce(-sequence_logps(logits, batch["labels"], batch["loss_mask"], average=True))


RIGHT_ORDER = ("zero_grad", "backward", "step")


def make_step(loss_of, order=RIGHT_ORDER, return_tensor=False):
    """A training step: the loss from loss_of(model, *args), then optimizer.zero_grad(), loss.backward()
    and optimizer.step() in `order` (leave one out, or reorder them, to break the step); returns
    loss.item(), or the loss tensor itself with return_tensor. A loss_of that returns (loss, metrics),
    as dpo_batch_loss does, makes a step that returns the metrics."""
    def step(model, optimizer, *args):
        loss = loss_of(model, *args)
        loss, metrics = loss if isinstance(loss, tuple) else (loss, None)
        actions = {"zero_grad": optimizer.zero_grad, "backward": loss.backward, "step": optimizer.step}
        for action in order:
            actions[action]()
        if metrics is not None:
            return metrics
        return loss if return_tensor else loss.item()
    return step


def _sft_loss_without_grad(model, batch):
    with torch.no_grad():
        return _sft_loss(model, batch)


sft_step = make_step(_sft_loss)
sft_no_zero_grad = make_step(_sft_loss, order=("backward", "step"))
sft_no_grad = make_step(_sft_loss_without_grad)
sft_detached = make_step(lambda model, batch: _sft_loss(model, batch).detach().requires_grad_())
sft_no_step = make_step(_sft_loss, order=("zero_grad", "backward"))
sft_zero_grad_between = make_step(_sft_loss, order=("backward", "zero_grad", "step"))
sft_step_before_backward = make_step(_sft_loss, order=("zero_grad", "step", "backward"))
sft_summed = make_step(functools.partial(_sft_loss, reduce=torch.sum))
sft_returns_tensor = make_step(_sft_loss, return_tensor=True)


def sft_in_place(model, optimizer, batch):
    batch["input_ids"][:, 0] = 3
    return sft_step(model, optimizer, batch)


def sft_returns_nothing(model, optimizer, batch):
    sft_step(model, optimizer, batch)


def dpo_batch_loss_ignoring_config(policy, batch, ref_chosen_logps, ref_rejected_logps, config):
    chosen, rejected = model_sequence_logps(policy, batch).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                                            beta=config.beta)
    return losses.mean(), dpo.dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)


def _bt_loss(reward_model, batch, swap=False):
    chosen, rejected = reward_model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    return bradley_terry_loss(*((rejected, chosen) if swap else (chosen, rejected))).mean()


reward_model_step = make_step(_bt_loss)
reward_model_step_swapped = make_step(functools.partial(_bt_loss, swap=True))


def dpo_batch_loss_without_beta(policy, batch, ref_chosen_logps, ref_rejected_logps, config):
    chosen, rejected = model_sequence_logps(policy, batch).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps)
    return losses.mean(), dpo.dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)


def dpo_batch_loss_detached(policy, batch, ref_chosen_logps, ref_rejected_logps, config):
    with torch.no_grad():
        return dpo.dpo_batch_loss(policy, batch, ref_chosen_logps, ref_rejected_logps, config)


@pytest.mark.parametrize("check, function", [
    (checks.check_sft_step, sft_step),
    (checks.check_reward_model_step, reward_model_step),
    (checks.check_dpo_step, make_step(dpo.dpo_batch_loss)),
    (checks.check_dpo_batch_loss, dpo.dpo_batch_loss),
], ids=["sft", "reward", "dpo-step", "dpo-batch-loss"])
def test_right_steps_pass(check, function, capsys):
    check(function)
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("check, function, message", [
    (checks.check_sft_step, sft_no_zero_grad, "optimizer.zero_grad()"),
    (checks.check_sft_step, sft_no_grad, "torch.no_grad()"),
    (checks.check_sft_step, sft_detached, "parameters did not change"),
    (checks.check_sft_step, sft_no_step, "parameters did not change"),
    (checks.check_sft_step, sft_zero_grad_between, "not between backward and step"),
    (checks.check_sft_step, sft_step_before_backward, "then optimizer.step()"),
    (checks.check_sft_step, sft_in_place, "changed its input batch['input_ids'] in place"),
    (checks.check_sft_step, sft_summed, "summed, not averaged"),
    (checks.check_sft_step, sft_returns_nothing, "returned NoneType"),
    (checks.check_reward_model_step, reward_model_step_swapped, "swapped"),
    (checks.check_dpo_step, make_step(dpo_batch_loss_without_beta), "beta is not passed"),
    (checks.check_dpo_batch_loss, dpo_batch_loss_without_beta, "beta is not passed"),
    (checks.check_dpo_batch_loss, dpo_batch_loss_detached, "no gradient"),
    (checks.check_sft_step, sft_returns_tensor, "loss.item()"),
    (checks.check_dpo_batch_loss, dpo_batch_loss_ignoring_config, "label_smoothing=0.2"),
], ids=["no-zero-grad", "no-grad", "detached", "no-step", "zero-grad-between", "step-first", "in-place",
        "summed", "returns-none", "rm-swapped", "dpo-step-beta", "dpo-loss-beta", "dpo-loss-detached", "returns-tensor", "config-ignored"])
def test_slips_are_named(check, function, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(function)


def test_a_stub_is_not_written_yet():
    def stub(*args):
        raise NotImplementedError("sft_step: replace this line by your code")

    with pytest.raises(AssertionError, match="not written yet"):
        checks.check_sft_step(stub)
    with pytest.raises(AssertionError, match="not written yet"):
        checks.check_dpo_batch_loss(stub)
