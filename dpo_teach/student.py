"""The student edition: the course notebooks with every exercise's solution replaced by a stub and
the answer key left out.

An exercise is a code cell in which the solution sits between two marker lines (the convention of
nbgrader)::

    def bt_probability(reward_chosen, reward_rejected):
        ### BEGIN SOLUTION
        return torch.sigmoid(reward_chosen - reward_rejected)
        ### END SOLUTION

In the student edition the block, markers included, becomes a stub at the markers' indentation::

    def bt_probability(reward_chosen, reward_rejected):
        # YOUR CODE HERE
        raise NotImplementedError("bt_probability: replace this line by your code")

The check cell that follows the exercise then says that the function is not written yet.

The answer key is left out: every cell tagged "answer" (its metadata's "tags" list holds "answer")
is dropped. By the course's convention such a cell follows a notebook's "Questions to think about"
and starts with "**Answers** (instructor edition)".

Outputs and execution counts are cleared; everything else (the other cells' markdown, metadata and
cell ids) is kept. The source notebooks are only read.

Usage: python -m dpo_teach.student notebooks/ student/
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

__all__ = ["ANSWER_TAG", "BEGIN", "END", "STUB_COMMENT", "SolutionMarkerError", "is_answer", "solution_blocks",
           "stub_source", "without_markers", "student_notebook", "make_student_edition", "main"]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB_COMMENT = "# YOUR CODE HERE"
ANSWER_TAG = "answer"  # the tag of an answer-key cell, which the student edition leaves out

_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)\s*\(")


class SolutionMarkerError(ValueError):
    """The solution markers of a cell do not pair up (BEGIN without END, nested, END first)."""


def _indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _enclosing_function(lines: list[str], index: int) -> str | None:
    """Name of the function whose body holds lines[index], or None at the top level of the cell."""
    depth = len(_indentation(lines[index]))
    for line in reversed(lines[:index]):
        match = _DEF.match(line)
        if match and len(match.group(1)) < depth:
            return match.group(2)
        if line.strip() and len(_indentation(line)) < depth:
            depth = len(_indentation(line))  # left a block that is not a def: keep looking outwards
    return None


def solution_blocks(source: str, where: str = "cell") -> list[tuple[int, int]]:
    """(begin, end) line indices of the marker lines of each solution block in a cell's source.

    Raises SolutionMarkerError, naming `where` and the line, when the markers do not pair up.
    """
    blocks, begin = [], None
    for number, line in enumerate(source.splitlines()):
        marker = line.strip()
        if marker == BEGIN:
            if begin is not None:
                raise SolutionMarkerError(
                    f"{where}: '{BEGIN}' on line {number + 1} is nested in the solution block opened on "
                    f"line {begin + 1}; close that block with '{END}' first."
                )
            begin = number
        elif marker == END:
            if begin is None:
                raise SolutionMarkerError(
                    f"{where}: '{END}' on line {number + 1} has no '{BEGIN}' before it."
                )
            blocks.append((begin, number))
            begin = None
    if begin is not None:
        raise SolutionMarkerError(f"{where}: '{BEGIN}' on line {begin + 1} has no matching '{END}'.")
    return blocks


def stub_source(source: str, where: str = "cell") -> str:
    """The cell's source with each solution block replaced by `# YOUR CODE HERE` and a raise."""
    lines = source.splitlines()
    blocks = solution_blocks(source, where)
    for begin, end in reversed(blocks):  # from the bottom, so that earlier indices stay valid
        indent = _indentation(lines[begin])
        name = _enclosing_function(lines, begin)
        message = f"{name}: replace this line by your code" if name else "replace this line by your code"
        lines[begin : end + 1] = [indent + STUB_COMMENT, f'{indent}raise NotImplementedError("{message}")']
    stubbed = "\n".join(lines)
    return stubbed + "\n" if source.endswith("\n") else stubbed


def without_markers(source: str) -> str:
    """The solved source: `source` less its BEGIN and END marker lines (nothing else changes)."""
    kept = [line for line in source.splitlines() if line.strip() not in (BEGIN, END)]
    return "\n".join(kept) + "\n"


def is_answer(cell: nbformat.NotebookNode) -> bool:
    """Whether a cell belongs to the answer key: its metadata's tags hold ANSWER_TAG."""
    return ANSWER_TAG in (cell.get("metadata", {}).get("tags") or [])


def student_notebook(notebook: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """A copy of the notebook with stubs for solutions, no answer cells and no outputs; the argument
    is not changed. Marker errors name the cell by its index in the argument."""
    student = copy.deepcopy(notebook)
    kept = []
    for index, cell in enumerate(student.cells):
        if is_answer(cell):
            continue
        kept.append(cell)
        if cell.cell_type != "code":
            continue
        cell.source = stub_source(cell.source, where=f"{name}, cell {index}")
        cell.outputs = []
        cell.execution_count = None
    student.cells = kept
    return student


def make_student_edition(src_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the student edition of every notebook of src_dir into out_dir; return the new paths.

    All notebooks are converted before the first one is written, so a marker error leaves out_dir
    as it was.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir} is not a folder of notebooks")
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"the student edition would overwrite the notebooks of {src_dir}: choose another folder")
    converted = []
    for path in sorted(src_dir.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        student = student_notebook(notebook, name=str(path))
        nbformat.validate(student)
        converted.append((out_dir / path.name, student))
    out_dir.mkdir(parents=True, exist_ok=True)
    for target, student in converted:
        nbformat.write(student, target)
    return [target for target, _ in converted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_teach.student",
        description="Write the student edition of the course: solutions replaced by stubs, answer cells "
                    "left out, outputs cleared.",
    )
    parser.add_argument("src_dir", type=Path, help="folder of the instructor notebooks (e.g. notebooks/)")
    parser.add_argument("out_dir", type=Path, help="folder for the student notebooks (e.g. student/)")
    args = parser.parse_args(argv)
    try:
        written = make_student_edition(args.src_dir, args.out_dir)
    except (SolutionMarkerError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
