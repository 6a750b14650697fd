"""Corpora and splits: readers, arXiv domains, bad input, seeded splits, overlap, the demo corpus."""

import json

import numpy as np
import pytest

from gtl_dist.config import load_config
from gtl_dist.data import demo, sets
from gtl_dist.data.corpus import CorpusError, Document, LineReport, arxiv_domain, read_arxiv, read_corpus


def _cfg(configs_dir, *overrides):
    return load_config(configs_dir / "tiny.yaml", list(overrides))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("categories, domain", [
    ("physics.optics hep-th", "physics"), ("hep-th", "hep-th"), ("cs.LG stat.ML", "cs"),
    ("math.PR", "math"), ("astro-ph.CO physics.data-an", "astro-ph")])
def test_arxiv_domain_is_the_archive_of_the_first_category(categories, domain):
    assert arxiv_domain(categories) == domain


def test_arxiv_reader_collapses_hard_wraps_and_keeps_ids(tmp_path):
    path = _jsonl(tmp_path / "arxiv.json", [
        {"id": "0704.0001", "abstract": "  A first\n  abstract.\n", "categories": "physics.optics hep-th"},
        {"id": "0704.0002", "abstract": "Second one.", "categories": "cs.LG"}])
    docs = list(read_arxiv(path))
    assert docs == [Document("A first abstract.", "physics", "0704.0001"), Document("Second one.", "cs", "0704.0002")]


def test_jsonl_and_txt_corpora_with_domain_selection(tmp_path, configs_dir):
    records = [{"text": f"doc {i} about {d}", "domain": d} for d in ("a", "b", "zzz") for i in range(5)]
    path = _jsonl(tmp_path / "c.jsonl", records)
    cfg = _cfg(configs_dir, "data.corpus=jsonl", f"data.path={path}", "data.source_domains=[a]",
               "data.target_domains=[b]", "data.max_docs_per_domain=3")
    docs = read_corpus(cfg)
    assert list(docs) == ["a", "b"] and [d.text for d in docs["b"]] == ["doc 0 about b", "doc 1 about b", "doc 2 about b"]

    for d in ("a", "b"):
        (tmp_path / "txt" / d).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "txt" / d / f"{i}.txt").write_text(f"text {i} of {d}\n")
    cfg = _cfg(configs_dir, "data.corpus=txt", f"data.path={tmp_path / 'txt'}", "data.source_domains=[a]",
               "data.target_domains=[b]")
    docs = read_corpus(cfg)
    assert [d.doc_id for d in docs["a"]] == ["a/0.txt", "a/1.txt", "a/2.txt"] and docs["a"][0].text == "text 0 of a"


def test_bad_corpora_name_the_file_and_the_problem(tmp_path, configs_dir):
    def cfg(path, corpus="jsonl", targets="[b]"):
        return _cfg(configs_dir, f"data.corpus={corpus}", f"data.path={path}", "data.source_domains=[a]",
                    f"data.target_domains={targets}")

    with pytest.raises(CorpusError, match=r"data\.path: \S*missing\.jsonl does not exist; data\.corpus=jsonl reads "
                                          r"a file \(one JSON object a line"):
        read_corpus(cfg(tmp_path / "missing.jsonl"))
    # The wrong kind of path names what the corpus reads and the corpus that reads this kind.
    with pytest.raises(CorpusError, match=r"data\.path: \S+ is a folder, but data\.corpus=jsonl reads a file .*"
                                          r"or set data\.corpus=txt"):
        read_corpus(cfg(tmp_path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match=r"empty\.jsonl: the corpus is empty"):
        read_corpus(cfg(tmp_path / "empty.jsonl"))
    # Every non-empty line malformed: an error naming the file, each reason with its lines, and a good line.
    (tmp_path / "garbled.jsonl").write_text('{not json\n\n["text", "domain"]\n{"text": "x", "domain": 3}\n')
    with pytest.raises(CorpusError, match=r"garbled\.jsonl: no usable line \(skipped 3 of 3 lines: 1 not JSON "
                                          r"\(line 1\); 1 not a JSON object \(an array\) \(line 3\); 1 key "
                                          r"'domain' is a number, not a string \(line 4\)\); a data\.corpus=jsonl "
                                          r"file holds one JSON object a line with string keys \"text\" and "
                                          r"\"domain\""):
        read_corpus(cfg(tmp_path / "garbled.jsonl"))
    _jsonl(tmp_path / "nokey.jsonl", [{"body": "x", "domain": "a"}])
    with pytest.raises(CorpusError, match=r"nokey\.jsonl: no usable line \(skipped 1 of 1 lines: 1 key 'text' "
                                          r"missing \(line 1\)\)"):
        read_corpus(cfg(tmp_path / "nokey.jsonl"))
    path = _jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "domain": d} for d in ("a", "b") for i in range(3)])
    with pytest.raises(CorpusError, match=r"c\.jsonl: domain 'physics' has 0 document.*Domains found: a \(3\), b \(3\)"):
        read_corpus(cfg(path, targets="[physics]"))
    # A domain left short by skipped lines: the error says so.
    (tmp_path / "short.jsonl").write_text(path.read_text() + '{"text": "t3", "domain": "b"\n' * 2)
    with pytest.raises(CorpusError, match=r"short\.jsonl: domain 'physics' has 0 document.*Domains found: a \(3\), "
                                          r"b \(3\) \(skipped 2 of 8 lines: 2 not JSON \(lines 7, 8\)\)"):
        read_corpus(cfg(tmp_path / "short.jsonl", targets="[physics]"))
    (tmp_path / "txt" / "a").mkdir(parents=True)
    with pytest.raises(CorpusError, match=r"txt/b: no folder for domain 'b' .*folders found: a\. Fix "
                                          r"data\.source_domains / data\.target_domains, or data\.path"):
        read_corpus(cfg(tmp_path / "txt", corpus="txt"))
    with pytest.raises(CorpusError, match=r"c\.jsonl is a file, but data\.corpus=txt reads a folder .*"
                                          r"or set data\.corpus=jsonl"):
        read_corpus(cfg(path, corpus="txt"))
    with pytest.raises(CorpusError, match=r"arxiv-snapshot\.json does not exist; data\.corpus=arxiv reads a file"):
        read_corpus(cfg(tmp_path / "arxiv-snapshot.json", corpus="arxiv"))


def test_malformed_jsonl_lines_are_skipped_counted_and_reported(tmp_path, configs_dir, caplog):
    good = [json.dumps({"text": f" doc {i} ", "domain": "ab"[i % 2], "id": f"d{i}"}) for i in range(6)]
    bad = ['{"text": "cut off', '"just a string"', '{"domain": "a"}', '{"text": "   ", "domain": "b"}',
           '{"text": ["x"], "domain": "a"}', "not json at all"]
    lines = [good[0], bad[0], good[1], "", bad[1], good[2], bad[2], good[3], bad[3], bad[4], good[4], bad[5],
             good[5]]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(configs_dir, "data.corpus=jsonl", f"data.path={path}", "data.source_domains=[a]",
               "data.target_domains=[b]")
    report = LineReport()
    with caplog.at_level("WARNING", logger="gtl_dist.data.corpus"):
        docs = read_corpus(cfg, report)
    assert [d.doc_id for d in docs["a"]] == ["d0", "d2", "d4"] and [d.doc_id for d in docs["b"]] == ["d1", "d3", "d5"]
    assert docs["a"][0].text == "doc 0"
    summary = ("skipped 6 of 12 lines: 2 not JSON (lines 2, 12); 1 not a JSON object (a string) (line 5); "
               "1 key 'text' missing (line 7); 1 empty text (line 9); 1 key 'text' is an array, not a "
               "string (line 10)")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}: {summary}; these lines are left out (fix them to use them)"]
    assert report.summary() == summary
    assert report.to_info() == {"file": str(path), "lines": 12, "skipped": 6, "reasons": {
        "not JSON": {"count": 2, "lines": [2, 12]}, "not a JSON object (a string)": {"count": 1, "lines": [5]},
        "key 'text' missing": {"count": 1, "lines": [7]}, "empty text": {"count": 1, "lines": [9]},
        "key 'text' is an array, not a string": {"count": 1, "lines": [10]}}}


def test_skip_report_shows_the_first_ten_lines_of_a_reason():
    report = LineReport("big.jsonl")
    report.lines = 100
    for lineno in range(1, 26):
        report.skip("not JSON", lineno * 3)
    assert report.summary() == "skipped 25 of 100 lines: 25 not JSON (lines 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, ...)"


# The Kaggle arXiv metadata snapshot (arxiv-metadata-oai-snapshot.json): one record a line, every
# key present, abstracts with hard line wraps and leading spaces, versions and parsed authors.
def _arxiv_record(arxiv_id, categories, abstract, **changes):
    record = {
        "id": arxiv_id, "submitter": "Pavel Nadolsky",
        "authors": "C. Bal\\'azs, E. L. Berger, P. M. Nadolsky, C.-P. Yuan",
        "title": "Calculation of prompt diphoton production cross sections at Tevatron and\n  LHC energies",
        "comments": "37 pages, 15 figures; minor changes", "journal-ref": "Phys.Rev.D76:013009,2007",
        "doi": "10.1103/PhysRevD.76.013009", "report-no": "ANL-HEP-PR-07-12", "categories": categories,
        "license": None, "abstract": abstract,
        "versions": [{"version": "v1", "created": "Mon, 2 Apr 2007 19:18:42 GMT"},
                     {"version": "v2", "created": "Tue, 24 Jul 2007 20:10:27 GMT"}],
        "update_date": "2008-11-13", "authors_parsed": [["Balázs", "C.", ""], ["Berger", "E. L.", ""]]}
    record.update(changes)
    return json.dumps(record)


def test_arxiv_snapshot_schema_domains_ids_whitespace_and_skipped_lines(tmp_path, configs_dir, caplog):
    wrapped = "  A fully differential calculation in perturbative quantum chromodynamics is\n  presented for the " \
              "production of massive photon pairs.\n"
    lines = [
        _arxiv_record("0704.0001", "hep-ph", wrapped),
        _arxiv_record("0704.0002", "math.CO cs.CG", "  We describe a new algorithm, the $(k,\\ell)$-pebble game\n"
                                                   "  with colors.\n"),
        _arxiv_record("0704.0003", "physics.optics hep-th", "  The evolution of Earth-Moon system is\n  described.\n"),
        _arxiv_record("0704.0004", "math.CO", "  We show that a determinant of Stirling\n  cycle numbers counts.\n"),
        _arxiv_record("0704.0005", "math.CA math.FA", "  In this paper we show how to compute the\n  norm.\n")[:90],
        _arxiv_record("0704.0006", "cond-mat.mes-hall", "  We study the two-particle wave function.\n"),
        json.dumps(["0704.0007", "physics.gen-ph"]),
        _arxiv_record("0704.0008", "physics.gen-ph", "  A method for calculating the sum.\n"),
        json.dumps({k: v for k, v in json.loads(_arxiv_record("0704.0009", "cs.NE", "x")).items() if k != "abstract"}),
        _arxiv_record("0704.0010", "cs.LG stat.ML", "  \n   \n"),
        _arxiv_record("0704.0011", "hep-th", "  Black holes\n  radiate.\n"),
        _arxiv_record("0704.0012", "cs.DS", "  Sorting in\n   linear time.\n"),
    ]
    path = tmp_path / "arxiv-metadata-oai-snapshot.json"
    path.write_text("\n".join(lines) + "\n")
    docs = list(read_arxiv(path))
    assert [(d.doc_id, d.domain) for d in docs] == [
        ("0704.0001", "hep-ph"), ("0704.0002", "math"), ("0704.0003", "physics"), ("0704.0004", "math"),
        ("0704.0006", "cond-mat"), ("0704.0008", "physics"), ("0704.0011", "hep-th"), ("0704.0012", "cs")]
    assert docs[0].text == ("A fully differential calculation in perturbative quantum chromodynamics is presented "
                            "for the production of massive photon pairs.")
    assert docs[1].text == "We describe a new algorithm, the $(k,\\ell)$-pebble game with colors."
    assert docs[-1].text == "Sorting in linear time."

    cfg = _cfg(configs_dir, "data.corpus=arxiv", f"data.path={path}", "data.source_domains=[math]",
               "data.target_domains=[physics]")
    with caplog.at_level("WARNING", logger="gtl_dist.data.corpus"):
        by_domain = read_corpus(cfg)
    assert [d.doc_id for d in by_domain["math"]] == ["0704.0002", "0704.0004"]
    assert [d.doc_id for d in by_domain["physics"]] == ["0704.0003", "0704.0008"]
    assert caplog.text.count("WARNING") == 1
    assert (f"{path}: skipped 4 of 12 lines: 1 not JSON (line 5); 1 not a JSON object (an array) (line 7); "
            f"1 key 'abstract' missing (line 9); 1 empty abstract (line 10)") in caplog.text

    bad = tmp_path / "bad.json"
    bad.write_text("\n".join([lines[4], lines[6], lines[8], lines[9]]) + "\n")
    with pytest.raises(CorpusError, match=r"bad\.json: no usable line \(skipped 4 of 4 lines: .*\); a "
                                          r"data\.corpus=arxiv file holds one JSON object a line with string keys "
                                          r"\"abstract\" and \"categories\""):
        read_corpus(_cfg(configs_dir, "data.corpus=arxiv", f"data.path={bad}", "data.source_domains=[math]",
                         "data.target_domains=[physics]"))


def _docs(domain, n):
    return [Document(f"{domain} text {i}", domain, f"{domain}{i}") for i in range(n)]


def test_splits_are_seeded_per_domain_and_overlap_moves_round_r_n(configs_dir):
    split = ["data.corpus=demo", "data.target_domains=[t]", "data.test_fraction=0.2",
             "data.evaluator_fraction=0.1", "data.overlap=0.25", "data.split_seed=3"]
    cfg = _cfg(configs_dir, "data.source_domains=[s1, s2]", *split)
    docs = {"s1": _docs("s1", 30), "s2": _docs("s2", 10), "t": _docs("t", 50)}
    built = sets.build_text_sets(cfg, docs)
    assert list(built) == ["source/train", "source/test", "source/evaluator", "t/train", "t/test", "t/evaluator"]
    # t: 50 docs -> 10 test, 5 evaluator, 35 train; round(0.25 * 35) = 9 move to the source.
    assert len(built["t/test"]) == 10 and len(built["t/evaluator"]) == 5 and len(built["t/train"]) == 26
    moved = [d for d in built["source/train"] if d.domain == "t"]
    assert len(moved) == 9 and not {d.doc_id for d in moved} & {d.doc_id for d in built["t/train"]}
    assert len(built["source/train"]) == 21 + 7 + 9 and len(built["source/test"]) == 6 + 2
    assert len(built["source/evaluator"]) == 3 + 1
    ids = {name: {d.doc_id for d in built[name]} for name in built}
    all_ids = [d.doc_id for name in built for d in built[name]]
    assert len(all_ids) == len(set(all_ids)) == 90  # a partition: nothing lost, nothing duplicated
    # The evaluator split is disjoint from everything a method trains on, and from the test text.
    for domain in ("source", "t"):
        assert not ids[f"{domain}/evaluator"] & (ids["source/train"] | ids["t/train"] | ids[f"{domain}/test"])
    # The same seed gives the same split; another domain's size does not change this one's, nor
    # does adding a domain; the evaluator split comes out of training, so the test text stays.
    again = sets.build_text_sets(cfg, {"s1": _docs("s1", 30), "s2": _docs("s2", 99), "t": _docs("t", 50)})
    assert [d.doc_id for d in again["t/train"]] == [d.doc_id for d in built["t/train"]]
    added = sets.build_text_sets(_cfg(configs_dir, "data.source_domains=[s1, s2, s3]", *split),
                                 {**docs, "s3": _docs("s3", 40)})
    for name in ("t/train", "t/test", "t/evaluator"):
        assert [d.doc_id for d in added[name]] == [d.doc_id for d in built[name]], name
    assert ids["source/evaluator"] < {d.doc_id for d in added["source/evaluator"]}
    larger = sets.build_text_sets(_cfg(configs_dir, "data.source_domains=[s1, s2]", *split,
                                       "data.evaluator_fraction=0.3"), docs)
    assert [d.doc_id for d in larger["t/test"]] == [d.doc_id for d in built["t/test"]]
    assert ids["t/evaluator"] < {d.doc_id for d in larger["t/evaluator"]}
    reseeded = sets.build_text_sets(load_config(configs_dir / "tiny.yaml", [
        "data.source_domains=[s1, s2]", *split, "data.split_seed=4"]), docs)
    assert [d.doc_id for d in reseeded["t/test"]] != [d.doc_id for d in built["t/test"]]


def test_a_domain_too_small_for_its_held_out_splits_is_an_error(configs_dir):
    cfg = _cfg(configs_dir, "data.corpus=demo", "data.source_domains=[s]", "data.target_domains=[t]",
               "data.test_fraction=0.2", "data.evaluator_fraction=0.2")
    with pytest.raises(CorpusError, match=r"domain 't' has 2 documents: data.test_fraction=0.2 holds out 1 and "
                                          r"data.evaluator_fraction=0.2 1, which leaves none for training"):
        sets.build_text_sets(cfg, {"s": _docs("s", 10), "t": _docs("t", 2)})


def test_overlap_that_empties_a_target_is_an_error(configs_dir):
    cfg = _cfg(configs_dir, "data.corpus=demo", "data.source_domains=[s]", "data.target_domains=[t]",
               "data.overlap=0.9")
    with pytest.raises(CorpusError, match="moves 2 of target 't''s 2 training documents"):
        sets.build_text_sets(cfg, {"s": _docs("s", 10), "t": _docs("t", 4)})


def test_markov_sets_sizes_and_overlap(configs_dir):
    cfg = _cfg(configs_dir, "data.overlap=0.1")  # tiny: 2000 source, 200 target, 200 test
    built = sets.build_markov_sets(cfg)
    assert {k: len(v.domains) for k, v in built.items()} == {
        "source/train": 2000 + 20, "source/test": 200, "source/evaluator": 200, "sticky/train": 180,
        "sticky/test": 200, "sticky/evaluator": 200}
    assert not np.array_equal(built["sticky/test"].states, built["sticky/evaluator"].states)
    assert built["source/train"].domains.count("sticky") == 20
    assert built["source/train"].states.shape == (2020, 8)


# -- the demo corpus ----------------------------------------------------------------------------

def test_cleaning_keeps_prose_and_drops_code_tables_and_markup():
    raw = """Compute the thing along an axis of the array.

    Parameters
    ----------
    a : array_like
        Input array.

    Notes
    -----
    The result is computed in double precision, which is slower but :func:`numpy.sum` is exact.

    ========  ======
    column    value
    ========  ======

    For example::

        x = compute(a)

    >>> compute([1, 2])
    3

    Args:
        input (Tensor): the input tensor.

    .. note::
        A directive body that is dropped entirely.

    This closing paragraph explains ``compute`` in plain words for the reader.
    """
    text = demo.clean_docstring(demo._dedent(raw))
    assert text.split("\n") == [
        "Compute the thing along an axis of the array.",
        "The result is computed in double precision, which is slower but numpy.sum is exact.",
        "This closing paragraph explains compute in plain words for the reader."]


@pytest.fixture(scope="session")
def demo_docs():
    """Two domains of the real built-in demo corpus, built once per session (torch's ~3,000 source
    files take too long to parse for a unit test; the benchmark builds the whole corpus)."""
    return {d: list(demo.domain_documents(d)) for d in ("numpy", "python")}


def test_real_demo_corpus_is_prose(demo_docs):
    sizes = {d: sum(len(doc.text) for doc in docs) for d, docs in demo_docs.items()}
    assert sizes["numpy"] > 200_000 and sizes["python"] > 500_000 and sum(sizes.values()) < 5_000_000
    for docs in demo_docs.values():
        text = "\n".join(doc.text for doc in docs)
        assert ">>>" not in text and "----------" not in text and ":func:`" not in text
        assert len({doc.doc_id for doc in docs}) == len(docs)
    assert sum("array" in doc.text for doc in demo_docs["numpy"]) > 300
    assert any(doc.doc_id == "json/__init__.py:dumps" for doc in demo_docs["python"])


def test_demo_corpus_is_deterministic(demo_docs):
    assert list(demo.domain_documents("numpy")) == demo_docs["numpy"]


def test_demo_domain_must_be_an_installed_package():
    with pytest.raises(CorpusError, match="'no_such_pkg_xyz' is neither 'python'"):
        list(demo.domain_documents("no_such_pkg_xyz"))
