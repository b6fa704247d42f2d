"""The shipped base model: loads offline and fast, dropout off, 2-10 M parameters, sensible samples."""

import time

import torch

from dpo_teach.models import count_parameters, frozen_copy, load_base_model
from dpo_teach.sampling import generate
from dpo_teach.world import oracle_reward


def test_load_base_model_is_fast_and_offline(preset):
    load_base_model(preset)  # first load warms the file cache
    start = time.perf_counter()
    model, tokenizer = load_base_model(preset)
    assert time.perf_counter() - start < 5.0
    assert 2_000_000 <= count_parameters(model) <= 10_000_000
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert not model.training
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_frozen_copy_has_no_gradients(base_model):
    ref_model = frozen_copy(base_model)
    assert not any(p.requires_grad for p in ref_model.parameters()) and not ref_model.training
    assert any(p.requires_grad for p in base_model.parameters()), "the original is untouched"


def test_left_padded_generation_equals_unpadded(base_model, tokenizer):
    prompts = ["I watched", "The acting in this western was"]
    batch = generate(base_model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    for i, prompt in enumerate(prompts):
        alone = generate(base_model, tokenizer, [prompt], max_new_tokens=12, temperature=0)
        assert alone.texts[0] == batch.texts[i], "left padding must not change the continuation"


def test_generation_masks_come_from_lengths(base_model, tokenizer):
    torch.manual_seed(0)
    out = generate(base_model, tokenizer, ["The plot"] * 16, max_new_tokens=30)
    for i in range(16):
        length = int(out.response_mask[i].sum())
        ids = out.response_ids[i, :length].tolist()
        if out.finished[i]:
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        else:
            assert length == out.response_ids.shape[1] and tokenizer.eos_token_id not in ids
    assert out.num_tokens == int(out.response_mask.sum())


def test_base_model_writes_language_not_noise(base_model, tokenizer):
    torch.manual_seed(0)
    out = generate(base_model, tokenizer, [""] * 32, max_new_tokens=40)
    assert out.finished.float().mean() > 0.5, "most samples should end by themselves"
    words = " ".join(out.texts).split()
    assert len(words) > 200
    known = sum(w.strip(".,").lower() in KNOWN for w in words) / len(words)
    assert known > 0.9, f"only {known:.0%} of sampled words are words of the world"
    assert oracle_reward(out.texts).shape == (32,)


def _known_words():
    from dpo_teach.world import load_split

    words = set()
    for name in ("generic_pretrain", "reviews_pretrain"):
        for record in load_split(name):
            words.update(w.strip(".,").lower() for w in record["text"].split())
    return words


KNOWN = _known_words()
