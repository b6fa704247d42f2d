"""Exercise checks of notebook 08 (direct preference optimization on a language model):
`concatenated_logps` and `reward_accuracy`.

Built on dpo_teach.checks.engine (`compare_with_reference`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_teach.checks.engine import (
    Case,
    Inputs,
    Mistake,
    compare_with_reference,
    lm_batch,
    randn,
    tiny_gpt2,
)

__all__ = ["check_concatenated_logps", "check_reward_accuracy"]


def _tiny_lm_batch(generator: torch.Generator) -> Inputs:
    """A small random GPT-2 and a concatenated batch of 3 pairs (chosen rows, then rejected rows)."""
    model = tiny_gpt2(generator, keep_global_rng=False).eval()
    return {"model": model, "batch": lm_batch(generator, 6, first_token=0)}


def _pair_logps(model, batch, average=False):
    """The reference: (chosen_logps, rejected_logps), with their graph to the model's parameters."""
    from dpo_teach.dpo import pair_logps

    return pair_logps(model, batch, average=average)


def check_concatenated_logps(concatenated_logps: Callable) -> None:
    """Check concatenated_logps(model, batch) -> (chosen_logps, rejected_logps), each (B,), from
    one forward pass over a batch whose first half holds the chosen rows. DPO trains on both: each
    must keep its graph to the model's parameters (the gradient of its sum is compared), and neither
    the batch nor the model's weights may change."""
    def unshifted(model, batch):  # scoring token t with the logits at t, not t - 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_logps = torch.gather(logits.log_softmax(-1), 2, batch["labels"].unsqueeze(2)).squeeze(2)
        return ((token_logps * batch["loss_mask"]).sum(-1)).chunk(2)

    def whole_sequence(model, batch):  # the prompt counted too
        masked = dict(batch, loss_mask=batch["attention_mask"])
        return _pair_logps(model, masked)

    case = Case(
        name="concatenated_logps",
        reference=_pair_logps,
        make_inputs=_tiny_lm_batch,
        output_names=("chosen_logps", "rejected_logps"),
        shape_hint="Return two tensors of shape (B,): the first half of the rows are the chosen responses.",
        grad_inputs=("model",),  # both log-probs are trained on: their gradients reach every weight
        num_trials=3,
        rtol=1e-4,
        atol=1e-5,
        mistakes=[
            Mistake("the log-probs are averaged over tokens instead of summed",
                    lambda model, batch: _pair_logps(model, batch, average=True),
                    "DPO uses the SUM of the response tokens' log-probs (use average=False)."),
            Mistake("chosen and rejected are swapped",
                    lambda model, batch: _pair_logps(model, batch)[::-1],
                    "The batch holds the chosen rows first: logps.chunk(2) gives (chosen, rejected)."),
            Mistake("the labels are not shifted: token t is scored by the logits at t",
                    unshifted, "The logits at position t - 1 predict token t: use sequence_logps."),
            Mistake("the prompt tokens are counted too", whole_sequence,
                    "Only response tokens count: use batch['loss_mask'], not the attention mask."),
        ],
    )
    compare_with_reference(concatenated_logps, case)


def _rewards_with_ties(generator: torch.Generator) -> Inputs:
    chosen = randn(generator, 10)
    rejected = randn(generator, 10)
    rejected[:3] = chosen[:3]  # ties, as at the first step, when policy == reference
    return {"chosen_rewards": chosen, "rejected_rewards": rejected}


def check_reward_accuracy(reward_accuracy: Callable) -> None:
    """Check reward_accuracy(chosen_rewards, rejected_rewards) -> fraction of pairs ranked right."""
    case = Case(
        name="reward_accuracy",
        reference=lambda c, r: (c > r).to(c.dtype).mean(),
        make_inputs=_rewards_with_ties,
        shape_hint="Return one number (a 0-dimensional tensor): the fraction of pairs.",
        mistakes=[
            Mistake("ties count as correct (>= instead of >)", lambda c, r: (c >= r).to(c.dtype).mean(),
                    "A tie ranks nothing: at the first step every pair is a tie and the accuracy is 0, as TRL logs it."),
            Mistake("it counts the pairs instead of taking the fraction", lambda c, r: (c > r).to(c.dtype).sum(),
                    "Divide by the number of pairs (use .mean())."),
            Mistake("it compares the wrong way round", lambda c, r: (c < r).to(c.dtype).mean(),
                    "A pair is ranked right when the chosen response's implicit reward is higher."),
        ],
    )
    compare_with_reference(reward_accuracy, case)
