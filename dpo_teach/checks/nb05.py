"""Exercise checks of notebook 05 (supervised fine-tuning): the SFT loss and perplexity,
`sft_loss` and `perplexity_from_logps`.

Each check runs the learner's function and the reference on seeded random inputs, names a typical
mistake when one reproduces the learner's output, and raises AssertionError with an explanation;
it prints one line when all is right. Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpo_teach.checks.engine import Case, Inputs, Mistake, compare_with_reference, loss_mask
from dpo_teach.logps import sequence_logps
from dpo_teach.reward import last_token_index
from dpo_teach.sft import sft_loss

__all__ = ["check_perplexity", "check_sft_loss"]


def _lm_batch(generator: torch.Generator) -> Inputs:
    batch, width, vocab = 4, 9, 7
    prompt_lengths = torch.randint(1, 4, (batch,), generator=generator)
    response_lengths = torch.randint(1, 5, (batch,), generator=generator)
    return {"logits": torch.randn(batch, width, vocab, generator=generator, dtype=torch.float64),
            "labels": torch.randint(0, vocab, (batch, width), generator=generator),
            "loss_mask": loss_mask(prompt_lengths, response_lengths, width)}


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
