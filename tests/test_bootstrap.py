"""The bootstrap cell, first code cell of every notebook: the same everywhere, and it works offline.

The cell is run as a plain Python script in a fresh virtual environment that cannot import
dpo_teach, with a local copy of this working tree as the course's "remote": it must clone it,
install it, import it from the clone and call setup(), and a second run must not clone again.
"""

import ast
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dpo_teach.offline import offline_environment

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
REFERENCE = NOTEBOOKS / "00_welcome_and_setup.ipynb"


def first_code_cell(path: Path) -> str:
    notebook = nbformat.read(path, as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code")


BOOTSTRAP = first_code_cell(REFERENCE)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name[:2])
def test_every_notebook_starts_with_the_same_bootstrap(path):
    assert first_code_cell(path).encode() == BOOTSTRAP.encode(), (
        f"{path.name}: its first code cell differs from the bootstrap cell of {REFERENCE.name}; copy that cell")


def test_bootstrap_is_plain_python():
    ast.parse(BOOTSTRAP)  # no IPython magic (!git, %pip): it runs in any Python
    assert 'importlib.util.find_spec("dpo_teach") is None' in BOOTSTRAP
    assert "dpo_teach.setup()" in BOOTSTRAP
    assert "sys.executable" in BOOTSTRAP  # pip of the kernel's own interpreter


# ---- running the cell offline in a fresh virtual environment ---------------------------------------


def run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def make_venv(folder: Path) -> Path:
    """A virtual environment that sees the system's third-party packages but not dpo_teach.

    Not --system-site-packages: that would process the .pth files there, among them the finder of
    the editable install of dpo_teach. A .pth file of the venv lists the system site-packages
    folders instead; such plain lines are appended to sys.path, but the .pth files inside those
    folders are not processed, so dpo_teach stays out of reach while torch & co. are found. Without
    pip of its own, the venv runs the system's pip (found on those folders too), which installs
    into the venv.
    """
    created = run([sys.executable, "-m", "venv", "--without-pip", str(folder)])
    assert created.returncode == 0, created.stderr
    python = folder / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    system = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    (Path(purelib) / "system_site_packages.pth").write_text("".join(f"{p}\n" for p in system))
    return python


def snapshot_of_the_working_tree(target: Path) -> Path:
    """A git repository holding the tracked and untracked (not ignored) files of this checkout, data/
    included, so that the test clones the tree as it is now, uncommitted changes and all."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the checkout is left out
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git = ["git", "-c", "user.name=course", "-c", "user.email=course@localhost", "-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "--no-verify", "-m", "snapshot"]):
        done = run(git + command, cwd=target)
        assert done.returncode == 0, done.stderr
    return target


def system_install_files() -> dict[str, float]:
    """The dpo_teach files of the system site-packages (the editable install), with their mtimes."""
    found = {}
    for folder in site.getsitepackages():
        for path in Path(folder).glob("*dpo_teach*"):
            found[str(path)] = path.stat().st_mtime
    return found


@pytest.mark.skipif(os.name != "posix" or shutil.which("git") is None, reason="needs git and a POSIX venv")
def test_bootstrap_clones_installs_and_imports_offline(tmp_path):
    remote = snapshot_of_the_working_tree(tmp_path / "remote")
    home = tmp_path / "home"
    work = tmp_path / "work"  # the cell runs here, away from the repository
    work.mkdir()
    (tmp_path / "user").mkdir()
    script = work / "bootstrap_cell.py"
    script.write_text(BOOTSTRAP + "\nprint('dpo_teach file:', dpo_teach.__file__)\n")

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DPO_TEACH_", "PIP_")) and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env = offline_environment(env)  # Python processes start with the network guard on
    env.update({
        "DPO_TEACH_SOURCE": remote.as_uri(),
        "DPO_TEACH_HOME": str(home),
        # pip offline: no index, no dependencies (they are on the system site-packages), and the
        # installed setuptools as build backend instead of one fetched into an isolated build env
        "DPO_TEACH_PIP_ARGS": "--no-deps --no-build-isolation",
        "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", "PIP_NO_INPUT": "1",
        "DPO_TEACH_PRESET": "tiny", "DPO_TEACH_DEVICE": "cpu",  # the same line on a machine with a GPU
        "HOME": str(tmp_path / "user"), "OMP_NUM_THREADS": "1",
    })
    installed_before = system_install_files()
    python = make_venv(tmp_path / "venv")

    # before the bootstrap the venv finds torch but not dpo_teach
    probe = ("import importlib.util\nassert importlib.util.find_spec('torch') is not None\n"
             "try:\n    import dpo_teach\nexcept ModuleNotFoundError:\n    print('no dpo_teach')\n")
    before = run([str(python), "-c", probe], cwd=work, env=env)
    assert before.returncode == 0 and before.stdout.strip() == "no dpo_teach", before.stdout + before.stderr

    def bootstrap(python: Path) -> str:
        done = run([str(python), str(script)], cwd=work, env=env)
        assert done.returncode == 0, f"the bootstrap cell failed:\n{done.stdout}\n{done.stderr}"
        assert "dpo_teach: preset='tiny' device='cpu' seed=0 model=data/base_model" in done.stdout
        assert f"dpo_teach file: {home / 'dpo_teach' / '__init__.py'}" in done.stdout
        return done.stdout

    bootstrap(python)  # first run: clones the snapshot into home, installs it, imports it from there
    assert (home / "pyproject.toml").is_file() and (home / "data" / "base_model" / "config.json").is_file()
    head = run(["git", "rev-parse", "HEAD"], cwd=home).stdout
    assert head == run(["git", "rev-parse", "HEAD"], cwd=remote).stdout
    (home / "kept.txt").write_text("a re-clone would need an empty folder")

    # later runs must not clone: a clone from this source would fail
    env["DPO_TEACH_SOURCE"] = (tmp_path / "no-such-remote").as_uri()
    bootstrap(python)  # the same kernel again: dpo_teach is installed, nothing is fetched
    bootstrap(make_venv(tmp_path / "venv2"))  # a new environment, the clone already there: install only
    assert (home / "kept.txt").is_file()
    assert run(["git", "rev-parse", "HEAD"], cwd=home).stdout == head

    assert system_install_files() == installed_before  # pip left the system's dpo_teach alone
