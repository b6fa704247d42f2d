"""The course as nbgrader assignments: the instructor notebooks with nbgrader's cell metadata.

    python -m dpo_teach.grader notebooks/ course/                  # one assignment per notebook
    python -m dpo_teach.grader notebooks/ course/ --assignment dpo # all notebooks in one
    cd course && nbgrader generate_assignment 01_preferences_and_bradley_terry

writes the source version of each assignment into course/source/<assignment>/ (and, unless one is
there, an nbgrader_config.py into course/), ready for nbgrader's generate_assignment, release,
collect and autograde. The notebooks of notebooks/ are only read. In each notebook:

- an exercise cell (a code cell with `### BEGIN SOLUTION` ... `### END SOLUTION`, the convention
  nbgrader and dpo_teach.student share) is an nbgrader solution cell ("Autograded answer"), with
  the grade id of the function it defines; generate_assignment replaces each block by
  `# YOUR CODE HERE` / `raise NotImplementedError()`;
- the check cell after it (the next code cell, when it calls `checks.check_...(function)`) is an
  autograded test cell worth CHECK_POINTS points, read-only: it scores full points when it runs
  without an error and zero when it raises, which the checks do for a stub or a wrong answer;
- the answer key (the markdown cell tagged "answer" after "Questions to think about") becomes a
  manually graded answer cell, one point per numbered question: the released notebook says
  "YOUR ANSWER HERE" there, the student writes the answers, and the teacher grades them in
  formgrader (with --drop-answers it is left out, as in the student edition);
- every other markdown cell, and the setup cell, is read-only (where a cell quotes the markers in
  words, as 00 does, their space becomes a no-break space, so that nbgrader leaves the quote alone); the other code cells stay editable
  (learners may change a beta or a seed and run them again).

Outputs are cleared. A notebook's later cells may call the learner's function; with a stub they fail
too, but only the check cells are graded, so a stub scores zero for its exercise and nothing else.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

from dpo_teach import student

__all__ = ["CHECK_POINTS", "NBGRADER_CONFIG", "question_count", "grader_notebook", "make_course", "main"]

CHECK_POINTS = 1  # points of each autograded check
SCHEMA_VERSION = 3  # nbgrader's cell metadata format
_CHECK_CALL = r"check_\w+\(\s*{function}\b"
_DEF = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)\s*\(", re.MULTILINE)
_QUESTIONS = re.compile(r"^#{1,6}\s+(Questions to think about|More exercises)\s*$", re.MULTILINE)
_SETUP = "# Setup:"  # how the first code cell, the Colab bootstrap, starts

NBGRADER_CONFIG = '''\
# nbgrader's configuration for the dpo-teach course (written by python -m dpo_teach.grader).
c = get_config()  # noqa: F821

# Notebooks 05-10 train models: a cell may run for minutes on a CPU (nbgrader's default is 30 s).
c.Execute.timeout = 1800
'''


def _metadata(grade_id: str, *, solution: bool = False, grade: bool = False, locked: bool = False,
              points: int | None = None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": SCHEMA_VERSION,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return meta


def question_count(source: str) -> int:
    """Number of numbered items after the questions heading of a markdown cell (at least 1)."""
    match = _QUESTIONS.search(source)
    after = source[match.end():] if match else source
    return max(1, len(re.findall(r"^\d+\.\s", after, re.MULTILINE)))


def _defuse(source: str) -> str:
    """The markers quoted in a cell that is not an exercise (00 explains them in words) with a
    no-break space, which reads the same, so that nbgrader does not take the quote for a solution."""
    for marker in ("BEGIN SOLUTION", "END SOLUTION"):
        source = source.replace(marker, marker.replace(" ", "\u00a0"))
    return source


def _unique(grade_id: str, used: set[str]) -> str:
    candidate, n = grade_id, 2
    while candidate in used:
        candidate, n = f"{grade_id}-{n}", n + 1
    used.add(candidate)
    return candidate


def grader_notebook(notebook: nbformat.NotebookNode, name: str = "notebook", *, drop_answers: bool = False,
                    check_points: int = CHECK_POINTS) -> nbformat.NotebookNode:
    """A copy of an instructor notebook with nbgrader's metadata (see the module's docstring) and no
    outputs; the argument is not changed. Raises student.SolutionMarkerError for unpaired markers."""
    nb = copy.deepcopy(notebook)
    nb.metadata.pop("widgets", None)
    used: set[str] = set()
    cells, pending = [], None  # pending: the functions of the last exercise, until its check cell
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("nbgrader", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        is_exercise = cell.cell_type == "code" and bool(student.solution_blocks(cell.source, where=f"{name}, cell {index}"))
        if not is_exercise:
            cell.source = _defuse(cell.source)
        if student.is_answer(cell):
            if drop_answers:
                continue
            previous = next((c for c in reversed(cells) if c.cell_type == "markdown"), None)
            points = question_count(previous.source) if previous is not None else 1
            cell.metadata["nbgrader"] = _metadata(_unique("answers", used), solution=True, grade=True,
                                                  points=points)
        elif is_exercise:
            functions = _DEF.findall(cell.source) or [f"exercise-{index}"]
            cell.metadata["nbgrader"] = _metadata(_unique(functions[-1], used), solution=True)
            pending = functions
        elif cell.cell_type == "code" and pending is not None:
            checked = [f for f in pending if re.search(_CHECK_CALL.format(function=re.escape(f)), cell.source)]
            if checked:
                cell.metadata["nbgrader"] = _metadata(_unique(f"check-{checked[-1]}", used), grade=True,
                                                      locked=True, points=check_points)
            pending = None
        elif cell.cell_type == "markdown" or (cell.cell_type == "code" and cell.source.startswith(_SETUP)):
            cell.metadata["nbgrader"] = _metadata(_unique(f"cell-{cell.get('id') or index}", used), locked=True)
        cells.append(cell)
    nb.cells = cells
    return nb


def make_course(src_dir: str | Path, course_dir: str | Path, assignment: str | None = None, *,
                drop_answers: bool = False, only: list[str] | None = None) -> list[Path]:
    """Write the nbgrader source version of the notebooks of src_dir into course_dir/source/ (one
    assignment per notebook, named after it, or all in `assignment`) and course_dir/nbgrader_config.py
    unless it exists; return the notebooks written. `only`: notebook name prefixes ("01", ...) to
    keep. All notebooks are converted before the first is written."""
    src_dir, course_dir = Path(src_dir), Path(course_dir)
    paths = sorted(src_dir.glob("*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(prefix) for prefix in only)]
    if not paths:
        raise FileNotFoundError(f"no notebooks in {src_dir}" + (f" starting with {only}" if only else ""))
    converted = []
    for path in paths:
        nb = grader_notebook(nbformat.read(path, as_version=4), str(path), drop_answers=drop_answers)
        nbformat.validate(nb)
        converted.append((course_dir / "source" / (assignment or path.stem) / path.name, nb))
    for target, nb in converted:
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
    config = course_dir / "nbgrader_config.py"
    if not config.exists():
        config.write_text(NBGRADER_CONFIG, encoding="utf-8")
    return [target for target, _ in converted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_teach.grader",
        description="Write the course's notebooks as nbgrader assignments (source version).")
    parser.add_argument("src_dir", type=Path, help="folder of the instructor notebooks (e.g. notebooks/)")
    parser.add_argument("course_dir", type=Path, help="the nbgrader course folder (e.g. course/)")
    parser.add_argument("--assignment", help="put every notebook into this one assignment "
                                             "(default: one assignment per notebook, named after it)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="only the notebooks whose names start so (e.g. 01 02)")
    parser.add_argument("--drop-answers", action="store_true",
                        help="leave the answer key out instead of making it a manually graded answer")
    args = parser.parse_args(argv)
    try:
        written = make_course(args.src_dir, args.course_dir, args.assignment, drop_answers=args.drop_answers,
                              only=args.only)
    except (student.SolutionMarkerError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
