"""dpo_teach: the helper package of the DPO course (world, models, log-probs, losses, training loops).

Importing it changes no global setting; notebooks call `dpo_teach.setup()` once at the top.
"""

from dpo_teach.presets import Preset, get_preset, setup

__version__ = "0.1.0"
__all__ = ["Preset", "get_preset", "setup", "__version__"]
