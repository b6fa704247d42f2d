"""dpo_teach.online: online iterative DPO on a tiny random model with a stand-in oracle that records
what it is asked. The labels must come from the oracle applied to the CURRENT policy's samples."""

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import datasets
import pytest
import torch

from dpo_teach import online
from dpo_teach.models import frozen_copy
from dpo_teach.online import (
    label_matched_pairs,
    one_pair_per_prompt,
    online_dpo,
    round_prompts,
    sample_pairs,
)
from dpo_teach.settings import DPOConfig

PROMPTS = ["I watched", "The acting was", "What a", "The plot", "This film", "My friends"]
CONFIG = DPOConfig(beta=0.5, batch_size=4, lr=5e-3, warmup_steps=1, seed=3)
SAMPLING = dict(max_new_tokens=6, max_prompt_tokens=16)


class RecordingOracle:
    """Scores a text by a hash of its characters (ties are rare), or 0.0 for texts that start with
    one of `tie_prompts`; remembers every text and score it gave."""

    def __init__(self, tie_prompts=()):
        self.calls, self.scores, self.tie_prompts = [], {}, tuple(tie_prompts)

    def __call__(self, texts):
        self.calls.append(list(texts))
        scores = [0.0 if t.startswith(self.tie_prompts) and self.tie_prompts else float(sum(map(ord, t)) % 101)
                  for t in texts]
        self.scores.update(zip(texts, scores))
        return torch.tensor(scores)


def run(model, tokenizer, rounds, oracle, **kwargs):
    policy = copy.deepcopy(model)
    history = online_dpo(policy, frozen_copy(model), tokenizer, PROMPTS, CONFIG, rounds, oracle=oracle,
                         steps_per_round=3, **SAMPLING, **kwargs)
    return policy, history


def test_labels_come_from_the_oracle_on_the_current_policys_samples(tiny_model, tokenizer):
    oracle = RecordingOracle()
    _, history = run(tiny_model, tokenizer, 2, oracle)
    assert len(oracle.calls) == 2 and all(len(call) == 2 * len(PROMPTS) for call in oracle.calls)
    assert history["labels"] == [6, 12] and history["oracle_calls"] == [12, 24]
    for pair in history["collected_pairs"]:  # the chosen text is the one the oracle scored higher
        chosen, rejected = oracle.scores[pair["prompt"] + pair["chosen"]], oracle.scores[pair["prompt"] + pair["rejected"]]
        assert chosen > rejected and (pair["chosen_score"], pair["rejected_score"]) == pytest.approx((chosen, rejected))
    assert history["pairs"][-1] == len(history["collected_pairs"]) > 0

    # Round 1 samples the initial policy; round 2 samples the policy trained in round 1.
    after_round_1, _ = run(tiny_model, tokenizer, 1, RecordingOracle())
    for policy, round_index, expected in ((tiny_model, 1, True), (after_round_1, 2, True), (tiny_model, 2, False)):
        again = RecordingOracle()
        sample_pairs(policy, tokenizer, PROMPTS, again, seed=CONFIG.seed + round_index, **SAMPLING)
        assert (again.calls[0] == oracle.calls[round_index - 1]) == expected, (round_index, expected)


def test_ties_are_skipped_and_counted(tiny_model, tokenizer):
    oracle = RecordingOracle(tie_prompts=PROMPTS[:2])
    _, history = run(tiny_model, tokenizer, 2, oracle)
    assert history["ties"] == [2, 4] and history["labels"] == [6, 12]
    assert history["round_pairs"] == [4, 4] and history["pairs"] == [4, 8]
    assert all(pair["prompt"] not in PROMPTS[:2] for pair in history["collected_pairs"])


def test_a_round_of_ties_trains_nothing(tiny_model, tokenizer):
    policy, history = run(tiny_model, tokenizer, 1, RecordingOracle(tie_prompts=PROMPTS))
    assert history["ties"] == [6] and history["pairs"] == [0] and history["steps"] == [0]
    assert all(math.isnan(history[key][0])
               for key in ("train/loss", "train/rewards/margins", "train/rewards/accuracies"))
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), tiny_model.parameters()))


def test_same_seed_same_run(tiny_model, tokenizer):
    (policy_a, history_a), (policy_b, history_b) = (run(tiny_model, tokenizer, 2, RecordingOracle()) for _ in range(2))
    for key in history_a:
        if key != "seconds":
            assert history_a[key] == history_b[key], key
    assert all(torch.equal(a, b) for a, b in zip(policy_a.parameters(), policy_b.parameters()))
    assert history_a["steps"] == [3, 6] and all(math.isfinite(x) for x in history_a["train/loss"])
    assert len(history_a["train/rewards/margins"]) == len(history_a["train/rewards/accuracies"]) == 2
    assert history_a["round"] == [1, 2]


def test_eval_fn_before_and_after_each_round(tiny_model, tokenizer):
    seen = []

    def eval_fn(policy):
        seen.append(torch.rand(()).item())  # eval_fn's randomness must not change the run
        return {"first_weight": policy.lm_head.weight[0, 0].item(), "texts": ["not a number"]}

    _, history = run(tiny_model, tokenizer, 2, RecordingOracle(), eval_fn=eval_fn)
    _, plain = run(tiny_model, tokenizer, 2, RecordingOracle())
    assert history["eval/round"] == [0, 1, 2] and history["eval/labels"] == [0, 6, 12] and len(seen) == 3
    assert len(history["eval/first_weight"]) == 3 and "eval/texts" not in history
    assert history["collected_pairs"] == plain["collected_pairs"] and history["train/loss"] == plain["train/loss"]


def test_sample_pairs_skips_empty_and_identical_responses(tokenizer, monkeypatch):
    texts = [" good", " bad", "", " fine", " same", " same", " meh", " meh."]
    prompts = ["a", "b", "c", "d"]
    fake = SimpleNamespace(texts=texts, full_texts=[p + t for p, t in zip([p for p in prompts for _ in (0, 1)], texts)])
    monkeypatch.setattr(online, "generate", lambda *args, **kwargs: fake)
    scores = {"a good": 0.9, "a bad": -0.5, "c same": 0.1, "d meh": 0.0, "d meh.": 0.2}
    model = torch.nn.Linear(1, 1)
    pairs, counts = sample_pairs(model, tokenizer, prompts, lambda full: torch.tensor([scores.get(t, 0.0) for t in full]))
    assert counts == dict(labels=4, oracle_calls=8, ties=1, empty=1, pairs=2, mean_score=pytest.approx(0.8 / 8),
                          prompt_scores=pytest.approx([0.2, 0.0, 0.1, 0.1]))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("a", " good", " bad"), ("d", " meh.", " meh")]


def test_round_prompts_cycle():
    assert round_prompts(PROMPTS, 0, 4) == PROMPTS[:4]
    assert round_prompts(PROMPTS, 1, 4) == PROMPTS[4:] + PROMPTS[:2]


def test_label_matched_pairs():
    records = [{"prompt": str(i), "chosen": " a", "rejected": " b"} for i in range(10)]
    assert label_matched_pairs(records, 3) == records[:3]
    picked = label_matched_pairs(records, 4, seed=0)
    assert len(picked) == 4 and picked == label_matched_pairs(records, 4, seed=0) and picked != records[:4]
    dataset = label_matched_pairs(datasets.Dataset.from_list(records), 3)
    assert isinstance(dataset, datasets.Dataset) and dataset.to_list() == records[:3]
    with pytest.raises(ValueError, match="num_labels must lie in 1..10"):
        label_matched_pairs(records, 11)


def test_one_pair_per_prompt():
    # 14 pairs on 5 prompts, several per prompt and in prompt order, as the offline data set comes
    records = [{"prompt": p, "chosen": f" a{i}", "rejected": " b"} for i, p in enumerate("aaabbbbcddddee")]
    picked = one_pair_per_prompt(records, 4, seed=1)
    assert len(picked) == 4 and len({r["prompt"] for r in picked}) == 4  # four distinct prompts, one pair each
    assert picked == one_pair_per_prompt(records, 4, seed=1)  # seeded
    assert [records.index(r) for r in picked] == sorted(records.index(r) for r in picked)  # the data set's order
    assert sorted(r["prompt"] for r in one_pair_per_prompt(records, 5)) == list("abcde")
    given = one_pair_per_prompt(records, ["d", "a"], seed=2)  # the online run's prompts
    assert [r["prompt"] for r in given] == ["a", "d"]
    draws = {tuple(r["chosen"] for r in one_pair_per_prompt(records, 5, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the pair of each prompt is drawn at random, not always its first
    dataset = one_pair_per_prompt(datasets.Dataset.from_list(records), 4, seed=1)
    assert isinstance(dataset, datasets.Dataset) and dataset.to_list() == picked
    with pytest.raises(ValueError, match="prompts must lie in 1..5"):
        one_pair_per_prompt(records, 6)
    with pytest.raises(ValueError, match="1 of the prompts have no pair, e.g. 'z'"):
        one_pair_per_prompt(records, ["a", "z"])
    with pytest.raises(ValueError, match="distinct"):
        one_pair_per_prompt(records, ["a", "a"])


def test_sample_scores_are_recorded_per_prompt(tiny_model, tokenizer):
    oracle = RecordingOracle()
    _, history = run(tiny_model, tokenizer, 2, oracle)
    for round_index, scores in enumerate(history["sample_scores"]):
        given = [oracle.scores[t] for t in oracle.calls[round_index]]  # rows 2i and 2i + 1: prompt i
        assert scores == pytest.approx([(given[2 * i] + given[2 * i + 1]) / 2 for i in range(len(PROMPTS))])
        assert sum(scores) / len(scores) == pytest.approx(history["sample_reward"][round_index])


def test_online_dpo_needs_a_constant_schedule(tiny_model, tokenizer):
    """Its length is not known in advance, so a decaying schedule has no end to plan for."""
    with pytest.raises(ValueError, match="schedule='constant'"):
        online_dpo(tiny_model, tiny_model, tokenizer, ["a"], replace(CONFIG, schedule="cosine"), rounds=1)
