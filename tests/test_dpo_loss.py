"""dpo_teach.dpo.dpo_loss: analytic facts, equality with TRL's DPOTrainer, stability, bad inputs."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dpo_teach.dpo import dpo_loss


def make_logps(batch_size=6, seed=0, dtype=torch.float64):
    """Four (B,) tensors of sequence log-probs: references, and a policy a few nats away."""
    generator = torch.Generator().manual_seed(seed)
    ref_chosen = -40 * torch.rand(batch_size, generator=generator, dtype=dtype)
    ref_rejected = -40 * torch.rand(batch_size, generator=generator, dtype=dtype)
    policy_chosen = ref_chosen + 3 * torch.randn(batch_size, generator=generator, dtype=dtype)
    policy_rejected = ref_rejected + 3 * torch.randn(batch_size, generator=generator, dtype=dtype)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_shapes_and_rewards(loss_type):
    pc, pr, rc, rr = make_logps()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=0.3, loss_type=loss_type
    )
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (6,)
    torch.testing.assert_close(chosen_rewards, 0.3 * (pc - rc))
    torch.testing.assert_close(rejected_rewards, 0.3 * (pr - rr))
    assert losses.dtype == torch.float64


def test_sigmoid_is_eq7():
    pc, pr, rc, rr = make_logps()
    beta = 0.25
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(losses, -torch.log(torch.sigmoid(beta * h)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_log2_when_policy_equals_reference(label_smoothing):
    _, _, rc, rr = make_logps()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        rc, rr, rc, rr, beta=0.1, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_beta_to_zero_gives_log2():
    pc, pr, rc, rr = make_logps()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=1e-9)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))


def test_conservative_dpo_matches_official_form():
    """label_smoothing = eps: the form of the official DPO code (Mitchell 2023)."""
    pc, pr, rc, rr = make_logps()
    beta, eps = 0.5, 0.1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    logits = (pc - pr) - (rc - rr)
    expected = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    torch.testing.assert_close(losses, expected)


def test_gradient_is_the_papers_weighted_form():
    """d loss / d log pi(y_w) = -beta sigma(r_hat_l - r_hat_w), and the opposite for y_l."""
    pc, pr, rc, rr = make_logps()
    beta = 0.2
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    weight = torch.sigmoid(rejected_rewards - chosen_rewards)
    torch.testing.assert_close(pc.grad, -beta * weight)
    torch.testing.assert_close(pr.grad, beta * weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_huge_margins_are_finite(dtype, loss_type):
    margins = torch.tensor([1e4, -1e4], dtype=dtype)
    pc = (-5.0 + margins / 2).requires_grad_(True)
    pr = (-5.0 - margins / 2).requires_grad_(True)
    ref = torch.full((2,), -5.0, dtype=dtype)
    losses, _, _ = dpo_loss(pc, pr, ref, ref, beta=1.0, loss_type=loss_type)
    losses.sum().backward()
    assert (
        torch.isfinite(losses).all()
        and torch.isfinite(pc.grad).all()
        and torch.isfinite(pr.grad).all()
    )
    if loss_type == "sigmoid":
        torch.testing.assert_close(losses, torch.tensor([0.0, 1e4], dtype=dtype))


def test_ipo_minimum_at_half_over_beta():
    _, _, rc, rr = make_logps()
    beta = 0.5
    losses, _, _ = dpo_loss(rc + 1 / (2 * beta), rr, rc, rr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(losses, torch.zeros_like(losses))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(policy_chosen_logps=torch.zeros(5, dtype=torch.float64)), "same shape"),
        (dict(ref_rejected_logps=torch.zeros(6, 2, dtype=torch.float64)), "shape"),
        (dict(policy_rejected_logps=torch.zeros(6, dtype=torch.long)), "floating-point"),
        (dict(ref_chosen_logps=[0.0] * 6), "torch.Tensor"),
        (dict(loss_type="kto"), "unknown loss_type"),
        (dict(beta=0.0), "beta must be positive"),
        (dict(label_smoothing=0.7), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "sigmoid"),
    ],
)
def test_bad_inputs_raise(change, message):
    pc, pr, rc, rr = make_logps()
    kwargs = dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        beta=0.1,
    )
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        dpo_loss(**kwargs)


# ---- Equality with TRL ------------------------------------------------------------------------
# TRL 1.x computes the DPO loss inline, in DPOTrainer._compute_loss, from a model's per-token
# log-probs. We call that method on a stand-in trainer and a stand-in model whose per-token
# log-probs sum to the sequence log-probs we choose, with the reference log-probs precomputed.


def trl_dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    loss_type,
    completion_lengths,
):
    """TRL's mean DPO loss for sequence log-probs (summed over completion_lengths tokens)."""
    trl = pytest.importorskip("trl")
    batch_size, seq_len = policy_chosen_logps.shape[0], int(max(completion_lengths)) + 2
    logps = torch.cat(
        [policy_chosen_logps, policy_rejected_logps]
    )  # (2B,): batch is [chosen, rejected]
    lengths = torch.cat([completion_lengths, completion_lengths])  # (2B,)
    completion_mask = (
        torch.arange(seq_len)[None, :] >= seq_len - lengths[:, None]
    ).long()  # (2B, T)
    shift_mask = completion_mask[:, 1:].to(logps.dtype)  # (2B, T-1)
    per_token_logps = shift_mask * (logps / lengths)[:, None]  # sums to logps over the completion

    class StandInModel:
        training = True

        def __call__(self, **kwargs):
            zeros = torch.zeros_like(per_token_logps)
            return SimpleNamespace(
                log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
            )

    identity = SimpleNamespace(
        gather_for_metrics=lambda x: x, gather=lambda x: x, device=torch.device("cpu")
    )
    trainer = SimpleNamespace(
        model=StandInModel(),
        accelerator=identity,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "input_ids": torch.zeros(2 * batch_size, seq_len, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch_size, seq_len, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    return trl.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl(loss_type, beta):
    pc, pr, rc, rr = make_logps(batch_size=5, seed=1)
    lengths = torch.tensor([3, 7, 1, 12, 5])
    expected = trl_dpo_loss(pc, pr, rc, rr, beta, loss_type, lengths)
    if (
        loss_type == "ipo"
    ):  # TRL's IPO divides each sequence's log-ratio by its length: feed us mean log-probs
        pc, pr, rc, rr = pc / lengths, pr / lengths, rc / lengths, rr / lengths
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(losses.mean(), expected)


def test_matches_trl_per_example():
    pc, pr, rc, rr = make_logps(batch_size=4, seed=2)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    one = torch.tensor([4])
    for i in range(4):
        expected = trl_dpo_loss(
            pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], 0.1, "sigmoid", one
        )
        torch.testing.assert_close(losses[i], expected)
