"""Text corpora as ``(text, domain, doc_id)`` records, read into one list of documents per domain.

Readers (docs/architecture.md "Data contracts"):
  arxiv  the Kaggle arXiv metadata snapshot, one JSON object a line with ``abstract`` and
         ``categories``; the domain is the archive of the FIRST category ("physics.optics hep-th"
         -> "physics", "hep-th" -> "hep-th"), as in the paper's code.
  jsonl  one JSON object a line with ``text`` and ``domain`` (optional ``id``).
  txt    ``<root>/<domain>/*.txt``, one document per file.
  demo   the built-in offline corpus of documentation prose (gtl_dist/data/demo.py).
The Markov corpus produces token ids directly and lives in gtl_dist/data/markov.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gtl_dist.config import RunConfig
from gtl_dist.log import get_logger

log = get_logger("data.corpus")


class CorpusError(ValueError):
    """A problem with the input corpus, naming the file (and line or domain) and the fix."""


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    doc_id: str


def arxiv_domain(categories: str) -> str:
    """The archive of the first category: "physics.optics hep-th" -> "physics"."""
    first = categories.split()[0] if categories.split() else ""
    return first.split(".")[0]


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found (set data.path to an existing file)")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not a JSON object ({exc.msg}); every line must be "
                                  f"one JSON object") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _field(record: dict, key: str, path: Path, lineno: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise CorpusError(f"{path}:{lineno}: key '{key}' is {found}; expected a string "
                          f"(keys present: {', '.join(sorted(record)) or 'none'})")
    return value


def read_arxiv(path: str | Path) -> Iterator[Document]:
    """Abstracts with their first category's archive; whitespace (hard line wraps) collapsed."""
    path = Path(path)
    for lineno, record in _json_lines(path):
        abstract = " ".join(_field(record, "abstract", path, lineno).split())
        domain = arxiv_domain(_field(record, "categories", path, lineno))
        doc_id = str(record.get("id", f"line{lineno}"))
        if abstract and domain:
            yield Document(abstract, domain, doc_id)


def read_jsonl(path: str | Path) -> Iterator[Document]:
    path = Path(path)
    for lineno, record in _json_lines(path):
        text = _field(record, "text", path, lineno).strip()
        domain = _field(record, "domain", path, lineno)
        doc_id = str(record.get("id", f"line{lineno}"))
        if text:
            yield Document(text, domain, doc_id)


def read_txt_folder(root: str | Path, domains: Iterable[str]) -> Iterator[Document]:
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus folder not found (data.path must be a folder holding "
                          f"one sub-folder of .txt files per domain)")
    for domain in domains:
        folder = root / domain
        if not folder.is_dir():
            raise CorpusError(f"{folder}: no folder for domain '{domain}' (expected "
                              f"{root}/{domain}/*.txt, one document per file)")
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield Document(text, domain, f"{domain}/{file.name}")


def read_corpus(cfg: RunConfig) -> dict[str, list[Document]]:
    """The documents of every configured (source and target) domain, in corpus order.

    Fails if the corpus is empty or a configured domain has fewer than two documents (one for
    training, one for testing); the error names the domain and the file.
    """
    d = cfg.data
    wanted = list(d.source_domains) + list(d.target_domains)
    if d.corpus == "demo":
        from gtl_dist.data.demo import demo_corpus
        records: Iterable[Document] = demo_corpus(wanted)
        where = "the built-in demo corpus"
    elif d.corpus == "arxiv":
        records, where = read_arxiv(d.path), str(d.path)
    elif d.corpus == "jsonl":
        records, where = read_jsonl(d.path), str(d.path)
    elif d.corpus == "txt":
        records, where = read_txt_folder(d.path, wanted), str(d.path)
    else:
        raise CorpusError(f"data.corpus: '{d.corpus}' is not a text corpus")

    docs: dict[str, list[Document]] = {name: [] for name in wanted}
    seen_domains: dict[str, int] = {}
    total = 0
    for doc in records:
        total += 1
        seen_domains[doc.domain] = seen_domains.get(doc.domain, 0) + 1
        bucket = docs.get(doc.domain)
        if bucket is not None and (d.max_docs_per_domain is None or len(bucket) < d.max_docs_per_domain):
            bucket.append(doc)
    if total == 0:
        raise CorpusError(f"{where}: the corpus is empty (no documents with text)")
    for name in wanted:
        if len(docs[name]) < 2:
            common = sorted(seen_domains, key=lambda k: -seen_domains[k])[:8]
            raise CorpusError(
                f"{where}: domain '{name}' has {len(docs[name])} document(s); it needs at least 2 "
                f"(train and test). Domains found: {', '.join(f'{k} ({seen_domains[k]})' for k in common)}. "
                f"Fix data.source_domains / data.target_domains.")
    log.info("corpus %s: %s", where, ", ".join(f"{k}={len(v)}" for k, v in docs.items()))
    return docs
