"""Text corpora as ``(text, domain, doc_id)`` records, read into one list of documents per domain.

Readers (docs/architecture.md "Data contracts", docs/own_corpus.md):
  arxiv  the Kaggle arXiv metadata snapshot, one JSON object a line with ``abstract`` and
         ``categories``; the domain is the archive of the FIRST category ("physics.optics hep-th"
         -> "physics", "hep-th" -> "hep-th"), as in the paper's code.
  jsonl  one JSON object a line with ``text`` and ``domain`` (optional ``id``).
  txt    ``<root>/<domain>/*.txt``, one document per file.
  demo   the built-in offline corpus of documentation prose (gtl_dist/data/demo.py).
The Markov corpus produces token ids directly and lives in gtl_dist/data/markov.py.

The JSON-lines readers (arxiv, jsonl) skip a malformed line (not JSON, not a JSON object, a needed
key missing or not a string, empty text) and record it in a ``LineReport``; ``read_corpus`` logs
one warning with the count and the first line numbers per reason, and refuses a file in which
every non-empty line is malformed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from gtl_dist.config import RunConfig
from gtl_dist.data.demo import demo_corpus, package_root
from gtl_dist.data.documents import CorpusError, Document
from gtl_dist.log import get_logger

log = get_logger("data.corpus")

# What a good line of each JSON-lines corpus looks like (quoted in errors).
GOOD_LINE = {
    "jsonl": 'string keys "text" and "domain" (optional "id"), e.g. '
             '{"text": "One document ...", "domain": "physics", "id": "doc-1"}',
    "arxiv": 'string keys "abstract" and "categories" (optional "id"), e.g. '
             '{"id": "0704.0001", "abstract": "  We study ...", "categories": "hep-ph physics.optics"}',
}


def arxiv_domain(categories: str) -> str:
    """The archive of the first category: "physics.optics hep-th" -> "physics"."""
    first = categories.split()[0] if categories.split() else ""
    return first.split(".")[0]


# What data.path is for the corpora that read one, and what it holds.
PATH_KINDS = {"arxiv": ("file", "the arXiv metadata snapshot, one JSON object a line"),
              "jsonl": ("file", 'one JSON object a line with "text" and "domain"'),
              "txt": ("folder", "one sub-folder of .txt files per domain")}
# A JSON-lines corpus up to this size is read for its domains before anything is queued
# (precheck); a larger one is checked when its data is built.
CHEAP_SCAN_BYTES = 64 * 2**20


def check_path(corpus: str, path: str | Path) -> None:
    """``data.path`` exists and is what ``data.corpus`` reads, a file or a folder."""
    kind, holds = PATH_KINDS[corpus]
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"data.path: {path} does not exist; data.corpus={corpus} reads a {kind} ({holds}): "
                          f"set data.path to yours, e.g. --set data.path=/data/corpus"
                          f"{'.jsonl' if kind == 'file' else ''}")
    if path.is_dir() != (kind == "folder"):
        other = "txt (a folder of <domain>/*.txt)" if kind == "file" else "jsonl (one .jsonl file)"
        raise CorpusError(f"data.path: {path} is a {'folder' if path.is_dir() else 'file'}, but data.corpus="
                          f"{corpus} reads a {kind} ({holds}); point data.path at one, or set data.corpus={other}")


class LineReport:
    """The non-empty lines of a JSON-lines corpus and those skipped as malformed, by reason
    (a count and the first ``SHOWN`` line numbers of each)."""

    SHOWN = 10

    def __init__(self, path: str | Path = "") -> None:
        self.path = str(path)
        self.lines = 0
        self.skipped: dict[str, dict[str, Any]] = {}

    def skip(self, reason: str, lineno: int) -> None:
        entry = self.skipped.setdefault(reason, {"count": 0, "lines": []})
        entry["count"] += 1
        if len(entry["lines"]) < self.SHOWN:
            entry["lines"].append(lineno)

    @property
    def num_skipped(self) -> int:
        return sum(e["count"] for e in self.skipped.values())

    def to_info(self) -> dict[str, Any]:
        """What the data build records in the manifest's info (``corpus_lines``)."""
        return {"file": self.path, "lines": self.lines, "skipped": self.num_skipped, "reasons": self.skipped}

    def summary(self) -> str:
        return skip_summary(self.to_info())


def skip_summary(info: dict[str, Any]) -> str:
    """"skipped 3 of 120 lines: 2 not JSON (lines 4, 9); 1 key 'text' missing (line 12)"."""
    parts = []
    for reason, entry in sorted(info["reasons"].items(), key=lambda kv: kv[1]["lines"][:1]):  # first seen first
        shown = ", ".join(map(str, entry["lines"]))
        more = ", ..." if entry["count"] > len(entry["lines"]) else ""
        parts.append(f"{entry['count']} {reason} (line{'s' if entry['count'] > 1 else ''} {shown}{more})")
    return f"skipped {info['skipped']} of {info['lines']} lines" + (": " + "; ".join(parts) if parts else "")


def _json_lines(path: Path, report: LineReport) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every line that holds a JSON object; other non-empty lines are
    recorded in ``report`` and skipped."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            report.lines += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                report.skip("not JSON", lineno)
                continue
            if isinstance(record, dict):
                yield lineno, record
            else:
                report.skip(f"not a JSON object ({_json_kind(record)})", lineno)


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _fields(record: dict, keys: tuple[str, ...], lineno: int, report: LineReport) -> Optional[list[str]]:
    """The string values of ``keys``, or None (the line recorded as skipped) if one is not a string."""
    for key in keys:
        if not isinstance(record.get(key), str):
            found = "missing" if key not in record else f"is {_json_kind(record[key])}, not a string"
            report.skip(f"key '{key}' {found}", lineno)
            return None
    return [record[key] for key in keys]


def _documents(path: str | Path, report: Optional[LineReport], keys: tuple[str, str],
               clean: Callable[[str, str], tuple[str, str]]) -> Iterator[Document]:
    """Documents from JSON lines holding the string ``keys`` (text, domain), made by ``clean``; a
    line without them, or empty after ``clean``, is skipped and reported."""
    path = Path(path)
    report = report if report is not None else LineReport(path)
    for lineno, record in _json_lines(path, report):
        values = _fields(record, keys, lineno, report)
        if values is None:
            continue
        text, domain = clean(*values)
        if not text or not domain:
            report.skip(f"empty {keys[0] if not text else keys[1]}", lineno)
            continue
        yield Document(text, domain, str(record.get("id", f"line{lineno}")))


def read_arxiv(path: str | Path, report: Optional[LineReport] = None) -> Iterator[Document]:
    """Abstracts with their first category's archive; whitespace (hard line wraps) collapsed."""
    check_path("arxiv", path)
    return _documents(path, report, ("abstract", "categories"),
                      lambda abstract, categories: (" ".join(abstract.split()), arxiv_domain(categories)))


def read_jsonl(path: str | Path, report: Optional[LineReport] = None) -> Iterator[Document]:
    check_path("jsonl", path)
    return _documents(path, report, ("text", "domain"), lambda text, domain: (text.strip(), domain.strip()))


def read_txt_folder(root: str | Path, domains: Iterable[str]) -> Iterator[Document]:
    check_path("txt", root)
    for folder in _domain_folders(Path(root), domains):
        domain = folder.name
        for file in sorted(folder.glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield Document(text, domain, f"{domain}/{file.name}")


def _domain_folders(root: Path, domains: Iterable[str]) -> list[Path]:
    folders = [root / domain for domain in domains]
    for folder in folders:
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise CorpusError(f"{folder}: no folder for domain '{folder.name}' (expected {folder}/*.txt, one "
                              f"document per file); folders found: {', '.join(found[:8]) or 'none'}. Fix "
                              f"data.source_domains / data.target_domains, or data.path")
    return folders


def _records(cfg: RunConfig, wanted: list[str], report: LineReport) -> tuple[Iterable[Document], str]:
    d = cfg.data
    if d.corpus == "demo":
        return demo_corpus(wanted), "the built-in demo corpus"
    if d.corpus == "arxiv":
        return read_arxiv(d.path, report), str(d.path)
    if d.corpus == "jsonl":
        return read_jsonl(d.path, report), str(d.path)
    if d.corpus == "txt":
        return read_txt_folder(d.path, wanted), str(d.path)
    raise CorpusError(f"data.corpus: '{d.corpus}' is not a text corpus")


def _check_lines(report: LineReport, corpus: str, total: int) -> None:
    """Warn about skipped lines; refuse a file whose every non-empty line was skipped."""
    if not report.num_skipped:
        return
    if total == 0:
        raise CorpusError(f"{report.path}: no usable line ({report.summary()}); a data.corpus={corpus} "
                          f"file holds one JSON object a line with {GOOD_LINE[corpus]}")
    log.warning("%s: %s; these lines are left out (fix them to use them)", report.path, report.summary())


def check_domains(where: str, kept: dict[str, int], seen: dict[str, int], report: LineReport) -> None:
    """Every configured domain (``kept``: its documents) has at least two documents, one for
    training and one for testing; else an error that lists the domains ``seen`` in the corpus."""
    for name, n in kept.items():
        if n < 2:
            common = sorted(seen, key=lambda k: -seen[k])[:8]
            skipped = f" ({report.summary()})" if report.num_skipped else ""
            raise CorpusError(
                f"{where}: domain '{name}' has {n} document(s); it needs at least 2 (train and test). Domains "
                f"found: {', '.join(f'{k} ({seen[k]})' for k in common) or 'none'}"
                f"{', ...' if len(seen) > 8 else ''}{skipped}. Fix data.source_domains / data.target_domains.")


def precheck(cfg: RunConfig) -> Optional[str]:
    """Before anything is queued: ``data.path`` against ``data.corpus``, and the configured domains
    against the corpus where that is quick to learn (a txt folder's sub-folders, the demo's
    installed packages, a jsonl file up to CHEAP_SCAN_BYTES; never the arXiv snapshot). Raises CorpusError for a
    problem; returns a note when the domains are left to the data build."""
    d = cfg.data
    wanted = list(d.source_domains) + list(d.target_domains)
    if d.corpus == "demo":
        for domain in wanted:
            package_root(domain)
        return None
    if d.corpus not in PATH_KINDS:
        return None
    check_path(d.corpus, d.path)
    if d.corpus == "txt":
        _domain_folders(Path(d.path), wanted)
        seen = {f.name: len(list(f.glob("*.txt"))) for f in Path(d.path).iterdir() if f.is_dir()}
        check_domains(str(d.path), {name: seen[name] for name in wanted}, seen, LineReport(d.path))
        return None
    size = Path(d.path).stat().st_size
    if d.corpus == "arxiv":  # several GiB: its domains (archives) are found as the data is built
        return None
    if size > CHEAP_SCAN_BYTES:
        return (f"data.path: {d.path} ({size / 2**30:.1f} GiB) is not read now; its domains are checked when "
                f"the data stage builds the shards")
    report = LineReport(d.path)
    seen: dict[str, int] = {}
    for doc in _records(cfg, wanted, report)[0]:
        seen[doc.domain] = seen.get(doc.domain, 0) + 1
    check_domains(str(d.path), {name: seen.get(name, 0) for name in wanted}, seen, report)
    return None


def read_corpus(cfg: RunConfig, report: Optional[LineReport] = None) -> dict[str, list[Document]]:
    """The documents of every configured (source and target) domain, in corpus order.

    Malformed lines of a JSON-lines corpus are skipped and recorded in ``report`` (pass one to
    keep the counts), with one warning. Fails if no line is usable, if the corpus is empty, or if
    a configured domain has fewer than two documents (one for training, one for testing); the
    error names the file and the domain.
    """
    d = cfg.data
    wanted = list(d.source_domains) + list(d.target_domains)
    report = report if report is not None else LineReport()
    report.path = str(d.path or "")
    records, where = _records(cfg, wanted, report)
    docs: dict[str, list[Document]] = {name: [] for name in wanted}
    seen_domains: dict[str, int] = {}
    for doc in records:
        seen_domains[doc.domain] = seen_domains.get(doc.domain, 0) + 1
        bucket = docs.get(doc.domain)
        if bucket is not None and (d.max_docs_per_domain is None or len(bucket) < d.max_docs_per_domain):
            bucket.append(doc)
    total = sum(seen_domains.values())
    _check_lines(report, d.corpus, total)
    if total == 0:
        raise CorpusError(f"{where}: the corpus is empty (no documents with text)")
    check_domains(where, {name: len(docs[name]) for name in wanted}, seen_domains, report)
    log.info("corpus %s: %s", where, ", ".join(f"{k}={len(v)}" for k, v in docs.items()))
    return docs
