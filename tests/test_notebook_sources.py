"""A function shown in full in a notebook is the package's function, character for character."""

import inspect
import textwrap
from pathlib import Path

import nbformat
import pytest

from dpo_teach.logps import sequence_logps
from dpo_teach.reward import bradley_terry_loss
from dpo_teach.sft import sft_loss

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def function_source(notebook: str, name: str) -> str:
    """The source of `def name(...)` in the notebook's code cells: the def line and the indented
    block under it (up to the first line back at the def's indentation)."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        for start, line in enumerate(lines):
            if line.startswith(f"def {name}("):
                end = start + 1
                while end < len(lines) and (not lines[end].strip() or lines[end].startswith((" ", "\t", ")"))):
                    end += 1
                return "\n".join(lines[start:end]).rstrip() + "\n"
    raise AssertionError(f"{notebook} has no code cell with `def {name}(`")


@pytest.mark.parametrize("notebook, function", [
    ("04_the_model_and_the_task.ipynb", sequence_logps),
    ("05_supervised_fine_tuning.ipynb", sft_loss),
    ("06_reward_model.ipynb", bradley_terry_loss),
])
def test_notebook_shows_the_package_function(notebook, function):
    shown = function_source(notebook, function.__name__)
    package = textwrap.dedent(inspect.getsource(function))
    assert shown == package, (f"{notebook} shows a {function.__name__} that differs from the package's "
                              f"({inspect.getsourcefile(function)}): copy the package's source into the notebook")
