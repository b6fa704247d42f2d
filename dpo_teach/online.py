"""Online iterative DPO: sample from the current policy, let the oracle judge, train, repeat.

Offline DPO (notebook 08) learns from pairs sampled once, from the SFT policy, before training. As
the policy moves away from the SFT policy, those pairs describe responses it no longer writes.
Online (iterative) DPO collects its pairs from the policy being trained, in rounds (Xiong et al.
2024, arXiv 2312.11456; Guo et al. 2024, "Direct language model alignment from online AI
feedback", arXiv 2402.04792):

    for each round:
        sample two responses per prompt from the CURRENT policy
        the oracle scores both; the higher score is chosen (a tie says nothing: skipped, counted)
        DPO steps on the new pairs, against the FIXED reference model (the SFT policy)

One oracle label is one comparison of two responses (two texts scored). `label_matched_pairs`
gives the offline baseline the same number of labels; `one_pair_per_prompt` gives it one label on
each of the online run's prompts.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from dpo_teach.dpo import as_records, precompute_ref_logps, train_dpo
from dpo_teach.evaluation import seeded_sampling
from dpo_teach.sampling import generate
from dpo_teach.settings import NEW_TOKENS, PROMPT_TOKENS, DPOConfig
from dpo_teach.training import append, eval_fn_numbers, make_optimizer
from dpo_teach.world import oracle_reward

__all__ = ["label_matched_pairs", "one_pair_per_prompt", "online_dpo", "round_prompts", "sample_pairs"]


def sample_pairs(policy, tokenizer, prompts: list[str], oracle=oracle_reward, seed: int = 0,
                 max_new_tokens: int = NEW_TOKENS, max_prompt_tokens: int | None = PROMPT_TOKENS) -> tuple[list[dict], dict]:
    """Two responses per prompt from `policy` (temperature 1, full distribution, seeded), scored by
    `oracle` on prompt + response, one comparison per prompt.

    Returns (pairs, counts): pairs are {"prompt", "chosen", "rejected", "chosen_score",
    "rejected_score"}, chosen being the response with the higher score; counts has "labels"
    (comparisons asked, one per prompt), "oracle_calls" (texts scored), "ties" (equal scores, which
    includes identical responses), "empty" (a blank response: nothing to train on), "pairs",
    "mean_score" (the mean oracle score of the samples: the policy's own reward, for free) and
    "prompt_scores" (the mean score of each prompt's two samples, a list in prompt order, ties and
    blanks included).
    """
    repeated = [p for p in prompts for _ in range(2)]  # the samples of prompt i are rows 2i and 2i + 1
    with seeded_sampling(seed, next(policy.parameters()).device):
        generation = generate(policy, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=1.0,
                              top_k=0, top_p=1.0, max_prompt_tokens=max_prompt_tokens)
    scores = [float(s) for s in oracle(generation.full_texts)]
    texts = generation.texts
    counts = dict(labels=len(prompts), oracle_calls=len(texts), ties=0, empty=0, pairs=0,
                  mean_score=sum(scores) / len(scores),
                  prompt_scores=[(scores[2 * i] + scores[2 * i + 1]) / 2 for i in range(len(prompts))])
    pairs = []
    for i, prompt in enumerate(prompts):
        a, b = 2 * i, 2 * i + 1
        if not texts[a].strip() or not texts[b].strip():
            counts["empty"] += 1
        elif scores[a] == scores[b]:
            counts["ties"] += 1
        else:
            chosen, rejected = (a, b) if scores[a] > scores[b] else (b, a)
            pairs.append({"prompt": prompt, "chosen": texts[chosen], "rejected": texts[rejected],
                          "chosen_score": scores[chosen], "rejected_score": scores[rejected]})
    counts["pairs"] = len(pairs)
    return pairs, counts


def round_prompts(prompts: list[str], round_index: int, per_round: int) -> list[str]:
    """The prompts of round `round_index` (0-based): the next `per_round` prompts, cycling through the list."""
    start = round_index * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


def online_dpo(policy, ref_model, tokenizer, prompts: list[str], config: DPOConfig, rounds: int,
               prompts_per_round: int | None = None, steps_per_round: int | None = None, oracle=oracle_reward,
               eval_fn=None, max_new_tokens: int = NEW_TOKENS, max_prompt_tokens: int | None = PROMPT_TOKENS) -> dict[str, list]:
    """Train `policy` in place with online iterative DPO for `rounds` rounds; return the history.

    Round r (1-based) samples on round_prompts(prompts, r - 1, prompts_per_round) (default: all
    prompts), with the sampling seed config.seed + r, so the same seed gives the same run. It then
    takes steps_per_round DPO steps (default: each new pair once, ceil(pairs / batch_size)) with
    reference log-probs from `ref_model`, which stays fixed. One AdamW and one warm-up run across
    all rounds: the run is one training run whose data arrive in rounds.

    History, one entry per round: "round", cumulative "labels" (comparisons asked of the oracle,
    ties included), "oracle_calls", "pairs", "ties", "empty", "steps" and "seconds"; "round_pairs";
    "sample_reward" (mean oracle score of the round's samples) and "sample_scores" (the list of
    each prompt's mean score, see sample_pairs); the means over the round's steps
    of "train/loss", "train/rewards/margins" and "train/rewards/accuracies" (nan when a round has no
    pair). With eval_fn(policy) -> dict: "eval/round" (0 = before training), "eval/labels" and
    "eval/<key>".
    "collected_pairs": every pair used, with its "round".
    """
    if config.schedule != "constant":  # the run's length is not known in advance: no decay to plan
        raise ValueError(f"online_dpo needs schedule='constant' (warm-up, then constant), got {config.schedule!r}")
    lengths = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=None)
    per_round = prompts_per_round or len(prompts)
    optimizer = make_optimizer(policy, config)
    ref_model.eval()
    history: dict[str, list] = {"collected_pairs": []}
    totals = dict(labels=0, oracle_calls=0, pairs=0, ties=0, empty=0, steps=0)
    if eval_fn is not None:
        _record_eval(history, policy, eval_fn, 0, 0)
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        pairs, counts = sample_pairs(policy, tokenizer, round_prompts(prompts, r - 1, per_round), oracle,
                                     seed=config.seed + r, max_new_tokens=max_new_tokens,
                                     max_prompt_tokens=max_prompt_tokens)
        steps = 0
        round_history = {}
        if pairs:
            ref_logps = precompute_ref_logps(ref_model, tokenizer, pairs, average=config.average_logps, **lengths)
            steps = steps_per_round or math.ceil(len(pairs) / config.batch_size)
            round_config = replace(config, num_steps=steps, seed=config.seed + r, eval_every=0)
            round_history = train_dpo(policy, tokenizer, pairs, round_config, ref_logps=ref_logps, optimizer=optimizer,
                                      first_step=totals["steps"], progress=False, **lengths)
        for key in ("labels", "oracle_calls", "pairs", "ties", "empty"):
            totals[key] += counts[key]
        totals["steps"] += steps
        append(history, {"round": r, **totals, "seconds": time.perf_counter() - start, "round_pairs": len(pairs),
                         "sample_reward": counts["mean_score"], "sample_scores": counts["prompt_scores"],
                         **{key: _mean(round_history.get(key, []))
                            for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies")}})
        history["collected_pairs"].extend({**pair, "round": r} for pair in pairs)
        if eval_fn is not None:
            _record_eval(history, policy, eval_fn, r, totals["labels"])
    policy.eval()
    return history


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _record_eval(history: dict, policy, eval_fn, round_index: int, labels: int) -> None:
    """eval_fn's numbers, in a forked random stream (the run's samples do not depend on it)."""
    was_training = policy.training
    policy.eval()
    results = eval_fn_numbers(policy, eval_fn)
    append(history, {"round": round_index, "labels": labels, **results}, prefix="eval/")
    policy.train(was_training)


def label_matched_pairs(pairs, num_labels: int, seed: int | None = None):
    """The offline baseline on the online run's label budget: `num_labels` offline pairs (one label
    each), the first ones, or a seeded random subset with `seed` (the offline pairs come several per
    prompt, in prompt order, so the first ones cover few prompts: see one_pair_per_prompt for a
    baseline on as many prompts as the online run). A Dataset stays a Dataset.

    The offline data set has already dropped its ties, which also cost labels: at equal labels
    the offline baseline gets slightly more pairs than this count suggests."""
    total = len(pairs)
    if not 0 < num_labels <= total:
        raise ValueError(f"num_labels must lie in 1..{total} (the number of offline pairs), got {num_labels}")
    if seed is None:
        indices = list(range(num_labels))
    else:
        indices = sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_labels].tolist())
    return _select(pairs, indices)


def one_pair_per_prompt(pairs, prompts: int | list[str], seed: int = 0):
    """The offline baseline of an online run that asks one label on each of its prompts: one offline
    pair (one label) on each of `prompts` DISTINCT prompts. `prompts` is a list of distinct prompts
    (e.g. the online run's own; each must have a pair in `pairs`) or a number of prompts drawn at
    random, seeded, among those of `pairs`. The pair of each prompt is a seeded random one of its
    pairs; the pairs keep their order in `pairs`. A Dataset stays a Dataset."""
    records = as_records(pairs)
    by_prompt: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_prompt.setdefault(record["prompt"], []).append(i)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(prompts, int):
        if not 0 < prompts <= len(by_prompt):
            raise ValueError(f"prompts must lie in 1..{len(by_prompt)} (the number of distinct prompts of the pairs), "
                             f"got {prompts}")
        names = list(by_prompt)
        prompts = [names[i] for i in torch.randperm(len(names), generator=generator)[:prompts].tolist()]
    elif len(set(prompts)) != len(prompts):
        raise ValueError("prompts must be distinct: one pair per prompt")
    missing = [p for p in prompts if p not in by_prompt]
    if missing:
        raise ValueError(f"{len(missing)} of the prompts have no pair, e.g. {missing[0]!r}")
    indices = sorted(by_prompt[p][int(torch.randint(len(by_prompt[p]), (), generator=generator))] for p in prompts)
    return _select(pairs, indices)


def _select(pairs, indices: list[int]):
    """The records of `pairs` at `indices`: a Dataset stays a Dataset, anything else becomes a list."""
    if hasattr(pairs, "select"):  # a datasets.Dataset
        return pairs.select(indices)
    records = as_records(pairs)
    return [records[i] for i in indices]
