"""The review world: a seeded generator with real variety, the data files, and the VADER oracle."""

import random

import pytest
import torch

from dpo_teach import world


def test_generator_is_seeded():
    assert world.generate_reviews(50, seed=3) == world.generate_reviews(50, seed=3)
    assert world.generate_reviews(50, seed=3) != world.generate_reviews(50, seed=4)
    assert world.generate_generic(20, seed=3) == world.generate_generic(20, seed=3)


def test_reviews_have_variety():
    reviews = world.generate_reviews(2000, seed=0)
    texts = [r["text"] for r in reviews]
    assert {r["sentiment"] for r in reviews} == {"positive", "negative", "mixed", "neutral"}
    assert len(set(texts)) > 0.95 * len(texts), "reviews should rarely repeat"
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) < 15 and max(lengths) > 40, "reviews should have different lengths"
    joined = " ".join(texts)
    for marker in [" not ", " never ", " but ", " utterly ", " very "] + [f" {g}" for g in world.GENRES[:5]]:
        assert marker in joined, f"no review contains {marker!r}"
    assert len({t.split(".")[0] for t in texts}) > 500, "openers should vary"


def test_generic_text_is_not_reviews():
    docs = world.generate_generic(400, seed=0)
    assert {d["topic"] for d in docs} == set(world.GENERIC_TOPICS)
    assert not any("film" in d["text"] or "review" in d["text"] for d in docs)


def test_oracle_shape_and_range():
    scores = world.oracle_reward(["a wonderful film", "a dreadful film", "a film"])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0] > 0 > scores[1] and scores[2] == 0
    assert bool(((scores >= -1) & (scores <= 1)).all())


@pytest.mark.parametrize("better, worse", [
    ("The film was not bad.", "The film was bad."),
    ("The plot is never boring.", "The plot is boring."),
    ("The film was bad.", "The film was very bad."),
    ("The film was very good.", "The film was good."),
    ("A weak script but a great cast.", "A great cast but a weak script."),
    ("Highly recommended.", "I would not recommend it."),
])
def test_oracle_moves_like_a_person(better, worse):
    high, low = world.oracle_reward([better, worse])
    assert high > low, f"the oracle should prefer {better!r} to {worse!r}"


def test_oracle_rejects_bad_input():
    with pytest.raises(ValueError, match="single string"):
        world.oracle_reward("a film")
    with pytest.raises(ValueError, match="text 1"):
        world.oracle_reward(["fine", 3])


def test_oracle_agrees_with_generator_labels():
    reviews = world.generate_reviews(600, seed=11)
    scores = world.oracle_reward([r["text"] for r in reviews])
    mean = {s: scores[[i for i, r in enumerate(reviews) if r["sentiment"] == s]].mean().item()
            for s in ("positive", "negative")}
    assert mean["positive"] > 0.4 and mean["negative"] < -0.2, mean


def test_data_files_match_the_generator():
    for name, (n, _) in world.SPLITS.items():
        records = world.load_split(name)
        assert len(records) == n, name
    first = world.load_split("reviews_train")[:20]
    assert first == world.generate_reviews(20, seed=world.SPLITS["reviews_train"][1])


def test_prompts_are_prefixes_of_their_split():
    for name, (source, n, _) in world.PROMPT_SETS.items():
        texts = [r["text"] for r in world.load_split(source)]
        prompts = world.load_split(name)
        assert len(prompts) == n
        for record in prompts[:200]:
            words = record["prompt"].split()
            assert world.MIN_PROMPT_WORDS <= len(words) <= world.MAX_PROMPT_WORDS
            assert any(t.startswith(record["prompt"] + " ") for t in texts), record


def test_make_prompt_keeps_a_continuation():
    rng = random.Random(0)
    for _ in range(100):
        prompt = world.make_prompt("one two three", rng)["prompt"]
        assert prompt in ("one two",)
