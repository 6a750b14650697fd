"""What every text corpus reader yields, and the error they raise: the ground the readers of
gtl_dist/data/corpus.py and the demo corpus (gtl_dist/data/demo.py) share."""

from __future__ import annotations

from dataclasses import dataclass


class CorpusError(ValueError):
    """A problem with the input corpus, naming the file (and line or domain) and the fix."""


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    doc_id: str
