"""Beyond DPO: variants of the preference loss, one way to train each, and probes of learning dynamics.

Every loss here is a pure function of per-example sequence log-probabilities, like dpo.dpo_loss:
tensors in, per-example losses and (detached) implicit rewards out. They differ in what they need:

  variant  needs a reference?  log-probs         data       paper
  sigmoid  yes                 sum               pairs      DPO, Rafailov et al. 2023
  cdpo     yes                 sum               pairs      conservative DPO, Mitchell 2023
  hinge    yes                 sum               pairs      hinge on log-ratios, RSO (Liu et al. 2023)
  ipo      yes                 mean (per token)  pairs      IPO, Azar et al. 2023
  simpo    no                  mean              pairs      SimPO, Meng et al. 2024
  orpo     no                  mean              pairs      ORPO, Hong et al. 2024
  kto      yes                 sum               unpaired   KTO, Ethayarajh et al. 2024

`train_variant` trains any of them on the same preference pairs (KTO on their unpaired
conversion) with the shared loop (dpo_teach.training.train), as dpo.train_dpo: the same optimizer, schedule and
history keys. The four DPO-family variants are handed to train_dpo itself, so their numbers are
those of notebook 08. As in train_dpo, a reference model is only run before training, never
during it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_teach.dpo import (
    as_records,
    check_logps,
    concatenated_batch,
    dpo_loss,
    dpo_metrics,
    make_evaluate,
    pair_logps,
    precompute_ref_logps,
    probe_logps,
    train_dpo,
)
from dpo_teach.evaluation import generation_logps
from dpo_teach.logps import build_batch, model_sequence_logps
from dpo_teach.sampling import generate
from dpo_teach.settings import NEW_TOKENS, PROMPT_TOKENS, DPOConfig
from dpo_teach.training import train
from dpo_teach.utils import shuffled_batches

__all__ = ["VARIANTS", "DPO_FAMILY", "REFERENCE_FREE", "hinge_loss", "ipo_loss", "cdpo_loss", "simpo_loss",
           "log1mexp", "log_odds", "orpo_loss", "odds_ratio_loss", "kto_loss", "kto_reference_point",
           "unpair_preferences", "mismatched_records", "VariantConfig", "VARIANT_SETTINGS",
           "variant_config", "as_dpo_config", "reference_free_batch_loss", "kto_batches", "completion_logps",
           "kto_batch_loss", "kto_metrics", "train_variant", "make_probes", "ProbeRecorder"]

VARIANTS = ("sigmoid", "cdpo", "hinge", "ipo", "simpo", "orpo", "kto")
DPO_FAMILY = ("sigmoid", "cdpo", "hinge", "ipo")  # trained by dpo.train_dpo
REFERENCE_FREE = ("simpo", "orpo")  # never run (or need) a reference model


def _check_tensors(named: dict[str, Tensor], beta: float | None = None) -> None:
    """Raise ValueError naming the argument when a log-prob tensor (or beta) cannot be used."""
    if beta is not None and not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    check_logps(named)


# ---- The DPO family: already in dpo_loss, named here so that every variant has its function ----


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """The hinge loss on DPO's margin h of log-ratios, relu(1 - beta h): the "hinge-norm" loss of RSO
    (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization", arXiv
    2309.06657), TRL's loss_type="hinge". It is SLiC-HF's calibration hinge (Zhao et al. 2023, arXiv
    2305.10425), max(0, delta - log pi(y_w|x) + log pi(y_l|x)) on log-probabilities, moved onto
    log-ratios to pi_ref: no push once beta h >= 1 (margin 1/beta). dpo_loss(..., loss_type="hinge")."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, loss_type="hinge")


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): (h - 1/(2 beta))^2, minimal at the margin
    h = 1/(2 beta) instead of pushing h to infinity; beta is the paper's regulariser tau. The paper
    writes the loss on sequence log-probs; TRL uses mean (per-token) log-probs, on the advice of
    IPO's authors (Hugging Face blog "Preference Tuning LLMs with Direct Preference Optimization
    Methods", 2024), and so does the course (VARIANT_SETTINGS). dpo_loss(..., loss_type="ipo")."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, loss_type="ipo")


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              beta: float = 0.1, label_smoothing: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): each label is
    flipped with probability eps = label_smoothing, so the loss is
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), whose minimum is at a finite margin.
    dpo_loss(..., label_smoothing=eps)."""
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, label_smoothing=label_smoothing)


# ---- SimPO -------------------------------------------------------------------------------------


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 2.0,
               gamma: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): reference-free, on MEAN token log-probs.

        loss = -log sigma(beta * avg_w - beta * avg_l - gamma),  avg = (1/|y|) log pi(y|x)

    The implicit reward is beta * avg (no reference model, length-normalised), and gamma > 0 is a
    target margin between the rewards. gamma is the paper's gamma, on the reward scale, as TRL's
    CPOTrainer (loss_type="simpo", simpo_gamma=gamma) uses it; the SimPO repository's
    configurations give the ratio gamma / beta ("gamma_beta_ratio") instead.

    Args:
        policy_chosen_logps, policy_rejected_logps: mean token log-probs avg_w, avg_l. Shape: (B,)
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are beta * avg, detached.
    """
    _check_tensors({"policy_chosen_logps": policy_chosen_logps,
                    "policy_rejected_logps": policy_rejected_logps}, beta)
    chosen_rewards = beta * policy_chosen_logps  # (B,)
    rejected_rewards = beta * policy_rejected_logps  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ---- ORPO --------------------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log1p(-exp(x)) far from 0, log(-expm1(x)) near 0.

    Each branch only ever sees inputs where it is finite, so that torch.where's gradient of the
    branch it does not take is 0, not 0 * inf = nan."""
    far = x < -math.log(2)
    far_branch = torch.log1p(-torch.exp(torch.where(far, x, torch.full_like(x, -1.0))))
    near_branch = torch.log(-torch.expm1(torch.where(far, torch.full_like(x, -1.0), x)))
    return torch.where(far, far_branch, near_branch)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log odds(y|x) = log p - log(1 - p) with log p = the mean token log-prob (ORPO, Eq. 1 and 4).
    A response of probability exactly 1 has infinite odds: log p is kept below 0 by the smallest
    float, so the odds stay finite."""
    logp = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).tiny)
    return logp - log1mexp(logp)


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, lam: float = 0.1
              ) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, Eq. 6-7): SFT on the chosen response plus an
    odds-ratio penalty, reference-free, on MEAN token log-probs:

        loss = -avg_w + lam * ( -log sigma( log odds(y_w|x) - log odds(y_l|x) ) )

    -avg_w is the mean token NLL of the chosen response (L_SFT, Eq. 2); the odds-ratio term is
    log 2 when the two responses are equally likely. TRL's ORPOTrainer calls lam "beta".

    Args:
        policy_chosen_logps, policy_rejected_logps: mean token log-probs avg_w, avg_l (< 0). Shape: (B,)
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are lam * avg (what TRL logs).
    """
    _check_tensors({"policy_chosen_logps": policy_chosen_logps,
                    "policy_rejected_logps": policy_rejected_logps})
    if not lam >= 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    losses = -policy_chosen_logps + lam * odds_ratio_loss(policy_chosen_logps, policy_rejected_logps)
    return losses, lam * policy_chosen_logps.detach(), lam * policy_rejected_logps.detach()


def odds_ratio_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> Tensor:
    """ORPO's L_OR (Eq. 7): -log sigma(log odds(y_w|x) - log odds(y_l|x)) per example. Shape: (B,)."""
    return -F.logsigmoid(log_odds(policy_chosen_logps) - log_odds(policy_rejected_logps))


# ---- KTO ---------------------------------------------------------------------------------------


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, z0: Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
             ) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8) on unpaired data: each example is
    one response with a label, desirable (True) or undesirable (False). With the implied reward
    r = log pi(y|x) - log pi_ref(y|x) and a reference point z0 (an estimate of KL(pi || pi_ref)),

        desirable:    loss = lambda_D * (1 - sigma(beta (r - z0)))
        undesirable:  loss = lambda_U * (1 - sigma(beta (z0 - r)))

    A desirable response is pushed above the reference point, an undesirable one below it; the loss
    saturates on both sides (the value function of prospect theory). z0 is detached: no gradient
    flows through it (estimate it with kto_reference_point).

    Args:
        policy_logps, ref_logps: summed log-probs of each response. Shape: (B,)
        labels: True for desirable responses. Shape: (B,), dtype bool
        z0: the reference point, >= 0 (a float or a 0-dim tensor)
    Returns:
        (losses, rewards), each (B,); rewards are beta * r, detached. Take losses.mean() to train.
    """
    _check_tensors({"policy_logps": policy_logps, "ref_logps": ref_logps}, beta)
    if not isinstance(labels, Tensor) or labels.dtype != torch.bool:
        raise ValueError(f"labels must be a torch.Tensor of dtype torch.bool, got "
                         f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.shape != policy_logps.shape:
        raise ValueError(f"labels must have the shape of the log-probs {tuple(policy_logps.shape)}, "
                         f"got {tuple(labels.shape)}")
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    if z0.ndim != 0 or not bool(z0 >= 0):
        raise ValueError(f"z0 must be a single number >= 0 (see kto_reference_point), got {z0}")
    logratios = policy_logps - ref_logps  # (B,)
    desirable = desirable_weight * torch.sigmoid(beta * (z0 - logratios))  # = 1 - sigma(beta (r - z0))
    undesirable = undesirable_weight * torch.sigmoid(beta * (logratios - z0))
    losses = torch.where(labels, desirable, undesirable)
    return losses, beta * logratios.detach()


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's z0: the mean log-ratio of MISMATCHED responses (each prompt with another example's
    response, see mismatched_records), detached and clamped at 0 (Ethayarajh et al. 2024, Sec. 4.1:
    the KL term is estimated from unrelated outputs in the same batch). Shape: ()."""
    _check_tensors({"policy_kl_logps": policy_kl_logps, "ref_kl_logps": ref_kl_logps})
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def unpair_preferences(pairs) -> list[dict]:
    """Preference pairs -> KTO's unpaired schema {"prompt", "completion", "label"}: every chosen
    response with label True, then every rejected response with label False (TRL's order)."""
    records = as_records(pairs)
    chosen = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in records]
    rejected = [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in records]
    return chosen + rejected


def mismatched_records(records: list[dict]) -> list[dict]:
    """Each prompt with the previous record's completion (shifted by one, cyclically):
    (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). The responses are the batch's own, paired with
    other prompts, for kto_reference_point."""
    if len(records) < 2:
        raise ValueError(f"mismatched_records needs at least 2 records, got {len(records)}")
    return [{"prompt": record["prompt"], "completion": records[i - 1]["completion"]}
            for i, record in enumerate(records)]


# ---- Configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantConfig(DPOConfig):
    """A DPOConfig whose loss_type is any of VARIANTS, with the extra knobs of the variants.
    beta is each variant's own: DPO's KL strength, IPO's tau, SimPO's reward scale, KTO's beta;
    ORPO has none (it uses orpo_lambda)."""

    simpo_gamma: float = 1.0  # SimPO's target reward margin gamma (on the beta-scaled reward)
    orpo_lambda: float = 0.1  # ORPO's weight lambda of the odds-ratio term
    kto_desirable_weight: float = 1.0  # KTO's lambda_D
    kto_undesirable_weight: float = 1.0  # KTO's lambda_U

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in VARIANTS:
            raise ValueError(f"unknown loss_type {self.loss_type!r}: choose one of {VARIANTS}")
        if self.loss_type in REFERENCE_FREE and not self.average_logps:
            raise ValueError(f"{self.loss_type} is defined on mean token log-probs: set average_logps=True "
                             f"(variant_config({self.loss_type!r}) does)")
        if self.loss_type == "cdpo" and not self.label_smoothing > 0:
            raise ValueError("cdpo needs label_smoothing > 0 (with 0 it is plain DPO, loss_type='sigmoid')")


VARIANT_SETTINGS = {  # what each variant changes in a DPO configuration, and where the value comes from
    "sigmoid": {},  # beta = 0.1 (DPOConfig's, TRL's default)
    "cdpo": {"label_smoothing": 0.1},  # eps = 0.1: the course's choice (one label in ten taken as flipped)
    "hinge": {},  # beta = 0.1 as DPO: the course's choice; the hinge stops at h = 1/beta = 10 nats
    # IPO: beta is the paper's tau; 0.5 (target margin 1/(2 tau) = 1 nat per token on mean log-probs)
    # is the course's choice, not a value from Azar et al. 2023
    "ipo": {"average_logps": True, "beta": 0.5},
    # SimPO: beta = 2, gamma / beta = 0.5, the SimPO repository's setting for Llama-3-8B-Base
    "simpo": {"average_logps": True, "beta": 2.0, "simpo_gamma": 1.0},
    "orpo": {"average_logps": True, "orpo_lambda": 0.1},  # lambda = 0.1, the ORPO authors' for Mistral-ORPO
    "kto": {},  # beta = 0.1 as DPO (TRL's KTOConfig default), lambda_D = lambda_U = 1
}


def variant_config(loss_type: str, base: DPOConfig | None = None, **overrides) -> VariantConfig:
    """A VariantConfig for `loss_type`: the fields of `base` (default DPOConfig(); e.g.
    dpo.dpo_config(preset)), then the variant's VARIANT_SETTINGS, then `overrides`."""
    if loss_type not in VARIANTS:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {VARIANTS}")
    base = base or DPOConfig()
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    values.update(loss_type=loss_type, **VARIANT_SETTINGS[loss_type])
    values.update(overrides)
    return VariantConfig(**values)


def as_dpo_config(config: VariantConfig) -> DPOConfig:
    """The plain DPOConfig of a DPO-family variant ("cdpo" is the sigmoid loss with label smoothing)."""
    values = {f.name: getattr(config, f.name) for f in fields(DPOConfig)}
    if values["loss_type"] == "cdpo":
        values["loss_type"] = "sigmoid"
    return DPOConfig(**values)


# ---- Batches of the reference-free variants and of KTO -----------------------------------------


def reference_free_batch_loss(policy, batch: dict, config: VariantConfig) -> tuple[Tensor, dict[str, float]]:
    """SimPO or ORPO on one concatenated batch of pairs: one forward pass, mean log-probs, no reference."""
    chosen_logps, rejected_logps = pair_logps(policy, batch, average=True)  # (B,), (B,)
    losses, chosen_rewards, rejected_rewards, extra = _reference_free_losses(chosen_logps, rejected_logps, config)
    metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    return losses.mean(), {**metrics, **extra}


def _reference_free_losses(chosen_logps, rejected_logps, config):
    if config.loss_type == "simpo":
        return (*simpo_loss(chosen_logps, rejected_logps, config.beta, config.simpo_gamma), {})
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen_logps, rejected_logps, config.orpo_lambda)
    # "log_odds_margin": the mean of log odds(y_w) - log odds(y_l) (TRL logs it as "log_odds_chosen")
    extra = {"nll_loss": -chosen_logps.detach().mean().item(),
             "log_odds_margin": (log_odds(chosen_logps) - log_odds(rejected_logps)).detach().mean().item()}
    return losses, chosen_rewards, rejected_rewards, extra


def kto_batches(num_records: int, batch_size: int, seed: int) -> list[list[int]]:
    """KTO's batches: a seeded permutation of the unpaired records cut into batches of batch_size
    (a shorter last batch is dropped). They are fixed for the whole run, so the mismatched
    partner of each record (the previous record of its batch) is fixed too, and its reference
    log-prob can be computed once, before training (as TRL does when it precomputes them)."""
    batch_size = min(batch_size, num_records)
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[s:s + batch_size] for s in range(0, num_records - batch_size + 1, batch_size)]


def completion_logps(model, tokenizer, records: list[dict], average: bool = False, **lengths) -> Tensor:
    """log p(completion | prompt) of {"prompt", "completion"} records, no gradient. Shape: (N,)."""
    return probe_logps(model, tokenizer, [{"prompt": r["prompt"], "response": r["completion"]} for r in records],
                       average=average, **lengths)


def kto_batch_loss(policy, tokenizer, records: list[dict], kl_records: list[dict], ref_logps: Tensor,
                   ref_kl_logps: Tensor, config: VariantConfig, **lengths) -> tuple[Tensor, dict[str, float], int, int]:
    """KTO on one batch of unpaired records: z0 from the batch's mismatched records (under the
    policy without gradient; their reference log-probs ref_kl_logps are given), then the loss of
    the batch's own responses. Returns (mean loss, metrics, sequences and tokens the policy read
    with a gradient)."""
    device = next(policy.parameters()).device
    kl_batch = build_batch(kl_records, tokenizer, "completion", **lengths)
    with torch.no_grad():
        policy_kl = model_sequence_logps(policy, kl_batch, average=config.average_logps)
    z0 = kto_reference_point(policy_kl, ref_kl_logps.to(device))
    batch = build_batch(records, tokenizer, "completion", **lengths)
    policy_logps = model_sequence_logps(policy, batch, average=config.average_logps)  # (B,)
    labels = torch.tensor([r["label"] for r in records], device=device)
    losses, rewards = kto_loss(policy_logps, ref_logps.to(device), labels, z0, config.beta,
                               config.kto_desirable_weight, config.kto_undesirable_weight)
    metrics = kto_metrics(losses, rewards, policy_logps, labels, z0)
    # what the policy read with a gradient (the mismatched records' forward pass has none)
    return losses.mean(), metrics, len(records), int(batch["attention_mask"].sum())


def kto_metrics(losses: Tensor, rewards: Tensor, policy_logps: Tensor, labels: Tensor, z0: Tensor) -> dict[str, float]:
    """Batch means under TRL's KTO names: rewards and log-probs of the desirable ("chosen") and
    undesirable ("rejected") examples (nan when the batch has none), their margin, and "kl" (z0)."""
    def mean(x: Tensor) -> float:
        return x.detach().mean().item() if len(x) else math.nan

    chosen, rejected = rewards[labels], rewards[~labels]
    return {"loss": losses.mean().item(), "rewards/chosen": mean(chosen), "rewards/rejected": mean(rejected),
            "rewards/margins": mean(chosen) - mean(rejected), "logps/chosen": mean(policy_logps[labels]),
            "logps/rejected": mean(policy_logps[~labels]), "kl": z0.item()}


# ---- One entry point for every variant ---------------------------------------------------------


def train_variant(policy, tokenizer, train_pairs, config: VariantConfig, ref_model=None,
                  ref_logps: tuple[Tensor, Tensor] | None = None, eval_pairs=None,
                  eval_ref_logps: tuple[Tensor, Tensor] | None = None,
                  probes: dict[str, list[dict]] | None = None, eval_fn=None,
                  max_prompt_tokens: int | None = None, max_response_tokens: int | None = None,
                  progress: bool = True) -> dict[str, list]:
    """Train `policy` in place with the variant config.loss_type on preference pairs; return the history.

    - sigmoid, cdpo, hinge, ipo: dpo.train_dpo (reference log-probs precomputed once);
    - simpo, orpo: the same loop on mean log-probs; the reference model is never run (ref_model
      and ref_logps are ignored);
    - kto: the pairs become 2N unpaired records in fixed, seeded batches of 2 * batch_size (as
      many sequences with a gradient per step as DPO; see kto_batches); z0 from each batch's
      mismatched records. The reference log-probs of the responses (or ref_logps) and of the
      mismatched records are computed once, before training, from ref_model.
    History as train_dpo's (dpo_teach.training's format): "step", "lr", "seconds", "sequences",
    "tokens", "train/<m>" for the batch metrics ("train/loss", "train/rewards/margins",
    "train/logps/chosen", ...; for simpo and orpo the log-probs are means per token, as TRL logs
    them), and at "eval/step" the same metrics on eval_pairs as "eval/<m>", eval_fn's numbers as
    "eval/<key>" and "eval/probe/<name>" for each probe set (see dpo.probe_logps).
    """
    if not isinstance(config, VariantConfig):
        raise ValueError(f"config must be a VariantConfig (see variant_config), got {type(config).__name__}")
    lengths = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    common = dict(eval_pairs=eval_pairs, probes=probes, eval_fn=eval_fn, progress=progress, **lengths)
    if config.loss_type in DPO_FAMILY:
        return train_dpo(policy, tokenizer, train_pairs, as_dpo_config(config), ref_model=ref_model,
                         ref_logps=ref_logps, eval_ref_logps=eval_ref_logps, **common)
    if config.loss_type in REFERENCE_FREE:
        return _train_reference_free(policy, tokenizer, as_records(train_pairs), config, **common)
    return _train_kto(policy, tokenizer, as_records(train_pairs), config, ref_model, ref_logps,
                      eval_ref_logps, **common)


def _train_reference_free(policy, tokenizer, records, config, eval_pairs, probes, eval_fn, progress,
                          **lengths):
    def batch_loss(index):
        batch = concatenated_batch([records[i] for i in index], tokenizer, **lengths)
        loss, metrics = reference_free_batch_loss(policy, batch, config)
        return loss, metrics, 2 * len(index), int(batch["attention_mask"].sum())

    def held_out() -> dict[str, float]:  # the policy's mean log-probs: no reference to compare with
        chosen_logps, rejected_logps = precompute_ref_logps(policy, tokenizer, eval_pairs, average=True, **lengths)
        losses, chosen_rewards, rejected_rewards, extra = _reference_free_losses(chosen_logps, rejected_logps, config)
        return {**dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps), **extra}

    evaluate = make_evaluate(policy, tokenizer, held_out if eval_pairs is not None else None, probes, eval_fn,
                             **lengths)
    return train(policy, batch_loss, shuffled_batches(len(records), config.batch_size, config.seed), config,
                 evaluate, desc=f"{config.loss_type} beta={config.beta}", progress=progress)


def _train_kto(policy, tokenizer, records, config, ref_model, ref_logps, eval_ref_logps, eval_pairs, probes,
               eval_fn, progress, **lengths):
    if ref_model is None:
        raise ValueError("KTO needs a ref_model: the reference log-probs of each batch's mismatched "
                         "responses are computed from it (once, before training)")
    ref_model.eval()
    if ref_logps is None:
        ref_logps = precompute_ref_logps(ref_model, tokenizer, records, average=config.average_logps, **lengths)
    if len(ref_logps[0]) != len(records):
        raise ValueError(f"ref_logps has {len(ref_logps[0])} entries for {len(records)} pairs")
    unpaired = unpair_preferences(records)
    unpaired_ref = torch.cat(ref_logps)  # (2N,): the chosen responses, then the rejected ones
    batches = kto_batches(len(unpaired), 2 * config.batch_size, config.seed)  # as many sequences as DPO's
    kl_records = [mismatched_records([unpaired[i] for i in batch]) for batch in batches]
    ref_kl = completion_logps(ref_model, tokenizer, sum(kl_records, []), config.average_logps, **lengths)
    ref_kl = ref_kl.view(len(batches), -1)  # (batches, batch size)
    held_out = None
    if eval_pairs is not None:  # KTO's metrics on the held-out pairs (reference parts computed once, here)
        held_out = _kto_evaluator(policy, ref_model, tokenizer, as_records(eval_pairs), eval_ref_logps, config,
                                  **lengths)

    def batch_loss(b: int):  # b: which of the fixed batches
        return kto_batch_loss(policy, tokenizer, [unpaired[i] for i in batches[b]], kl_records[b],
                              unpaired_ref[batches[b]], ref_kl[b], config, **lengths)

    # The fixed batches in a seeded order, a new order every pass over them.
    order = (first for first, in shuffled_batches(len(batches), 1, config.seed))
    evaluate = make_evaluate(policy, tokenizer, held_out, probes, eval_fn, **lengths)
    return train(policy, batch_loss, order, config, evaluate, desc=f"kto beta={config.beta}", progress=progress)


def _kto_evaluator(policy, ref_model, tokenizer, records, ref_logps, config, **lengths):
    """KTO's metrics on held-out pairs: the loss over their unpaired form with z0 from the whole
    set's mismatched records (their reference part computed once), and the pairwise reward metrics."""
    if ref_logps is None:
        ref_logps = precompute_ref_logps(ref_model, tokenizer, records, average=config.average_logps, **lengths)
    unpaired = unpair_preferences(records)
    # Consecutive pairs often share a prompt (several pairs per prompt): shuffle before shifting.
    order = torch.randperm(len(unpaired), generator=torch.Generator().manual_seed(0)).tolist()
    kl_records = mismatched_records([unpaired[i] for i in order])
    ref_kl = completion_logps(ref_model, tokenizer, kl_records, config.average_logps, **lengths)
    labels = torch.tensor([r["label"] for r in unpaired])

    def evaluate() -> dict[str, float]:
        chosen_logps, rejected_logps = precompute_ref_logps(policy, tokenizer, records,
                                                            average=config.average_logps, **lengths)
        z0 = kto_reference_point(completion_logps(policy, tokenizer, kl_records, config.average_logps, **lengths),
                                 ref_kl)
        losses, rewards = kto_loss(torch.cat([chosen_logps, rejected_logps]), torch.cat(ref_logps), labels, z0,
                                   config.beta, config.kto_desirable_weight, config.kto_undesirable_weight)
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        return {**dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps),
                "kl": z0.item()}

    return evaluate


# ---- Probes of learning dynamics ---------------------------------------------------------------


def make_probes(train_pairs, eval_pairs=None, policy=None, tokenizer=None, n: int = 64, seed: int = 0,
                max_new_tokens: int = NEW_TOKENS, max_prompt_tokens: int | None = PROMPT_TOKENS) -> dict[str, list[dict]]:
    """Probe sets {"prompt", "response"} for the learning-dynamics view of Ren & Sutherland (ICLR 2025,
    "Learning Dynamics of LLM Finetuning"), n each, from a seeded sample of the training pairs:

      "train_chosen", "train_rejected": responses the loss pushes up and down;
      "other_chosen": the chosen response of a pair with another prompt (a response outside the
          data of this prompt);
      "eval_chosen": held-out chosen responses (with eval_pairs);
      "greedy": the greedy response of `policy` (pass the SFT policy, before training) to the
          training prompts (with policy and tokenizer), a fixed text; empty responses are left out.
          ProbeRecorder follows the greedy response of the policy being trained instead.
    """
    records = as_records(train_pairs)
    picked = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    sample = [records[i] for i in picked]
    probes = {key: [{"prompt": r["prompt"], "response": r[field]} for r in sample]
              for key, field in (("train_chosen", "chosen"), ("train_rejected", "rejected"))}
    probes["other_chosen"] = [{"prompt": r["prompt"], "response": _other_prompt(sample, i)["chosen"]}
                              for i, r in enumerate(sample)]
    if eval_pairs is not None:
        probes["eval_chosen"] = [{"prompt": r["prompt"], "response": r["chosen"]} for r in as_records(eval_pairs)[:n]]
    if policy is not None:
        prompts = [r["prompt"] for r in sample]
        texts = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                         max_prompt_tokens=max_prompt_tokens).texts
        probes["greedy"] = [{"prompt": p, "response": t} for p, t in zip(prompts, texts) if t.strip()]
    return probes


def _other_prompt(sample: list[dict], i: int) -> dict:
    """The next record of `sample` (cyclically) whose prompt differs from record i's."""
    for step in range(1, len(sample)):
        other = sample[(i + step) % len(sample)]
        if other["prompt"] != sample[i]["prompt"]:
            return other
    raise ValueError("every probe record has the same prompt: no response of another prompt to take")


class ProbeRecorder:
    """An eval_fn for train_dpo and train_variant that keeps the log-prob of EVERY probe record at
    every evaluation point (the `probes` argument of train_dpo keeps only each set's mean), so that a
    change gets an interval over the records; and, given greedy_prompts, the policy's own mode:

      "greedy": the greedy response of the CURRENT policy to each prompt, decoded anew at every
          evaluation point, and its log-prob under that policy: if it rises, probability mass
          concentrates on the policy's most likely response (Ren & Sutherland's "squeezing");
      "first_greedy": the greedy responses decoded at the first evaluation point (the policy before
          training), scored again at every point: does the starting mode keep its mass?

    Log-probs are summed over the response's tokens (EOS included where generated); the greedy
    responses are scored on their own token ids (no decode and re-encode). After training,
    recorder[name] is a (T, N) tensor, T evaluation points by N records, and recorder.tokens(name)
    the lengths in tokens of the greedy responses, (T, N); recorder.first_generation and
    recorder.last_generation hold the greedy responses themselves (sampling.Generation). Calling it
    returns each set's mean (what train_dpo records as "eval/<name>"); it draws no random numbers
    and changes nothing in training.
    """

    def __init__(self, tokenizer, probes: dict[str, list[dict]] | None = None, greedy_prompts=None,
                 max_new_tokens: int = NEW_TOKENS, max_prompt_tokens: int | None = PROMPT_TOKENS,
                 max_response_tokens: int | None = None):
        self.tokenizer, self.probes = tokenizer, dict(probes or {})
        self.greedy_prompts = list(greedy_prompts or [])
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.logps: dict[str, list[Tensor]] = {}  # name -> one (N,) tensor per evaluation point
        self.lengths: dict[str, list[Tensor]] = {}  # the greedy sets' response lengths, likewise
        self.first_generation = self.last_generation = None

    @torch.no_grad()
    def __call__(self, policy) -> dict[str, float]:
        for name, records in self.probes.items():
            self.logps.setdefault(name, []).append(probe_logps(
                policy, self.tokenizer, records, max_prompt_tokens=self.max_prompt_tokens,
                max_response_tokens=self.max_response_tokens))
        if self.greedy_prompts:
            generation = generate(policy, self.tokenizer, self.greedy_prompts, max_new_tokens=self.max_new_tokens,
                                  temperature=0.0, max_prompt_tokens=self.max_prompt_tokens)
            if self.first_generation is None:
                self.first_generation = generation
            self.last_generation = generation
            was_training = policy.training
            policy.eval()
            for name, responses in (("greedy", generation), ("first_greedy", self.first_generation)):
                self.logps.setdefault(name, []).append(generation_logps(policy, responses).cpu())
                self.lengths.setdefault(name, []).append(responses.response_mask.sum(1).cpu())
            policy.train(was_training)
        return {name: values[-1].mean().item() for name, values in self.logps.items()}

    def __getitem__(self, name: str) -> Tensor:
        """The log-probs of probe set `name`: (T, N), one row per evaluation point."""
        return torch.stack(self.logps[name])

    def tokens(self, name: str) -> Tensor:
        """The response lengths in tokens of greedy set `name` ("greedy" or "first_greedy"): (T, N)."""
        return torch.stack(self.lengths[name]).to(torch.float64)
