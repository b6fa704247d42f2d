"""Exercise checks: run a learner's function against the reference and say what is wrong.

What lives where:

- `engine.py`: the recipe every check follows (`Case`, `Mistake`, `Extreme`,
  `compare_with_reference`: seeded random inputs, known mistakes named with a hint, extreme
  inputs, gradients) and the random-input makers shared by several notebooks;
- `nb00.py` ... `nb12.py`: the checks of one notebook each (00 the warm-up, 01 Bradley-Terry,
  02 the KL-regularised objective, 03 DPO's loss, 04 masks and sampling, 05 SFT, 06 the reward
  model, 07 PPO, 08 DPO on a language model, 09 the frontier, 10 beyond DPO, 11 when DPO goes wrong,
  12 scaling out);
- `steps.py`: the training steps the learner writes (05 SFT, 06 the reward model, 08 DPO), run
  from the same model as the reference step and compared step by step, parameters included.
- `ppo_update.py`: notebook 07's PPO update on one rollout batch, run from the same small model as
  the reference and compared by its minibatches, statistics and parameters after the update.

Every check is re-exported here, so a notebook writes `from dpo_teach import checks` and calls
`checks.check_something(function)`. A check's module is imported when the check is first used, so
the checks of notebooks 00-03 do not load what those of 04-10 need (transformers, the models).
"""

import importlib

_MODULE_OF = {  # public name -> the module of dpo_teach.checks that defines it
    **dict.fromkeys(["Case", "Extreme", "Inputs", "Mistake", "compare_with_reference"], "engine"),  # for a new check
    "check_preferred": "nb00",
    **dict.fromkeys(["check_bt_nll", "check_bt_probability", "check_flip_nll"], "nb01"),
    **dict.fromkeys(["check_kl_divergence", "check_objective_gradient", "check_optimal_policy",
                     "check_rlhf_objective"], "nb02"),
    **dict.fromkeys(["check_dpo_loss", "check_implicit_reward", "check_plackett_luce_dpo_loss",
                     "check_reward_projection", "check_rlhf_route"], "nb03"),
    **dict.fromkeys(["check_loss_mask", "check_sequence_logps", "check_top_k"], "nb04"),
    **dict.fromkeys(["check_perplexity", "check_sft_loss"], "nb05"),
    **dict.fromkeys(["check_last_token_index", "check_spearman"], "nb06"),
    **dict.fromkeys(["check_clipped_policy_loss", "check_gae", "check_kl_penalty_rewards"], "nb07"),
    "check_ppo_minibatch_steps": "ppo_update",  # notebook 07's PPO update, run from the same model as the reference
    **dict.fromkeys(["check_concatenated_logps", "check_reward_accuracy"], "nb08"),
    **dict.fromkeys(["check_best_of_n_rewards", "check_on_frontier"], "nb09"),
    **dict.fromkeys(["check_ipo_loss", "check_log_odds"], "nb10"),
    **dict.fromkeys(["check_length_only_accuracy", "check_repetition_rate"], "nb11"),
    **dict.fromkeys(["check_combine_means", "check_zero_bytes_per_parameter"], "nb12"),
    **dict.fromkeys(["check_dpo_batch_loss", "check_dpo_step", "check_reward_model_step", "check_sft_step",
                     "check_training_step", "StepCase"], "steps"),  # the training steps of 05, 06, 08
}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    """Import the module that defines `name` on first use (PEP 562) and keep the name here."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
