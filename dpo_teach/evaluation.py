"""Evaluating a policy the way the paper does: oracle reward of its samples, and KL to the reference.

Every method of the course (SFT, PPO, DPO and its variants) is measured by the same two numbers on
the same held-out prompts:

- the mean oracle reward r*(x, y) of responses y ~ pi(.|x), sampled at temperature 1 from the full
  distribution (no top-k, no top-p), scored on the full text x + y;
- the sequence-level KL(pi || pi_ref), estimated from the same samples by the mean log-ratio
      KL(pi || pi_ref) = E_{y ~ pi} [log pi(y|x) - log pi_ref(y|x)]
  (the "k1" estimator: unbiased, but one sample's log-ratio can be negative).

The log-probs are those of the sampled token ids themselves (no decode and re-encode), computed by
one forward pass over the left-padded prompt and the right-padded response. Left padding shifts
every real token to the right, so position ids are counted from the first real token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from dpo_teach.logps import sequence_logps
from dpo_teach.sampling import Generation, generate
from dpo_teach.settings import NEW_TOKENS, PROMPT_TOKENS
from dpo_teach.utils import position_ids_from_mask
from dpo_teach.world import oracle_reward

__all__ = ["evaluate_policy", "generation_logps", "ranks", "seeded_sampling", "sequence_kl", "spearman_correlation"]


def generation_logps(model, generation: Generation, average: bool = False, batch_size: int = 64) -> torch.Tensor:
    """log p(y|x) under `model` of each sampled response in `generation`, summed over its tokens
    (EOS included where it was generated). Shape: (B,).

    The rows are [left-padded prompt | right-padded response]; the loss mask covers the response's
    real tokens, and the position ids skip the left padding, so the result equals a forward pass
    over the unpadded ids of each row.
    """
    device = next(model.parameters()).device
    input_ids = torch.cat([generation.prompt_ids, generation.response_ids], dim=1)  # (B, P + R)
    attention_mask = torch.cat([generation.prompt_mask, generation.response_mask], dim=1)  # (B, P + R)
    loss_mask = torch.cat([torch.zeros_like(generation.prompt_mask), generation.response_mask], dim=1)
    position_ids = position_ids_from_mask(attention_mask)  # (B, P + R)
    out = []
    for start in range(0, len(input_ids), batch_size):
        rows = slice(start, start + batch_size)
        logits = model(input_ids=input_ids[rows].to(device), attention_mask=attention_mask[rows].to(device),
                       position_ids=position_ids[rows].to(device)).logits  # (b, P + R, V)
        out.append(sequence_logps(logits, input_ids[rows].to(device), loss_mask[rows].to(device), average=average))
    return torch.cat(out)


def sequence_kl(policy, ref_model, generation: Generation) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) of each sampled response (y sampled from the policy). Shape: (B,).

    Its mean over samples from the policy estimates KL(pi || pi_ref) per prompt (k1 estimator).
    """
    with torch.no_grad():
        policy_logps = generation_logps(policy, generation)  # (B,)
        ref_logps = generation_logps(ref_model, generation)  # (B,)
    return (policy_logps - ref_logps).cpu()


def ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of the values of x (N,); tied values share their average rank. Shape: (N,)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts  # rank of the first copy of each distinct value
    return (first + (counts - 1) / 2).to(torch.float64)[inverse]


def spearman_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of x and y (N,): the Pearson correlation of their ranks. Shape: ()."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum() / (rx.norm() * ry.norm())


@contextmanager
def seeded_sampling(seed: int, device: torch.device):
    """Seed torch for sampling inside a forked RNG: the same seed gives the same samples, and the
    caller's random stream is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "mps":
            torch.mps.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate_policy(policy, ref_model, tokenizer, prompts: list[str], max_new_tokens: int = NEW_TOKENS,
                    seed: int = 0, max_prompt_tokens: int | None = PROMPT_TOKENS, batch_size: int | None = None) -> dict:
    """Sample one response per prompt (temperature 1, full distribution) and measure it.

    Returns a dict with
      "oracle_reward", "oracle_reward_std": mean and std of the oracle reward of the full texts;
      "kl", "kl_std": mean and std of the sequence log-ratio (the k1 estimate of KL(pi || pi_ref));
      "num_tokens": response tokens sampled; "mean_length": response tokens per sample;
      "texts": full texts (prompt + response); "responses": responses only;
      "rewards", "kls": per-sample tensors (N,); "generation": the Generation itself.
    The same seed gives the same samples (the caller's RNG is left as it was).
    """
    device = next(policy.parameters()).device
    with seeded_sampling(seed, device):
        generation = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                              top_k=0, top_p=1.0, max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
    rewards = oracle_reward(generation.full_texts)  # (N,)
    kls = sequence_kl(policy, ref_model, generation)  # (N,)
    return {
        "oracle_reward": rewards.mean().item(),
        "oracle_reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "kl": kls.mean().item(),
        "kl_std": kls.std().item() if len(kls) > 1 else 0.0,
        "num_tokens": generation.num_tokens,
        "mean_length": generation.num_tokens / len(prompts),
        "texts": generation.full_texts,
        "responses": generation.texts,
        "rewards": rewards,
        "kls": kls,
        "generation": generation,
    }
