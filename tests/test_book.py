"""The course's website (dpo_teach/book.py): built offline, then read in a real browser with the
network cut off.

The book is built once for the module by `python -m dpo_teach.book` in a subprocess with the network
guard on (dpo_teach/offline.py), within BUILD_LIMIT seconds. The checks that read its files run
everywhere. The browser checks serve it on loopback and open every page in Debian's headless
chromium (driven by the `playwright` package, as tests/test_browser.py does; no browser is ever
downloaded), with every request off the machine refused: no JavaScript or console error, no
resource that fails to load, every image loads, every internal link (and its #fragment) resolves,
every formula is typeset by the site's own MathJax, and the DPO loss on notebook 03's page is
rendered math, not raw LaTeX. They are skipped where chromium or playwright is missing.
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import nbformat
import pytest

from dpo_teach import book
from dpo_teach.offline import offline_environment

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CHROMIUM = Path("/usr/bin/chromium")
BUILD_LIMIT = 180  # seconds: the budget for building the book
DPO_LOSS_TEX = r"\mathcal{L}_{\text{DPO}}(\pi_\theta; \pi_{\text{ref}})"  # notebook 03, section 3
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--no-proxy-server",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built book: (output folder, seconds the build took)."""
    out = tmp_path_factory.mktemp("book") / "site"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "dpo_teach.book", "--out", str(out)], cwd=REPO,
                         env=offline_environment(), capture_output=True, text=True, timeout=2 * BUILD_LIMIT)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, f"the book did not build:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    print(f"\nbook built in {seconds:.1f} s")
    return out, seconds


def pages(out: Path) -> list[Path]:
    """Every HTML page of the site (not the theme's and MathJax's files under _static/)."""
    return sorted(p for p in out.rglob("*.html") if "_static" not in p.relative_to(out).parts)


# ---- the files ---------------------------------------------------------------------------------


def test_builds_offline_in_time(site):
    out, seconds = site
    assert seconds < BUILD_LIMIT, f"the book took {seconds:.0f} s to build (limit {BUILD_LIMIT} s)"
    assert (out / "index.html").is_file() and (out / ".nojekyll").is_file()
    assert (out / "_static" / "mathjax" / "MathJax.js").is_file(), "MathJax is not served by the site"


def test_one_page_per_notebook_with_colab_and_download_links(site):
    out, _ = site
    for path in NOTEBOOKS:
        page = out / "notebooks" / f"{path.stem}.html"
        assert page.is_file(), f"no page for {path.name}"
        html = page.read_text(encoding="utf-8")
        assert f'href="{book.colab_url(path.name)}"' in html, f"{page.name}: no Open in Colab link"
        download = re.search(rf'href="(\.\./_downloads/[^"]+/{re.escape(path.name)})"', html)
        assert download, f"{page.name}: no download link to {path.name}"
        downloaded = nbformat.read(page.parent / download.group(1), as_version=4)
        assert not any("answer" in (c.metadata.get("tags") or []) for c in downloaded.cells)
        assert "(instructor edition)" not in html, f"{page.name}: the answer key is on the site"


def test_home_page_has_syllabus_course_map_and_teaching_notes(site):
    out, _ = site
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Syllabus" in html and "Course map" in html
    assert re.search(r'<img[^>]+src="_images/course_map\.png"', html), "no course map on the home page"
    for path in NOTEBOOKS:
        assert f'href="notebooks/{path.stem}.html"' in html, f"the home page does not link {path.name}"
    notes = (out / "teaching_notes.html").read_text(encoding="utf-8")
    assert "What each check catches" in notes
    assert 'href="teaching_notes.html"' in html, "the teaching notes are not in the navigation"


def test_no_resource_comes_from_another_site(site):
    out, _ = site
    for page in pages(out):
        html = page.read_text(encoding="utf-8")
        remote = re.findall(r'<(?:script|link|img)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]+)"', html)
        assert not remote, f"{page.relative_to(out)} loads {remote}"


def test_prerequisites_from_the_teaching_notes():
    notes = "- **03 from RLHF to DPO**: needs 01 and 02; 10 s;\n" \
            "- **04 the model**: needs broadcasting (01-03 give the motivation); 16 s;\n" \
            "- **10 beyond DPO**: needs 03 and 08 (and the frontiers of 09's sweep); 207 s;\n"
    assert book.prerequisites(notes) == {"03": ["01", "02"], "04": [], "10": ["03", "08"]}


# ---- in the browser ----------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} is missing (Debian package `chromium`)"
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr
        pass


@pytest.fixture(scope="module")
def server(site):
    """The site served over HTTP on 127.0.0.1 (a free port); yields its base URL."""
    out, _ = site
    handler = functools.partial(_QuietHandler, directory=str(out))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="no browser driver: the `playwright` package is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Visit:
    """A browser context on the site with the network cut off, recording what goes wrong."""

    def __init__(self, browser, base: str):
        self.base, self.problems, self.refused = base, [], []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(30_000)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"JavaScript error: {e}"))
        self.page.on("requestfailed", lambda r: r.url.startswith(base) and self.problems.append(
            f"failed to load {r.url}: {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.base + "/") or url.startswith("data:"):
            route.continue_()
        else:  # the network is cut off: nothing may come from another machine
            self.refused.append(url)
            route.abort()

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="load")
        if self.page.evaluate("() => !!document.querySelector('script[src*=\"MathJax.js\"]')"):
            self.page.wait_for_function("() => window.MathJax && MathJax.isReady === true")
            self.page.evaluate("() => new Promise(done => MathJax.Hub.Queue(() => done(true)))")

    def close(self):
        self.context.close()


# Every image of the page, loaded (lazy ones too): [src, loaded?]
IMAGES_JS = """
async () => Promise.all([...document.images].map(async (img) => {
    img.loading = 'eager';
    try { await img.decode(); } catch (e) { return [img.currentSrc || img.src, false]; }
    return [img.currentSrc || img.src, img.naturalWidth > 0 && img.naturalHeight > 0];
}))
"""

# Formulas not typeset by MathJax, or typeset with a TeX error: [element's text]
UNTYPESET_JS = """
() => [...document.querySelectorAll('.math.notranslate')]
    .filter(e => !e.querySelector('script[type^="math/tex"]') || e.querySelector('.merror, .noError'))
    .map(e => e.textContent.slice(0, 80))
"""

LINKS_JS = "() => [...document.querySelectorAll('a[href]')].map(a => a.href)"


def _link_problem(out: Path, base: str, href: str) -> str | None:
    """What is wrong with an internal link (a missing file or #fragment), or None."""
    url = urllib.parse.urlsplit(href)
    path = urllib.parse.unquote(url.path)
    target = out / path.lstrip("/")
    if path.endswith("/"):
        target = target / "index.html"
    if not target.is_file():
        return f"{href}: no such file"
    if url.fragment and target.suffix == ".html":
        ids = _ids(target)
        if urllib.parse.unquote(url.fragment) not in ids:
            return f"{href}: no element with id {url.fragment!r}"
    return None


@functools.lru_cache(maxsize=None)
def _ids(path: Path) -> frozenset[str]:
    return frozenset(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))


@needs_browser
def test_every_page_in_the_browser(site, server, browser):
    out, _ = site
    visit = Visit(browser, server)
    problems, links, images, formulas = [], set(), 0, 0
    try:
        for page_path in pages(out):
            name = page_path.relative_to(out).as_posix()
            visit.problems.clear()
            visit.open(f"{server}/{name}")
            for src, loaded in visit.page.evaluate(IMAGES_JS):
                images += 1
                if not loaded:
                    problems.append(f"{name}: image does not load: {src}")
            for text in visit.page.evaluate(UNTYPESET_JS):
                problems.append(f"{name}: formula not typeset: {text!r}")
            formulas += visit.page.evaluate("() => document.querySelectorAll('.math.notranslate').length")
            links.update(h.split("?", 1)[0] for h in visit.page.evaluate(LINKS_JS) if h.startswith(server + "/"))
            problems += [f"{name}: {p}" for p in visit.problems]
        for href in sorted(links):
            problem = _link_problem(out, server, href)
            if problem:
                problems.append(f"link {problem}")
    finally:
        visit.close()
    print(f"\n{len(pages(out))} pages, {images} images, {formulas} formulas, {len(links)} internal links")
    assert not visit.refused, f"the site asked for resources off the machine: {sorted(set(visit.refused))[:10]}"
    assert images > 0 and formulas > 0 and links
    assert not problems, "\n".join(problems[:40])


@needs_browser
def test_dpo_loss_is_rendered_math(site, server, browser, tmp_path):
    visit = Visit(browser, server)
    try:
        visit.open(f"{server}/notebooks/03_from_rlhf_to_dpo.html")
        found = visit.page.evaluate(
            """(tex) => {
                const script = [...document.querySelectorAll('script[type="math/tex; mode=display"]')]
                    .find(s => s.textContent.includes(tex));
                if (!script) return null;
                const frame = document.getElementById(script.id + '-Frame');
                if (!frame) return {rendered: false};
                const formula = script.closest('.math.notranslate');
                formula.scrollIntoView();
                const box = formula.getBoundingClientRect();
                return {rendered: true, id: frame.id, width: box.width, height: box.height,
                        text: frame.innerText, fractions: frame.querySelectorAll('.mfrac').length,
                        errors: frame.querySelectorAll('.merror, .noError').length};
            }""",
            DPO_LOSS_TEX,
        )
        assert found is not None, f"no display formula holding {DPO_LOSS_TEX} on notebook 03's page"
        assert found["rendered"], "MathJax did not typeset the DPO loss"
        visit.page.locator(f".math.notranslate:has(#{found['id']})").screenshot(path=tmp_path / "dpo_loss.png")
        assert found["errors"] == 0, "MathJax reported a TeX error in the DPO loss"
        assert found["width"] > 200 and found["height"] > 40, f"the typeset DPO loss is {found}"
        assert found["fractions"] == 2, "the log-ratios of the chosen and rejected responses are not typeset as fractions"
        assert "\\" not in found["text"] and "mathcal" not in found["text"], "raw LaTeX is shown"
        assert not visit.refused and not visit.problems, visit.problems + visit.refused
    finally:
        visit.close()
