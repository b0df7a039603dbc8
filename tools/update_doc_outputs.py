"""Rewrite the ```text blocks of README.md and docs/*.md that no longer match what their ```python
block prints (the check in tests/test_docs.py). Blocks that still match, wildcards included, are
left alone. Prose that quotes the numbers is not touched: reread it after running this.

    python tools/update_doc_outputs.py [PAGE ...]      # default: every page
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_docs import PAGES, output_matches, run_page, runnable  # noqa: E402


def update(page: Path) -> int:
    """Rewrite the page's stale output blocks; how many were rewritten."""
    blocks = runnable(page)
    if not blocks:
        return 0
    lines = page.read_text().splitlines()
    stale = []
    for block, res in zip(blocks, run_page(blocks)):
        if res["error"] is not None:
            print(f"{page.relative_to(ROOT)}:{block.line}: the block raised; stopping this page\n{res['error']}")
            break
        if block.expected is not None and not output_matches(block.expected, res["out"]):
            stale.append((block.expected_lines, res["out"].rstrip("\n").splitlines()))
    for (start, end), new in sorted(stale, reverse=True):
        lines[start:end] = new
    if stale:
        page.write_text("\n".join(lines) + "\n")
    return len(stale)


if __name__ == "__main__":
    pages = [Path(p).resolve() for p in sys.argv[1:]] or PAGES
    for page in pages:
        n = update(page)
        if n:
            print(f"{page.relative_to(ROOT)}: {n} output block(s) rewritten")
