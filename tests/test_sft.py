"""The SFT step: the loss, its gradient (prompt tokens carry none), the training loop, perplexity."""

import math

import pytest
import torch

from dpo_teach.logps import build_batch, model_sequence_logps, sequence_logps
from dpo_teach.settings import SFTConfig
from dpo_teach.sft import perplexity, sft_loss, token_perplexity, train_sft
from dpo_teach.training import lr_at

RECORDS = [
    {"prompt": "I watched", "completion": " The Silent Harbor last night. The plot is great."},
    {"prompt": "The acting was", "completion": " bad."},
    {"prompt": "", "completion": "The music is lovely but the ending is weak."},
]
TINY = SFTConfig(num_steps=30, batch_size=3, lr=3e-3, warmup_steps=3, eval_every=10)


def test_sft_loss_is_the_mean_token_nll_of_each_response(tiny_model, tokenizer):
    batch = build_batch(RECORDS, tokenizer)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sft_loss(logits, batch["labels"], batch["loss_mask"])  # (B,)
        assert loss.shape == (len(RECORDS),)
        torch.testing.assert_close(loss, -sequence_logps(logits, batch["labels"], batch["loss_mask"], average=True))
        for i in range(len(RECORDS)):  # transformers' loss on one example, prompt labels set to -100
            labels = batch["labels"][i:i + 1].masked_fill(batch["loss_mask"][i:i + 1] == 0, -100)
            reference = tiny_model(input_ids=batch["input_ids"][i:i + 1],
                                   attention_mask=batch["attention_mask"][i:i + 1], labels=labels).loss
            torch.testing.assert_close(loss[i], reference, atol=1e-5, rtol=1e-5)


def test_prompt_and_padding_tokens_carry_no_gradient(tiny_model, tokenizer):
    batch = build_batch(RECORDS, tokenizer)
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.detach().requires_grad_(True)
    sft_loss(logits, batch["labels"], batch["loss_mask"]).sum().backward()
    grad_per_position = logits.grad.abs().sum(-1)  # (B, T): position t predicts token t + 1
    predicts_response = torch.zeros_like(batch["loss_mask"])
    predicts_response[:, :-1] = batch["loss_mask"][:, 1:]
    assert (grad_per_position[predicts_response == 0] == 0).all(), "prompt or padding positions got a gradient"
    assert (grad_per_position[predicts_response == 1] > 0).all()


def test_prompt_tokens_do_not_change_the_loss_targets(tiny_model, tokenizer):
    """Changing what the model predicts at prompt positions leaves the loss unchanged."""
    batch = build_batch(RECORDS[:2], tokenizer)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    edited = logits.clone()
    prompt_positions = batch["prompt_lengths"].min() - 1  # positions < this predict prompt tokens only
    edited[:, :prompt_positions] += 5 * torch.randn_like(edited[:, :prompt_positions])
    torch.testing.assert_close(sft_loss(logits, batch["labels"], batch["loss_mask"]),
                               sft_loss(edited, batch["labels"], batch["loss_mask"]))


def test_training_lowers_the_loss_and_changes_the_parameters(tiny_model, tokenizer):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    history = train_sft(tiny_model, tokenizer, RECORDS, TINY, eval_records=RECORDS)
    assert len(history["train/loss"]) == TINY.num_steps and history["step"] == list(range(TINY.num_steps))
    assert sum(history["train/loss"][-5:]) / 5 < 0.7 * sum(history["train/loss"][:5]) / 5
    assert history["eval/step"] == [0, 10, 20, 30]
    assert history["eval/perplexity"][-1] < history["eval/perplexity"][0]
    assert all(not torch.equal(b, p) for b, p in zip(before, tiny_model.parameters()))
    assert not tiny_model.training, "train_sft returns the policy in eval mode"


def test_training_is_seeded(tokenizer, tiny_model):
    import copy

    other = copy.deepcopy(tiny_model)
    first = train_sft(tiny_model, tokenizer, RECORDS * 3, SFTConfig(num_steps=4, batch_size=2))
    second = train_sft(other, tokenizer, RECORDS * 3, SFTConfig(num_steps=4, batch_size=2))
    assert first["train/loss"] == second["train/loss"]


def test_perplexity_weighs_every_token_the_same(tiny_model, tokenizer):
    batch = build_batch(RECORDS, tokenizer)
    with torch.no_grad():
        total = model_sequence_logps(tiny_model, batch).sum().item()
    expected = math.exp(-total / batch["loss_mask"].sum().item())
    assert perplexity(tiny_model, tokenizer, RECORDS, batch_size=2) == pytest.approx(expected, rel=1e-5)
    batches = [build_batch(RECORDS[:2], tokenizer), build_batch(RECORDS[2:], tokenizer)]
    assert token_perplexity(tiny_model, batches) == pytest.approx(expected, rel=1e-5)


def test_learning_rate_schedule():
    config = SFTConfig(num_steps=100, warmup_steps=10, lr=1.0)
    assert config.schedule == "cosine"
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(100, config) == pytest.approx(0.1)


def test_bad_input_is_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="no records"):
        train_sft(tiny_model, tokenizer, [], TINY)
    with pytest.raises(ValueError, match="record 0"):
        train_sft(tiny_model, tokenizer, [{"prompt": "x"}], TINY)
