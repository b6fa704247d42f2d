"""pytest set-up for the unit tests and for nbval's notebook runs: everything runs offline.

The environment is changed before any kernel starts, so each notebook's kernel inherits the
network guard (dpo_teach/offline.py) and the Hugging Face offline switches.

The longest test, the rehearsal of the gpt2 preset (tests/test_rehearsal.py), runs every notebook
again on stand-ins, with a cache of its own. When a session runs it together with the notebooks on a
machine with 2 or more CPU threads, it starts in the background as soon as the tests are collected,
on half of the threads (dpo_teach.rehearse.Run), while the notebooks and the other tests run on the
other half; its test collects the result later. As long as it runs, each test, and each notebook
kernel started for one, gets the other half (torch.set_num_threads, OMP_NUM_THREADS); once it has
ended, every thread again. Much of a notebook's time is one-threaded Python (sampling a token at a
time, kernel start-up), so two jobs on one thread each get more done than one job on two threads.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from dpo_teach.offline import block_network, offline_environment

os.environ.update(offline_environment())
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")
block_network()

REHEARSAL_TEST = "test_every_notebook_runs_under_the_gpt2_preset"
REHEARSAL_KEY = pytest.StashKey()  # the background rehearsal (a dpo_teach.rehearse.Run), when one was started
THREADS_KEY = pytest.StashKey()  # (threads of this session while the rehearsal runs, threads otherwise, OMP_NUM_THREADS)


def pytest_collection_finish(session):
    import torch

    from dpo_teach import rehearse

    items = session.items
    threads = torch.get_num_threads()
    together = any(item.name == REHEARSAL_TEST for item in items) and any(item.path.suffix == ".ipynb" for item in items)
    if not together or threads < 2 or session.config.option.collectonly:
        return
    share = threads // 2
    out = Path(tempfile.mkdtemp(prefix="dpo_teach_rehearsal_"))
    session.config.stash[REHEARSAL_KEY] = rehearse.Run(out, scale=rehearse.TEST_SCALE, threads=share)
    session.config.stash[THREADS_KEY] = (threads - share, threads, os.environ.get("OMP_NUM_THREADS"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test (and before nbval starts a notebook's kernel): this session's share of the threads."""
    run = item.config.stash.get(REHEARSAL_KEY, None)
    if run is None:
        return
    import torch

    shared, every, omp = item.config.stash[THREADS_KEY]
    threads = shared if run.running() else every
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if threads == shared:
        os.environ["OMP_NUM_THREADS"] = str(shared)
    elif omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture()
def background_rehearsal(request):
    """The rehearsal started in the background for this session, or None."""
    return request.config.stash.get(REHEARSAL_KEY, None)


def pytest_sessionfinish(session, exitstatus):
    """Stop a background rehearsal still running (a session cut short); remove its folder if all passed."""
    run = session.config.stash.get(REHEARSAL_KEY, None)
    if run is None:
        return
    run.stop()
    if exitstatus == 0:
        shutil.rmtree(run.out, ignore_errors=True)
    else:
        print(f"\nthe background rehearsal's notebooks, report and log: {run.out}")
