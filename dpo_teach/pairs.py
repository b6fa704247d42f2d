"""Preference pairs as in the paper: sample completions from the SFT policy, let the oracle judge.

For each prompt, `completions_per_prompt` responses are sampled (temperature 1, full distribution;
the paper: 4 per prompt) and every two of them form a pair (4 samples give 6 pairs). The oracle
scores each full text (prompt + response) and labels the pair:

- labels="oracle" (default): the response with the higher oracle score is chosen (deterministic);
- labels="bradley_terry": chosen is drawn with p(a beats b) = sigma(bt_scale * (r*(a) - r*(b))),
  a noisy judge that follows the Bradley-Terry model (seeded).

The rule for ties: a pair is left out, and counted, when a response is empty (counts["empty"]), when
both responses are the same text (counts["identical"]), or when their oracle scores are exactly
equal (counts["ties"]; common for neutral texts, which VADER scores 0.0). Such a pair says nothing
about which response is better. Responses keep their leading space: prompt + response is the text.
"""

from __future__ import annotations

import warnings
from itertools import combinations

import datasets
import torch

from dpo_teach.evaluation import seeded_sampling
from dpo_teach.sampling import generate
from dpo_teach.settings import NEW_TOKENS, PROMPT_TOKENS, PairsConfig
from dpo_teach.world import load_prompts, oracle_reward

__all__ = ["LABELS", "build_preference_pairs", "pair_prompts", "make_preference_pairs"]

LABELS = ("oracle", "bradley_terry")


def build_preference_pairs(policy, tokenizer, prompts: list[str], completions_per_prompt: int = 4,
                           labels: str = "oracle", seed: int = 0, bt_scale: float = 10.0,
                           max_new_tokens: int = NEW_TOKENS, max_prompt_tokens: int | None = PROMPT_TOKENS,
                           batch_size: int | None = None) -> tuple[datasets.Dataset, dict]:
    """Sample, score and pair responses. Returns (Dataset with columns prompt, chosen, rejected,
    chosen_score, rejected_score; counts dict: prompts, samples, unfinished, possible_pairs, empty,
    identical, ties, pairs, flipped (Bradley-Terry labels that disagree with the scores))."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if completions_per_prompt < 2:
        raise ValueError(f"completions_per_prompt must be at least 2 to form pairs, got {completions_per_prompt}")
    k = completions_per_prompt
    repeated = [p for p in prompts for _ in range(k)]  # the k samples of prompt i are rows k*i ... k*i + k-1
    device = next(policy.parameters()).device
    with seeded_sampling(seed, device):
        generation = generate(policy, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=1.0,
                              top_k=0, top_p=1.0, max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
    scores = oracle_reward(generation.full_texts).tolist()
    texts = generation.texts
    label_generator = torch.Generator().manual_seed(seed)
    counts = dict(prompts=len(prompts), samples=len(texts), unfinished=int((~generation.finished).sum()),
                  possible_pairs=0, empty=0, identical=0, ties=0, pairs=0, flipped=0)
    rows = {"prompt": [], "chosen": [], "rejected": [], "chosen_score": [], "rejected_score": []}
    for i, prompt in enumerate(prompts):
        for a, b in combinations(range(k * i, k * i + k), 2):
            counts["possible_pairs"] += 1
            if not texts[a].strip() or not texts[b].strip():
                counts["empty"] += 1
                continue
            if texts[a] == texts[b]:
                counts["identical"] += 1
                continue
            if scores[a] == scores[b]:
                counts["ties"] += 1
                continue
            a_wins = scores[a] > scores[b]
            if labels == "bradley_terry":
                p_a = torch.sigmoid(torch.tensor(bt_scale * (scores[a] - scores[b]))).item()
                drawn = torch.rand((), generator=label_generator).item() < p_a
                counts["flipped"] += int(drawn != a_wins)
                a_wins = drawn
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows["prompt"].append(prompt)
            rows["chosen"].append(texts[chosen])
            rows["rejected"].append(texts[rejected])
            rows["chosen_score"].append(scores[chosen])
            rows["rejected_score"].append(scores[rejected])
    counts["pairs"] = len(rows["prompt"])
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "chosen_score": datasets.Value("float32"),
                                  "rejected_score": datasets.Value("float32")})
    return datasets.Dataset.from_dict(rows, features=features), counts


def pair_prompts(preset, config: PairsConfig) -> dict[str, list[str]]:
    """The prompts of each split: the first training prompts, and the LAST test prompts (the
    evaluation uses the first preset.eval_prompts test prompts; a warning says when they overlap)."""
    test = load_prompts(preset, "test")
    if config.num_test_prompts > len(test):
        raise ValueError(f"{config.num_test_prompts} held-out prompts asked for, but there are only {len(test)}")
    if config.num_test_prompts + preset.eval_prompts > len(test):
        warnings.warn(f"the {config.num_test_prompts} held-out pair prompts overlap the {preset.eval_prompts} "
                      f"evaluation prompts (there are {len(test)} test prompts)", stacklevel=2)
    return {"train": load_prompts(preset, "train", config.num_train_prompts),
            "test": test[len(test) - config.num_test_prompts:]}


def make_preference_pairs(policy, tokenizer, preset, config: PairsConfig = PairsConfig()
                          ) -> tuple[datasets.DatasetDict, dict]:
    """The course's preference data: a "train" split from training prompts and a held-out "test"
    split from other prompts. Returns (DatasetDict, {"train": counts, "test": counts})."""
    splits, counts = {}, {}
    for offset, (split, prompts) in enumerate(pair_prompts(preset, config).items()):
        splits[split], counts[split] = build_preference_pairs(
            policy, tokenizer, prompts, config.completions_per_prompt, labels=config.labels,
            seed=config.seed + offset, bt_scale=config.bt_scale, max_new_tokens=config.max_new_tokens,
            max_prompt_tokens=config.max_prompt_tokens)
    return datasets.DatasetDict(splits), counts
