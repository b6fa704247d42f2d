"""The pair builder: all pairs of the samples of a prompt, the rule for ties, the counts, labels."""

from dataclasses import replace

import pytest
import torch

from dpo_teach import pairs as pairs_module
from dpo_teach.pairs import build_preference_pairs, make_preference_pairs
from dpo_teach.presets import get_preset
from dpo_teach.sampling import Generation
from dpo_teach.settings import PairsConfig
from dpo_teach.world import load_prompts, oracle_reward


def fake_generate(responses: list[str]):
    """A stand-in for sampling.generate that returns `responses` in order."""

    def generate(model, tokenizer, prompts, **kwargs):
        n = len(prompts)
        texts = responses[:n]
        ids = torch.zeros((n, 1), dtype=torch.long)
        return Generation(list(prompts), texts, ids, torch.ones_like(ids), ids, torch.ones_like(ids),
                          torch.ones(n, dtype=torch.bool))

    return generate


def test_ties_identical_and_empty_responses_are_left_out_and_counted(monkeypatch, tiny_model, tokenizer):
    responses = [" was great.", " was awful.", " was great.", " was shot in Paris.",  # prompt 1
                 " is long.", " is in cinemas now.", "", " is superb."]  # prompt 2
    monkeypatch.setattr(pairs_module, "generate", fake_generate(responses))
    prompts = ["The film", "The movie"]
    data, counts = build_preference_pairs(tiny_model, tokenizer, prompts, completions_per_prompt=4)
    # prompt 1: (great, great) identical; (great, awful) x2, (great, Paris) x2, (awful, Paris): 5 pairs
    # prompt 2: three pairs with "" are empty; (long, cinemas) both 0.0: a tie; 2 pairs with "superb"
    assert counts == dict(prompts=2, samples=8, unfinished=0, possible_pairs=12, empty=3, identical=1, ties=1,
                          pairs=7, flipped=0)
    assert counts["pairs"] + counts["empty"] + counts["identical"] + counts["ties"] == counts["possible_pairs"]
    assert len(data) == 7 and data.column_names == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
    for row in data:
        assert row["chosen"] != row["rejected"]
        assert row["chosen_score"] > row["rejected_score"]
        scores = oracle_reward([row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]])
        assert row["chosen_score"] == pytest.approx(scores[0].item())
        assert row["rejected_score"] == pytest.approx(scores[1].item())
        assert row["chosen"].startswith(" "), "responses keep their leading space"


def test_pairs_from_a_model_are_seeded_and_consistent(tiny_model, tokenizer):
    prompts = ["I watched", "The acting was", "What a"]
    data, counts = build_preference_pairs(tiny_model, tokenizer, prompts, seed=3, max_new_tokens=8)
    again, counts_again = build_preference_pairs(tiny_model, tokenizer, prompts, seed=3, max_new_tokens=8)
    assert data.to_dict() == again.to_dict() and counts == counts_again
    assert counts["possible_pairs"] == 6 * len(prompts) and counts["samples"] == 4 * len(prompts)
    assert counts["pairs"] + counts["empty"] + counts["identical"] + counts["ties"] == counts["possible_pairs"]
    assert len(data) == counts["pairs"]
    assert all(c != r for c, r in zip(data["chosen"], data["rejected"]))
    assert set(data["prompt"]) <= set(prompts)


def test_bradley_terry_labels(monkeypatch, tiny_model, tokenizer):
    responses = [" was great.", " was awful.", " was good.", " was bad."] * 50
    monkeypatch.setattr(pairs_module, "generate", fake_generate(responses))
    prompts = ["The film"] * 50
    sharp, counts = build_preference_pairs(tiny_model, tokenizer, prompts, labels="bradley_terry", bt_scale=1e4)
    assert counts["flipped"] == 0 and all(c > r for c, r in zip(sharp["chosen_score"], sharp["rejected_score"]))
    coin, counts = build_preference_pairs(tiny_model, tokenizer, prompts, labels="bradley_terry", bt_scale=0.0)
    assert 0.35 < counts["flipped"] / counts["pairs"] < 0.65, "with bt_scale 0 a label is a coin flip"
    again, _ = build_preference_pairs(tiny_model, tokenizer, prompts, labels="bradley_terry", bt_scale=0.0)
    assert coin.to_dict() == again.to_dict(), "sampled labels are seeded"


def test_bad_arguments_are_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="labels must be one of"):
        build_preference_pairs(tiny_model, tokenizer, ["a"], labels="human")
    with pytest.raises(ValueError, match="at least 2"):
        build_preference_pairs(tiny_model, tokenizer, ["a"], completions_per_prompt=1)


def test_train_and_test_prompts_are_different(tiny_model, tokenizer):
    preset = get_preset("tiny", device="cpu")
    config = PairsConfig(num_train_prompts=3, num_test_prompts=2, completions_per_prompt=2, max_new_tokens=4)
    data, counts = make_preference_pairs(tiny_model, tokenizer, preset, config)
    assert set(data) == {"train", "test"}
    assert counts["train"]["prompts"] == 3 and counts["test"]["prompts"] == 2
    prompts = pairs_module.pair_prompts(preset, config)
    assert prompts["train"] == load_prompts(preset, "train")[:3]
    test = load_prompts(preset, "test")
    assert prompts["test"] == test[-2:], "held-out pairs come from test reviews, not from training ones"
    assert len(test) - 2 >= preset.eval_prompts, "and not from the evaluation prompts (the first ones)"
    with pytest.raises(ValueError, match="only"):
        make_preference_pairs(tiny_model, tokenizer, preset, replace(config, num_test_prompts=10_000))
    with pytest.warns(UserWarning, match="overlap"):
        pairs_module.pair_prompts(preset, replace(config, num_test_prompts=len(test) - 10))
