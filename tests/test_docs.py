"""Every ```python block in README.md and docs/*.md runs, and shows what it prints.

Conventions for writing pages (picked up automatically, new pages included):

- A page's ```python blocks run top to bottom in one namespace, in a fresh Python process
  started from the repository root (one torch thread, matplotlib's Agg backend), as a reader
  would run them.
- A block whose first line is ``# fragment`` is a fragment on purpose (a signature, a
  sketch with names the reader supplies): it is shown, never run. Use it sparingly: a page
  should not leave the reader with code that cannot run.
- A ```text block right after a ```python block (blank lines only between them) is what that
  block prints. It is compared with the real output token by token: words and punctuation
  exactly (runs of whitespace count as one space), integers exactly, other numbers within a
  relative 5% or an absolute 1e-8 (``nan`` equals ``nan``). ``...`` in the expected text
  matches any run of output. A block with no ```text block after it may print anything.
  `python tools/update_doc_outputs.py` rewrites the ```text blocks that no longer match (then
  reread the prose around them: it may quote the old numbers).

The site itself (mkdocs --strict, the API reference, a real browser) is checked below too.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "# fragment"
REL_TOL, ABS_TOL = 0.05, 1e-8


@dataclass
class Block:
    """One fenced ```python block of a page, with the output shown after it (if any)."""

    line: int  # 1-based line of the opening fence
    code: str
    expected: str | None
    expected_lines: tuple[int, int] | None = None  # 0-based [start, end) of the text block's body


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a markdown text, each with the ```text block that follows it."""
    lines = text.splitlines()
    fences: list[tuple[int, str, str, int]] = []  # (line, info, body, closing line), 1-based
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, info = m.group(1), m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(ticks):
            j += 1
        body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j])
        fences.append((i + 1, info, body, j + 1))
        i = j + 1
    blocks = []
    for k, (line, info, body, end) in enumerate(fences):
        if info != "python":
            continue
        expected, span = None, None
        if k + 1 < len(fences) and fences[k + 1][1] == "text":
            between = lines[end:fences[k + 1][0] - 1]
            if all(not ln.strip() for ln in between):
                expected, span = fences[k + 1][2], (fences[k + 1][0], fences[k + 1][3] - 1)
        blocks.append(Block(line, body, expected, span))
    return blocks


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b|\.\.\.")
_TOKEN = re.compile(r"\S")


def _tokens(text: str) -> list[str]:
    """Numbers, ``...`` and single non-space characters, in order."""
    out, pos = [], 0
    for m in _NUMBER.finditer(text):
        out += _TOKEN.findall(text[pos:m.start()])
        out.append(m.group())
        pos = m.end()
    return out + _TOKEN.findall(text[pos:])


def _is_number(tok: str) -> bool:
    return tok not in ("...",) and bool(_NUMBER.fullmatch(tok))


def _same(want: str, got: str) -> bool:
    if _is_number(want) and _is_number(got):
        if re.fullmatch(r"[-+]?\d+", want):
            return want.lstrip("+") == got.lstrip("+")
        a, b = float(want), float(got)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return want == got


def output_matches(expected: str, actual: str) -> bool:
    """Whether `actual` is `expected` up to whitespace, number tolerances and ``...``."""
    want, got = _tokens(expected), _tokens(actual)
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(want):
                memo[i, j] = j == len(got)
            elif want[i] == "...":
                memo[i, j] = any(match(i + 1, k) for k in range(j, len(got) + 1))
            else:
                memo[i, j] = j < len(got) and _same(want[i], got[j]) and match(i + 1, j + 1)
        return memo[i, j]

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * (len(want) + len(got)) + 100))
    return match(0, 0)


_RUNNER = r"""
import contextlib, io, json, sys, traceback
import torch
torch.set_num_threads(1)
blocks = json.load(sys.stdin)
ns = {"__name__": "__main__"}
results = []
for code in blocks:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<block>", "exec"), ns)
    except BaseException:
        results.append({"out": buf.getvalue(), "error": traceback.format_exc()})
        break
    results.append({"out": buf.getvalue(), "error": None})
print("\n@@RESULTS@@" + json.dumps(results))
"""


def run_page(blocks: list[Block]) -> list[dict]:
    """Run the page's blocks in order in one fresh process; per block its output or error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONHASHSEED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:   # (a block that writes a file writes it there, never
        proc = subprocess.run(                   # into the work tree)
            [sys.executable, "-c", _RUNNER], input=json.dumps([b.code for b in blocks]),
            capture_output=True, text=True, cwd=tmp, env=env, timeout=300,
        )
    assert "@@RESULTS@@" in proc.stdout, f"the page runner crashed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.rsplit("@@RESULTS@@", 1)[1])


def runnable(page: Path) -> list[Block]:
    """The page's python blocks that are not marked as fragments."""
    return [b for b in python_blocks(page.read_text()) if not b.code.lstrip().startswith(FRAGMENT)]


CODE_PAGES = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize("page", CODE_PAGES, ids=[p.name for p in CODE_PAGES])
def test_every_python_block_runs_and_prints_what_the_page_shows(page: Path) -> None:
    blocks = runnable(page)
    results = run_page(blocks)
    rel = page.relative_to(ROOT)
    for block, res in zip(blocks, results):
        assert res["error"] is None, f"{rel}:{block.line}: the block raised\n{res['error']}"
        if block.expected is not None:
            assert output_matches(block.expected, res["out"]), (
                f"{rel}:{block.line}: the block printed\n{res['out']}\nbut the page shows\n{block.expected}")
    assert len(results) == len(blocks)


def test_fragments_are_marked_on_their_first_line() -> None:
    """A fragment marker anywhere but the first line is a typo that would run the block."""
    for page in PAGES:
        for b in python_blocks(page.read_text()):
            lines = b.code.strip().splitlines()
            assert all(ln.strip() != FRAGMENT for ln in lines[1:]), f"{page.name}:{b.line}"


def test_output_comparison_catches_the_mismatches_it_should() -> None:
    shown = "Solution(B=8; CONVERGED: 3, MAX_ITER: 5; iterations mean 42.6 max 50; residual 0.00455)"
    assert output_matches(shown, shown.replace("0.00455", "0.00460"))          # within 5%
    assert not output_matches(shown, shown.replace("0.00455", "0.00500"))      # 10% off
    assert not output_matches(shown, shown.replace("CONVERGED: 3", "CONVERGED: 2"))  # a count
    assert not output_matches(shown, shown.replace("MAX_ITER", "DIVERGED"))
    assert output_matches("a   b\n  c", "a b c")                                  # whitespace
    assert output_matches("tensor([nan, 1.0])", "tensor([nan, 1.00001])")
    assert not output_matches("tensor([nan, 1.0])", "tensor([0.5, 1.0])")
    assert output_matches("error: ... at", "error: anything goes here 12 at")
    assert not output_matches("x 1", "x 1 2")


def test_the_collector_pairs_output_blocks_and_skips_other_languages() -> None:
    text = "```python\nprint(1)\n```\n\n```text\n1\n```\n```bash\nls\n```\n```python\nx = 2\n```\n"
    blocks = python_blocks(text)
    assert [(b.line, b.code, b.expected) for b in blocks] == [(1, "print(1)", "1"), (11, "x = 2", None)]
    lines = text.splitlines()
    start, end = blocks[0].expected_lines
    assert lines[start:end] == ["1"]


# --- the site: mkdocs --strict, the API reference, every page in the nav, a real browser ----

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built with `mkdocs build --strict` (a warning fails), into a pytest tmp dir."""
    pytest.importorskip("mkdocs", reason="the docs tools are not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs tools are not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return out


def test_the_api_page_documents_every_public_name(site: Path) -> None:
    import fpsolve

    html = (site / "api" / "index.html").read_text()
    missing = [n for n in fpsolve.__all__ if f'id="fpsolve.{n}"' not in html]
    assert not missing, f"not in the API reference: {missing}"


def test_every_docs_page_is_in_the_nav() -> None:
    import yaml  # comes with mkdocs

    pytest.importorskip("mkdocs")
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))["nav"]
    listed = {v for entry in nav for v in entry.values()}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert not pages - listed, f"docs pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"


def test_the_home_page_is_the_readme_with_working_links(site: Path) -> None:
    html = (site / "index.html").read_text()
    assert "A solved DEQ in ten lines" in html
    assert 'src="figures/halting_compute.png"' in html and (site / "figures" / "halting_compute.png").exists()
    assert 'href="docs/' not in html  # README's links were rewritten for the site


def test_every_figure_a_page_shows_is_in_the_built_site(site: Path) -> None:
    """Figures appear on the pages that discuss them: each image link resolves in the site."""
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            rel = target[5:] if page.name == "README.md" and target.startswith("docs/") else target
            assert (site / rel).is_file(), f"{page.name} shows {target}, which is not in the site"


def _chromium() -> str | None:
    return os.environ.get("FPSOLVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(site: Path):
    """The built site on a localhost port, for the duration of the browser tests."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output readable
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright; skipped with the reason when either is missing."""
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine: `make docs` installs it (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed: pip install -e '.[docs]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _open(browser, url: str, shot: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url, wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    return page


def _images_loaded(page) -> tuple[int, list[str]]:
    """How many <img> in the article, and the sources of those that did not load."""
    imgs = page.eval_on_selector_all(
        "article img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
    return len(imgs), [src for src, ok in imgs if not ok]


def test_the_site_in_a_real_browser(browser, served: str, tmp_path: Path) -> None:
    """Home, a guide page and the API page: figures load, code is highlighted, names listed,
    search finds things. Screenshots go to this test's tmp dir (printed on failure)."""
    import fpsolve

    print(f"screenshots in {tmp_path}")
    for path, name in [("", "home"), ("training/", "training")]:
        page = _open(browser, f"{served}/{path}", tmp_path / f"{name}.png")
        n, broken = _images_loaded(page)
        assert n >= 1 and not broken, f"{name}: {n} figures, not loaded: {broken}"
        spans = page.locator(".highlight code span[class]").count()  # pygments token classes
        assert spans > 20, f"{name}: code is not highlighted ({spans} token spans)"
        page.close()

    page = _open(browser, f"{served}/api/", tmp_path / "api.png")
    for n in fpsolve.__all__:
        assert page.locator(f'[id="fpsolve.{n}"]').count() == 1, f"API page lacks {n}"
    assert page.locator(".doc-signature, .highlight").count() >= len(fpsolve.__all__) // 2

    page.keyboard.press("/")                  # the theme's shortcut to the search box
    page.keyboard.type("Anderson")            # typed key by key, as a reader would
    results = page.locator(".md-search-result__item")
    results.first.wait_for(timeout=15000)
    assert results.count() >= 1
    assert "Anderson" in results.first.inner_text()
    page.screenshot(path=str(tmp_path / "search.png"))
    page.close()


def test_every_make_command_the_pages_show_is_a_makefile_target() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for page in PAGES:
        shown = set(re.findall(r"^\s*make ([\w-]+)", page.read_text(), re.M))
        shown |= set(re.findall(r"`make ([\w-]+)`", page.read_text()))
        assert shown <= targets, f"{page.name} shows make {sorted(shown - targets)}, not in the Makefile"
