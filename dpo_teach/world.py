"""The offline "reviews" world: a seeded generator of short movie reviews, generic text, and the oracle.

Everything the default (CPU, offline) preset trains and evaluates on comes from here:

- `generate_reviews(n, seed)`: short English movie reviews from a small grammar with real variety
  (titles, genres, aspects, intensifiers, negation such as "not bad", contrast such as "a great
  cast but a weak script", mixed and neutral reviews, different lengths);
- `generate_generic(n, seed)`: weather notes, recipes, sports recaps and town news made by the same
  kind of grammar, so that pretraining gives a general "base" model that is not yet a review writer;
- `write_world(folder)`: the splits and prompt sets as JSONL (data/world/, see data/README.md);
- `oracle_reward(texts)`: the VADER compound score in [-1, 1], the course's stand-in for human
  judgement (Hutto & Gilbert 2014). Nobody in this course wrote it, and every method is judged by it.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["GENRES", "ASPECTS", "POSITIVE", "NEGATIVE", "NEUTRAL_ADJ", "INTENSIFIERS", "FIRST_NAMES",
           "LAST_NAMES", "TITLE_ADJ", "TITLE_NOUNS", "PLACES", "SUBJECTS", "PLOTS", "PLURAL_ASPECTS",
           "VERDICTS", "generate_review", "TOWNS", "DAYS", "TEAMS", "NUMBERS", "FOODS", "INGREDIENTS",
           "GENERIC_TOPICS", "generate_generic", "generate_reviews", "make_prompt", "SPLITS", "PROMPT_SETS",
           "read_jsonl", "write_world", "world_dir", "load_split", "oracle_reward", "HTML_BREAK",
           "MIN_PROMPT_TOKENS", "MAX_PROMPT_TOKENS", "clean_review", "token_prompt", "load_reviews", "load_prompts"]

# ----------------------------------------------------------------------------------------------
# Vocabulary of the review grammar. Sentiment words are mostly ones VADER's lexicon knows, with a
# few it does not ("tedious", "forgettable"): like any real judge, the oracle is imperfect.

GENRES = ["thriller", "comedy", "drama", "horror film", "documentary", "romance", "western",
          "musical", "animated film", "science fiction film", "war film", "crime story", "mystery",
          "family film", "period drama", "road movie"]
ASPECTS = ["acting", "cast", "script", "plot", "story", "dialogue", "soundtrack", "music", "score",
           "camera work", "pacing", "ending", "direction", "lead actor", "lead actress",
           "special effects", "characters", "humor", "editing", "opening scene", "final act",
           "costumes", "set design", "villain"]
POSITIVE = ["good", "great", "brilliant", "wonderful", "superb", "charming", "beautiful", "excellent",
            "delightful", "clever", "funny", "stunning", "fantastic", "lovely", "impressive",
            "enjoyable", "fresh", "smart", "warm", "memorable", "powerful", "perfect", "amazing",
            "gripping", "moving", "sharp"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "dull", "weak", "poor", "silly", "disappointing",
            "messy", "stupid", "ugly", "annoying", "painful", "lazy", "horrible", "confusing",
            "pointless", "tedious", "forgettable", "clumsy", "flat", "lifeless", "cheap"]
NEUTRAL_ADJ = ["long", "short", "quiet", "simple", "familiar", "old-fashioned", "slow", "loud",
               "dark", "colorful", "modern", "unusual"]
INTENSIFIERS = ["very", "really", "truly", "utterly", "incredibly", "extremely", "absolutely",
                "quite", "rather", "somewhat", "genuinely", "remarkably"]
FIRST_NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Henry", "Iris", "Jack",
               "Kate", "Leo", "Maria", "Nick", "Olivia", "Paul", "Rosa", "Sam", "Tom", "Vera",
               "Walter", "Yara", "Hugo", "Nina"]
LAST_NAMES = ["Adams", "Baker", "Carter", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito",
              "Jensen", "Klein", "Lopez", "Moreau", "Novak", "Olsen", "Price", "Rossi", "Silva",
              "Turner", "Weber", "Young", "Khan", "Murphy", "Larsen"]
TITLE_ADJ = ["Silent", "Last", "Red", "Hidden", "Broken", "Golden", "Lost", "Secret", "Long", "Dark",
             "Little", "Burning", "Frozen", "Distant", "Empty", "Wild", "Quiet", "Final"]
TITLE_NOUNS = ["Harbor", "Garden", "River", "Winter", "City", "Road", "Mountain", "Letter", "Window",
               "Island", "Summer", "House", "Train", "Forest", "Bridge", "Station", "Storm", "Voice",
               "Mirror", "Kingdom", "Shadow", "Valley"]
PLACES = ["Paris", "a small village", "New York", "the desert", "a fishing town", "Tokyo",
          "the mountains", "a big city", "London", "an old castle", "a space station", "a coastal town"]
SUBJECTS = ["a young teacher", "a young boxer", "a retired detective", "a lonely pilot",
            "a family of farmers", "a famous singer", "a group of students", "an old sailor",
            "a nurse", "a young mother", "a small-town mayor", "a chess player", "a runaway dog"]
PLOTS = ["tries to find a lost friend", "returns home after many years", "plans a daring escape",
         "falls in love with a stranger", "solves a strange murder", "fights to save a farm",
         "travels across the country", "discovers a family secret", "starts a new life",
         "prepares for a big concert", "hunts a dangerous thief"]


def _title(rng: random.Random) -> str:
    shapes = [
        lambda: f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUNS)}",
        lambda: f"{rng.choice(TITLE_NOUNS)} of {rng.choice(TITLE_NOUNS)}s",
        lambda: f"{rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUNS)}",
        lambda: f"The {rng.choice(TITLE_NOUNS)}",
    ]
    return rng.choice(shapes)()


PLURAL_ASPECTS = {"characters", "special effects", "costumes"}


def _be(aspect: str, past: bool = False) -> str:
    """The verb that agrees with an aspect: "the plot is", "the characters were"."""
    if aspect in PLURAL_ASPECTS:
        return "were" if past else "are"
    return "was" if past else "is"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _graded(rng: random.Random, words: list[str]) -> str:
    """An adjective, with an intensifier half of the time: "very good", "utterly boring"."""
    adjective = rng.choice(words)
    if rng.random() < 0.5:
        return f"{rng.choice(INTENSIFIERS)} {adjective}"
    return adjective


def _opener(rng: random.Random, title: str, genre: str, polarity: str) -> str:
    """The first sentence. Most openers are neutral, so a prompt (the first words) rarely fixes
    the sentiment of the rest: the continuation is where a policy can be better or worse."""
    neutral = [
        f"I watched {title} last night.",
        f"I saw {title} at the cinema this weekend.",
        f"{title} is {_article(genre)} {genre} about {rng.choice(SUBJECTS)} who {rng.choice(PLOTS)}.",
        f"This {genre} follows {rng.choice(SUBJECTS)} who {rng.choice(PLOTS)}.",
        f"The new {genre} by {_person(rng)} opens this week.",
        f"My friends and I went to see {title}.",
        f"{title} stars {_person(rng)} as {rng.choice(SUBJECTS)}.",
        f"I finally watched {title}, the {genre} set in {rng.choice(PLACES)}.",
    ]
    if polarity in ("positive", "negative") and rng.random() < 0.3:
        words = POSITIVE if polarity == "positive" else NEGATIVE
        adjective = _graded(rng, words)
        return rng.choice([
            f"{title} is {_article(adjective)} {adjective} {genre}.",
            f"What {_article(adjective)} {adjective} {genre}.",
        ])
    return rng.choice(neutral)


def _judgement(rng: random.Random, polarity: str) -> str:
    """One sentence that judges one aspect, positive or negative, sometimes through negation."""
    aspect = rng.choice(ASPECTS)
    if polarity == "positive":
        if rng.random() < 0.2:  # negated negative: "never boring", "not bad at all"
            return rng.choice([
                f"The {aspect} {_be(aspect)} never {rng.choice(NEGATIVE)}.",
                f"The {aspect} {_be(aspect, True)} not {rng.choice(NEGATIVE)} at all.",
            ])
        adjective = _graded(rng, POSITIVE)
        return rng.choice([
            f"The {aspect} {_be(aspect)} {adjective}.",
            f"The {aspect} {_be(aspect, True)} {adjective}.",
            f"I found the {aspect} {adjective}.",
            f"{_person(rng)} is {adjective} in the lead role.",
            f"I loved the {aspect}.",
            f"The {aspect} made me smile.",
        ])
    if rng.random() < 0.2:  # negated positive: "not very good", "never funny"
        return rng.choice([
            f"The {aspect} {_be(aspect)} not {rng.choice(['very ', ''])}{rng.choice(POSITIVE)}.",
            f"The {aspect} {_be(aspect, True)} never {rng.choice(POSITIVE)}.",
        ])
    adjective = _graded(rng, NEGATIVE)
    return rng.choice([
        f"The {aspect} {_be(aspect)} {adjective}.",
        f"The {aspect} {_be(aspect, True)} {adjective}.",
        f"I found the {aspect} {adjective}.",
        f"{_person(rng)} is {adjective} in the lead role.",
        f"I hated the {aspect}.",
        f"The {aspect} made me yawn.",
    ])


def _contrast(rng: random.Random, first: str) -> str:
    """A contrast sentence: "The cast is great but the script is weak." (the second half wins)."""
    one, two = rng.sample(ASPECTS, 2)
    good = f"the {one} {_be(one)} {_graded(rng, POSITIVE)}"
    bad = f"the {two} {_be(two)} {_graded(rng, NEGATIVE)}"
    a, b = (good, bad) if first == "positive" else (bad, good)
    joint = rng.choice([" but ", ", but ", ", although ", " while "])
    return a[0].upper() + a[1:] + joint + b + "."


def _fact(rng: random.Random, genre: str) -> str:
    return rng.choice([
        f"The film runs for about {rng.choice(['ninety minutes', 'two hours', 'three hours'])}.",
        f"It was shot in {rng.choice(PLACES)}.",
        f"The story takes place in {rng.choice(PLACES)}.",
        f"The music is by {_person(rng)}.",
        (lambda adjective: f"It is {_article(adjective)} {adjective} {genre} in the old style.")(rng.choice(NEUTRAL_ADJ)),
        (lambda aspect: f"The {aspect} {_be(aspect)} {rng.choice(NEUTRAL_ADJ)}.")(rng.choice(ASPECTS)),
        f"It is based on a novel by {_person(rng)}.",
    ])


VERDICTS = {
    "positive": ["I would happily watch it again.", "Highly recommended.", "Well worth seeing.",
                 "A real treat.", "One of the best films this year.", "Go and see it."],
    "negative": ["I would not recommend it.", "A waste of time.", "Skip this one.",
                 "One of the worst films this year.", "I wanted my money back.",
                 "Avoid it if you can."],
    "mixed": ["Worth a look, but do not expect too much.", "Good in parts, bad in others.",
              "A mixed bag.", "Not great, not terrible."],
    "neutral": ["Make up your own mind.", "It is in cinemas now.", "It comes out on Friday."],
}


def generate_review(rng: random.Random) -> dict:
    """One review: {"text": str, "sentiment": "positive" | "negative" | "mixed" | "neutral"}."""
    sentiment = rng.choices(["positive", "negative", "mixed", "neutral"], [0.35, 0.35, 0.2, 0.1])[0]
    title, genre = _title(rng), rng.choice(GENRES)
    sentences = [_opener(rng, title, genre, sentiment)]
    num_body = rng.choice([1, 1, 2, 2, 3])
    for _ in range(num_body):
        if sentiment in ("positive", "negative"):
            roll = rng.random()
            if roll < 0.15:
                sentences.append(_fact(rng, genre))
            elif roll < 0.3:  # a contrast whose second half carries the review's sentiment
                sentences.append(_contrast(rng, "negative" if sentiment == "positive" else "positive"))
            else:
                sentences.append(_judgement(rng, sentiment))
        elif sentiment == "mixed":
            roll = rng.random()
            if roll < 0.5:
                sentences.append(_contrast(rng, rng.choice(["positive", "negative"])))
            else:
                sentences.append(_judgement(rng, rng.choice(["positive", "negative"])))
        else:
            sentences.append(_fact(rng, genre))
    if rng.random() < 0.7:
        sentences.append(rng.choice(VERDICTS[sentiment]))
    return {"text": " ".join(sentences), "sentiment": sentiment}


# ----------------------------------------------------------------------------------------------
# Generic text for pretraining: the same kind of grammar about other things.

TOWNS = ["the north", "the south", "the valley", "the coast", "the hills", "the old town", "the city"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEAMS = ["the home team", "the visitors", "the city club", "the river side", "the young side",
         "the old champions"]
NUMBERS = ["one", "two", "three", "four", "five"]
FOODS = ["soup", "bread", "cake", "pasta", "salad", "stew", "pie", "rice"]
INGREDIENTS = ["flour", "two eggs", "a cup of milk", "some butter", "a pinch of salt", "onions",
               "garlic", "fresh tomatoes", "a spoon of sugar", "olive oil", "carrots", "lemon juice"]


def _weather(rng: random.Random) -> str:
    mood = rng.choice(POSITIVE[:6] + NEGATIVE[:6] + NEUTRAL_ADJ[:4])
    parts = [
        f"The weather on {rng.choice(TOWNS)} was {rng.choice(['cold', 'warm', 'grey', 'sunny', 'windy'])} on {rng.choice(DAYS)}.",
        f"Rain is expected by the {rng.choice(['morning', 'evening', 'weekend'])}.",
        f"It was {_article(mood)} {mood} day for a walk.",
        f"Temperatures will stay {rng.choice(['low', 'high', 'mild'])} in {rng.choice(TOWNS)}.",
        f"A {rng.choice(['strong', 'light', 'cool'])} wind will come from the sea.",
    ]
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(2, 4)])


def _recipe(rng: random.Random) -> str:
    food = rng.choice(FOODS)
    steps = [f"To make {rng.choice(['a simple', 'a quick', 'an easy'])} {food}, start with {rng.choice(INGREDIENTS)}.",
             f"Mix it with {rng.choice(INGREDIENTS)} and {rng.choice(INGREDIENTS)}.",
             f"Cook for {rng.choice(['ten', 'twenty', 'thirty', 'forty'])} minutes.",
             f"Add {rng.choice(INGREDIENTS)} at the end.",
             f"The {food} tastes {rng.choice(POSITIVE[:8])} with {rng.choice(['bread', 'cheese', 'tea', 'wine'])}."]
    return " ".join(steps[: rng.randint(3, 5)])


def _sports(rng: random.Random) -> str:
    home, away = rng.sample(TEAMS, 2)
    return " ".join([
        f"{home.capitalize()} beat {away} {rng.choice(NUMBERS)} to {rng.choice(NUMBERS[:2])} on {rng.choice(DAYS)}.",
        f"The {rng.choice(['first', 'second'])} half was {_graded(rng, POSITIVE + NEGATIVE)}.",
        f"{_person(rng)} scored {rng.choice(['late', 'early', 'twice'])} in the game.",
        rng.choice(["The fans were happy.", "The coach was angry.", "The next match is on Sunday."]),
    ][: rng.randint(2, 4)])


def _news(rng: random.Random) -> str:
    return " ".join([
        f"The {rng.choice(['library', 'market', 'school', 'museum', 'station'])} in {rng.choice(TOWNS)} will open on {rng.choice(DAYS)}.",
        f"{_person(rng)} said the plan was {_graded(rng, POSITIVE + NEGATIVE + NEUTRAL_ADJ)}.",
        f"Many people came to see the {rng.choice(['new bridge', 'old house', 'concert', 'show', 'garden'])}.",
        f"The {rng.choice(['book', 'play', 'song', 'show', 'painting'])} by {_person(rng)} is {rng.choice(NEUTRAL_ADJ)}.",
    ][: rng.randint(2, 4)])


GENERIC_TOPICS = {"weather": _weather, "recipe": _recipe, "sports": _sports, "news": _news}


def generate_generic(n: int, seed: int = 0) -> list[dict]:
    """`n` generic documents: {"text": str, "topic": "weather" | "recipe" | "sports" | "news"}."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(sorted(GENERIC_TOPICS))
        out.append({"text": GENERIC_TOPICS[topic](rng), "topic": topic})
    return out


def generate_reviews(n: int, seed: int = 0) -> list[dict]:
    """`n` reviews from a generator seeded with `seed` (the same seed gives the same reviews)."""
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Prompts, splits and files.

MIN_PROMPT_WORDS, MAX_PROMPT_WORDS = 2, 6


def make_prompt(text: str, rng: random.Random) -> dict:
    """The first 2 to 6 words of a review (the paper's prompts are 2 to 8 token prefixes)."""
    words = text.split()
    k = rng.randint(MIN_PROMPT_WORDS, min(MAX_PROMPT_WORDS, len(words) - 1))
    return {"prompt": " ".join(words[:k])}


SPLITS = {  # name: (number of records, seed)
    "reviews_train": (12000, 1),
    "reviews_validation": (1000, 2),
    "reviews_test": (1000, 3),
    "reviews_pretrain": (3000, 4),
    "generic_pretrain": (15000, 5),
    "generic_validation": (500, 6),
}
PROMPT_SETS = {"prompts_train": ("reviews_train", 2000, 7), "prompts_test": ("reviews_test", 500, 8)}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_world(folder: Path) -> dict[str, int]:
    """Write every split and prompt set under `folder` as JSONL; return the record counts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, (n, seed) in SPLITS.items():
        make = generate_generic if name.startswith("generic") else generate_reviews
        splits[name] = make(n, seed=seed)
        _write_jsonl(folder / f"{name}.jsonl", splits[name])
    for name, (source, n, seed) in PROMPT_SETS.items():
        rng = random.Random(seed)
        reviews = rng.sample(splits[source], n)
        splits[name] = [make_prompt(r["text"], rng) for r in reviews]
        _write_jsonl(folder / f"{name}.jsonl", splits[name])
    return {name: len(records) for name, records in splits.items()}


def world_dir() -> Path:
    from dpo_teach.presets import data_dir

    return data_dir() / "world"


def load_split(name: str) -> list[dict]:
    """Records of one file of data/world/ (e.g. "reviews_train", "prompts_test")."""
    path = world_dir() / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: regenerate it with `python -m dpo_teach.pretrain --world-only`")
    return read_jsonl(path)


# ----------------------------------------------------------------------------------------------
# The oracle.


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def oracle_reward(texts: list[str]) -> torch.Tensor:
    """VADER's compound sentiment score of each text, in [-1, 1]. Shape: (N,).

    This is the ground truth r*(x, y) of the course: it labels preference pairs and it scores every
    method. Pass the full text a reader would judge (prompt + response).
    """
    if isinstance(texts, str):
        raise ValueError("oracle_reward expects a list of strings, got a single string")
    analyzer = _analyzer()
    scores = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"oracle_reward: text {i} is {type(text).__name__}, expected str")
        scores.append(analyzer.polarity_scores(text)["compound"])
    return torch.tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# One entry point for both worlds: the preset decides where reviews and prompts come from.


HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 2, 8  # IMDb prompts: the paper's prefixes of 2 to 8 tokens


def clean_review(text: str) -> str:
    """An IMDb review as plain text: its HTML line breaks ("<br /><br />") become spaces, runs of
    whitespace one space. Reviews are not cut here: every stage cuts what it reads to its token
    budget (SFT keeps a review's first max_response_tokens tokens, settings.py)."""
    return " ".join(HTML_BREAK.sub(" ", text).split())


def token_prompt(text: str, tokenizer, rng: random.Random) -> str:
    """The first 2 to 8 tokens of a review, as text (the prompts of the paper's IMDb task)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS]
    k = rng.randint(MIN_PROMPT_TOKENS, min(MAX_PROMPT_TOKENS, len(ids) - 1))
    return tokenizer.decode(ids[:k])


def _hub_reviews(dataset: str, split: str) -> list[str]:
    """Review texts of an IMDb-like data set ("text" column, cleaned by clean_review): a hub name or a
    local folder made by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    import datasets

    folder = Path(dataset)
    hub_split = {"train": "train", "validation": "test", "test": "test"}[split]
    if (folder / "dataset_dict.json").exists():
        data = datasets.load_from_disk(str(folder))[hub_split]
    elif (folder / "dataset_info.json").exists():
        data = datasets.load_from_disk(str(folder))
    else:
        data = datasets.load_dataset(dataset, split=hub_split)
    texts = [clean_review(t) for t in data["text"]]
    if split != "train":  # IMDb has no validation split: the test split is halved
        half = len(texts) // 2
        texts = texts[:half] if split == "validation" else texts[half:]
    return texts


def load_reviews(preset=None, split: str = "train") -> list[str]:
    """Review texts of the preset's world; split is "train", "validation" or "test"."""
    from dpo_teach.presets import get_preset

    preset = preset or get_preset()
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    if preset.dataset == "reviews":
        return [r["text"] for r in load_split(f"reviews_{split}")]
    return _hub_reviews(preset.dataset, split)


def load_prompts(preset=None, split: str = "test", n: int | None = None) -> list[str]:
    """Prompts of the preset's world, "train" or "test": the first 2 to 6 words of the world's
    reviews, or the first 2 to 8 tokens (the preset's tokenizer) of an IMDb-like data set's."""
    from dpo_teach.presets import get_preset

    preset = preset or get_preset()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if preset.dataset == "reviews":
        prompts = [r["prompt"] for r in load_split(f"prompts_{split}")]
    else:
        _, count, seed = PROMPT_SETS[f"prompts_{split}"]
        rng = random.Random(seed)
        from dpo_teach.models import load_tokenizer

        tokenizer = load_tokenizer(preset)
        texts = [t for t in load_reviews(preset, split) if len(t.split()) > MAX_PROMPT_WORDS]
        prompts = [token_prompt(t, tokenizer, rng) for t in rng.sample(texts, min(count, len(texts)))]
    return prompts[:n] if n is not None else prompts
