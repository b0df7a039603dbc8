"""MkDocs hooks: the home page from README.md, the changelog from CHANGELOG.md, and links that
point outside docs/ (examples/, benchmarks/) shown as repository paths, so one set of markdown
files reads well both on the repository host and on the site."""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def on_config(config):
    """Drop nav entries whose page does not exist yet (e.g. a page another branch adds)."""
    docs = Path(config["docs_dir"])
    generated = {"index.md", "changelog.md"}
    config["nav"] = [e for e in config["nav"]
                     if not isinstance(e, dict) or any(
                         not isinstance(v, str) or v in generated or (docs / v).exists()
                         for v in e.values())]
    return config


def on_files(files: Files, config) -> Files:
    """Add index.md and changelog.md, made from the repository's README.md and CHANGELOG.md."""
    for src, name in (("README.md", "index.md"), ("CHANGELOG.md", "changelog.md")):
        text = (ROOT / src).read_text(encoding="utf-8")
        files.append(File.generated(config, name, content=_from_root(text)))
    return files


def _from_root(text: str) -> str:
    """Rewrite a root-level page's links so that they work from docs/."""
    def fix(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        if target.startswith("docs/"):
            return f"{bang}[{label}]({target[5:]})"
        if target == "CHANGELOG.md":
            return f"[{label}](changelog.md)"
        if target == "README.md":
            return f"[{label}](index.md)"
        return f"{bang}[{label}](../{target})"
    return _LINK.sub(fix, text)


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """Show links to files outside docs/ (examples, benchmarks) as repository paths."""
    docs = Path(config["docs_dir"]).resolve()
    here = (docs / page.file.src_uri).parent

    def fix(m: re.Match) -> str:
        bang, label, target = m.groups()
        if bang or re.match(r"[a-z]+:|#", target):
            return m.group(0)
        path = (here / target.split("#")[0]).resolve()
        if path.is_relative_to(docs):
            return m.group(0)
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else target
        shown = label.strip("`")
        return f"`{rel}`" if shown == rel else f"{label} (`{rel}` in the repository)"
    return _LINK.sub(fix, markdown)
