"""sequence_logps and the batch builder: equal to transformers' own loss, padding-invariant, strict."""

import warnings

import pytest
import torch

from dpo_teach.logps import build_batch, model_sequence_logps, sequence_logps

RECORDS = [
    {"prompt": "I watched", "completion": " The Silent Harbor last night. The plot is great."},
    {"prompt": "The acting was", "completion": " bad."},
    {"prompt": "", "completion": "The music is lovely but the ending is weak."},
]


def test_matches_transformers_causal_lm_loss(tiny_model, tokenizer):
    batch = build_batch(RECORDS, tokenizer)
    with torch.no_grad():
        logps = model_sequence_logps(tiny_model, batch)  # (B,)
        for i in range(len(RECORDS)):  # transformers' loss: mean over tokens whose label is not -100
            labels = batch["labels"][i : i + 1].masked_fill(batch["loss_mask"][i : i + 1] == 0, -100)
            out = tiny_model(input_ids=batch["input_ids"][i : i + 1],
                             attention_mask=batch["attention_mask"][i : i + 1], labels=labels)
            num_tokens = int(batch["loss_mask"][i].sum())
            torch.testing.assert_close(logps[i], -out.loss * num_tokens, atol=1e-5, rtol=1e-5)


def test_equals_the_full_log_softmax_and_is_float32_under_autocast(base_model, tokenizer):
    """Only response positions reach the LM head, and no log-softmax tensor is built; the numbers are
    those of the full computation. Under bfloat16 autocast the log-probs still come out in float32,
    within 0.25 nats of the float32 ones (sums over a few dozen tokens; bfloat16 keeps 8 bits)."""
    batch = build_batch(RECORDS * 4, tokenizer)
    with torch.no_grad():
        logits = base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = sequence_logps(logits, batch["labels"], batch["loss_mask"])
        fast = model_sequence_logps(base_model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model_sequence_logps(base_model, batch)
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-5)
    assert low.dtype == torch.float32 and (low - full).abs().max() < 0.25


def test_average_is_the_mean_over_response_tokens(tiny_model, tokenizer):
    batch = build_batch(RECORDS, tokenizer)
    with torch.no_grad():
        total = model_sequence_logps(tiny_model, batch)
        mean = model_sequence_logps(tiny_model, batch, average=True)
    torch.testing.assert_close(mean, total / batch["loss_mask"].sum(1))


def test_unchanged_by_padding_and_by_other_sequences(tiny_model, tokenizer):
    with torch.no_grad():
        alone = model_sequence_logps(tiny_model, build_batch(RECORDS[1:2], tokenizer))
        together = model_sequence_logps(tiny_model, build_batch(RECORDS, tokenizer))
        reordered = model_sequence_logps(tiny_model, build_batch(RECORDS[::-1], tokenizer))
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together, reordered.flip(0), atol=1e-5, rtol=1e-5)


def test_manual_example():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 1
    logits[0, 1, 3] = 10.0  # position 1 predicts token 2
    labels = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[0, 1, 1]])
    lsm = logits.log_softmax(-1)
    expected = lsm[0, 0, 2] + lsm[0, 1, 1]
    torch.testing.assert_close(sequence_logps(logits, labels, mask)[0], expected)
    torch.testing.assert_close(sequence_logps(logits, labels, mask, average=True)[0], expected / 2)


def test_batch_layout(tokenizer):
    batch = build_batch(RECORDS, tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for i, record in enumerate(RECORDS):
        p, r = int(batch["prompt_lengths"][i]), int(batch["response_lengths"][i])
        ids = batch["input_ids"][i]
        prompt_ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        assert ids[:p].tolist() == [eos] + prompt_ids, "prompt = start token + its own ids"
        assert ids[p : p + r].tolist() == response_ids + [eos], "response = its own ids + EOS"
        assert (ids[p + r :] == pad).all(), "right padding"
        assert batch["loss_mask"][i].tolist() == [0] * p + [1] * r + [0] * (ids.numel() - p - r)
        assert batch["attention_mask"][i].sum() == p + r
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_mask_from_lengths_keeps_eos_when_pad_is_eos(tokenizer):
    tokenizer = __import__("copy").deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2's usual set-up
    batch = build_batch(RECORDS, tokenizer)
    i = 1  # the short record: padded with EOS ids after its own EOS
    end = int(batch["prompt_lengths"][i] + batch["response_lengths"][i])
    assert batch["input_ids"][i, end - 1] == tokenizer.eos_token_id
    assert batch["loss_mask"][i, end - 1] == 1, "the real EOS must be scored"
    assert batch["loss_mask"][i, end:].sum() == 0


@pytest.mark.parametrize("record, message", [
    ({"completion": " fine."}, r"record 1: missing field 'prompt'"),
    ({"prompt": "The plot"}, r"record 1: missing field 'completion'"),
    ({"prompt": "The plot", "completion": "   "}, r"record 1: field 'completion' is empty"),
    ({"prompt": "The plot", "completion": 7}, r"record 1: field 'completion' must be a string, got int"),
    ({"prompt": None, "completion": " fine."}, r"record 1: field 'prompt' must be a string, got NoneType"),
    ("The plot is fine", r"record 1: expected a dict"),
])
def test_bad_records_are_named(tokenizer, record, message):
    with pytest.raises(ValueError, match=message):
        build_batch([RECORDS[0], record], tokenizer)


def test_error_names_the_record_index_in_the_data_set(tokenizer):
    with pytest.raises(ValueError, match="record 41: missing field 'chosen'"):
        build_batch([{"prompt": "a"}], tokenizer, response_key="chosen", start=41)


def test_over_long_records_are_truncated_counted_and_warned(tokenizer):
    long_prompt = "The plot " * 20
    long_response = " The music is lovely." * 20
    records = [{"prompt": long_prompt, "completion": long_response}, RECORDS[1]]
    with pytest.warns(UserWarning, match="truncated 1 prompt"):
        batch = build_batch(records, tokenizer, max_prompt_tokens=8, max_response_tokens=12)
    assert batch["num_truncated_prompts"] == 1 and batch["num_truncated_responses"] == 1
    assert len(batch["input_ids"]) == 2, "nothing is dropped"
    assert batch["prompt_lengths"][0] == 8 and batch["response_lengths"][0] == 12
    ids = batch["input_ids"][0]
    assert ids[0] == tokenizer.eos_token_id, "the start token survives truncation"
    end_of_prompt = tokenizer(long_prompt, add_special_tokens=False)["input_ids"][-7:]
    assert ids[1:8].tolist() == end_of_prompt, "a long prompt keeps its end"
    assert tokenizer.eos_token_id not in ids[8:20].tolist(), "a cut response has no EOS"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_batch(RECORDS, tokenizer, max_prompt_tokens=16, max_response_tokens=48)


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="floating point"):
        sequence_logps(torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match="no records"):
        build_batch([], None)
