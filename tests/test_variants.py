"""dpo_teach.variants: the losses beyond DPO (analytic values, limits, stability, bad inputs,
equality with TRL 1.x), training every variant on the same pairs, and learning-dynamics probes.

Where TRL has each loss:
- IPO, hinge, sigmoid: DPOTrainer (tests/test_dpo_loss.py checks dpo_loss against it).
- Conservative DPO: DPOTrainer's "sigmoid" loss does not use label_smoothing in TRL 1.16 (its
  "robust" loss is another one, Chowdhury et al. 2024); CPOTrainer's "sigmoid" loss has the
  conservative form, on the difference of its two inputs, so we feed it the log-ratios.
- SimPO: CPOTrainer(loss_type="simpo") in trl.experimental.cpo (its cpo_alpha adds an NLL term;
  the loss function alone is compared).
- ORPO: ORPOTrainer in trl.experimental.orpo.
- KTO: KTOTrainer.
TRL computes these inside trainer methods; we call the methods on minimal stand-in objects
(SimpleNamespace) that carry only the attributes the methods read, as tests/test_dpo_loss.py does.
"""

import copy
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_dpo_train import PAIRS, counting  # the same pairs and call counter

from dpo_teach.dpo import dpo_loss, precompute_ref_logps, probe_logps, train_dpo
from dpo_teach.models import frozen_copy
from dpo_teach.settings import DPOConfig
from dpo_teach.variants import (
    VARIANTS,
    ProbeRecorder,
    VariantConfig,
    cdpo_loss,
    hinge_loss,
    ipo_loss,
    kto_batches,
    kto_loss,
    kto_reference_point,
    log1mexp,
    log_odds,
    make_probes,
    mismatched_records,
    odds_ratio_loss,
    orpo_loss,
    simpo_loss,
    train_variant,
    unpair_preferences,
    variant_config,
)

CPU = torch.device("cpu")


def mean_logps(batch_size=6, seed=0, dtype=torch.float64):
    """Two (B,) tensors of mean token log-probs in (-4, 0)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(-4 * torch.rand(batch_size, generator=generator, dtype=dtype) for _ in range(2))


# ---- The DPO family, through the named wrappers ------------------------------------------------


def test_wrappers_are_dpo_loss():
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(5, generator=generator, dtype=torch.float64) for _ in range(4))
    for wrapper, kwargs in ((hinge_loss, dict(loss_type="hinge")), (ipo_loss, dict(loss_type="ipo")),
                            (cdpo_loss, dict(label_smoothing=0.1))):
        for ours, theirs in zip(wrapper(pc, pr, rc, rr, beta=0.3), dpo_loss(pc, pr, rc, rr, beta=0.3, **kwargs)):
            torch.testing.assert_close(ours, theirs)


def test_ipo_minimum_and_zero_gradient_at_half_over_beta():
    beta = 0.25
    rc, rr = torch.tensor([-3.0, -1.0], dtype=torch.float64), torch.tensor([-2.0, -5.0], dtype=torch.float64)
    pc = (rc + 1 / (2 * beta)).requires_grad_(True)
    losses, _, _ = ipo_loss(pc, rr, rc, rr, beta=beta)
    losses.sum().backward()
    torch.testing.assert_close(losses, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(pc.grad, torch.zeros(2, dtype=torch.float64))


def test_conservative_dpo_has_its_minimum_at_a_finite_margin():
    """d/dh of -(1-eps) log sigma(beta h) - eps log sigma(-beta h) is 0 at beta h = log((1-eps)/eps)."""
    beta, eps = 0.5, 0.2
    h = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    losses, _, _ = cdpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=eps)
    losses.sum().backward()
    torch.testing.assert_close(h.grad, zero)


def test_hinge_is_zero_beyond_margin_one_over_beta():
    beta = 0.5
    zero = torch.zeros(3, dtype=torch.float64)
    h = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)  # beta h = 1, 1.5, 0.5
    losses, _, _ = hinge_loss(h, zero, zero, zero, beta=beta)
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64))


# ---- SimPO -------------------------------------------------------------------------------------


def test_simpo_by_hand():
    losses, chosen_rewards, rejected_rewards = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-1.0))]))  # -log sigma(2 * 1 - 1)
    torch.testing.assert_close(chosen_rewards, torch.tensor([-2.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-4.0]))


def test_simpo_without_margin_is_dpo_on_mean_logps_with_a_zero_reference():
    chosen, rejected = mean_logps()
    zero = torch.zeros_like(chosen)
    for ours, theirs in zip(simpo_loss(chosen, rejected, beta=2.5, gamma=0.0), dpo_loss(chosen, rejected, zero, zero, beta=2.5)):
        torch.testing.assert_close(ours, theirs)


def test_simpo_at_equal_logps_is_softplus_gamma():
    chosen, _ = mean_logps()
    losses, _, _ = simpo_loss(chosen, chosen.clone(), beta=2.0, gamma=1.5)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log1p(math.exp(1.5))))


# ---- ORPO --------------------------------------------------------------------------------------


def test_log_odds_by_hand():
    p = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(log_odds(p.log()), torch.log(p / (1 - p)))


def test_log1mexp_is_accurate_near_zero_and_far_from_it():
    x = torch.tensor([-1e-12, -1e-5, -0.5, -0.7, -2.0, -50.0], dtype=torch.float64)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected)
    torch.testing.assert_close(log1mexp(torch.tensor([-1e-12]))[0], torch.tensor(math.log(1e-12)), rtol=1e-4, atol=0)


def test_orpo_odds_term_is_log2_at_equal_logps():
    chosen, _ = mean_logps()
    torch.testing.assert_close(odds_ratio_loss(chosen, chosen.clone()), torch.full_like(chosen, math.log(2)))
    losses, chosen_rewards, _ = orpo_loss(chosen, chosen.clone(), lam=0.2)
    torch.testing.assert_close(losses, -chosen + 0.2 * math.log(2))
    torch.testing.assert_close(chosen_rewards, 0.2 * chosen)


def test_orpo_with_lambda_zero_is_the_chosen_nll():
    chosen, rejected = mean_logps()
    losses, _, _ = orpo_loss(chosen, rejected, lam=0.0)
    torch.testing.assert_close(losses, -chosen)


# ---- KTO ---------------------------------------------------------------------------------------


def test_kto_at_policy_equal_reference_and_zero_z0():
    logps = torch.tensor([-10.0, -20.0, -5.0, -7.0], dtype=torch.float64)
    labels = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(logps, logps.clone(), labels, 0.0, beta=0.1, desirable_weight=1.0,
                               undesirable_weight=1.5)
    torch.testing.assert_close(losses, torch.tensor([0.5, 0.75, 0.5, 0.75], dtype=torch.float64))
    assert torch.all(rewards == 0)


def test_kto_by_hand():
    policy, ref = torch.tensor([-8.0, -8.0]), torch.tensor([-10.0, -10.0])  # r = 2
    losses, rewards = kto_loss(policy, ref, torch.tensor([True, False]), torch.tensor(0.5), beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([1 - torch.sigmoid(torch.tensor(0.15)).item(),
                                                     1 - torch.sigmoid(torch.tensor(-0.15)).item()]))
    torch.testing.assert_close(rewards, torch.tensor([0.2, 0.2]))


def test_kto_gradient_does_not_flow_into_z0():
    policy = torch.tensor([-8.0, -9.0], requires_grad=True)
    z0 = torch.tensor(0.3, requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-10.0, -10.0]), torch.tensor([True, False]), z0)
    losses.sum().backward()
    assert z0.grad is None and policy.grad is not None


def test_kto_reference_point_is_the_clamped_detached_mean():
    policy = torch.tensor([-5.0, -7.0, -6.0], requires_grad=True)
    torch.testing.assert_close(kto_reference_point(policy, torch.tensor([-6.0, -6.0, -9.0])), torch.tensor(1.0))
    assert not kto_reference_point(policy, torch.zeros(3)).requires_grad
    assert kto_reference_point(policy, torch.zeros(3)).item() == 0.0  # a negative mean is clamped at 0


def test_unpair_and_mismatch():
    pairs = [{"prompt": "a", "chosen": " A", "rejected": " x"}, {"prompt": "b", "chosen": " B", "rejected": " y"}]
    unpaired = unpair_preferences(pairs)
    assert unpaired == [{"prompt": "a", "completion": " A", "label": True},
                        {"prompt": "b", "completion": " B", "label": True},
                        {"prompt": "a", "completion": " x", "label": False},
                        {"prompt": "b", "completion": " y", "label": False}]
    assert mismatched_records(unpaired) == [{"prompt": "a", "completion": " y"}, {"prompt": "b", "completion": " A"},
                                            {"prompt": "a", "completion": " B"}, {"prompt": "b", "completion": " x"}]
    with pytest.raises(ValueError, match="at least 2 records"):
        mismatched_records(unpaired[:1])


# ---- Stability ---------------------------------------------------------------------------------


def _finite(losses, *inputs):
    losses.sum().backward()
    return torch.isfinite(losses).all() and all(torch.isfinite(x.grad).all() for x in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_margins_are_finite(dtype):
    def leaves(*values):
        return [torch.tensor(v, dtype=dtype, requires_grad=True) for v in values]

    chosen, rejected = leaves([-1e-3, -1e4], [-1e4, -1e-3])
    assert _finite(simpo_loss(chosen, rejected, beta=10.0, gamma=1.0)[0], chosen, rejected)
    chosen, rejected = leaves([-1e-3, -1e4, 0.0], [-1e4, -1e-3, 0.0])
    assert _finite(orpo_loss(chosen, rejected, lam=1.0)[0], chosen, rejected)
    policy, = leaves([1e4, -1e4, 1e4, -1e4])
    labels = torch.tensor([True, True, False, False])
    assert _finite(kto_loss(policy, torch.zeros(4, dtype=dtype), labels, 0.0, beta=1.0)[0], policy)
    losses, _, _ = simpo_loss(torch.tensor([-1e-3, -1e4], dtype=dtype), torch.tensor([-1e4, -1e-3], dtype=dtype),
                              beta=1.0, gamma=0.0)
    torch.testing.assert_close(losses, torch.tensor([0.0, 1e4 - 1e-3], dtype=dtype))


# ---- Bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda c, r: simpo_loss(c, r[:3]), "same shape"),
    (lambda c, r: simpo_loss(c, r.long()), "policy_rejected_logps must be a floating-point"),
    (lambda c, r: simpo_loss(c.tolist(), r), "policy_chosen_logps must be a torch.Tensor"),
    (lambda c, r: simpo_loss(c, r, beta=0.0), "beta must be positive"),
    (lambda c, r: orpo_loss(c[:, None], r), "policy_chosen_logps must have shape"),
    (lambda c, r: orpo_loss(c, r, lam=-1.0), "lam must be non-negative"),
    (lambda c, r: kto_loss(c, r.long(), c > -2, 0.0), "ref_logps must be a floating-point"),
    (lambda c, r: kto_loss(c, r, (c > -2).long(), 0.0), "labels must be a torch.Tensor of dtype torch.bool"),
    (lambda c, r: kto_loss(c, r, (c > -2)[:2], 0.0), "labels must have the shape"),
    (lambda c, r: kto_loss(c, r, c > -2, -0.5), "z0 must be a single number >= 0"),
    (lambda c, r: kto_loss(c, r[:4], c > -2, 0.0), "same shape"),
    (lambda c, r: kto_reference_point(c, r[:2]), "same shape"),
])
def test_bad_inputs_raise(call, message):
    chosen, rejected = mean_logps()
    with pytest.raises(ValueError, match=message):
        call(chosen, rejected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="dpop"), "unknown loss_type"),
    (dict(loss_type="simpo"), "average_logps=True"),
    (dict(loss_type="orpo"), "average_logps=True"),
    (dict(loss_type="cdpo"), "label_smoothing > 0"),
    (dict(loss_type="kto", schedule="linear"), "unknown schedule"),
])
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VariantConfig(**kwargs)


def test_variant_config_applies_settings_then_overrides():
    config = variant_config("simpo", DPOConfig(num_steps=7), simpo_gamma=0.3)
    assert (config.loss_type, config.num_steps, config.beta, config.simpo_gamma, config.average_logps) == (
        "simpo", 7, 2.0, 0.3, True)
    assert all(variant_config(name).loss_type == name for name in VARIANTS)
    with pytest.raises(ValueError, match="unknown loss_type"):
        variant_config("dpop")


# ---- Equality with TRL -------------------------------------------------------------------------


def _quiet_import(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (0.5, 0.2)])
def test_simpo_matches_trl_cpo(beta, gamma):
    cpo = _quiet_import("trl.experimental.cpo")
    chosen, rejected = mean_logps(seed=1, dtype=torch.float32)
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device=CPU))
    expected = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    for ours, theirs in zip(simpo_loss(chosen, rejected, beta=beta, gamma=gamma), expected):
        torch.testing.assert_close(ours, theirs)


def test_conservative_dpo_matches_trl_cpo_sigmoid_on_log_ratios():
    cpo = _quiet_import("trl.experimental.cpo")
    generator = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-30 * torch.rand(6, generator=generator) for _ in range(4))
    beta, eps = 0.3, 0.15
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=eps,
                              accelerator=SimpleNamespace(device=CPU))
    expected, _, _ = cpo.CPOTrainer.cpo_loss(trainer, pc - rc, pr - rr)  # its "logits" are then DPO's h
    losses, _, _ = cdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(losses, expected)


def test_orpo_matches_trl():
    orpo = _quiet_import("trl.experimental.orpo")
    chosen, rejected = mean_logps(seed=3, dtype=torch.float32)
    lam = 0.25
    identity = SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(beta=lam, accelerator=identity, aux_loss_enabled=False)
    # The odds-ratio term: TRL's per-example "losses" are lam * log sigma(log odds ratio).
    trl_losses, trl_chosen_rewards, _, _, trl_log_odds = orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    torch.testing.assert_close(odds_ratio_loss(chosen, rejected), -trl_losses / lam)
    # The whole loss: TRL adds the NLL of the chosen tokens of the batch (prompt tokens included,
    # one mean over all tokens); a stand-in forward pass hands it the mean of our per-example NLLs.
    zeros = torch.zeros(len(chosen), 2, 3)
    trainer.concatenated_forward = lambda model, batch: (chosen, rejected, zeros, zeros, (-chosen).mean())
    trainer.odds_ratio_loss = lambda c, r: orpo.ORPOTrainer.odds_ratio_loss(trainer, c, r)
    loss, metrics = orpo.ORPOTrainer.get_batch_loss_metrics(trainer, None, {})
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, lam=lam)
    torch.testing.assert_close(losses.mean(), loss)
    torch.testing.assert_close(chosen_rewards, trl_chosen_rewards)
    assert metrics["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-6)
    assert metrics["log_odds_chosen"] == pytest.approx((log_odds(chosen) - log_odds(rejected)).mean().item(), abs=1e-5)
    assert trl_log_odds.item() == pytest.approx(metrics["log_odds_chosen"], abs=1e-6)


def trl_kto(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps, beta, desirable_weight,
            undesirable_weight):
    """TRL's KTOTrainer._compute_loss with reference log-probs precomputed, on a stand-in model
    whose per-token log-probs sum to the sequence log-probs we choose (KL rows have another width)."""
    trl = _quiet_import("trl")
    batch_size, width, kl_width = len(labels), 6, 5

    def per_token(logps, seq_len):
        out = torch.zeros(batch_size, seq_len - 1)
        out[:, -1] = logps
        return out

    class StandInModel:
        training = True

        def __call__(self, input_ids, **kwargs):
            logps = policy_kl_logps if input_ids.shape[1] == kl_width else policy_logps
            log_probs = per_token(logps, input_ids.shape[1])
            return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                                   mean_logits=torch.zeros_like(log_probs))

    identity = SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=StandInModel(), accelerator=identity, loss_type="kto", beta=beta,
                              desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                              precompute_ref_logps=True, calculate_KL=True, aux_loss_enabled=False,
                              _total_train_tokens=0, _tp_size=1,
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._compute_kl_logps = lambda model, batch: trl.KTOTrainer._compute_kl_logps(trainer, model, batch)
    ones = torch.ones(batch_size, width, dtype=torch.long)
    kl_ones = torch.ones(batch_size, kl_width, dtype=torch.long)
    inputs = {"input_ids": 0 * ones, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": 0 * kl_ones,
              "KL_attention_mask": kl_ones, "KL_completion_mask": kl_ones, "label": labels,
              "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    loss = trl.KTOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
@pytest.mark.parametrize("kl_shift", [3.0, -3.0])  # a positive and a clamped (negative) KL estimate
def test_kto_matches_trl(weights, kl_shift):
    generator = torch.Generator().manual_seed(4)
    ref_logps = -30 * torch.rand(6, generator=generator)
    policy_logps = ref_logps + 4 * torch.randn(6, generator=generator)
    ref_kl_logps = -30 * torch.rand(6, generator=generator)
    policy_kl_logps = ref_kl_logps + kl_shift + torch.randn(6, generator=generator)
    labels = torch.tensor([True, False, False, True, True, False])
    loss, metrics = trl_kto(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps, 0.1, *weights)
    z0 = kto_reference_point(policy_kl_logps, ref_kl_logps)
    losses, rewards = kto_loss(policy_logps, ref_logps, labels, z0, beta=0.1, desirable_weight=weights[0],
                               undesirable_weight=weights[1])
    torch.testing.assert_close(losses.mean(), loss)
    assert metrics["kl"][0] == pytest.approx(z0.item(), abs=1e-6)
    assert metrics["rewards/chosen"][0] == pytest.approx(rewards[labels].mean().item(), abs=1e-6)
    assert metrics["rewards/rejected"][0] == pytest.approx(rewards[~labels].mean().item(), abs=1e-6)


# ---- Training every variant on the same pairs --------------------------------------------------

class RaisingModel(torch.nn.Module):
    """A reference model that must not be run."""

    def forward(self, **kwargs):
        raise AssertionError("the reference model was called")

    @property
    def base_model(self):  # what model_sequence_logps runs
        raise AssertionError("the reference model was called")


FAST = dict(num_steps=12, batch_size=4, lr=2e-3, warmup_steps=2, eval_every=6)


@pytest.mark.parametrize("loss_type", VARIANTS)
def test_every_variant_learns_the_pairs(loss_type, tiny_model, tokenizer):
    policy = copy.deepcopy(tiny_model)
    config = variant_config(loss_type, **FAST)
    history = train_variant(policy, tokenizer, PAIRS, config, ref_model=frozen_copy(tiny_model),
                            eval_pairs=PAIRS[:4], progress=False)
    assert history["eval/step"] == [0, 6, 12]
    assert history["eval/loss"][-1] < history["eval/loss"][0], loss_type
    assert history["eval/rewards/margins"][-1] > history["eval/rewards/margins"][0], loss_type
    assert len(history["train/loss"]) == 12 and all(math.isfinite(x) for x in history["train/loss"])
    assert history["step"] == list(range(12)) and len(history["lr"]) == 12
    metrics = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert {"step", "lr", "seconds", "sequences", "tokens"} <= set(history)
    assert {f"train/{n}" for n in metrics} <= set(history) and {f"eval/{n}" for n in metrics} <= set(history)
    # with a gradient: 2 x 4 sequences a step (KTO's mismatched rows are read without one, not counted)
    assert history["sequences"][-1] == 12 * 2 * 4


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_variants_never_run_the_reference(loss_type, tiny_model, tokenizer):
    config = variant_config(loss_type, **FAST)
    train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=RaisingModel(),
                  eval_pairs=PAIRS[:4], progress=False)
    train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, progress=False)  # no reference at all


def test_kto_runs_the_reference_before_training_only(tiny_model, tokenizer):
    ref_logps = precompute_ref_logps(tiny_model, tokenizer, PAIRS)
    calls = []
    for num_steps in (2, 12):
        ref_model = counting(frozen_copy(tiny_model))
        config = variant_config("kto", **{**FAST, "num_steps": num_steps})
        train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=ref_model, ref_logps=ref_logps,
                      progress=False)
        calls.append(ref_model.calls)
    assert calls == [1, 1], "one forward pass over the 32 mismatched rows, before training"
    with pytest.raises(ValueError, match="KTO needs a ref_model"):
        train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_logps=ref_logps, progress=False)


def test_kto_batches_are_fixed_and_mismatched_within_themselves():
    batches = kto_batches(10, 4, seed=0)
    assert batches == kto_batches(10, 4, seed=0) and len(batches) == 2
    assert all(len(b) == 4 for b in batches) and len({i for b in batches for i in b}) == 8
    assert kto_batches(3, 8, seed=0)[0] and len(kto_batches(3, 8, seed=0)[0]) == 3


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "ipo"])
def test_dpo_family_is_train_dpo(loss_type, tiny_model, tokenizer):
    config = variant_config(loss_type, **FAST)
    ref = frozen_copy(tiny_model)
    ours = train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=ref, progress=False)
    fields = {name: getattr(config, name) for name in DPOConfig.__dataclass_fields__}
    plain = DPOConfig(**{**fields, "loss_type": "sigmoid" if loss_type == "cdpo" else loss_type})
    theirs = train_dpo(copy.deepcopy(tiny_model), tokenizer, PAIRS, plain, ref_model=ref, progress=False)
    assert ours["train/loss"] == theirs["train/loss"]


def test_train_variant_wants_a_variant_config(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="VariantConfig"):
        train_variant(tiny_model, tokenizer, PAIRS, DPOConfig(), progress=False)


def test_variant_training_is_deterministic(tiny_model, tokenizer):
    config = variant_config("kto", **{**FAST, "num_steps": 4})
    runs = [train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=frozen_copy(tiny_model),
                          progress=False)["train/loss"] for _ in range(2)]
    assert runs[0] == runs[1]


# ---- Probes of learning dynamics ---------------------------------------------------------------


def test_probe_logps_equal_a_direct_computation(tiny_model, tokenizer):
    from dpo_teach.logps import build_batch, model_sequence_logps

    records = [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS[:4]]
    with torch.no_grad():
        direct = model_sequence_logps(tiny_model, build_batch(records, tokenizer, "response"))
    torch.testing.assert_close(probe_logps(tiny_model, tokenizer, records, batch_size=3), direct)


def test_probes_are_recorded_and_change_nothing(tiny_model, tokenizer):
    probes = make_probes(PAIRS, eval_pairs=PAIRS[:4], policy=tiny_model, tokenizer=tokenizer, n=4, max_new_tokens=6)
    assert set(probes) >= {"train_chosen", "train_rejected", "other_chosen", "eval_chosen"}
    prompt_of = {p["chosen"]: p["prompt"] for p in PAIRS}
    assert all(prompt_of[o["response"]] != o["prompt"] for o in probes["other_chosen"])  # another prompt's response
    config = DPOConfig(num_steps=6, batch_size=4, lr=2e-3, eval_every=3)
    ref = frozen_copy(tiny_model)
    policy = copy.deepcopy(tiny_model)
    with_probes = train_dpo(policy, tokenizer, PAIRS, config, ref_model=ref, probes=probes, progress=False)
    without = train_dpo(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=ref, progress=False)
    assert with_probes["train/loss"] == without["train/loss"]
    assert with_probes["eval/step"] == [0, 3, 6]
    for name, records in probes.items():
        values = with_probes[f"eval/probe/{name}"]
        assert len(values) == 3
        assert values[0] == pytest.approx(probe_logps(tiny_model, tokenizer, records).mean().item(), abs=1e-5)
        assert values[-1] == pytest.approx(probe_logps(policy, tokenizer, records).mean().item(), abs=1e-5)
    assert with_probes["eval/probe/train_chosen"][-1] - with_probes["eval/probe/train_rejected"][-1] > (
        with_probes["eval/probe/train_chosen"][0] - with_probes["eval/probe/train_rejected"][0])


def test_probe_recorder_keeps_every_record_and_the_current_greedy_response(tiny_model, tokenizer):
    from dpo_teach.evaluation import generation_logps
    from dpo_teach.sampling import generate

    probes = make_probes(PAIRS, n=4)
    prompts = [r["prompt"] for r in probes["train_chosen"]]
    recorder = ProbeRecorder(tokenizer, probes, greedy_prompts=prompts, max_new_tokens=6)
    config = DPOConfig(num_steps=6, batch_size=4, lr=2e-3, eval_every=3)
    ref = frozen_copy(tiny_model)
    policy = copy.deepcopy(tiny_model)
    history = train_dpo(policy, tokenizer, PAIRS, config, ref_model=ref, eval_fn=recorder, progress=False)
    without = train_dpo(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=ref, progress=False)
    assert history["train/loss"] == without["train/loss"]  # recording changes nothing in training
    assert history["eval/step"] == [0, 3, 6]
    for name, records in probes.items():  # every record, at every point; the means go to the history
        assert recorder[name].shape == (3, 4)
        torch.testing.assert_close(recorder[name][0], probe_logps(tiny_model, tokenizer, records))
        torch.testing.assert_close(recorder[name][-1], probe_logps(policy, tokenizer, records))
        assert history[f"eval/{name}"] == pytest.approx(recorder[name].mean(1).tolist(), abs=1e-6)
    # "greedy": the greedy response of the policy at that point, scored by that policy
    for model, row in ((tiny_model, 0), (policy, -1)):
        generation = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0.0, max_prompt_tokens=16)
        torch.testing.assert_close(recorder["greedy"][row], generation_logps(model, generation))
        assert recorder.tokens("greedy")[row].tolist() == generation.response_mask.sum(1).tolist()
        kept = recorder.first_generation if row == 0 else recorder.last_generation
        assert torch.equal(kept.response_ids, generation.response_ids)
    # "first_greedy": the responses decoded before training, scored again by the trained policy
    first = generate(tiny_model, tokenizer, prompts, max_new_tokens=6, temperature=0.0, max_prompt_tokens=16)
    torch.testing.assert_close(recorder["first_greedy"][-1], generation_logps(policy, first))
    torch.testing.assert_close(recorder["first_greedy"][0], recorder["greedy"][0])
    assert (recorder.tokens("first_greedy") == recorder.tokens("first_greedy")[0]).all()
    assert not torch.equal(recorder["greedy"][-1], recorder["greedy"][0])  # training moved the mode's log-prob


@pytest.mark.parametrize("loss_type", ["simpo", "kto"])
def test_variants_record_probes_and_eval_fn(loss_type, tiny_model, tokenizer):
    probes = {"chosen": [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS[:4]]}
    config = variant_config(loss_type, **FAST)
    policy = copy.deepcopy(tiny_model)
    history = train_variant(policy, tokenizer, PAIRS, config, ref_model=frozen_copy(tiny_model), probes=probes,
                            eval_fn=lambda p: {"answer": 42.0, "texts": ["ignored"]}, progress=False)
    assert history["eval/step"] == [0, 6, 12] and history["eval/answer"] == [42.0] * 3
    assert "eval/texts" not in history
    assert history["eval/probe/chosen"][-1] == pytest.approx(probe_logps(policy, tokenizer, probes["chosen"]).mean().item(),
                                                         abs=1e-5)


def test_kto_eval_margins_are_pairwise(tiny_model, tokenizer):
    """KTO's held-out metrics: the loss over the unpaired pairs, and the DPO-style pairwise rewards."""
    config = variant_config("kto", **{**FAST, "num_steps": 1})
    history = train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS, config, ref_model=frozen_copy(tiny_model),
                            eval_pairs=PAIRS[:4], progress=False)
    assert history["eval/loss"][0] == pytest.approx(0.5, abs=1e-6)  # policy == reference, z0 = 0
    assert history["eval/rewards/margins"][0] == 0.0 and history["eval/kl"][0] == 0.0


def test_simpo_metrics_are_on_mean_logps(tiny_model, tokenizer):
    config = variant_config("simpo", **{**FAST, "num_steps": 1})
    history = train_variant(copy.deepcopy(tiny_model), tokenizer, PAIRS[:4], config, eval_pairs=PAIRS[:4],
                            progress=False)
    chosen, rejected = precompute_ref_logps(tiny_model, tokenizer, PAIRS[:4], average=True)
    expected = F.softplus(-(2.0 * (chosen - rejected) - 1.0)).mean().item()
    assert history["eval/loss"][0] == pytest.approx(expected, abs=1e-5)
    assert history["eval/logps/chosen"][0] == pytest.approx(chosen.mean().item(), abs=1e-5)
