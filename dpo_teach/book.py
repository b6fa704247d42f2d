"""The course as a static website: the executed notebooks, the syllabus and the teaching notes.

    python -m dpo_teach.book                      # writes build/book/ (open build/book/index.html)
    python -m dpo_teach.book --out site/          # anywhere else

It builds with Sphinx, MyST-NB and the Sphinx Book Theme, offline, without executing anything: the
notebooks are committed executed, and their saved outputs (text, tables, plots) are what the pages
show. MathJax is served from the site itself (the copy of MathJax 2 that the `jupyter-server-mathjax`
package ships), so the pages need no CDN.

What goes in:

- a home page: the README's introduction, its syllabus and a course map drawn from the teaching
  notes' prerequisites ("needs 01 and 02");
- one page per notebook of notebooks/ (every `*.ipynb`, in name order), as committed, except that
  the answer key (cells tagged "answer", see dpo_teach/student.py) is left out, each exercise's
  solution is folded ("Show code cell source"), an interactive explorer shows the first figure it
  drew with a note that it moves only in a running notebook, and a line under the title links to
  the notebook on Colab and to a download of the page's notebook;
- the README's "Teaching notes" and "Student edition" sections, one page each.

Sphinx writes its pages into the output folder; the source it builds from is put together in a
temporary folder (kept with --keep-source DIR).
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from dpo_teach import student

__all__ = ["REPO", "DEFAULT_OUT", "DEFAULT_REPOSITORY", "DEFAULT_BRANCH", "colab_url",
           "readme_section", "prerequisites", "book_notebook", "stage_book", "build_book", "main"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "build" / "book"
DEFAULT_REPOSITORY = "dpo-teach/dpo-teach"  # owner/name on GitHub: the Colab and source links
DEFAULT_BRANCH = "main"

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
EXPLORER_NOTE = ("*An interactive explorer: this is the figure it first drew. Open the notebook in "
                 "Jupyter or on Colab to move its sliders.*")
FOLD_TAG = "hide-input"  # MyST-NB folds a cell's source behind "Show code cell source"


def colab_url(name: str, repository: str = DEFAULT_REPOSITORY, branch: str = DEFAULT_BRANCH) -> str:
    """Colab's address of notebooks/<name> in the GitHub repository `owner/name`."""
    return f"https://colab.research.google.com/github/{repository}/blob/{branch}/notebooks/{name}"


# ---- pieces of the README ----------------------------------------------------------------------


def readme_section(readme: str, title: str) -> str | None:
    """The section of the README under the level-2 heading `title` (heading included), up to the
    next level-2 heading; None if there is no such section."""
    match = re.search(rf"^## {re.escape(title)}\s*$", readme, re.MULTILINE)
    if match is None:
        return None
    following = re.search(r"^## ", readme[match.end():], re.MULTILINE)
    end = match.end() + following.start() if following else len(readme)
    return readme[match.start():end].rstrip() + "\n"


def readme_introduction(readme: str) -> tuple[str, str]:
    """(title, text between the title and the first level-2 heading) of the README."""
    title = re.search(r"^# (.+)$", readme, re.MULTILINE)
    first = re.search(r"^## ", readme, re.MULTILINE)
    start = title.end() if title else 0
    return (title.group(1).strip() if title else "dpo-teach"), readme[start:first.start() if first else None].strip()


def promote_headings(markdown: str) -> str:
    """Every heading one level up (## -> #), outside code fences, so a section can be a page."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"^#{2,6} ", line):
            line = line[1:]
        out.append(line)
    return "\n".join(out) + "\n"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def rewrite_links(markdown: str, staged: set[str], repository: str, branch: str) -> str:
    """Relative links to files that are not pages of the book point to the file on GitHub."""
    def replace(match: re.Match) -> str:
        target = match.group(1)
        path = target.split("#", 1)[0]
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", target) or path in staged:
            return match.group(0)
        return f"](https://github.com/{repository}/blob/{branch}/{path})"
    return _LINK.sub(replace, markdown)


_NOTE = re.compile(r"^- \*\*(\d{2})\b[^*]*\*\*:\s*needs ([^;]*);", re.MULTILINE)


def prerequisites(teaching_notes: str) -> dict[str, list[str]]:
    """Per notebook number, the notebooks its teaching note says it needs ("needs 03 and 08 (...)":
    ["03", "08"]; parentheses are left out, they qualify rather than require)."""
    needs = {}
    for match in _NOTE.finditer(teaching_notes):
        clause = re.sub(r"\([^)]*\)", "", match.group(2))
        needs[match.group(1)] = [n for n in re.findall(r"\b(\d{2})\b", clause) if n != match.group(1)]
    return needs


def draw_course_map(titles: dict[str, str], needs: dict[str, list[str]], path: Path) -> None:
    """A PNG of the course: one box per notebook (titles: number -> title), a row per depth, an arrow
    per prerequisite (a notebook that needs none of the others follows the first one)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    numbers = list(titles)
    edges = {n: [d for d in needs.get(n, []) if d in titles] for n in numbers}
    for n in numbers[1:]:
        edges[n] = edges[n] or [numbers[0]]
    depth: dict[str, int] = {}

    def depth_of(n: str, seen: tuple = ()) -> int:
        if n not in depth:
            deps = [d for d in edges[n] if d not in seen]
            depth[n] = 1 + max(depth_of(d, (*seen, n)) for d in deps) if deps else 0
        return depth[n]

    rows: dict[int, list[str]] = {}
    for n in numbers:
        rows.setdefault(depth_of(n), []).append(n)
    width = max(len(r) for r in rows.values())
    position = {n: (col - (len(ns) - 1) / 2, -row) for row, ns in rows.items() for col, n in enumerate(ns)}

    fig, ax = plt.subplots(figsize=(2.6 * width + 0.6, 0.95 * len(rows) + 0.3), dpi=110)
    boxes = {}
    for n, (x, y) in position.items():
        boxes[n] = ax.text(x, y, f"{n} · {_wrap(titles[n].split(':')[0], 28)}", ha="center", va="center", fontsize=8.5,
                           bbox=dict(boxstyle="round,pad=0.4", fc="#eef3fb", ec="#3b6ea8", lw=1))
    for n, deps in edges.items():
        for d in deps:
            ax.annotate("", xy=position[n], xytext=position[d],
                        arrowprops=dict(arrowstyle="-|>", color="0.45", lw=0.9, shrinkA=2, shrinkB=2,
                                        patchA=boxes[d].get_bbox_patch(), patchB=boxes[n].get_bbox_patch()))
    ax.set_xlim(-width / 2 - 0.1, width / 2 + 0.1)
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


# ---- the notebooks -----------------------------------------------------------------------------


def notebook_title(notebook: nbformat.NotebookNode, name: str) -> str:
    """The title of its first heading without the number ("# 03 · From RLHF to DPO": "From RLHF to
    DPO"), or the file name's words."""
    for cell in notebook.cells:
        match = re.search(r"^# (?:\d+\s*·\s*)?(.+)$", cell.source, re.MULTILINE) if cell.cell_type == "markdown" else None
        if match:
            return match.group(1).strip()
    return name[3:].removesuffix(".ipynb").replace("_", " ")


def _widget_outputs(model_id: str, state: dict, seen: set | None = None) -> list[dict]:
    """The outputs captured by the Output widgets inside widget `model_id` (its saved state)."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return []
    seen.add(model_id)
    model = state[model_id].get("state", {})
    outputs = list(model.get("outputs", [])) if state[model_id].get("model_name") == "OutputModel" else []
    for child in model.get("children", []) or []:
        if isinstance(child, str) and child.startswith("IPY_MODEL_"):
            outputs += _widget_outputs(child.removeprefix("IPY_MODEL_"), state, seen)
    return outputs


def book_notebook(notebook: nbformat.NotebookNode, name: str, repository: str = DEFAULT_REPOSITORY,
                  branch: str = DEFAULT_BRANCH) -> nbformat.NotebookNode:
    """The page's version of a notebook (a copy; the argument is not changed): answer cells left out,
    solutions folded, widgets replaced by what they drew, and a line of links under the title."""
    nb = copy.deepcopy(notebook)
    state = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    cells = []
    for cell in nb.cells:
        if student.is_answer(cell):
            continue
        if cell.cell_type == "code":
            if student.solution_blocks(cell.source, where=f"{name}, cell {len(cells)}"):
                tags = cell.metadata.setdefault("tags", [])
                if FOLD_TAG not in tags:
                    tags.append(FOLD_TAG)
            outputs = []
            for output in cell.get("outputs", []):
                view = output.get("data", {}).get(WIDGET_VIEW)
                if view is None:
                    outputs.append(output)
                    continue
                drawn = _widget_outputs(view.get("model_id", ""), state)
                if drawn:  # an explorer: its first figure and a note; a progress bar shows nothing
                    outputs.append(nbformat.v4.new_output("display_data", data={"text/markdown": EXPLORER_NOTE}))
                    outputs += [nbformat.from_dict(o) for o in drawn]
            cell.outputs = outputs
        cells.append(cell)
    links = nbformat.v4.new_markdown_cell(
        f"[Open in Colab]({colab_url(name, repository, branch)}) · "
        f"{{download}}`Download this notebook <{name}>`"
    )
    at = 1 if cells and cells[0].cell_type == "markdown" and cells[0].source.startswith("# ") else 0
    cells.insert(at, links)
    nb.cells = cells
    return nb


# ---- the Sphinx project ------------------------------------------------------------------------


def _mathjax_dir() -> Path:
    try:
        import jupyter_server_mathjax
    except ImportError as error:  # pragma: no cover - a dev dependency
        raise RuntimeError("the book needs the `jupyter-server-mathjax` package (pip install -e '.[dev]')") from error
    path = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (path / "MathJax.js").is_file():
        raise RuntimeError(f"no MathJax.js in {path}")
    return path


CONF = '''\
# Written by python -m dpo_teach.book: the Sphinx configuration of the course's website.
project = {project!r}
author = "the dpo-teach authors"
html_title = {title!r}
extensions = ["myst_nb"]
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are committed executed
nb_ipywidgets_js = {{}}  # no widget JavaScript from a CDN: the pages show what the widgets drew
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

# MathJax 2, served from _static/mathjax (the copy the jupyter-server-mathjax package ships)
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
myst_update_mathjax = False
mathjax2_config = {{
    "tex2jax": {{"inlineMath": [["\\\\(", "\\\\)"]], "displayMath": [["\\\\[", "\\\\]"]],
                "processEscapes": True}},
    # STIX-Web is the only web font shipped; the probe font that MathJax declares with the address
    # about:blank (which Chromium reports as an error) is declared as a local font instead
    "HTML-CSS": {{"availableFonts": ["STIX"], "preferredFont": "STIX", "webFont": "STIX-Web",
                 "imageFont": None,
                 "styles": {{"@font-face": {{"font-family": "MathJax_Blank", "src": "local('MathJax_Blank')"}}}}}},
    "messageStyle": "none",
    # no hidden MathML copy: its styles would fetch TeX fonts that the shipped MathJax lacks
    "menuSettings": {{"zoom": "None", "assistiveMML": False}},
}}

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_show_sourcelink = False
html_context = {{"default_mode": "auto"}}  # not left empty: the theme's script reports that as an error
html_theme_options = {{
    "repository_url": "https://github.com/{repository}",
    "repository_branch": {branch!r},
    "use_repository_button": True,
    "use_download_button": True,
    "launch_buttons": {{"colab_url": "https://colab.research.google.com"}},
    "show_navbar_depth": 1,
    "home_page_in_toc": True,
}}
'''


def stage_book(src: Path, root: Path = REPO, repository: str = DEFAULT_REPOSITORY,
               branch: str = DEFAULT_BRANCH) -> list[str]:
    """Write the Sphinx project of the book into `src`; return the notebook names it holds."""
    readme = (root / "README.md").read_text(encoding="utf-8")
    names = [p.name for p in sorted((root / "notebooks").glob("*.ipynb"))]
    if not names:
        raise FileNotFoundError(f"no notebooks in {root / 'notebooks'}")
    (src / "notebooks").mkdir(parents=True)
    (src / "_static").mkdir()
    shutil.copytree(_mathjax_dir(), src / "_static" / "mathjax")
    titles = {}
    for name in names:
        nb = nbformat.read(root / "notebooks" / name, as_version=4)
        nbformat.write(book_notebook(nb, name, repository, branch), src / "notebooks" / name)
        titles[name[:2]] = notebook_title(nb, name)

    pages = {f"notebooks/{name}" for name in names} | {"course_map.png"}
    teacher_pages = []
    for title, page in (("Teaching notes", "teaching_notes"), ("Student edition", "student_edition")):
        section = readme_section(readme, title)
        if section is not None:
            pages.add(f"{page}.md")
            teacher_pages.append((page, section))
    for page, section in teacher_pages:
        text = rewrite_links(promote_headings(section), pages, repository, branch)
        (src / f"{page}.md").write_text(text, encoding="utf-8")

    title, introduction = readme_introduction(readme)
    syllabus = readme_section(readme, "Syllabus") or "## Syllabus\n"
    notes = readme_section(readme, "Teaching notes") or ""
    needs = prerequisites(notes)
    draw_course_map(titles, needs, src / "course_map.png")
    map_lines = [f"- [{n} · {t}](notebooks/{names[i]}): "
                 + (f"builds on {', '.join(needs[n])}" if needs.get(n) else "a starting point")
                 for i, (n, t) in enumerate(titles.items())]
    toctree = "\n".join(f"notebooks/{name.removesuffix('.ipynb')}" for name in names)
    teachers = "\n".join(page for page, _ in teacher_pages)
    index = f"""# {title}

{introduction}

Each notebook page shows the notebook as it ran on the CPU preset, with its outputs and plots, a link
that opens it on Colab and a download of the notebook. The exercises' solutions are folded: try
first, then open "Show code cell source". The answer key to the questions is not on this site.

{syllabus}
## Course map

An arrow from one notebook to another: the second builds on the first (from the teaching notes).

![The course map: which notebook builds on which](course_map.png)

{chr(10).join(map_lines)}

```{{toctree}}
:hidden:
:caption: Notebooks

{toctree}
```

```{{toctree}}
:hidden:
:caption: For teachers

{teachers}
```
"""
    (src / "index.md").write_text(rewrite_links(index, pages, repository, branch), encoding="utf-8")
    (src / "conf.py").write_text(CONF.format(project="dpo-teach", title=title, repository=repository,
                                             branch=branch), encoding="utf-8")
    return names


def build_book(out: Path = DEFAULT_OUT, root: Path = REPO, repository: str = DEFAULT_REPOSITORY,
               branch: str = DEFAULT_BRANCH, keep_source: Path | None = None, quiet: bool = True) -> Path:
    """Build the website into `out` (emptied first); return the path of its home page."""
    from sphinx.application import Sphinx

    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="dpo-teach-book-") as tmp:
        src = Path(keep_source).resolve() if keep_source else Path(tmp) / "src"
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        stage_book(src, root, repository, branch)
        if out.exists():
            shutil.rmtree(out)
        app = Sphinx(str(src), str(src), str(out), str(Path(tmp) / "doctrees"), "html",
                     status=None if quiet else sys.stdout, warning=sys.stderr, freshenv=True)
        app.build()
        if app.statuscode:
            raise RuntimeError(f"Sphinx failed with status {app.statuscode}")
    (out / ".nojekyll").touch()  # GitHub Pages: serve _static/ and _images/ as they are
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_teach.book", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY,
                        help=f"GitHub owner/name for the Colab and source links (default {DEFAULT_REPOSITORY})")
    parser.add_argument("--branch", default=DEFAULT_BRANCH, help=f"its branch (default {DEFAULT_BRANCH})")
    parser.add_argument("--keep-source", type=Path, help="also keep the Sphinx project in this folder")
    parser.add_argument("--verbose", action="store_true", help="print Sphinx's progress")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        index = build_book(args.out, REPO, args.repository, args.branch, args.keep_source, quiet=not args.verbose)
    except (FileNotFoundError, RuntimeError, student.SolutionMarkerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{index} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
