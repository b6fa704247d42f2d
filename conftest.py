"""pytest set-up for the unit tests and for nbval's notebook runs: everything runs offline.

The environment is changed before any kernel starts, so each notebook's kernel inherits the
network guard (dpo_teach/offline.py) and the Hugging Face offline switches.
"""

import os

from dpo_teach.offline import block_network, offline_environment

os.environ.update(offline_environment())
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")
block_network()
