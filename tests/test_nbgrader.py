"""The course as nbgrader assignments (dpo_teach/grader.py), checked with nbgrader itself in a
temporary course folder.

Every notebook gets nbgrader's metadata, and `nbgrader generate_assignment` turns all of them into a
student version without a line of any solution or of the answer key. The round trip through
`nbgrader autograde` runs on notebooks 01 and 03 only (AUTOGRADED): autograding executes each
notebook twice (the instructor's and the stubbed submission), and these two execute in about 10 s
each on the CPU while covering eight exercises, Bradley-Terry's and the DPO loss's among them;
notebooks 05-10 train models for minutes each, too long for every test run. The instructor's
submission must score full points on every autograded check and the stubbed one zero on every
check, with the answer key left to manual grading.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dpo_teach import grader, student
from dpo_teach.offline import offline_environment

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
AUTOGRADED = ["01", "03"]  # see the docstring
pytest.importorskip("nbgrader", reason="nbgrader is not installed (the `dev` extra)")


def nbgrader(course: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the nbgrader command line in the course folder, offline (its kernels inherit the network
    guard), with this Python's scripts on PATH (nbgrader calls `alembic` to set up its database)."""
    env = offline_environment()
    env["MPLBACKEND"] = "Agg"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    run = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return run


def solutions(path: Path) -> list[str]:
    """The non-blank lines between the solution markers of every exercise cell of a notebook."""
    lines = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            source = cell.source.splitlines()
            for begin, end in student.solution_blocks(cell.source):
                lines += [line.strip() for line in source[begin + 1:end] if line.strip()]
    return lines


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course folder with two assignments: "course" (every notebook) and "quick" (AUTOGRADED),
    both generated; "quick" submitted by "instructor" (the source version) and by "stub" (the
    released version, untouched) and autograded."""
    root = tmp_path_factory.mktemp("nbgrader") / "course"
    grader.make_course(REPO / "notebooks", root, assignment="course")
    grader.make_course(REPO / "notebooks", root, assignment="quick", only=AUTOGRADED)
    nbgrader(root, "generate_assignment", "course")
    nbgrader(root, "generate_assignment", "quick")
    for who, version in (("instructor", "source"), ("stub", "release")):
        target = root / "submitted" / who / "quick"
        shutil.copytree(root / version / "quick", target)
    nbgrader(root, "autograde", "quick", timeout=1200)
    return root


def test_every_notebook_carries_nbgrader_metadata(course):
    for path in NOTEBOOKS:
        cells = nbformat.read(course / "source" / "course" / path.name, as_version=4).cells
        meta = [c.metadata.get("nbgrader") for c in cells]
        exercises = [i for i, c in enumerate(cells) if c.cell_type == "code" and student.solution_blocks(c.source)]
        for i in exercises:
            assert meta[i]["solution"] and not meta[i]["grade"], f"{path.name} cell {i}: not a solution cell"
            check = next(j for j in range(i + 1, len(cells)) if cells[j].cell_type == "code")
            assert meta[check] and meta[check]["grade"] and meta[check]["locked"], f"{path.name} cell {check}"
            assert meta[check]["points"] == grader.CHECK_POINTS and re.search(r"check_\w+\(", cells[check].source)
        answers = [i for i, c in enumerate(cells) if student.is_answer(c)]
        for i in answers:
            assert meta[i]["solution"] and meta[i]["grade"] and meta[i]["points"] >= 1, f"{path.name} cell {i}"
        assert all(m and m["locked"] for c, m in zip(cells, meta, strict=True)
                   if c.cell_type == "markdown" and not student.is_answer(c)), f"{path.name}: editable text"
        assert all(c.outputs == [] for c in cells if c.cell_type == "code")
    graded = sum(1 for p in NOTEBOOKS for e in nbformat.read(p, as_version=4).cells
                 if e.cell_type == "code" and student.solution_blocks(e.source))
    assert graded >= 30, "fewer exercises than the course has"


def test_the_student_version_has_no_solution(course):
    for path in NOTEBOOKS:
        released = nbformat.read(course / "release" / "course" / path.name, as_version=4)
        text = "\n".join(c.source for c in released.cells)
        code_lines = {line.strip() for c in released.cells if c.cell_type == "code" for line in c.source.splitlines()}
        assert student.BEGIN not in text and student.END not in text, path.name
        for line in solutions(path):
            assert line not in code_lines, f"{path.name}: a solution line survives: {line!r}"
        assert "**Answers**" not in text and "(instructor edition)" not in text, f"{path.name}: the answer key survives"
        stubs = text.count("raise NotImplementedError()")
        assert stubs == sum(len(student.solution_blocks(c.source))
                            for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"), path.name
        if any(student.is_answer(c) for c in nbformat.read(path, as_version=4).cells):
            assert "YOUR ANSWER HERE" in text, f"{path.name}: no place for the answers"


def _grades(course: Path, student_id: str) -> dict[str, list]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        submission = gradebook.find_submission("quick", student_id)
        return {nb.name: [(g.name, g.cell_type, g.auto_score, g.max_score, g.needs_manual_grade) for g in nb.grades]
                for nb in submission.notebooks}


def test_autograding_the_instructor_version_gives_full_points(course):
    grades = _grades(course, "instructor")
    assert sorted(grades) == sorted(p.stem for p in NOTEBOOKS if p.name[:2] in AUTOGRADED)
    for notebook, cells in grades.items():
        checks = [g for g in cells if g[1] == "code"]
        assert len(checks) >= 3, f"{notebook}: {checks}"
        assert all(score == maximum for _, _, score, maximum, _ in checks), f"{notebook}: {checks}"
        assert all(manual for _, kind, _, _, manual in cells if kind == "markdown"), "answers need a teacher"


def test_autograding_the_stubs_gives_zero_for_every_exercise(course):
    grades = _grades(course, "stub")
    assert sorted(grades) == sorted(p.stem for p in NOTEBOOKS if p.name[:2] in AUTOGRADED)
    for notebook, cells in grades.items():
        checks = [g for g in cells if g[1] == "code"]
        assert checks and all(score == 0 for _, _, score, _, _ in checks), f"{notebook}: {checks}"
        autograded = nbformat.read(course / "autograded" / "stub" / "quick" / f"{notebook}.ipynb", as_version=4)
        for cell in autograded.cells:
            if (cell.metadata.get("nbgrader") or {}).get("grade") and cell.cell_type == "code":
                errors = [o for o in cell.outputs if o.output_type == "error"]
                assert errors and "not written yet" in "".join(errors[0].traceback), \
                    f"{notebook}: the check {cell.metadata.nbgrader.grade_id} does not say the stub is unwritten"
