"""The reward model: the Bradley-Terry loss on hand-computed values, reading the last real token
(padding ignored, whatever the pad id), initialisation from the policy, and training."""

import math

import pytest
import torch

from dpo_teach.logps import build_batch
from dpo_teach.reward import (
    RewardModel,
    bradley_terry_loss,
    last_token_index,
    pair_batch,
    pair_rewards,
    pairwise_accuracy,
    reward_model_batch_loss,
    score_texts,
    train_reward_model,
)
from dpo_teach.settings import RewardConfig

PAIRS = [
    {"prompt": "I watched", "chosen": " a great film.", "rejected": " a terrible film."},
    {"prompt": "The acting was", "chosen": " superb and moving.", "rejected": " bad."},
    {"prompt": "", "chosen": "I loved the music.", "rejected": "I hated the music and the plot was dull."},
]


@pytest.fixture()
def reward_model(tiny_model):
    torch.manual_seed(0)
    model = RewardModel.from_policy(tiny_model)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a non-zero head, so that scores differ
    return model


def test_bradley_terry_loss_hand_computed():
    chosen = torch.tensor([0.0, 2.0, 0.0, 1.5])
    rejected = torch.tensor([0.0, 0.0, 2.0, 1.5])
    expected = torch.tensor([math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(2)), math.log(2)])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)


def test_bradley_terry_loss_is_shift_invariant_and_finite_for_huge_margins():
    chosen, rejected = torch.tensor([0.3, -1.0]), torch.tensor([1.2, 0.4])
    torch.testing.assert_close(bradley_terry_loss(chosen + 7.0, rejected + 7.0), bradley_terry_loss(chosen, rejected))
    loss = bradley_terry_loss(torch.tensor([1e4, -1e4]), torch.tensor([-1e4, 1e4]))
    torch.testing.assert_close(loss, torch.tensor([0.0, 2e4]))


def test_last_token_index_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_score_ignores_padding_and_the_pad_id(reward_model, tokenizer):
    batch = build_batch([{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS], tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        together = reward_model(ids, mask)
        alone = torch.stack([reward_model(ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())])[0]
                             for i in range(len(ids))])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        wider = torch.cat([ids, torch.full((len(ids), 5), tokenizer.pad_token_id)], 1)
        torch.testing.assert_close(reward_model(wider, torch.cat([mask, torch.zeros_like(wider[:, :5])], 1)),
                                   together, atol=1e-5, rtol=1e-5)
        other_pad = ids.masked_fill(mask == 0, 7)  # another id in the padding: the score must not move
        torch.testing.assert_close(reward_model(other_pad, mask), together, atol=1e-5, rtol=1e-5)
        lengths = mask.sum(1)  # the same rows, left-padded
        left_ids, left_mask = torch.full_like(ids, tokenizer.pad_token_id), torch.zeros_like(mask)
        for i, n in enumerate(lengths.tolist()):
            left_ids[i, ids.shape[1] - n:], left_mask[i, ids.shape[1] - n:] = ids[i, :n], 1
        torch.testing.assert_close(reward_model(left_ids, left_mask), together, atol=1e-5, rtol=1e-5)


def test_from_policy_copies_the_trunk_and_starts_at_log_2(tiny_model, tokenizer):
    model = RewardModel.from_policy(tiny_model)
    for name, value in tiny_model.transformer.state_dict().items():
        torch.testing.assert_close(model.transformer.state_dict()[name], value)
    assert model.transformer.wte.weight.data_ptr() != tiny_model.transformer.wte.weight.data_ptr()
    assert not model.training
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, tokenizer, PAIRS)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.full((3,), math.log(2)))


def test_score_texts_matches_pair_rewards_and_accepts_empty_responses(reward_model, tokenizer):
    with torch.no_grad():
        chosen, rejected = pair_rewards(reward_model, tokenizer, PAIRS)
    scores = score_texts(reward_model, tokenizer, [p["prompt"] for p in PAIRS], [p["chosen"] for p in PAIRS])
    torch.testing.assert_close(scores, chosen, atol=1e-5, rtol=1e-5)
    assert score_texts(reward_model, tokenizer, ["I watched"], [""]).shape == (1,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_texts(reward_model, tokenizer, ["a", "b"], ["c"])


def test_pairwise_accuracy_counts_chosen_above_rejected(reward_model, tokenizer):
    with torch.no_grad():
        chosen, rejected = pair_rewards(reward_model, tokenizer, PAIRS)
    expected = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
    assert pairwise_accuracy(reward_model, tokenizer, PAIRS, batch_size=2) == pytest.approx(expected)
    swapped = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS]
    assert pairwise_accuracy(reward_model, tokenizer, swapped) == pytest.approx(1 - expected)


def test_pair_batch_puts_the_chosen_then_the_rejected(reward_model, tokenizer):
    batch = pair_batch(tokenizer, PAIRS)
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS)
    chosen = build_batch([{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS], tokenizer)
    rejected = build_batch([{"prompt": p["prompt"], "completion": p["rejected"]} for p in PAIRS], tokenizer)
    for half, expected in ((batch["attention_mask"][:len(PAIRS)], chosen), (batch["attention_mask"][len(PAIRS):], rejected)):
        torch.testing.assert_close(half.sum(-1), expected["attention_mask"].sum(-1))
    with torch.no_grad():
        from_batch = pair_rewards(reward_model, tokenizer, PAIRS, batch=batch)
        built = pair_rewards(reward_model, tokenizer, PAIRS)
    torch.testing.assert_close(from_batch, built)


def test_the_step_loss_and_its_margins(reward_model, tokenizer):
    """reward_model_batch_loss: the mean Bradley-Terry loss of the pairs, with its graph, and each
    pair's margin r_chosen - r_rejected (chosen minus rejected, not the other way), detached."""
    batch = pair_batch(tokenizer, PAIRS)
    loss, margins = reward_model_batch_loss(reward_model, batch)
    with torch.no_grad():
        chosen, rejected = pair_rewards(reward_model, tokenizer, PAIRS, batch=batch)
    assert margins.shape == (len(PAIRS),) and not margins.requires_grad and loss.requires_grad
    assert (chosen - rejected).abs().min() > 1e-3, "the pairs' scores differ, so a swapped sign shows"
    torch.testing.assert_close(margins, chosen - rejected)
    torch.testing.assert_close(loss.detach(), bradley_terry_loss(chosen, rejected).mean())


def test_training_fits_the_pairs(tiny_model, tokenizer):
    import datasets

    model = RewardModel.from_policy(tiny_model)
    config = RewardConfig(num_steps=40, batch_size=3, lr=3e-3, warmup_steps=2, eval_every=20)
    history = train_reward_model(model, tokenizer, datasets.Dataset.from_list(PAIRS), config, eval_pairs=PAIRS)
    assert history["train/loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(history["train/loss"][-5:]) / 5 < 0.2
    assert history["eval/step"] == [0, 20, 40] and history["eval/accuracy"][-1] == 1.0
    assert history["step"] == list(range(40)) and history["sequences"][-1] == 40 * 2 * len(PAIRS)
    assert history["train/accuracy"][0] == 0.5 and history["train/margin"][0] == 0.0  # a zero head: all tie
    assert history["train/accuracy"][-1] == 1.0 and history["train/margin"][-1] > 0
    assert not model.training


def test_bad_pairs_are_rejected(reward_model, tokenizer):
    with pytest.raises(ValueError, match="no pairs"):
        train_reward_model(reward_model, tokenizer, [], RewardConfig(num_steps=1))
    with pytest.raises(ValueError, match="'chosen'"):
        train_reward_model(reward_model, tokenizer, [{"prompt": "a", "completion": "b"}], RewardConfig(num_steps=1))
