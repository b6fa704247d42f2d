"""Sampling responses from a policy: left-padded prompts, transformers' generate, lengths as masks.

Prompts are tokenized exactly as the batch builder does (EOS as a start token, then the prompt's
ids), left-padded so that every row's last prompt token sits at the same position, and passed to
`model.generate`, which derives position ids from the attention mask. A response is every
generated token up to and including the first EOS; its mask comes from that length, never from
comparing ids with the pad id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from dpo_teach.logps import encode_prompt
from dpo_teach.settings import NEW_TOKENS
from dpo_teach.training import autocast
from dpo_teach.utils import TOKEN_COUNTS, left_pad

__all__ = ["Generation", "generate", "generation_batch_size"]


@dataclass
class Generation:
    """A batch of sampled responses. B prompts, P prompt positions, R response positions."""

    prompts: list[str]  # the prompts as given
    texts: list[str]  # decoded responses (without EOS); prompt + text is what a reader sees
    prompt_ids: torch.Tensor  # (B, P) left-padded prompt ids
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, R) right-padded response ids, EOS included where generated
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens (EOS included)
    finished: torch.Tensor  # (B,) True where the response ended with EOS (not cut by the length limit)

    @property
    def full_texts(self) -> list[str]:
        return [p + t for p, t in zip(self.prompts, self.texts)]

    @property
    def num_tokens(self) -> int:
        """Number of response tokens generated (what a sampling-based method pays for)."""
        return int(self.response_mask.sum())


@torch.no_grad()
def generation_batch_size(device: torch.device) -> int:
    """Prompts sampled together: 64 on a CPU; 256 on a GPU, where one decoding step costs about the
    same for 64 rows as for 256 (its time goes to launching kernels, not to arithmetic)."""
    return 64 if torch.device(device).type == "cpu" else 256


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = NEW_TOKENS, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, max_prompt_tokens: int | None = None,
             batch_size: int | None = None) -> Generation:
    """Sample one response per prompt. temperature = 0 means greedy; top_k = 0 and top_p = 1 mean
    no truncation of the distribution (the paper samples from the full distribution). batch_size:
    prompts sampled together (default: generation_batch_size(device))."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = batch_size or generation_batch_size(device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [encode_prompt(p, tokenizer, max_prompt_tokens)[0] for p in prompts]
    prompt_ids, prompt_mask = left_pad(rows, pad)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids = prompt_ids[start:start + batch_size].to(device)
        mask = prompt_mask[start:start + batch_size].to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        if temperature == 0:
            sampling = dict(do_sample=False)
        # Once a row has ended, generate feeds it pad tokens; transformers then warns about padding
        # without a mask on forwards it makes itself. Those rows are masked by length below.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with autocast(device):  # float32 on a CPU; mixed precision on a GPU
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     eos_token_id=eos, pad_token_id=pad, **sampling)
        finally:
            hf_logging.set_verbosity(verbosity)
        chunks.append(out[:, ids.shape[1]:].cpu())  # (b, r) response part only
    width = max(c.shape[1] for c in chunks)
    response_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    row = 0
    for c in chunks:
        response_ids[row:row + len(c), :c.shape[1]] = c
        row += len(c)
    is_eos = response_ids == eos
    finished = is_eos.any(dim=1)
    first_eos = torch.where(finished, is_eos.float().argmax(dim=1), torch.full_like(finished, width, dtype=torch.long))
    lengths = torch.where(finished, first_eos + 1, torch.full_like(first_eos, width))
    positions = torch.arange(width).unsqueeze(0)  # (1, R)
    response_mask = (positions < lengths.unsqueeze(1)).long()  # (B, R)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad))
    texts = [tokenizer.decode(response_ids[i, : lengths[i] - int(finished[i])].tolist()) for i in range(len(prompts))]
    TOKEN_COUNTS["generated"] += int(lengths.sum())
    model.train(was_training)
    return Generation(list(prompts), texts, prompt_ids, prompt_mask, response_ids, response_mask, finished)
