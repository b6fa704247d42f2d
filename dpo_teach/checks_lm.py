"""Exercise checks of notebooks 04-06 (the language-model notebooks), built on dpo_teach.checks.

Each check runs the learner's function and the reference on seeded random inputs, names a typical
mistake when one reproduces the learner's output, and raises AssertionError with an explanation;
it prints one line when all is right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach.checks import Case, Extreme, Inputs, Mistake, compare_with_reference
from dpo_teach.evaluation import spearman_correlation
from dpo_teach.logps import sequence_logps
from dpo_teach.reward import last_token_index
from dpo_teach.sft import sft_loss

# ---- Notebook 04: masks, sampling --------------------------------------------------------------


def _loss_mask(prompt_lengths: Tensor, response_lengths: Tensor, width: int) -> Tensor:
    positions = torch.arange(width).unsqueeze(0)  # (1, T)
    end = (prompt_lengths + response_lengths).unsqueeze(1)  # (B, 1)
    return ((positions >= prompt_lengths.unsqueeze(1)) & (positions < end)).long()  # (B, T)


def _lengths(generator: torch.Generator) -> Inputs:
    batch = int(torch.randint(2, 7, (), generator=generator))
    prompt_lengths = torch.randint(1, 6, (batch,), generator=generator)
    response_lengths = torch.randint(1, 8, (batch,), generator=generator)
    width = int((prompt_lengths + response_lengths).max()) + int(torch.randint(0, 3, (), generator=generator))
    return {"prompt_lengths": prompt_lengths, "response_lengths": response_lengths, "width": width}


def check_loss_mask(loss_mask_from_lengths: Callable) -> None:
    """Check loss_mask_from_lengths(prompt_lengths, response_lengths, width) -> (B, T) mask."""
    case = Case(
        name="loss_mask_from_lengths",
        reference=_loss_mask,
        make_inputs=_lengths,
        shape_hint="Return one row per sequence and `width` columns: (B, width).",
        mistakes=[
            Mistake("the prompt tokens are included (this is the attention mask)",
                    lambda p, r, w: (torch.arange(w).unsqueeze(0) < (p + r).unsqueeze(1)).long(),
                    "Only response tokens (and the response's EOS) are scored: start at position prompt_length."),
            Mistake("the mask is one position too early (it includes the last prompt token)",
                    lambda p, r, w: _loss_mask(p - 1, r, w),
                    "Position t of the loss mask marks token t itself; sequence_logps does the shift."),
            Mistake("the last response token (EOS) is left out",
                    lambda p, r, w: _loss_mask(p, r - 1, w),
                    "The response's EOS is scored too: the model must learn where a response ends."),
            Mistake("the padding is included",
                    lambda p, r, w: (torch.arange(w).unsqueeze(0) >= p.unsqueeze(1)).long(),
                    "Stop at prompt_length + response_length: what follows is padding."),
        ],
    )
    compare_with_reference(loss_mask_from_lengths, case)


def _top_k_logits(logits: Tensor, k: int) -> Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest logit of each row
    return logits.masked_fill(logits < kth, float("-inf"))


def _logits(generator: torch.Generator) -> Inputs:
    vocab = int(torch.randint(5, 12, (), generator=generator))
    return {"logits": 2 * torch.randn(3, vocab, generator=generator, dtype=torch.float64),
            "k": int(torch.randint(1, vocab, (), generator=generator))}


def check_top_k(top_k_logits: Callable) -> None:
    """Check top_k_logits(logits, k): the k largest logits of each row kept, the others -inf."""

    def keep_smallest(logits, k):
        kth = torch.topk(logits, k, dim=-1, largest=False).values[..., -1:]
        return logits.masked_fill(logits > kth, float("-inf"))

    def zeroed(logits, k):
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, 0.0)

    case = Case(
        name="top_k_logits",
        reference=_top_k_logits,
        make_inputs=_logits,
        shape_hint="Return logits of the same shape as the input (B, V).",
        mistakes=[
            Mistake("the k SMALLEST logits are kept", keep_smallest, "Keep the k largest: torch.topk(logits, k)."),
            Mistake("the dropped logits are set to 0 instead of -inf", zeroed,
                    "A logit of 0 still has probability e^0 / Z > 0 after the softmax; -inf gives exactly 0."),
            Mistake("one token too many is kept", lambda x, k: _top_k_logits(x, min(k + 1, x.shape[-1])),
                    "Keep exactly k tokens per row: compare with the k-th largest logit, values[..., -1]."),
            Mistake("one token too few is kept", lambda x, k: _top_k_logits(x, max(k - 1, 1)),
                    "Keep exactly k tokens per row: compare with the k-th largest logit, values[..., -1]."),
        ],
    )
    compare_with_reference(top_k_logits, case)


# ---- Notebook 05: the SFT loss, perplexity ------------------------------------------------------


def _lm_batch(generator: torch.Generator) -> Inputs:
    batch, width, vocab = 4, 9, 7
    prompt_lengths = torch.randint(1, 4, (batch,), generator=generator)
    response_lengths = torch.randint(1, 5, (batch,), generator=generator)
    return {"logits": torch.randn(batch, width, vocab, generator=generator, dtype=torch.float64),
            "labels": torch.randint(0, vocab, (batch, width), generator=generator),
            "loss_mask": _loss_mask(prompt_lengths, response_lengths, width)}


def _transformers_style(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """One mean over every masked token of the batch, repeated per example."""
    total = sequence_logps(logits, labels, loss_mask).sum() / loss_mask[:, 1:].sum()
    return (-total).expand(len(logits))


def check_sft_loss(learner_sft_loss: Callable) -> None:
    """Check sft_loss(logits, labels, loss_mask) -> per-example mean token NLL, shape (B,)."""
    case = Case(
        name="sft_loss",
        reference=sft_loss,
        make_inputs=_lm_batch,
        shape_hint="Return one loss per example, shape (B,); average over the batch when training.",
        grad_inputs=("logits",),
        mistakes=[
            Mistake("the log-probs are summed over tokens instead of averaged",
                    lambda x, y, m: -sequence_logps(x, y, m),
                    "L_SFT is -1/T sum_t log p(y_t | ...): divide by each response's number of tokens."),
            Mistake("the minus sign is missing", lambda x, y, m: sequence_logps(x, y, m, average=True),
                    "A negative log-likelihood is >= 0."),
            Mistake("the prompt tokens are scored too",
                    lambda x, y, m: -sequence_logps(x, y, _up_to_response_end(m), average=True),
                    "Pass the loss mask, which covers only the response tokens."),
            Mistake("the mean is taken over all tokens of the batch at once (transformers' convention)",
                    _transformers_style, "Average each example over its own tokens: sequence_logps(..., average=True)."),
        ],
    )
    compare_with_reference(learner_sft_loss, case)


def _up_to_response_end(loss_mask: Tensor) -> Tensor:
    """1 on every position up to the end of the response: prompt and response (an attention mask)."""
    positions = torch.arange(loss_mask.shape[1]).unsqueeze(0)  # (1, T)
    return (positions <= last_token_index(loss_mask).unsqueeze(1)).long()


def _perplexity(sum_logps: Tensor, num_tokens: Tensor) -> Tensor:
    return torch.exp(-sum_logps.sum() / num_tokens.sum())


def _logps_and_counts(generator: torch.Generator) -> Inputs:
    num_tokens = torch.randint(2, 30, (6,), generator=generator)
    return {"sum_logps": -num_tokens * (0.5 + 2 * torch.rand(6, generator=generator, dtype=torch.float64)),
            "num_tokens": num_tokens}


def check_perplexity(perplexity_from_logps: Callable) -> None:
    """Check perplexity_from_logps(sum_logps, num_tokens) -> exp(-total log-prob / total tokens)."""
    case = Case(
        name="perplexity_from_logps",
        reference=_perplexity,
        make_inputs=_logps_and_counts,
        shape_hint="Return one number for the whole data set: a 0-dimensional tensor.",
        mistakes=[
            Mistake("it averages the per-sequence perplexities",
                    lambda s, n: torch.exp(-s / n).mean(),
                    "Every token weighs the same: divide the total log-prob by the total number of tokens."),
            Mistake("it averages the per-sequence mean log-probs (short sequences weigh as much as long ones)",
                    lambda s, n: torch.exp(-(s / n).mean()),
                    "Divide the SUM of log-probs by the SUM of token counts."),
            Mistake("the minus sign is missing", lambda s, n: torch.exp(s.sum() / n.sum()),
                    "Log-probs are negative; perplexity = exp(-mean log-prob) >= 1."),
            Mistake("the exp is missing (this is the mean NLL, not the perplexity)",
                    lambda s, n: -s.sum() / n.sum(), "Perplexity is exp of the mean negative log-likelihood."),
        ],
    )
    compare_with_reference(perplexity_from_logps, case)


# ---- Notebook 06: reading the last token, rank correlation --------------------------------------


def _masks(generator: torch.Generator) -> Inputs:
    batch, width = 6, 10
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    positions = torch.arange(width).unsqueeze(0)
    left = torch.rand(batch, generator=generator) < 0.5  # some rows left-padded, some right-padded
    right_mask = positions < lengths.unsqueeze(1)
    left_mask = positions >= (width - lengths).unsqueeze(1)
    return {"attention_mask": torch.where(left.unsqueeze(1), left_mask, right_mask).long()}


def check_last_token_index(learner_last_token_index: Callable) -> None:
    """Check last_token_index(attention_mask) -> index of each row's last real token, shape (B,)."""
    case = Case(
        name="last_token_index",
        reference=last_token_index,
        make_inputs=_masks,
        shape_hint="Return one index per row, shape (B,).",
        mistakes=[
            Mistake("it returns the number of real tokens (one past the last one)",
                    lambda m: m.sum(1), "Indices start at 0: the last of n tokens of a right-padded row is n - 1."),
            Mistake("it assumes right padding (length - 1), which is wrong for left-padded rows",
                    lambda m: m.sum(1) - 1,
                    "A left-padded row's last real token is at the END. Take the largest position whose mask is 1."),
            Mistake("it returns the FIRST real token", lambda m: m.argmax(1),
                    "argmax returns the first maximum; multiply the mask by the positions first."),
        ],
    )
    compare_with_reference(learner_last_token_index, case)


def _scores(generator: torch.Generator) -> Inputs:
    x = torch.randn(20, generator=generator, dtype=torch.float64)
    y = torch.exp(2 * x) + 0.5 * torch.randn(20, generator=generator, dtype=torch.float64)  # monotone + noise
    return {"x": x, "y": y}


def check_spearman(spearman: Callable) -> None:
    """Check spearman(x, y) -> Spearman rank correlation of two (N,) tensors without ties."""

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return (x * y).sum() / (x.norm() * y.norm())

    case = Case(
        name="spearman",
        reference=spearman_correlation,
        make_inputs=_scores,
        rtol=1e-5,
        atol=1e-7,
        shape_hint="Return one number: a 0-dimensional tensor.",
        mistakes=[
            Mistake("it is the Pearson correlation of the raw values", pearson,
                    "Replace each value by its rank first (the rank of the smallest is 0)."),
            Mistake("it uses argsort once, which gives the ORDER of the indices, not the ranks",
                    lambda x, y: pearson(x.argsort().double(), y.argsort().double()),
                    "The rank of x[i] is argsort(argsort(x))[i]."),
        ],
        extremes=[Extreme("already sorted inputs",
                          {"x": torch.arange(8, dtype=torch.float64), "y": torch.arange(8, dtype=torch.float64) ** 3})],
    )
    compare_with_reference(spearman, case)
