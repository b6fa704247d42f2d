# Imported by Python at start-up when this folder is on PYTHONPATH (see dpo_teach/offline.py).
# It loads offline.py by path, so that starting Python does not import torch through the package.
import os

if os.environ.get("DPO_TEACH_BLOCK_NETWORK") == "1":
    import importlib.util

    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "offline.py")
    _spec = importlib.util.spec_from_file_location("dpo_teach_offline_guard", _path)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.block_network()
