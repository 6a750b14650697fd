"""The built-in offline demo corpus: English prose from documentation that ships with Python.

Every machine that has the package installed has this text: the docstrings of Python's standard
library (domain ``python``) and of installed packages (any other domain name is the import name of
a package, e.g. ``numpy``, ``torch``). The source files are parsed with ``ast`` -- nothing is imported
or executed -- in sorted file order, so the corpus is the same bytes every time on the same Python
and package versions.

Docstrings are written for a terminal, not as prose: they hold doctests, code blocks, parameter
tables and reST markup. ``clean_docstring`` keeps the paragraphs that read like English and drops
the rest, so the language model learns prose and the domains differ in topic and style rather than
in code formatting.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sysconfig
from pathlib import Path
from typing import Iterator

from gtl_dist.data.documents import CorpusError, Document

STDLIB = "python"
# Folders whose docstrings are tests, demos or vendored third-party code rather than documentation.
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "turtledemo", "site-packages",
              "dist-packages", "__pycache__", "ensurepip", "pydoc_data", "_vendor", "vendored",
              "third_party", "benchmarks", "_pyrepl"}
# Numpy-style and Google-style sections that are lists of names and types, code or references.
_DROP_SECTIONS = {"parameters", "params", "arguments", "args", "keyword arguments", "kwargs",
                  "other parameters", "returns", "return", "yields", "yield", "raises", "warns",
                  "see also", "examples", "example", "references", "attributes", "methods",
                  "shape", "inputs", "outputs", "type", "rtype", "todo", ".. rubric"}
# Calls that attach documentation to C functions (numpy's add_newdoc, torch's add_docstr).
_DOC_CALLS = {"add_newdoc", "add_docstr", "add_newdoc_ufunc", "_add_docstr"}
MIN_WORDS = 6


def package_root(domain: str) -> Path:
    """Where the domain's source files are: the standard library, or an installed package."""
    if domain == STDLIB:
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(domain)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"demo corpus: domain '{domain}' is neither 'python' (the standard library) "
                          f"nor an installed package; pick installed packages in data.source_domains / "
                          f"data.target_domains (configs/demo.yaml uses python, numpy, torch)")
    return Path(list(spec.submodule_search_locations)[0])


def _source_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel[:-1]):
            continue
        if rel[-1].startswith("test_") or rel[-1] in ("conftest.py", "setup.py"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _string_arg(node: ast.expr) -> str | None:
    """A string literal, or the literal in ``"...".format(...)`` (torch writes docs that way)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)):
        return node.func.value.value
    return None


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, raw docstring) for the module, classes, functions and doc-attaching calls."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield "<module>", doc
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield name, doc
                stack.append((name + ".", child))
            elif isinstance(child, ast.Expr) and isinstance(child.value, ast.Call):
                call = child.value
                fname = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
                if fname in _DOC_CALLS and call.args:
                    for arg in reversed(call.args):
                        text = _string_arg(arg)
                        if text and len(text) > 40:
                            target = ".".join(str(getattr(a, "value", "")) for a in call.args[:2]
                                              if isinstance(a, ast.Constant))
                            yield f"{fname}({target or child.lineno})", _dedent(text)
                            break


def _dedent(text: str) -> str:
    lines = text.expandtabs().splitlines()
    indents = [len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip()]
    cut = min(indents) if indents else 0
    return "\n".join([lines[0].strip()] + [ln[cut:] for ln in lines[1:]]).strip() if lines else ""


# -- cleaning ---------------------------------------------------------------------------------

_RULE = re.compile(r"^\s*([-=~^*+#_`:.'\"|]\s*){3,}$")  # section underlines, table borders
_ROLE = re.compile(r":[a-zA-Z_:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name <target>` -> name
_LITERAL = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_REF = re.compile(r"`([^`]+)`_+")
_PLACEHOLDER = re.compile(r"\{\w+\}")
_FIELD = re.compile(r"^:\w[\w\s]*:")  # :param x: ..., :returns: ...
_DIRECTIVE = re.compile(r"^\.\.\s")  # .. note::, .. code-block:: python, .. _label:
_HEADER = re.compile(r"^([A-Za-z][A-Za-z ]*):?$")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'\"()\-!?]")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _drop_blocks(lines: list[str]) -> list[str]:
    """Remove doctests, literal/code blocks, directives, field lists and list-like sections."""
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        stripped = line.strip()
        low = stripped.lower().rstrip(":")
        # A section header: "Parameters" + a dashed underline, or Google-style "Args:".
        underlined = i + 1 < n and _RULE.match(lines[i + 1]) and _HEADER.match(stripped)
        google = stripped.endswith(":") and _HEADER.match(stripped) and low in _DROP_SECTIONS
        if underlined and low not in _DROP_SECTIONS:
            i += 2  # "Notes" + underline: keep the section, not its title
            continue
        if (underlined or google) and low in _DROP_SECTIONS:
            base = _indent(line)
            i += 2 if underlined else 1
            # A numpy-style section runs until the next underlined header; a Google-style one is
            # an indented block that ends at the first line back at the header's indentation.
            while i < n:
                nxt, s = lines[i], lines[i].strip()
                if s and _indent(nxt) <= base and (
                        not underlined or (i + 1 < n and _RULE.match(lines[i + 1]) and _HEADER.match(s))):
                    break
                i += 1
            continue
        if stripped.startswith(">>>"):
            # A doctest runs until the next blank line (its output included).
            while i < n and lines[i].strip():
                i += 1
            continue
        if _DIRECTIVE.match(stripped) or stripped.endswith("::"):
            # The directive or "::" line opens an indented block that is code or markup.
            base = _indent(line)
            head = _DIRECTIVE.sub("", stripped) if _DIRECTIVE.match(stripped) else stripped[:-2].rstrip()
            keep_head = not _DIRECTIVE.match(stripped) and head
            if keep_head:
                out.append(" " * base + head + ":")
            i += 1
            while i < n and (not lines[i].strip() or _indent(lines[i]) > base):
                i += 1
            out.append("")  # whatever follows the block is a new paragraph
            continue
        if _FIELD.match(stripped) or _RULE.match(line) or _PLACEHOLDER.search(stripped):
            i += 1
            continue
        out.append(line)
        i += 1
    return out


def _inline(text: str) -> str:
    text = text.replace("`~", "`")  # `~pkg.name`: Sphinx's "show the last component" marker
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    return " ".join(text.split())


def is_prose(paragraph: str) -> bool:
    """A paragraph of at least MIN_WORDS words, almost all letters and punctuation, ending a sentence."""
    words = paragraph.split()
    if len(words) < MIN_WORDS or paragraph[-1] not in ".!?:)\"'":
        return False
    prose = len(_PROSE_CHARS.findall(paragraph))
    if prose < 0.93 * len(paragraph):
        return False
    # Code that slipped through: assignments, calls with arguments, arrows, brackets.
    return not re.search(r"(==|!=|->|=>|\w\(\w[^)]*[,=]|\[\d|^\s*[-*] |\w=\w|\s=\s|self\.|\bawait\s)",
                         paragraph)


def clean_docstring(doc: str) -> str:
    """The prose paragraphs of a docstring, one per line, reflowed; "" if nothing reads like prose."""
    lines = _drop_blocks(doc.expandtabs().splitlines())
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(_inline(" ".join(current)))
            current = []
    return "\n".join(p for p in paragraphs if is_prose(p))


def domain_documents(domain: str) -> Iterator[Document]:
    """Cleaned, de-duplicated docstrings of one domain, in sorted (file, position) order."""
    root = package_root(domain)
    seen: set[str] = set()
    ids: set[str] = set()
    for path in _source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # e.g. a Python 2 file kept for reference: not documentation we can read
        rel = path.relative_to(root).as_posix()
        for name, raw in _docstrings(tree):
            text = clean_docstring(raw)
            if text and text not in seen:  # inherited/copied docstrings would repeat verbatim
                seen.add(text)
                doc_id, k = f"{rel}:{name}", 1
                while doc_id in ids:  # a function defined twice (e.g. per platform)
                    k += 1
                    doc_id = f"{rel}:{name}#{k}"
                ids.add(doc_id)
                yield Document(text, domain, doc_id)


def demo_corpus(domains: list[str]) -> Iterator[Document]:
    for domain in domains:
        yield from domain_documents(domain)


def corpus_versions(domains: list[str]) -> dict[str, str]:
    """The versions the demo text comes from (the corpus is deterministic for fixed versions)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for domain in domains:
        if domain == STDLIB:
            out[domain] = platform.python_version()
        else:
            try:
                out[domain] = version(domain)
            except PackageNotFoundError:
                out[domain] = "unknown"
    return out
