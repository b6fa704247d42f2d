"""The course in a real browser: JupyterLab runs notebook 02 in headless Chromium, and the beta
slider of the beta explorer redraws its plot when it moves.

The test starts its own JupyterLab server on loopback (a free port, a token, settings and workspace
in a temporary folder), opens a copy of notebook 02 with its saved outputs cleared, runs every cell
from the Run menu, checks that no cell raised, then moves the slider with the keyboard and checks
that the figure was redrawn. Screenshots of the explorer's output before and after the move are
saved in the test's tmp_path.

It needs Debian's chromium (/usr/bin/chromium) and the `playwright` package (the `dev` extra); it is
skipped where either is missing. No browser is ever downloaded.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from dpo_teach.offline import offline_environment

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = (
    Path(__file__).resolve().parent.parent
    / "notebooks"
    / "02_the_rlhf_objective_and_its_optimum.ipynb"
)
EXPLORER_SOURCE = "widgets.beta_explorer("

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} is missing (Debian package `chromium`)"
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="no browser driver: the `playwright` package is not installed"
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-proxy-server",  # the server is on loopback
    # no background requests off the machine (the network is closed; they would only fail)
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SERVER_START_TIMEOUT = 60  # seconds
RUN_ALL_TIMEOUT = 180_000  # milliseconds: the notebook takes ~10 s alone on a slow machine
UI_TIMEOUT = 60_000  # milliseconds, for any one element to appear
REDRAW_TIMEOUT = 60_000  # milliseconds, for one slider move to redraw the figure

# JupyterLab settings for a quiet, deterministic page: no news or update toasts, and every cell
# kept in the DOM (no windowing), so that all prompts and outputs can be queried.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, token: str, method: str = "GET", timeout: float = 5.0) -> int:
    """HTTP status of a request to the local server (no proxy, whatever the environment says)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url,
        method=method,
        headers={"Authorization": f"token {token}"},
        data=b"" if method == "POST" else None,
    )
    with opener.open(request, timeout=timeout) as response:
        return response.status


def _copy_without_outputs(source: Path, target: Path) -> int:
    """Copy a notebook with its outputs, execution counts and saved widget state removed, so that
    everything the browser shows comes from this run. Returns its number of non-empty code cells."""
    nb = json.loads(source.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)
    target.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return sum(1 for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip())


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 serving a folder with a copy of notebook 02.

    Yields (base_url, token, notebook name, number of non-empty code cells). The finalizer asks the server to shut down (which
    shuts down its kernels) and terminates it only if it does not exit."""
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "root"
    root.mkdir()
    code_cells = _copy_without_outputs(NOTEBOOK, root / NOTEBOOK.name)
    settings_dir = base / "settings"
    for name, values in LAB_SETTINGS.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")
    for sub in ("config", "data", "runtime", "workspaces"):
        (base / sub).mkdir()

    port = _free_port()
    token = uuid.uuid4().hex
    env = offline_environment()  # the kernels start offline, as in the nbval runs
    env.pop("MPLBACKEND", None)  # the notebook selects %matplotlib inline itself
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(settings_dir),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
    )
    command = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    log_path = base / "server.log"
    log = open(log_path, "wb")  # closed in the finalizer
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def server_log() -> str:
        log.flush()
        return log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{server_log()}")
            try:
                if _request(f"{base_url}/api/status", token) == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"JupyterLab did not answer within {SERVER_START_TIMEOUT} s:\n{server_log()}"
                )
            time.sleep(0.25)
        yield base_url, token, NOTEBOOK.name, code_cells
    finally:
        try:
            _request(f"{base_url}/api/shutdown", token, method="POST")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


# JavaScript run in the page ------------------------------------------------------------------

# True once the notebook's kernel has started and is idle (before that, the toolbar says "No Kernel",
# and running cells would open a kernel-selection dialog).
KERNEL_READY_JS = """
() => {
    const name = document.querySelector('.jp-NotebookPanel-toolbar .jp-Toolbar-kernelName');
    const status = document.querySelector('.jp-StatusBar-TextItem[title^="Change kernel"]');
    const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
    return name !== null && !/No Kernel/.test(name.textContent)
        && indicator !== null && indicator.getAttribute('data-status') === 'idle'
        && (status === null || /\\| Idle$/.test(status.textContent.trim()));
}
"""

# The input prompts of the code cells: "[ ]:" not run, "[*]:" queued or running, "[7]:" run.
PROMPTS_JS = """
() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
    .map(p => p.textContent.trim())
"""

# True once a run has finished: some cell has run, none is queued or running, and the kernel is
# idle. Run All marks every cell "[*]" at once; if a cell fails, JupyterLab clears the "[*]" of
# the cells after it, so this also turns true, at once, after a failure.
RUN_FINISHED_JS = """
() => {
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
        .map(p => p.textContent.trim());
    const idle = document.querySelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]');
    return idle !== null && prompts.some(p => /^\\[\\d+\\]:$/.test(p))
        && !prompts.some(p => p === '[*]:');
}
"""

# The text of every stderr output (warnings, and the tracebacks of errors).
STDERR_JS = """
() => [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
)].map(e => e.textContent)
"""

# The src of the figure the explorer shows, once its output holds exactly one image.
IMAGE_SRC_JS = """
(cell) => {
    const images = cell.querySelectorAll('.widget-interact .jp-OutputArea-output img');
    return images.length === 1 ? images[0].getAttribute('src') : null;
}
"""


def _explorer_image(cell, previous: str | None, timeout: int) -> str:
    """Wait until the explorer shows a figure whose src differs from `previous`; return that src."""
    cell.page.wait_for_function(
        """([cell, previous]) => {
            const images = cell.querySelectorAll('.widget-interact .jp-OutputArea-output img');
            return images.length === 1 && images[0].getAttribute('src') !== previous;
        }""",
        arg=[cell.element_handle(), previous],
        timeout=timeout,
    )
    return cell.evaluate(IMAGE_SRC_JS)


def test_beta_explorer_redraws_in_jupyterlab(jupyter_lab, browser, tmp_path):
    base_url, token, notebook, code_cells = jupyter_lab
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    console_errors: list[str] = []
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    try:
        page.goto(f"{base_url}/lab/tree/{notebook}?token={token}", wait_until="domcontentloaded")

        # The notebook is open and its kernel (python3, from the notebook's metadata) is idle.
        panel = page.locator(".jp-NotebookPanel").filter(has=page.locator(".jp-Notebook"))
        panel.locator(".jp-Notebook .jp-Cell").first.wait_for()
        page.wait_for_function(KERNEL_READY_JS, timeout=UI_TIMEOUT)

        # Run > Run All Cells
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_ALL_TIMEOUT)

        stderr = page.evaluate(STDERR_JS)
        tracebacks = [text for text in stderr if "Traceback" in text]
        assert not tracebacks, "a cell raised in JupyterLab:\n\n" + "\n\n".join(tracebacks)
        ran = [p for p in page.evaluate(PROMPTS_JS) if re.fullmatch(r"\[\d+\]:", p)]
        assert len(ran) == code_cells, (
            f"{len(ran)} of {code_cells} code cells ran; stderr outputs:\n\n" + "\n\n".join(stderr)
        )

        # The explorer's cell: its input holds the beta_explorer call, its output the widget.
        cell = page.locator(".jp-CodeCell").filter(
            has=page.locator(".jp-InputArea", has_text=EXPLORER_SOURCE)
        )
        assert cell.count() == 1, f"expected one cell calling {EXPLORER_SOURCE}"
        slider = cell.locator(".widget-slider").filter(
            has=page.locator(".widget-label", has_text="beta")
        )
        handle = slider.locator('[role="slider"]')
        readout = slider.locator(".widget-readout")
        output = cell.locator(".jp-Cell-outputArea")
        handle.wait_for()
        assert float(readout.inner_text()) == pytest.approx(1.0)
        before_src = _explorer_image(cell, None, REDRAW_TIMEOUT)
        output.scroll_into_view_if_needed()
        before_png = output.screenshot(path=tmp_path / "beta_explorer_before.png")

        # Six presses of the right arrow: the log-scale slider moves by 0.05 decades each, from
        # beta = 1 to beta = 10**0.3 ~ 2. One press at a time, each waiting for its redraw, so the
        # last figure shown is the one for the last value.
        src = before_src
        for _ in range(6):
            handle.press("ArrowRight")
            src = _explorer_image(cell, src, REDRAW_TIMEOUT)
        page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for()
        after_src = cell.evaluate(IMAGE_SRC_JS)
        assert float(readout.inner_text()) == pytest.approx(10**0.3, rel=0.01)  # shown as 2.00
        after_png = output.screenshot(path=tmp_path / "beta_explorer_after.png")

        assert after_src.startswith("data:image/png;base64,")
        assert after_src != before_src, "the figure did not change when beta moved"
        assert after_png != before_png, "the screenshots before and after the move are identical"
        tracebacks = [text for text in page.evaluate(STDERR_JS) if "Traceback" in text]
        assert not tracebacks, "moving the slider raised:\n\n" + "\n\n".join(tracebacks)
        assert not console_errors, f"JavaScript errors in the page: {console_errors}"
    except BaseException:
        page.screenshot(path=tmp_path / "page_at_failure.png")  # to see what went wrong
        raise
    finally:
        context.close()
