"""dpo_teach: the helper package of the DPO course.

Where things live:
- settings.py: every setting, one table per preset; presets.py: which preset, device, model, data;
- training.py: the one training loop and history format; utils.py: padding, position ids, seeding;
- world.py, models.py, logps.py, sampling.py, evaluation.py: the review world, the models, log-probs,
  generation and the oracle/KL evaluation;
- sft.py, pairs.py, reward.py, ppo.py, dpo.py, variants.py, online.py: one module per method;
- pipeline.py (cached SFT policy, pairs, reward model), frontier.py / sweep.py / stats.py / cost.py
  (notebook 09's experiment), checks/ (the exercises' checks), student.py, execute.py.

Importing it changes no global setting; notebooks call `dpo_teach.setup()` once at the top.
"""

from dpo_teach.presets import Preset, get_preset, setup

__version__ = "0.1.0"
__all__ = ["Preset", "get_preset", "setup", "__version__"]
