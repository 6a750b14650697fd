"""The documentation's references resolve: a relative link in the README, results/README.md or
docs/, and a repository file named in them or in a config's comments, points at a file that is
in the repository (a renamed diagnostic or config leaves no dangling reference)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITING = [*DOCS, *sorted((ROOT / "configs").glob("*.yaml"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
USER_FILES = {"configs/mine.yaml"}  # the user's own config, which docs/own_corpus.md has them write
NAMED_FILE = re.compile(r"(?<![\w/<.-])((?:results|configs|docs|benchmarks|launchers)/[\w./-]+\.(?:md|yaml|py|txt|csv|jsonl))")


def relative_links(doc: Path) -> list[str]:
    return [t for t in LINK.findall(doc.read_text()) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    missing = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing files {missing}"


@pytest.mark.parametrize("doc", CITING, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repository_file_exists(doc):
    missing = sorted({p for p in set(NAMED_FILE.findall(doc.read_text())) - USER_FILES
                      if not ((ROOT / p).exists() or (doc.parent / p).exists())})
    assert not missing, f"{doc.relative_to(ROOT)}: names missing files {missing}"
