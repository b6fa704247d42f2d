"""RLHF with PPO: rollouts, the KL-shaped reward, GAE, the clipped losses and a train loop, each a pure part.

The objective is the one DPO starts from (docs/conventions.md, step 3):

    max_pi  E_{x, y ~ pi} [ r(x, y) ]  -  kl_coef * KL( pi(.|x) || pi_ref(.|x) )

optimised as in Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022) with PPO (Schulman et al.
2017): each response is an episode whose actions are its tokens; token t earns the per-token KL
penalty -kl_coef * (log pi(y_t|.) - log pi_ref(y_t|.)) and the last real token also earns the
reward model's score; advantages come from GAE (Schulman et al. 2016) with a learnt value head.

Conventions (docs/conventions.md): generation is left-padded, responses right-padded, masks come from lengths;
dropout is off in every model; the reference model is frozen. Shapes: B prompts, P prompt positions,
R response positions, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dpo_teach.models import disable_dropout
from dpo_teach.sampling import Generation, generate
from dpo_teach.settings import PPOConfig
from dpo_teach.training import (
    append,
    autocast,
    eval_fn_numbers,
    grad_scaler,
    gradient_step,
    lr_at,
    make_optimizer,
    record_eval,
)
from dpo_teach.utils import (
    TOKEN_COUNTS,
    count_scored,
    position_ids_from_mask,
    right_pad,
    seed_everything,
)
from dpo_teach.world import oracle_reward

__all__ = ["PPOConfig", "PolicyWithValueHead", "RewardFn", "Rollout", "entropy_from_logits", "gae", "kl_k1", "kl_k3",
           "kl_penalty_rewards", "masked_mean", "oracle_fn", "pack_right", "policy_loss", "ppo_minibatch_steps",
           "ppo_step", "ppo_update", "response_logits_and_values", "reward_model_fn", "rollout", "rollout_evaluator",
           "token_logps", "train_ppo",
           "update_kl_coef", "value_loss", "whiten"]


# ---- The model: the policy plus a value head ------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    """The policy (a causal LM) with a scalar value head V(s_t) on its last hidden state.

    One forward pass gives the next-token logits and the value of every position, so the critic
    costs one Linear(n_embd, 1) instead of a second transformer. The head starts at zero, so at the
    first step the value loss does not pull on the shared trunk. Save or evaluate `self.policy`,
    the plain language model; the head is only needed for training.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        width = policy.get_output_embeddings().in_features
        self.value_head = nn.Linear(width, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), values (B, T)) at every position."""
        hidden = self.policy.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state  # (B, T, D)
        with torch.autocast(hidden.device.type, enabled=False):  # heads in float32, also under autocast
            logits = self.policy.get_output_embeddings()(hidden.float())  # (B, T, V)
            values = self.value_head(hidden.float()).squeeze(-1)  # (B, T)
        return logits, values


def response_logits_and_values(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                               response_mask: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Logits (B, R, V) that predict each response token, and values (B, R) of the states before them.

    The rows are [left-padded prompt | right-padded response]; position ids count real tokens only,
    so left padding changes nothing. Position P - 1 + t (the token before response token t) predicts
    response token t and holds the value V(s_t). `model` is a PolicyWithValueHead (values returned)
    or a plain causal LM such as ref_model (values None). Logits are divided by the temperature, so
    that log-probs are those of the distribution the responses were sampled from. Under autocast the
    transformer runs in 16 bits, the heads in float32: logits and values, and so log-probs, KL and
    losses, are float32.
    """
    device = next(model.parameters()).device
    count_scored(prompt_mask)
    count_scored(response_mask)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)  # (B, P + R)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).to(device)  # (B, P + R)
    position_ids = position_ids_from_mask(attention_mask)  # (B, P + R)
    num_prompt, num_response = prompt_ids.shape[1], response_ids.shape[1]
    window = slice(num_prompt - 1, num_prompt + num_response - 1)
    if isinstance(model, PolicyWithValueHead):
        logits, values = model(input_ids, attention_mask, position_ids)
        return logits[:, window] / temperature, values[:, window]
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids).last_hidden_state  # (B, P + R, D)
    with torch.autocast(hidden.device.type, enabled=False):  # the LM head in float32, also under autocast
        logits = model.get_output_embeddings()(hidden.float())  # (B, P + R, V)
    return logits[:, window] / temperature, None


def token_logps(logits: Tensor, response_ids: Tensor) -> Tensor:
    """log pi(y_t | x, y_<t) of each response token. logits (B, R, V), response_ids (B, R) -> (B, R)."""
    return torch.gather(logits.log_softmax(dim=-1), 2, response_ids.to(logits.device).unsqueeze(2)).squeeze(2)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy H(pi(.|s_t)) = logsumexp(z) - sum_v softmax(z)_v z_v of each position. (B, R, V) -> (B, R)."""
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


# ---- Masked statistics ------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where mask is 1 (a scalar)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values - mean) / std over the valid tokens only; masked positions become 0. Shape kept.

    Padding must not enter the statistics: a batch of short responses would otherwise have its
    mean dragged towards the zeros that stand after each response's end.
    """
    mask = mask.to(values.dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError("whiten needs at least two valid tokens")
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / (count - 1)  # unbiased
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _check_right_padded(mask: Tensor, name: str = "mask") -> None:
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(mask.shape)}")
    if (mask[:, 1:].long() > mask[:, :-1].long()).any():
        raise ValueError(f"{name} must be right-padded: ones first, then zeros, in every row")
    if (mask[:, 0] == 0).any():
        raise ValueError(f"every row of {name} needs at least one token")


# ---- Rewards: the KL estimators and the KL-shaped reward -------------------------------------------


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log pi(y_t) - log pi_ref(y_t) per sampled token (Schulman 2020, "Approximating KL").

    Unbiased: its mean over y ~ pi is KL(pi || pi_ref), and summed over a response it estimates the
    sequence KL; but one sample can be negative, and its variance is high when pi is near pi_ref.
    """
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(y_t) / pi(y_t) per sampled token.

    Also unbiased for KL(pi || pi_ref) (E_pi[r - 1] = 0), never negative, and of lower variance
    near pi_ref. exp(d) - 1 - d is computed as expm1(d) - d: with exp(d) - 1 the 1 cancels
    catastrophically for small d and the result can even come out negative.
    """
    log_ratio = ref_logps - logps  # log r
    return torch.expm1(log_ratio) - log_ratio


def kl_penalty_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: -kl_coef * k1 on every response token, plus the score on the last one.

    scores (B,): the reward of each full response; logps, ref_logps, mask (B, R), right-padded.
    The score goes to the response's last REAL token: its EOS, or its last token when generation
    hit the length limit. It must not go one position further: that position is padding, which
    no loss sees, so the policy would never be rewarded (or, when it falls beyond the tensor,
    it would wrap to another position). Padding positions get 0. Returns (B, R).
    """
    _check_right_padded(mask)
    mask = mask.to(logps.dtype)
    rewards = -kl_coef * kl_k1(logps, ref_logps) * mask  # (B, R)
    last = mask.sum(dim=1).long() - 1  # (B,) index of the last real token, from the lengths
    rows = torch.arange(len(rewards), device=rewards.device)
    return rewards.index_put((rows, last), rewards[rows, last] + scores.to(rewards))


# ---- Generalised advantage estimation ------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) for right-padded (B, T) tensors.

        delta_t = r_t + gamma * V_{t+1} - V_t           (V after a response's last token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}      (A after the last token is 0)
        returns_t = A_t + V_t                           (the value head's regression target)

    Positions after each response's end are ignored: whatever rewards and values hold there never
    enter, and advantages and returns are 0 there. Returns (advantages, returns), both (B, T).
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"rewards, values and mask must have one shape (B, T), got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    _check_right_padded(mask)
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # nothing after the end enters
    num_tokens = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(num_tokens)):
        next_value = values[:, t + 1] if t + 1 < num_tokens else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


# ---- The PPO losses -----------------------------------------------------------------------------


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate loss (Schulman et al. 2017, Eq. 7), as a mean over valid tokens.

        ratio_t = pi(y_t|s_t) / pi_old(y_t|s_t) = exp(logps - old_logps)
        loss    = -mean_t min( ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t )

    The min takes the pessimistic of the two, so moving the ratio beyond 1 +- eps in the direction
    the advantage favours earns nothing more. logps, old_logps, advantages, mask: (B, T).
    Returns (loss: scalar, clip_fraction: share of tokens where the clipped term was chosen,
    approx_kl: k3 estimate of KL(pi_old || pi) on these tokens), the last two detached.
    """
    mask = mask.to(logps.dtype)
    log_ratio = torch.where(mask.bool(), logps - old_logps, torch.zeros_like(logps))  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logps.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               value_clip: float | None = 0.2) -> tuple[Tensor, Tensor]:
    """0.5 * mean_t (V_t - returns_t)^2 over valid tokens, clipped like the policy when value_clip is set.

    With clipping, the new value may move at most value_clip away from the value recorded at
    rollout time, and the larger of the clipped and unclipped errors is taken (as in OpenAI's
    baselines and TRL). Returns (loss: scalar, clip_fraction: share of tokens where clipping bit).
    """
    mask = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), dtype=values.dtype)
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clip_fraction


def update_kl_coef(kl_coef: float, kl: float, target_kl: float, horizon: int, batch_size: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019: raise kl_coef when the KL exceeds its target.

        kl_coef <- kl_coef * (1 + clip(kl / target_kl - 1, -0.2, 0.2) * batch_size / horizon)
    """
    error = min(max(kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * batch_size / horizon)


# ---- Reward sources ------------------------------------------------------------------------------


RewardFn = Callable[[Generation], Tensor]  # a Generation in, one score per response out: (B,)


def pack_right(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
               pad_id: int) -> tuple[Tensor, Tensor]:
    """Re-pack [left-padded prompt | right-padded response] rows as right-padded rows
    [prompt | response | pad], the layout build_batch gives and the reward model was trained on.
    Returns (input_ids, attention_mask), both (B, P + R) or narrower."""
    num_prompt = prompt_ids.shape[1]
    rows = [prompt_ids[i, num_prompt - p:].tolist() + response_ids[i, :r].tolist()
            for i, (p, r) in enumerate(zip(prompt_mask.sum(1).tolist(), response_mask.sum(1).tolist(), strict=True))]
    return right_pad(rows, pad_id)


def reward_model_fn(reward_model: nn.Module, pad_id: int) -> RewardFn:
    """Score responses with a reward model that reads right-padded (input_ids, attention_mask) and
    returns one score per row from its last real token. It reads the sampled ids themselves (no
    decode and re-encode) in the layout it was trained on: EOS + prompt + response (+ EOS)."""
    disable_dropout(reward_model).eval()

    @torch.no_grad()
    def score(generation: Generation) -> Tensor:
        device = next(reward_model.parameters()).device
        input_ids, attention_mask = pack_right(generation.prompt_ids, generation.prompt_mask,
                                               generation.response_ids, generation.response_mask, pad_id)
        return reward_model(input_ids.to(device), attention_mask.to(device)).float().cpu()

    return score


def oracle_fn(generation: Generation) -> Tensor:
    """Score responses with the oracle itself (VADER on prompt + response): the paper's "PPO-GT"."""
    return oracle_reward(generation.full_texts)


# ---- Rollouts ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A batch of sampled responses with what PPO needs about them, all recorded at sampling time."""

    generation: Generation  # prompts, texts, left-padded prompt ids/mask (B, P), right-padded response ids/mask (B, R)
    logps: Tensor  # (B, R) log pi_old(y_t | s_t): the policy that sampled (PPO's old_logps)
    ref_logps: Tensor  # (B, R) log pi_ref(y_t | s_t)
    values: Tensor  # (B, R) V_old(s_t) from the value head
    scores: Tensor  # (B,) the reward source's score of each full response

    @property
    def mask(self) -> Tensor:
        return self.generation.response_mask


@torch.no_grad()
def rollout(model: PolicyWithValueHead, ref_model: nn.Module, reward_fn: RewardFn, tokenizer, prompts: list[str],
            config: PPOConfig) -> Rollout:
    """Sample one response per prompt with the current policy and record log-probs, values and scores."""
    generation = generate(model.policy, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_k=0, top_p=1.0,
                          max_prompt_tokens=config.max_prompt_tokens, batch_size=len(prompts))
    ids = (generation.prompt_ids, generation.prompt_mask, generation.response_ids, generation.response_mask)
    with autocast(next(model.parameters()).device, config.precision):
        logits, values = response_logits_and_values(model, *ids, temperature=config.temperature)
        ref_logits, _ = response_logits_and_values(ref_model, *ids, temperature=config.temperature)
    mask = generation.response_mask.to(logits.device).float()
    logps = token_logps(logits, generation.response_ids) * mask  # (B, R)
    ref_logps = token_logps(ref_logits, generation.response_ids) * mask  # (B, R)
    scores = reward_fn(generation).float()  # (B,)
    return Rollout(generation, logps.cpu(), ref_logps.cpu(), (values * mask).cpu(), scores)


def _rows(rollout: Rollout, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Some rows of a rollout, with the all-padding columns at the left of the prompts and at
    the right of the responses trimmed (less to compute on a CPU; the result does not change)."""
    g = rollout.generation
    prompt_ids, prompt_mask = g.prompt_ids[index], g.prompt_mask[index]
    response_ids, response_mask = g.response_ids[index], g.response_mask[index]
    first = int((prompt_mask.sum(0) > 0).nonzero().min())
    width = int(response_mask.sum(1).max())
    return prompt_ids[:, first:], prompt_mask[:, first:], response_ids[:, :width], response_mask[:, :width]


Evaluate = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # rows -> (logps, values, entropy), each (b, width)


def ppo_minibatch_steps(evaluate, model, optimizer, old_logps, old_values, advantages, returns, mask, config,
                        generator=None, scaler=None):
    """PPO's update on one rollout batch of B rows, whatever computes the log-probs and the values.

    evaluate(index) -> (logps, values, entropy) of the current policy on the rows `index`, each
    (b, width) with gradients: log pi(y_t|s_t) of the sampled tokens, V(s_t) and H(pi(.|s_t)). It may
    trim padding columns at the right (width <= T); the other tensors are cut to match.
    old_logps, old_values, advantages (raw, from GAE), returns, mask: (B, T), recorded at rollout time.
    The advantages are whitened here, once over the valid tokens of the whole batch (not per
    minibatch), when config.whiten_advantages. Then num_epochs passes, each over num_minibatches
    minibatches of shuffled rows (the order drawn from `generator`), one gradient step each on
    policy_loss + vf_coef * value_loss - entropy_coef * entropy (training.gradient_step: zero_grad,
    backward, clip the gradient norm of `model`, step). Returns the mean over the steps of
    policy_loss, value_loss, entropy, clip_fraction, approx_kl and value_clip_fraction (floats).
    """
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)  # once per batch, over its valid tokens only
    stats = {key: [] for key in ("policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl",
                                 "value_clip_fraction")}
    for _ in range(config.num_epochs):
        for index in torch.randperm(len(mask), generator=generator).chunk(config.num_minibatches):
            logps, values, entropy = evaluate(index)  # (b, width) each, with gradients
            width = logps.shape[1]
            rows = (index, slice(0, width))  # the minibatch's rows of a (B, T) tensor, cut to width
            pg_loss, clip_fraction, approx_kl = policy_loss(logps, old_logps[rows], advantages[rows], mask[rows],
                                                            config.clip_range)
            vf_loss, value_clip_fraction = value_loss(values, old_values[rows], returns[rows], mask[rows],
                                                      config.value_clip)
            entropy = masked_mean(entropy, mask[rows])
            loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy
            gradient_step(model, optimizer, loss, config.max_grad_norm, scaler)
            for key, value in zip(stats, (pg_loss, vf_loss, entropy, clip_fraction, approx_kl, value_clip_fraction),
                                  strict=True):
                stats[key].append(float(value.detach()))
    return {key: sum(values) / len(values) for key, values in stats.items()}


def rollout_evaluator(model: PolicyWithValueHead, rollout: Rollout, config: PPOConfig) -> Evaluate:
    """evaluate(index) for ppo_minibatch_steps on a language model: the current log-probs of the
    rollout's sampled tokens, the values and the entropies of the rows `index`, each (b, width),
    with the rows' all-padding columns trimmed. The forward pass runs under
    autocast(device, config.precision); logits and values come out in float32."""
    device = next(model.parameters()).device

    def evaluate(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        prompt_ids, prompt_mask, response_ids, response_mask = _rows(rollout, index)
        with autocast(device, config.precision):
            logits, values = response_logits_and_values(model, prompt_ids, prompt_mask, response_ids,
                                                        response_mask, temperature=config.temperature)
        return token_logps(logits, response_ids), values, entropy_from_logits(logits)

    return evaluate


def ppo_update(model: PolicyWithValueHead, optimizer: torch.optim.Optimizer, rollout: Rollout, advantages: Tensor,
               returns: Tensor, config: PPOConfig, generator: torch.Generator | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """PPO's update of a language model on one rollout: ppo_minibatch_steps with rollout_evaluator.

    advantages: raw, from GAE (whitened inside when config.whiten_advantages); returns: GAE's, both
    (B, R). num_epochs passes over the rollout in num_minibatches shuffled minibatches, one gradient
    step each on  policy_loss + vf_coef * value_loss - entropy_coef * entropy. Returns mean statistics.
    scaler: float16's (training.grad_scaler)."""
    num = len(rollout.scores)
    if num % config.num_minibatches:
        raise ValueError(f"batch_size {num} is not divisible by num_minibatches {config.num_minibatches}")
    device = next(model.parameters()).device
    # the model stays in eval mode: with dropout off (docs/conventions.md) train and eval mode compute the same
    return ppo_minibatch_steps(rollout_evaluator(model, rollout, config), model, optimizer, rollout.logps.to(device),
                               rollout.values.to(device), advantages.to(device), returns.to(device),
                               rollout.mask.to(device), config, generator, scaler)


def ppo_step(model, ref_model, reward_fn, tokenizer, prompts, kl_coef, config, optimizer, generator=None,
             scaler=None):
    """One step of PPO on a batch of prompts: what train_ppo repeats. Returns (rollout, statistics).

    Sample one response per prompt and record log-probs, reference log-probs, values and scores;
    turn them into per-token rewards (KL penalty on every token, the score on the last real one);
    GAE gives advantages and returns; ppo_update whitens the advantages and takes
    num_epochs x num_minibatches gradient steps on the rollout.
    """
    batch = rollout(model, ref_model, reward_fn, tokenizer, prompts, config)  # no gradients
    rewards = kl_penalty_rewards(batch.scores, batch.logps, batch.ref_logps, batch.mask, kl_coef)  # (B, R)
    advantages, returns = gae(rewards, batch.values, batch.mask, config.gamma, config.lam)  # (B, R) each
    stats = ppo_update(model, optimizer, batch, advantages, returns, config, generator, scaler)
    return batch, stats


# ---- Training --------------------------------------------------------------------------------------


@torch.enable_grad()  # training needs gradients even when called inside no_grad (e.g. lazily)
def train_ppo(policy: nn.Module, ref_model: nn.Module, reward: nn.Module | RewardFn, tokenizer, prompts: list[str],
              config: PPOConfig = PPOConfig(), eval_fn: Callable[[nn.Module], dict] | None = None,
              progress: bool = True) -> dict[str, list]:
    """Train `policy` (in place) with PPO against `reward` and return the history (dict of lists).

    reward: a reward model (nn.Module, scored on the sampled ids, see reward_model_fn) or any
    function Generation -> (B,) scores, e.g. `oracle_fn` ("PPO-GT"). A value head is put on the
    policy for training (PolicyWithValueHead); the policy itself stays a plain LM. Each step is one
    rollout batch: ppo_step (sample, score, then ppo_update). The history has dpo_teach.training's format, one
    entry per rollout batch: "step" (from 0), "lr", "seconds", "sequences" and "tokens" (what the
    policy read with a gradient: batch_size x num_epochs sequences a step), "train/<m>" for the
    reward source's "score", the "oracle_reward" and sequence "kl" to ref_model of the rollout's
    samples, "kl_coef", "response_length" and the PPO statistics, and PPO's other costs:
    "generated_sequences", "generated_tokens" and "inference_sequences" (forward passes without a
    gradient: the policy's and the reference's log-probs, the reward model's scores).
    eval_fn(policy) -> dict of numbers (e.g. evaluation.evaluate_policy on held-out prompts) is
    recorded as "eval/<key>" with "eval/step" (rollout batches done) before training, every
    config.eval_every steps and after the last; it runs with its own random stream, so it does not
    change the training run. The learning rate follows training.lr_at (constant by default).
    """
    seed_everything(config.seed)
    for m in (policy, ref_model):
        disable_dropout(m).eval()
    ref_model.requires_grad_(False)
    model = PolicyWithValueHead(policy).to(next(policy.parameters()).device)
    reward_fn = reward_model_fn(reward, tokenizer.pad_token_id) if isinstance(reward, nn.Module) else reward
    optimizer = make_optimizer(model, config)
    scaler = grad_scaler(next(policy.parameters()).device, config.precision)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    scored = 2 + isinstance(reward, nn.Module)  # forward passes without a gradient per response
    history: dict[str, list] = {}
    kl_coef, seconds, cursor = config.kl_coef, 0.0, 0
    costs = dict(sequences=0, tokens=0, generated_sequences=0, generated_tokens=0, inference_sequences=0)
    evaluating = eval_fn is not None and config.eval_every > 0
    evaluate = lambda: eval_fn_numbers(policy, eval_fn)  # its numbers, in a forked random stream
    if evaluating:
        record_eval(history, policy, evaluate, 0)
    bar = tqdm(range(config.num_steps), desc="PPO", disable=not progress)
    for step in bar:
        start = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + config.batch_size > len(order):  # a new pass over the prompts, in a new order
            order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
        batch_prompts = [prompts[i] for i in order[cursor:cursor + config.batch_size]]
        cursor += config.batch_size
        batch, stats = ppo_step(model, ref_model, reward_fn, tokenizer, batch_prompts, kl_coef, config, optimizer,
                                generator, scaler)
        seconds += time.perf_counter() - start
        g = batch.generation
        costs["sequences"] += config.batch_size * config.num_epochs
        costs["tokens"] += int(g.prompt_mask.sum() + g.response_mask.sum()) * config.num_epochs
        TOKEN_COUNTS["trained"] += int(g.prompt_mask.sum() + g.response_mask.sum()) * config.num_epochs
        costs["generated_sequences"] += config.batch_size
        costs["generated_tokens"] += g.num_tokens
        costs["inference_sequences"] += config.batch_size * scored
        sequence_kl = kl_k1(batch.logps, batch.ref_logps).sum(1)  # (B,) log pi(y|x) - log pi_ref(y|x)
        metrics = {"score": batch.scores.mean().item(), "oracle_reward": oracle_reward(g.full_texts).mean().item(),
                   "kl": sequence_kl.mean().item(), "kl_coef": kl_coef,
                   "response_length": batch.mask.sum(1).float().mean().item(), **stats}
        append(history, {"step": step, "lr": lr, "seconds": seconds, **costs})
        append(history, metrics, prefix="train/")
        if config.target_kl is not None:
            kl_coef = update_kl_coef(kl_coef, metrics["kl"], config.target_kl, config.kl_horizon, config.batch_size)
        if evaluating and ((step + 1) % config.eval_every == 0 or step + 1 == config.num_steps):
            record_eval(history, policy, evaluate, step + 1)
        bar.set_postfix(score=f"{metrics['score']:+.2f}", oracle=f"{metrics['oracle_reward']:+.2f}",
                        kl=f"{metrics['kl']:.2f}")
    return history

