"""Evaluation: log-probs of sampled responses (left-padded prompts need position ids), the sequence KL,
evaluate_policy, and the rank correlation."""

import copy

import pytest
import torch

from dpo_teach.evaluation import (
    evaluate_policy,
    generation_logps,
    ranks,
    sequence_kl,
    spearman_correlation,
)
from dpo_teach.logps import (
    build_batch,
    encode_prompt,
    encode_response,
    model_sequence_logps,
    sequence_logps,
)
from dpo_teach.sampling import Generation, generate
from dpo_teach.utils import left_pad

PROMPTS = ["I watched", "The acting was really", "", "What a"]
RECORDS = [
    {"prompt": "I watched", "completion": " The Silent Harbor last night."},
    {"prompt": "The acting was really", "completion": " bad."},
    {"prompt": "", "completion": "The music is lovely but the ending is weak."},
]


def generation_of(records, tokenizer) -> Generation:
    """The Generation that sampling would return had it sampled exactly these responses."""
    prompt_ids, prompt_mask = left_pad([encode_prompt(r["prompt"], tokenizer)[0] for r in records],
                                       tokenizer.pad_token_id)
    rows = [encode_response(r["completion"], tokenizer)[0] for r in records]
    width = max(len(r) for r in rows)
    response_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        response_ids[i, :len(row)], response_mask[i, :len(row)] = torch.tensor(row), 1
    return Generation([r["prompt"] for r in records], [r["completion"] for r in records], prompt_ids, prompt_mask,
                      response_ids, response_mask, torch.ones(len(rows), dtype=torch.bool))


def unpadded_logps(model, generation: Generation) -> torch.Tensor:
    """Each row on its own: real prompt ids + real response ids, no padding at all."""
    out = []
    for i in range(len(generation.prompts)):
        prompt = generation.prompt_ids[i][generation.prompt_mask[i].bool()]
        response = generation.response_ids[i][generation.response_mask[i].bool()]
        ids = torch.cat([prompt, response]).unsqueeze(0)  # (1, T)
        mask = torch.cat([torch.zeros_like(prompt), torch.ones_like(response)]).unsqueeze(0)
        out.append(sequence_logps(model(input_ids=ids).logits, ids, mask)[0])
    return torch.stack(out)


def test_generation_logps_equal_the_unpadded_forward(tiny_model, tokenizer):
    torch.manual_seed(0)
    generation = generate(tiny_model, tokenizer, PROMPTS, max_new_tokens=12)
    assert generation.prompt_mask[:, 0].tolist().count(0) > 0, "the test needs left padding"
    with torch.no_grad():
        torch.testing.assert_close(generation_logps(tiny_model, generation, batch_size=3),
                                   unpadded_logps(tiny_model, generation), atol=1e-5, rtol=1e-5)


def test_generation_logps_equal_build_batch_logps(tiny_model, tokenizer):
    generation = generation_of(RECORDS, tokenizer)
    with torch.no_grad():
        expected = model_sequence_logps(tiny_model, build_batch(RECORDS, tokenizer))
        torch.testing.assert_close(generation_logps(tiny_model, generation), expected, atol=1e-5, rtol=1e-5)


def test_position_ids_matter(tiny_model, tokenizer):
    """Without position ids counted from the first real token, left padding changes the result."""
    generation = generation_of(RECORDS, tokenizer)
    ids = torch.cat([generation.prompt_ids, generation.response_ids], 1)
    mask = torch.cat([generation.prompt_mask, generation.response_mask], 1)
    loss_mask = torch.cat([torch.zeros_like(generation.prompt_mask), generation.response_mask], 1)
    with torch.no_grad():
        naive = sequence_logps(tiny_model(input_ids=ids, attention_mask=mask).logits, ids, loss_mask)
        right = generation_logps(tiny_model, generation)
    assert not torch.allclose(naive, right, atol=1e-3)


def test_sequence_kl_is_the_log_ratio_and_zero_for_the_same_model(tiny_model, tokenizer):
    generation = generation_of(RECORDS, tokenizer)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        expected = (model_sequence_logps(tiny_model, build_batch(RECORDS, tokenizer))
                    - model_sequence_logps(other, build_batch(RECORDS, tokenizer)))
    torch.testing.assert_close(sequence_kl(tiny_model, other, generation), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(sequence_kl(tiny_model, copy.deepcopy(tiny_model), generation), torch.zeros(len(RECORDS)))


def test_evaluate_policy_is_seeded_and_leaves_the_rng_alone(tiny_model, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluate_policy(tiny_model, copy.deepcopy(tiny_model), tokenizer, PROMPTS, max_new_tokens=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state), "evaluate_policy must not move the caller's RNG"
    second = evaluate_policy(tiny_model, tiny_model, tokenizer, PROMPTS, max_new_tokens=8, seed=1)
    third = evaluate_policy(tiny_model, tiny_model, tokenizer, PROMPTS, max_new_tokens=8, seed=2)
    assert first["texts"] == second["texts"] and first["texts"] != third["texts"]
    for key in ("oracle_reward", "oracle_reward_std", "kl", "num_tokens", "texts", "rewards"):
        assert key in first
    assert first["kl"] == 0.0 and first["rewards"].shape == (len(PROMPTS),)
    assert first["oracle_reward"] == pytest.approx(first["rewards"].mean().item())
    assert all(t.startswith(p) for t, p in zip(first["texts"], PROMPTS))


def test_spearman_correlation():
    x = torch.tensor([0.1, 0.5, 0.3, 0.9, -0.2])
    assert spearman_correlation(x, x ** 3).item() == pytest.approx(1.0)
    assert spearman_correlation(x, -x).item() == pytest.approx(-1.0)
    assert ranks(torch.tensor([2.0, 0.0, 2.0, 1.0])).tolist() == [2.5, 0.0, 2.5, 1.0], "ties share their mean rank"
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    b = a + torch.randn(40, generator=generator)
    assert spearman_correlation(a, b).item() == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
