"""Exercise checks: run a learner's function against the reference and say what is wrong.

What lives where:

- `engine.py`: the recipe every check follows (`Case`, `Mistake`, `Extreme`,
  `compare_with_reference`: seeded random inputs, known mistakes named with a hint, extreme
  inputs, gradients) and the random-input makers shared by several notebooks;
- `nb00.py` ... `nb10.py`: the checks of one notebook each (00 the warm-up, 01 Bradley-Terry,
  02 the KL-regularised objective, 03 DPO's loss, 04 masks and sampling, 05 SFT, 06 the reward
  model, 07 PPO, 08 DPO on a language model, 09 the frontier, 10 beyond DPO).

Every check is re-exported here, so a notebook writes `from dpo_teach import checks` and calls
`checks.check_something(function)`.
"""

from dpo_teach.checks.engine import Case, Extreme, Inputs, Mistake, compare_with_reference
from dpo_teach.checks.nb00 import check_preferred
from dpo_teach.checks.nb01 import check_bt_nll, check_bt_probability
from dpo_teach.checks.nb02 import check_kl_divergence, check_optimal_policy, check_rlhf_objective
from dpo_teach.checks.nb03 import check_dpo_loss, check_implicit_reward
from dpo_teach.checks.nb04 import check_loss_mask, check_top_k
from dpo_teach.checks.nb05 import check_perplexity, check_sft_loss
from dpo_teach.checks.nb06 import check_last_token_index, check_spearman
from dpo_teach.checks.nb07 import check_clipped_policy_loss, check_gae, check_kl_penalty_rewards
from dpo_teach.checks.nb08 import check_concatenated_logps, check_reward_accuracy
from dpo_teach.checks.nb09 import check_best_of_n_rewards, check_on_frontier
from dpo_teach.checks.nb10 import check_ipo_loss, check_log_odds

__all__ = [
    # the engine, for a new check
    "Case",
    "Extreme",
    "Inputs",
    "Mistake",
    "compare_with_reference",
    # notebook 00
    "check_preferred",
    # notebook 01
    "check_bt_nll",
    "check_bt_probability",
    # notebook 02
    "check_kl_divergence",
    "check_optimal_policy",
    "check_rlhf_objective",
    # notebook 03
    "check_dpo_loss",
    "check_implicit_reward",
    # notebook 04
    "check_loss_mask",
    "check_top_k",
    # notebook 05
    "check_perplexity",
    "check_sft_loss",
    # notebook 06
    "check_last_token_index",
    "check_spearman",
    # notebook 07
    "check_clipped_policy_loss",
    "check_gae",
    "check_kl_penalty_rewards",
    # notebook 08
    "check_concatenated_logps",
    "check_reward_accuracy",
    # notebook 09
    "check_best_of_n_rewards",
    "check_on_frontier",
    # notebook 10
    "check_ipo_loss",
    "check_log_odds",
]
