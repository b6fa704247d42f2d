"""Exercise check of notebook 00 (welcome and setup): `preferred`, the text the oracle prefers."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["check_preferred"]


def check_preferred(preferred: Callable) -> None:
    """Check preferred(text_a, text_b) -> the text the oracle scores higher (text_a on a tie)."""
    from dpo_teach.world import generate_reviews, oracle_reward

    texts = [r["text"] for r in generate_reviews(40, seed=123)]
    cases = list(zip(texts[::2], texts[1::2])) + [(texts[0], texts[0]), ("It was shot in Paris.", "It is on Friday.")]
    for text_a, text_b in cases:
        try:
            got = preferred(text_a, text_b)
        except NotImplementedError as error:
            raise AssertionError("preferred is not written yet: replace `raise NotImplementedError()`.") from error
        score_a, score_b = oracle_reward([text_a, text_b]).tolist()
        expected = text_a if score_a >= score_b else text_b
        if not isinstance(got, str):
            raise AssertionError(f"preferred should return one of the two texts (a str), got {type(got).__name__}.")
        if got not in (text_a, text_b):
            raise AssertionError("preferred should return one of the two texts it was given, unchanged.")
        if got != expected:
            if score_a == score_b:
                raise AssertionError(f"On a tie (both score {score_a:+.3f}) preferred should return the first text.")
            raise AssertionError(
                f"The oracle scores text_a {score_a:+.3f} and text_b {score_b:+.3f}, so the preferred text is "
                f"{'text_a' if score_a > score_b else 'text_b'}; your function returned the other one. "
                "Higher oracle reward means preferred.")
    print(f"✓ preferred is correct: it agrees with the oracle on {len(cases)} pairs, ties included.")
