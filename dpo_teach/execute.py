"""Execute notebooks in place, top to bottom, each in a fresh kernel, offline, and time them.

    python -m dpo_teach.execute                 # every notebook under notebooks/
    python -m dpo_teach.execute notebooks/02_*.ipynb

This is how the committed notebooks get their outputs: a reader browsing the repository sees
what a fresh run on the CPU preset printed and plotted. The network guard is on while they run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from dpo_teach.offline import offline_environment

__all__ = ["execute_notebook", "main"]


def execute_notebook(path: Path, timeout: int = 900) -> float:
    """Run the notebook at `path` in a fresh kernel, write it back with outputs, return seconds."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    saved = dict(os.environ)
    os.environ.update(offline_environment())  # the kernel inherits this environment
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    try:
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)
    nbformat.write(nb, path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    paths = args.notebooks or sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        seconds = execute_notebook(path)
        print(f"{path.name}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
