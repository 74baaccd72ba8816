"""What the code and the docs cite exists in the repository: every `docs/...` path, every `*.md#anchor` (a heading
of that file, as GitHub makes anchors), and no reference to a document outside it (the shared DESIGN.md)."""
from __future__ import annotations

import re

import pytest

from helpers import ROOT

SOURCES = sorted([*ROOT.glob("iconface_jax/**/*.py"), *ROOT.glob("convert/*.py"), *ROOT.glob("tools/*.py"),
                  *ROOT.glob("configs/*.py"), *ROOT.glob("tests/*.py")])
SOURCES.remove(ROOT / "tests" / "test_docs.py")  # names DESIGN.md to forbid it
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "BUILD_NOTES.md"])
LINK = re.compile(r"((?:docs/|log/)?[\w.-]+\.md)(?:#([\w-]+))?")


def anchors(path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}


def cited(path) -> list[tuple[str, str | None]]:
    text = path.read_text()
    return [(m[1], m[2]) for m in LINK.finditer(text)
            if m[1].startswith(("docs/", "log/")) or m[2] or m[1] in ("DESIGN.md", "BUILD_NOTES.md", "README.md")]


@pytest.mark.parametrize("path", SOURCES + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_document_and_anchor_exists(path):
    missing = []
    for name, anchor in cited(path):
        target = next((c for c in (ROOT / name, path.parent / name, ROOT / "docs" / name) if c.is_file()), None)
        if target is None:
            missing.append(name)
        elif anchor and anchor not in anchors(target):
            missing.append(f"{name}#{anchor}")
    assert not missing, f"{path.relative_to(ROOT)} cites what the repository does not hold: {missing}"
