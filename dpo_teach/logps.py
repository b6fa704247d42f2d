"""Sequence log-probabilities and the batch builder that every stage (SFT, reward, PPO, DPO) shares.

Conventions (docs/conventions.md):
- a prompt and its response are tokenized separately and their ids concatenated, so no BPE merge
  crosses the boundary; the prompt starts with EOS (GPT-2's document separator, used as a start
  token) and the response ends with EOS;
- batches are right-padded; the loss mask marks response tokens only, built from lengths (never
  from `input_ids != pad_id`, which would also hide a real EOS when pad and EOS share an id);
- the log-probability of a response is the SUM of its tokens' log-probs (the DPO paper's choice);
  the mean is an option, never a silent default.
"""

from __future__ import annotations

import warnings

import torch

from dpo_teach.utils import count_scored, right_pad

__all__ = ["SequenceLogps", "build_batch", "check_text", "encode_prompt", "encode_response", "model_sequence_logps", "quiet_batch",
           "sequence_logps"]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Log-probability of the masked tokens of each sequence. Shape: (B,).

    logits (B, T, V) come from the model on the input ids; labels (B, T) are those input ids;
    loss_mask (B, T) marks the response tokens, aligned with labels: token t counts when
    loss_mask[:, t] is 1 and is scored by the logits at position t - 1.
    Sum over tokens by default; the mean over counted tokens when average=True.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(f"expected logits (B, T, V), labels (B, T), loss_mask (B, T); got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(loss_mask.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    logits = logits[:, :-1, :]  # (B, T-1, V): position t-1 predicts token t
    labels = labels[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].to(logits.dtype)  # (B, T-1)
    token_logps = torch.gather(logits.log_softmax(dim=-1), 2, labels.unsqueeze(2)).squeeze(2)  # (B, T-1)
    summed = (token_logps * mask).sum(dim=-1)  # (B,)
    if average:
        return summed / mask.sum(dim=-1).clamp(min=1)
    return summed


def check_text(record, index: int, field: str, allow_empty: bool) -> str:
    """record[field] when record is a dict whose `field` is a string (non-empty unless allow_empty);
    otherwise a ValueError that names the record (its `index`) and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index}: expected a dict with field {field!r}, got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"record {index}: missing field {field!r} (fields: {sorted(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"record {index}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"record {index}: field {field!r} is empty")
    return value


def encode_prompt(prompt: str, tokenizer, max_prompt_tokens: int | None = None) -> tuple[list[int], bool]:
    """(EOS + prompt ids, truncated?). Too long a prompt keeps its END (the start token stays)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    truncated = max_prompt_tokens is not None and len(ids) + 1 > max_prompt_tokens
    if truncated:
        ids = ids[len(ids) + 1 - max_prompt_tokens:]
    return [tokenizer.eos_token_id] + ids, truncated


def encode_response(response: str, tokenizer, max_response_tokens: int | None = None) -> tuple[list[int], bool]:
    """(response ids + EOS, truncated?). Too long a response keeps its START and loses its EOS
    (it did not end there)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = max_response_tokens is not None and len(ids) > max_response_tokens
    if truncated:
        ids = ids[:max_response_tokens]
    return ids, truncated


def build_batch(records: list[dict], tokenizer, response_key: str = "completion",
                max_prompt_tokens: int | None = None, max_response_tokens: int | None = None,
                start: int = 0) -> dict:
    """Tokenize prompt and response separately, concatenate, append EOS, right-pad.

    records: dicts with "prompt" (may be empty) and `response_key` (non-empty), e.g. "completion"
    for SFT data, "chosen" or "rejected" for preference pairs. `start` is the index of the first
    record in its data set, so that error messages name the right record.

    Returns input_ids, attention_mask, labels (= input_ids) and loss_mask, each (B, T), plus
    prompt_lengths and response_lengths (B,), and num_truncated_prompts / num_truncated_responses:
    over-long records are truncated (prompt: keep the end; response: keep the start), counted and
    warned about, never dropped.
    """
    if not records:
        raise ValueError("build_batch got no records")
    rows, prompt_lengths, response_lengths = [], [], []
    cut_prompts = cut_responses = 0
    for i, record in enumerate(records):
        prompt = check_text(record, start + i, "prompt", allow_empty=True)
        response = check_text(record, start + i, response_key, allow_empty=False)
        prompt_ids, cut_p = encode_prompt(prompt, tokenizer, max_prompt_tokens)
        response_ids, cut_r = encode_response(response, tokenizer, max_response_tokens)
        cut_prompts += cut_p
        cut_responses += cut_r
        rows.append(prompt_ids + response_ids)
        prompt_lengths.append(len(prompt_ids))
        response_lengths.append(len(response_ids))
    if cut_prompts or cut_responses:
        warnings.warn(f"build_batch truncated {cut_prompts} prompt(s) to {max_prompt_tokens} tokens and "
                      f"{cut_responses} {response_key!r} response(s) to {max_response_tokens} tokens "
                      f"(of {len(records)} records)", stacklevel=2)
    input_ids, attention_mask = right_pad(rows, tokenizer.pad_token_id)  # (B, T), (B, T)
    prompt_lengths = torch.tensor(prompt_lengths)
    response_lengths = torch.tensor(response_lengths)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)  # (1, T)
    loss_mask = (attention_mask.bool() & (positions >= prompt_lengths.unsqueeze(1))).long()  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.clone(),
        "loss_mask": loss_mask,
        "prompt_lengths": prompt_lengths,
        "response_lengths": response_lengths,
        "num_truncated_prompts": cut_prompts,
        "num_truncated_responses": cut_responses,
    }


def quiet_batch(records: list[dict], tokenizer, response_key: str, max_prompt_tokens: int | None,
                max_response_tokens: int | None, start: int = 0) -> dict:
    """build_batch without its truncation warning (the caller counts truncations instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_batch(records, tokenizer, response_key=response_key, max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens, start=start)


class SequenceLogps(torch.nn.Module):
    """A causal LM whose forward pass is model_sequence_logps: the module data parallelism wraps
    (dpo_teach.distributed). DDP averages the processes' gradients during backward only for a
    forward pass that went through its wrapper, and model_sequence_logps calls the LM's trunk and
    head, not the LM's own forward; so this module's forward is that computation."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict, average: bool = False) -> torch.Tensor:
        return model_sequence_logps(self.lm, batch, average)


def model_sequence_logps(model, batch: dict, average: bool = False) -> torch.Tensor:
    """sequence_logps of `model` on a right-padded batch from build_batch, computed where it is
    needed only. Shape: (B,).

    The same numbers as sequence_logps(model(...).logits, labels, loss_mask), but only the positions
    that predict a response token go through the LM head (a prompt's or a pad's logits are never
    used), and each token's log-prob is its logit minus the logsumexp of its row, so no (B, T, V)
    log-softmax tensor is built. Under autocast the transformer runs in 16 bits but the LM head and
    the log-probs in float32 (16-bit logits of a 50,257-way softmax would lose about 0.1 nat a token).
    For a causal LM of transformers (base_model + output embeddings), or a SequenceLogps (also
    wrapped by DDP), whose forward pass is then called: it runs this function on its LM.
    """
    if isinstance(getattr(model, "module", model), SequenceLogps):  # through the wrapper, for DDP
        return model(batch, average)
    device = next(model.parameters()).device
    count_scored(batch["attention_mask"])
    input_ids = batch["input_ids"].to(device)
    hidden = model.base_model(input_ids=input_ids,
                              attention_mask=batch["attention_mask"].to(device)).last_hidden_state  # (B, T, H)
    predicts = batch["loss_mask"][:, 1:].to(device).bool()  # (B, T-1): position t-1 predicts response token t
    with torch.autocast(device.type, enabled=False):  # the LM head in float32, also under autocast
        logits = model.get_output_embeddings()(hidden[:, :-1][predicts].float())  # (N, V)
    labels = batch["labels"][:, 1:].to(device)[predicts]  # (N,)
    token_logps = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)  # (N,)
    summed = token_logps.new_zeros(predicts.shape).masked_scatter(predicts, token_logps).sum(dim=-1)  # (B,)
    if average:
        return summed / predicts.sum(dim=-1).clamp(min=1)
    return summed
