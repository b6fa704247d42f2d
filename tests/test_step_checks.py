"""The checks of the training steps the learner writes (dpo_teach/checks/steps.py): right steps pass,
and each typical slip of a training step fails with a message that names it."""

import re

import pytest
import torch

from dpo_teach import checks, dpo
from dpo_teach.logps import model_sequence_logps, sequence_logps
from dpo_teach.reward import bradley_terry_loss


def _sft_loss(model, batch, reduce=torch.mean):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return reduce(-sequence_logps(logits, batch["labels"], batch["loss_mask"], average=True))


def sft_step(model, optimizer, batch):
    loss = _sft_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def sft_no_zero_grad(model, optimizer, batch):
    loss = _sft_loss(model, batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def sft_no_grad(model, optimizer, batch):
    with torch.no_grad():
        loss = _sft_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def sft_detached(model, optimizer, batch):
    loss = _sft_loss(model, batch).detach().requires_grad_()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def sft_no_step(model, optimizer, batch):
    loss = _sft_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    return loss.item()


def sft_zero_grad_between(model, optimizer, batch):
    loss = _sft_loss(model, batch)
    loss.backward()
    optimizer.zero_grad()
    optimizer.step()
    return loss.item()


def sft_step_before_backward(model, optimizer, batch):
    loss = _sft_loss(model, batch)
    optimizer.zero_grad()
    optimizer.step()
    loss.backward()
    return loss.item()


def sft_in_place(model, optimizer, batch):
    batch["input_ids"][:, 0] = 3
    return sft_step(model, optimizer, batch)


def sft_summed(model, optimizer, batch):
    loss = _sft_loss(model, batch, reduce=torch.sum)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def sft_returns_nothing(model, optimizer, batch):
    sft_step(model, optimizer, batch)


def sft_returns_tensor(model, optimizer, batch):
    loss = _sft_loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def dpo_batch_loss_ignoring_config(policy, batch, ref_chosen_logps, ref_rejected_logps, config):
    chosen, rejected = model_sequence_logps(policy, batch).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                                            beta=config.beta)
    return losses.mean(), dpo.dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)


def reward_model_step(reward_model, optimizer, batch, swap=False):
    chosen, rejected = reward_model(batch["input_ids"], batch["attention_mask"]).chunk(2)
    loss = bradley_terry_loss(*((rejected, chosen) if swap else (chosen, rejected))).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def dpo_batch_loss_without_beta(policy, batch, ref_chosen_logps, ref_rejected_logps, config):
    chosen, rejected = model_sequence_logps(policy, batch).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps)
    return losses.mean(), dpo.dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)


def dpo_batch_loss_detached(policy, batch, ref_chosen_logps, ref_rejected_logps, config):
    with torch.no_grad():
        return dpo.dpo_batch_loss(policy, batch, ref_chosen_logps, ref_rejected_logps, config)


def make_dpo_step(batch_loss):
    def dpo_step(policy, optimizer, batch, ref_chosen_logps, ref_rejected_logps, config):
        loss, metrics = batch_loss(policy, batch, ref_chosen_logps, ref_rejected_logps, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return metrics
    return dpo_step


@pytest.mark.parametrize("check, function", [
    (checks.check_sft_step, sft_step),
    (checks.check_reward_model_step, reward_model_step),
    (checks.check_dpo_step, make_dpo_step(dpo.dpo_batch_loss)),
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
    (checks.check_reward_model_step, lambda m, o, b: reward_model_step(m, o, b, swap=True), "swapped"),
    (checks.check_dpo_step, make_dpo_step(dpo_batch_loss_without_beta), "beta is not passed"),
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
