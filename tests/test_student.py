"""The student edition (dpo_teach/student.py): solutions become stubs, and every check then says so;
the answer key (cells tagged "answer") is left out, and nothing in it claims to be the instructor
edition.

Exercises and question cells are found in the notebooks at collection time, so a new notebook is
tested without editing this file.
"""

import ast
import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from dpo_teach import student

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
MARKERS = (student.BEGIN, student.END)
ANSWERS_START = "**Answers** (instructor edition)"  # how an answer cell starts (the course's convention)
QUESTION_HEADING = re.compile(r"^#{1,6}\s+(Questions to think about|More exercises)\s*$", re.MULTILINE)


def tagged_answer(cell) -> bool:
    """An answer-key cell: "answer" among its metadata's tags (written here, not taken from student.py)."""
    return "answer" in (cell.get("metadata", {}).get("tags") or [])


def student_index(notebook: nbformat.NotebookNode) -> dict[int, int]:
    """Index in the student edition of every cell of an instructor notebook that the edition keeps."""
    kept = [i for i, cell in enumerate(notebook.cells) if not tagged_answer(cell)]
    return {original: new for new, original in enumerate(kept)}


@dataclass(frozen=True)
class Exercise:
    notebook: str  # file name
    cell: int  # index of the exercise cell
    function: str  # the function the learner writes
    solution: tuple[str, ...]  # the lines strictly between the markers
    indent: str  # indentation of the BEGIN marker
    check_cell: int | None  # index of the next code cell when it calls a check on the function
    checked_as: str = ""  # the function that check is called on: this one, or one of its cell calling it

    def __str__(self):
        return f"{self.notebook[:2]}-{self.function}"


def _functions(source: str, body_only: bool = True) -> dict[str, str]:
    """Name -> source of every top-level function of a cell (its body alone, or the whole def)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    return {node.name: "\n".join(lines[(node.body[0] if body_only else node).lineno - 1:node.end_lineno])
            for node in tree.body if isinstance(node, ast.FunctionDef)}


def find_exercises(path: Path) -> list[Exercise]:
    """The exercises of a notebook: code cells with a solution block, and the check cell after each."""
    notebook = nbformat.read(path, as_version=4)
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        begins = [i for i, line in enumerate(lines) if line.strip() == student.BEGIN]
        ends = [i for i, line in enumerate(lines) if line.strip() == student.END]
        for begin, end in zip(begins, ends, strict=True):
            names = [m.group(1) for line in lines[:begin] if (m := re.match(r"\s*def\s+(\w+)\s*\(", line))]
            function = names[-1] if names else ""
            following = next((j for j in range(index + 1, len(notebook.cells))
                              if notebook.cells[j].cell_type == "code"), None)
            # checked: the next code cell calls a check on the function, or on a function of the
            # same cell that calls it (05's sft_step is checked together with its sft_batch_loss)
            callers = {function} | {name for name, body in _functions(cell.source).items()
                                    if function and re.search(rf"\b{function}\(", body)}
            checked_as = next((name for name in sorted(callers, key=lambda name: name != function)
                               if following is not None and function and re.search(
                                   rf"check_\w+\(\s*{name}\b", notebook.cells[following].source)), "")
            found.append(Exercise(path.name, index, function, tuple(lines[begin + 1:end]),
                                  lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())],
                                  following if checked_as else None, checked_as))
    return found


NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
EXERCISES = [exercise for path in NOTEBOOK_PATHS for exercise in find_exercises(path)]


def digests() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(NOTEBOOKS.glob("*.ipynb"))}


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    """The student edition made twice (command line and function), with the sources' hashes around it."""
    before = digests()
    root = tmp_path_factory.mktemp("student")
    cli = subprocess.run([sys.executable, "-m", "dpo_teach.student", "notebooks/", str(root / "cli")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    written = student.make_student_edition(NOTEBOOKS, root / "function")
    after = digests()
    return {"before": before, "after": after, "cli": cli, "cli_dir": root / "cli",
            "function_dir": root / "function", "written": written}


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


# ---- (a) the command line and the function write valid notebooks without outputs -------------------


def test_command_line_and_function_write_the_same_valid_notebooks(edition):
    assert edition["cli"].returncode == 0, edition["cli"].stderr
    names = [p.name for p in NOTEBOOK_PATHS]
    assert [p.name for p in edition["written"]] == names
    assert sorted(p.name for p in edition["cli_dir"].glob("*.ipynb")) == names
    for name in names:
        from_cli, from_function = edition["cli_dir"] / name, edition["function_dir"] / name
        assert from_cli.read_bytes() == from_function.read_bytes(), name
        nbformat.validate(read(from_cli))


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOK_PATHS])
def test_outputs_cleared_and_everything_else_kept(edition, name):
    original, copy = read(NOTEBOOKS / name), read(edition["function_dir"] / name)
    assert copy.metadata == original.metadata
    assert (copy.nbformat, copy.nbformat_minor) == (original.nbformat, original.nbformat_minor)
    kept = [(index, cell) for index, cell in enumerate(original.cells) if not tagged_answer(cell)]
    assert len(copy.cells) == len(kept), f"{name}: the student edition should keep every cell but the answers"
    exercise_cells = {e.cell for e in EXERCISES if e.notebook == name}
    for (index, a), b in zip(kept, copy.cells, strict=True):
        assert (b.cell_type, b.get("id"), b.metadata) == (a.cell_type, a.get("id"), a.metadata), index
        if b.cell_type == "code":
            assert b.outputs == [] and b.execution_count is None, f"{name} cell {index} kept its outputs"
            ast.parse(python_only(b.source))  # the stubbed cell is still valid Python
        if index not in exercise_cells:
            assert b.source == a.source, f"{name} cell {index} changed but holds no exercise"


def python_only(source: str) -> str:
    """The source with IPython magics (%matplotlib, !cmd) commented out, so that ast can read it."""
    return "\n".join("# " + line if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


# ---- (b) no solution survives ---------------------------------------------------------------------


@pytest.mark.parametrize("exercise", EXERCISES, ids=str)
def test_no_solution_text_survives(edition, exercise):
    at_index = student_index(read(NOTEBOOKS / exercise.notebook))
    cell = read(edition["function_dir"] / exercise.notebook).cells[at_index[exercise.cell]]
    student_lines = [line.strip() for line in cell.source.splitlines()]
    for line in exercise.solution:
        if line.strip():
            assert line.strip() not in student_lines, f"solution line kept in {exercise}: {line.strip()!r}"
    stub = cell.source.splitlines()
    # a cell may hold several exercises (a function and the step that calls it): find this one's stub
    raises = [stub[at + 1] for at, line in enumerate(stub[:-1]) if line == exercise.indent + student.STUB_COMMENT]
    assert raises, f"no stub in {exercise}'s cell"
    named = [line for line in raises if f'"{exercise.function}:' in line]
    assert len(named) == 1, f"{exercise}: expected one stub naming the function, got {raises}"
    assert named[0].startswith(exercise.indent + "raise NotImplementedError(")


def test_no_marker_left_anywhere(edition):
    for path in sorted(edition["function_dir"].glob("*.ipynb")):
        for index, cell in enumerate(read(path).cells):
            if cell.cell_type == "code":
                for line in cell.source.splitlines():
                    assert line.strip() not in MARKERS, f"{path.name} cell {index} still has {line.strip()!r}"


# ---- (c) each check explains that the function is not written yet ----------------------------------


def imports_before(notebook: nbformat.NotebookNode, index: int) -> str:
    """The top-level import statements of the code cells before cell `index`, in order.

    This is the cheap stand-in for running the notebook up to the exercise: the exercise cells only
    define a function and the check cells only import a checks module and call the check on it, so
    imports are all the state they need (no model is loaded or trained).
    """
    statements = []
    for cell in notebook.cells[:index]:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(python_only(cell.source))
        statements += [ast.unparse(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    return "\n".join(statements)


def up_to_the_check(source: str, function: str) -> str:
    """The check cell's statements up to and including the one calling check_*(function).

    What follows the check in a cell (04's check cells, say, go on to use a batch built earlier in
    the notebook) is never reached when the check raises, so it is left out instead of its state built.
    """
    tree = ast.parse(python_only(source))
    for end, node in enumerate(tree.body):
        for call in ast.walk(node):
            if (isinstance(call, ast.Call) and re.search(r"check_\w+$", ast.unparse(call.func))
                    and any(ast.unparse(arg) == function for arg in call.args)):
                return "\n".join(ast.unparse(n) for n in tree.body[: end + 1])
    raise AssertionError(f"the check cell does not call a check on {function}:\n{source}")


@pytest.mark.parametrize("exercise", [e for e in EXERCISES if e.check_cell is not None], ids=str)
def test_check_explains_the_stub(edition, exercise, capsys):
    notebook = read(edition["function_dir"] / exercise.notebook)
    at_index = student_index(read(NOTEBOOKS / exercise.notebook))
    cell, check_cell = at_index[exercise.cell], at_index[exercise.check_cell]
    namespace = {"__name__": "__main__"}
    exec(imports_before(notebook, cell), namespace)
    exec(notebook.cells[cell].source, namespace)  # defines the stubbed function
    if exercise.checked_as != exercise.function:  # checked through a caller: that one solved, this one a stub
        solved = read(NOTEBOOKS / exercise.notebook).cells[exercise.cell].source
        exec(student.without_markers(_functions(solved, body_only=False)[exercise.checked_as]), namespace)
    check = up_to_the_check(notebook.cells[check_cell].source, exercise.checked_as)
    with pytest.raises(AssertionError, match="not written yet") as raised:
        exec(check, namespace)
    assert isinstance(raised.value.__cause__, NotImplementedError), "the check did not reach the stub"
    assert capsys.readouterr().out.count("✓") == 0  # no success line printed


# ---- (c') the answer key stays in the instructor edition --------------------------------------------


def question_cells(path: Path) -> list[int]:
    """Indices of the markdown cells with a "Questions to think about" (or "More exercises") heading."""
    return [i for i, cell in enumerate(read(path).cells)
            if cell.cell_type == "markdown" and QUESTION_HEADING.search(cell.source)]


def question_numbers(source: str) -> list[int]:
    """The numbers of the numbered list items after the first question heading of a cell."""
    after = source[QUESTION_HEADING.search(source).end():]
    return [int(m.group(1)) for m in re.finditer(r"^(\d+)\.\s", after, re.MULTILINE)]


def test_no_answer_survives(edition):
    for path in sorted(edition["function_dir"].glob("*.ipynb")):
        for index, cell in enumerate(read(path).cells):
            assert not tagged_answer(cell), f"{path.name} cell {index} is tagged 'answer'"
            assert "**Answers**" not in cell.source, f"{path.name} cell {index} holds answer text"


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOK_PATHS if question_cells(p)])
def test_questions_are_followed_by_their_answers(name):
    cells = read(NOTEBOOKS / name).cells
    for index in question_cells(NOTEBOOKS / name):
        assert index + 1 < len(cells), f"{name}: the questions (cell {index}) end the notebook: no answer cell follows"
        answer = cells[index + 1]
        assert answer.cell_type == "markdown" and tagged_answer(answer), \
            f"{name}: cell {index + 1}, after the questions, should be a markdown cell tagged 'answer'"
        assert answer.source.startswith(ANSWERS_START), f"{name}: the answer cell should start with {ANSWERS_START!r}"
        answered = {int(m.group(1)) for m in re.finditer(r"^\s*(?:\*\*)?(\d+)[.)]", answer.source, re.MULTILINE)}
        missing = [n for n in question_numbers(cells[index].source) if n not in answered]
        assert not missing, f"{name}: question(s) {missing} of cell {index} have no numbered answer"


def test_answer_cells_are_left_out_and_nothing_else(tmp_path):
    notebook = nbformat.v4.new_notebook()
    answer = nbformat.v4.new_markdown_cell(ANSWERS_START + "\n\n1. Because.")
    answer.metadata["tags"] = ["answer"]
    code_answer = nbformat.v4.new_code_cell("print('worked answer')")
    code_answer.metadata["tags"] = ["solution", "answer"]
    other_tags = nbformat.v4.new_markdown_cell("kept")
    other_tags.metadata["tags"] = ["answers-follow", "hide-input"]
    notebook.cells = [nbformat.v4.new_markdown_cell("## Questions to think about\n\n1. Why?"), answer,
                      nbformat.v4.new_code_cell("x = 1"), code_answer, other_tags]
    (tmp_path / "src").mkdir()
    nbformat.write(notebook, tmp_path / "src" / "nb.ipynb")
    (path,) = student.make_student_edition(tmp_path / "src", tmp_path / "out")
    cells = read(path).cells
    assert [c.source for c in cells] == ["## Questions to think about\n\n1. Why?", "x = 1", "kept"]
    assert [c.get("id") for c in cells] == [notebook.cells[i].id for i in (0, 2, 4)]
    assert len(read(tmp_path / "src" / "nb.ipynb").cells) == 5, "the source is not changed"


# ---- (c'') the student edition does not call itself the instructor edition -------------------------

INSTRUCTOR_CLAIMS = [re.compile(pattern, re.IGNORECASE) for pattern in (
    r"\(\s*instructor(?:'s)?\s*\)\s*edition",  # "in this (instructor) edition"
    r"\(\s*instructor(?:'s)?\s+edition\s*\)",  # "**Answers** (instructor edition)"
    r"\bthis\s*\(\s*instructor",  # "this (instructor"
    r"\bthis\s+instructor(?:'s)?\s+edition",  # "in this instructor edition"
    r"\b(?:is|are|you\s+have)\s+(?:in\s+)?the\s+instructor(?:'s)?\s+edition",  # "this is the instructor edition"
    r"\binstructor(?:'s)?\s+edition\s*\(\s*(?:this|the\s+one\s+you)",  # "the instructor edition (this one)"
)]


def instructor_claims(text: str) -> list[str]:
    return [m.group(0) for pattern in INSTRUCTOR_CLAIMS for m in pattern.finditer(text)]


@pytest.mark.parametrize("sentence, claims", [
    ("1. a cell with a function to complete; in this (instructor) edition the solution sits between", True),
    ("In this instructor edition, the solutions are shown.", True),
    ("This is the instructor edition of the course.", True),
    ("You are in the Instructor edition.", True),
    ("**Answers** (instructor edition)", True),
    ("in the instructor edition (the `notebooks/` folder) the solution sits between the markers; in the "
     "student edition it is a stub", False),
    ("the **instructor edition** (the repository's notebooks) keeps the answers", False),
])
def test_the_claim_detector(sentence, claims):
    assert bool(instructor_claims(sentence)) == claims


def test_student_edition_does_not_claim_to_be_the_instructor_edition(edition):
    for path in sorted(edition["function_dir"].glob("*.ipynb")):
        for index, cell in enumerate(read(path).cells):
            found = instructor_claims(cell.source)
            assert not found, f"{path.name} cell {index} says it is the instructor edition: {found}"


# ---- (d) the instructor notebooks are untouched ---------------------------------------------------


def test_instructor_notebooks_unchanged(edition):
    assert edition["after"] == edition["before"]


# ---- (e) every notebook after the welcome has exercises, each followed by its check -----------------


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOK_PATHS if p.name[:2].isdigit() and int(p.name[:2]) >= 1])
def test_each_notebook_has_two_checked_exercises(name):
    exercises = [e for e in EXERCISES if e.notebook == name]
    checked = [e for e in exercises if e.check_cell is not None]
    assert len(checked) >= 2, f"{name}: {len(checked)} exercise(s) followed by a check cell, expected at least 2"
    assert checked == exercises, f"{name}: exercises without a check cell after them: {set(exercises) - set(checked)}"


# ---- the converter itself: stubs at the block's indentation, clear errors ---------------------------


def write_notebook(folder: Path, name: str, *sources: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# exercise")]
    notebook.cells += [nbformat.v4.new_code_cell(source, execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="hello\n")]) for source in sources]
    path = folder / name
    nbformat.write(notebook, path)
    return path


def test_stub_keeps_the_indentation_and_handles_top_level_blocks(tmp_path):
    in_loop = "def f(xs):\n    for x in xs:\n        ### BEGIN SOLUTION\n        print(x)\n        ### END SOLUTION\n    return 1\n"
    top_level = "x = 1\n### BEGIN SOLUTION\ny = x + 1\n### END SOLUTION\n"
    write_notebook(tmp_path / "src", "nb.ipynb", in_loop, top_level)
    (path,) = student.make_student_edition(tmp_path / "src", tmp_path / "out")
    cells = read(path).cells
    assert cells[1].source == ('def f(xs):\n    for x in xs:\n        # YOUR CODE HERE\n'
                               '        raise NotImplementedError("f: replace this line by your code")\n    return 1\n')
    assert cells[2].source == 'x = 1\n# YOUR CODE HERE\nraise NotImplementedError("replace this line by your code")\n'
    with pytest.raises(NotImplementedError):  # a top-level stub raises when the cell runs
        exec(cells[2].source, {})
    assert all(c.outputs == [] and c.execution_count is None for c in cells[1:])


@pytest.mark.parametrize("source, message", [
    ("def f():\n    ### BEGIN SOLUTION\n    return 1\n", r"cell 1: '### BEGIN SOLUTION' on line 2 has no matching"),
    ("def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n",
     r"cell 1: '### BEGIN SOLUTION' on line 3 is nested in the solution block opened on line 2"),
    ("def f():\n    ### END SOLUTION\n    return 1\n    ### BEGIN SOLUTION\n",
     r"cell 1: '### END SOLUTION' on line 2 has no '### BEGIN SOLUTION' before it"),
])
def test_unbalanced_markers_raise_a_clear_error(tmp_path, source, message, capsys):
    write_notebook(tmp_path / "src", "bad.ipynb", source)
    with pytest.raises(student.SolutionMarkerError, match=r"bad\.ipynb, " + message):
        student.make_student_edition(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    assert student.main([str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    assert "bad.ipynb, cell 1" in capsys.readouterr().err


def test_refuses_to_write_over_the_sources(tmp_path):
    source = write_notebook(tmp_path, "nb.ipynb", "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n")
    before = source.read_bytes()
    with pytest.raises(ValueError, match="overwrite"):
        student.make_student_edition(tmp_path, tmp_path / ".")
    assert source.read_bytes() == before
