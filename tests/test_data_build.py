"""Building shards: manifest, packing round trip, fractions, overlap, worker-count independence,
resumption after SIGKILL, config changes, and the two CLIs."""

import io
import json
import os
import re
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from gtl_dist.config import ConfigError, load_config
from gtl_dist.data import Manifest, ManifestError, markov, prepare_data, sets
from gtl_dist.data.build import BuildError, data_hash
from gtl_dist.data.shards import read_shard
from gtl_dist.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARD_NAME = r"^(source|sticky|t|u)-(train|test|evaluator)-\d{6}\.tar$"
VOCAB = {"a": "alpha beta gamma delta epsilon zeta eta theta".split(),
         "b": "red green blue yellow purple orange black white".split(),
         "t": "quark gluon boson lepton meson hadron zyxwvu photon".split()}


def _markov_cfg(configs_dir, *overrides):
    return load_config(configs_dir / "tiny.yaml", ["shards.build_workers=1", *overrides])


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    lines = []
    for domain, n in (("a", 60), ("b", 40), ("t", 50)):
        for i in range(n):
            words = [rng.choice(VOCAB[domain]) for _ in range(rng.randint(3, 20))]
            lines.append(json.dumps({"text": " ".join(words) + ".", "domain": domain, "id": f"{domain}-{i}"}))
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _text_cfg(configs_dir, corpus_file, *overrides):
    return load_config(configs_dir / "tiny.yaml", [
        "data.corpus=jsonl", f"data.path={corpus_file}", "data.source_domains=[a, b]", "data.target_domains=[t]",
        "data.test_fraction=0.2", "data.target_fractions=[1.0, 0.5, 0.1]", "data.overlap=0.2",
        "tokenizer.vocab_size=60", "shards.seq_len=32", "shards.samples_per_shard=8", "shards.unit_chars=1500",
        "shards.build_workers=1", *overrides])


def _all_rows(manifest, set_name):
    rows, domains = [], []
    for shard in manifest.sets[set_name].shards:
        t, d = read_shard(manifest.root / shard.name, manifest.seq_len)
        rows.append(t)
        domains += d
    return np.concatenate(rows), domains


def _sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_markov_manifest_roundtrip_fractions_and_overlap(tmp_path, configs_dir):
    cfg = _markov_cfg(configs_dir, "data.overlap=0.1")
    m = prepare_data(cfg, tmp_path)
    assert m.root == tmp_path / "data" and Manifest.load(tmp_path / "data" / "manifest.json") == m
    assert (m.seq_len, m.vocab_size, m.mask_id, m.pad_id, m.bos_id, m.eos_id, m.dtype) == (8, 5, 4, None, None, None, "uint8")
    assert m.tokenizer_hash == markov.chain_spec_hash(cfg.data.markov) and m.data_hash == data_hash(cfg)
    assert list(m.sets) == ["source/train", "source/test", "source/evaluator", "sticky/train", "sticky/test",
                            "sticky/evaluator"]
    names = [s.name for e in m.sets.values() for s in e.shards]
    assert all(re.match(SHARD_NAME, n) for n in names) and sorted(os.listdir(m.root)) == sorted(
        names + ["build.lock", "corpus", "manifest.json", "plan.json"])
    # Every sequence of every set comes back exactly (as a multiset) from the shards.
    expected = sets.build_markov_sets(cfg)
    for name in m.sets:
        rows, domains = _all_rows(m, name)
        np.testing.assert_array_equal(_sorted_rows(rows), _sorted_rows(expected[name].states))
        assert Counter(domains) == Counter(expected[name].domains) == Counter(m.sets[name].domains)
    # Overlap: round(0.1 * 200) = 20 target sequences moved into source/train.
    assert m.sets["source/train"].domains == {"source": 2000, "sticky": 20}
    assert m.num_samples("sticky/train") == 180
    # Fractions: recorded counts, and the reader's prefixes are nested.
    assert m.sets["sticky/train"].fractions == {"1": 180, "0.2": 36}
    small = m.shard_files("sticky/train", 0.2)
    assert sum(n for _, _, n in small) == m.num_samples("sticky/train", 0.2) == 36
    rows_small = np.concatenate([read_shard(p, 8, limit=n)[0] for p, _, n in small])
    rows_all = np.concatenate([read_shard(p, 8, limit=n)[0] for p, _, n in m.shard_files("sticky/train", 1.0)])
    np.testing.assert_array_equal(rows_small, rows_all[:36])
    with pytest.raises(ManifestError, match="applies to target training sets only"):
        m.num_samples("source/train", 0.5)


def test_text_build_packs_documents_exactly(tmp_path, configs_dir, corpus_file):
    cfg = _text_cfg(configs_dir, corpus_file)
    m = prepare_data(cfg, tmp_path)
    tok = Tokenizer(m.tokenizer_path, expected_hash=m.tokenizer_hash)
    assert (m.mask_id, m.pad_id, m.bos_id, m.eos_id, m.dtype) == (4, 0, 2, 3, "uint8")
    assert m.vocab_size == tok.vocab_size
    # With overlap the source set (and so the tokenizer's training text) includes target documents:
    # target-only words become pieces (without, none does: test_inspect_cli_verifies_and_decodes).
    assert tok.sp.piece_to_id("▁alpha") != tok.unk_id
    assert any(tok.sp.piece_to_id(f"▁{word}") != tok.unk_id for word in VOCAB["t"])
    corpus = {}
    for line in corpus_file.read_text().splitlines():
        r = json.loads(line)
        corpus[r["id"]] = (r["text"], r["domain"])
    set_ids = {}
    total_tokens = 0
    for name in m.sets:
        stem = sets.file_stem(name)
        ids = [json.loads(x)["id"] for x in (m.root / "corpus" / f"{stem}.jsonl").read_text().splitlines()]
        set_ids[name] = set(ids)
        total_tokens += sum(len(t) + 2 for t in tok.encode([corpus[i][0] for i in ids]))
        whole_docs = 0
        for shard in m.sets[name].shards:
            for sample in wds.tarfile_samples([{"url": str(m.root / shard.name)}]):
                meta = json.loads(sample["json"])
                row = np.load(io.BytesIO(sample["npy"]))
                assert row.shape == (32,) and row.dtype == np.uint8
                # Chunks never mix domains or sets.
                assert meta["doc_ids"] and all(corpus[i][1] == meta["domain"] for i in meta["doc_ids"])
                assert set(meta["doc_ids"]) <= set_ids[name]
                # A document wholly inside the chunk decodes back to its text.
                bos = np.flatnonzero(row == 2)
                eos = np.flatnonzero(row == 3)
                for b in bos:
                    after = eos[eos > b]
                    if after.size:
                        doc_index = list(bos).index(b) + (0 if row[0] == 2 else 1)
                        text = tok.decode(row[b + 1:after[0]])
                        assert text == corpus[meta["doc_ids"][doc_index]][0]
                        whole_docs += 1
        # The evaluator sets hold a few documents each, too few to be sure of a whole one in a chunk.
        assert whole_docs > 0 or name.endswith("/evaluator"), name
    # Every token of every document is in a chunk, except the dropped tail of each (unit, domain).
    stored = sum(e.num_samples for e in m.sets.values()) * 32
    assert stored + m.info["tokens_dropped"] == total_tokens
    # Per set and domain: documents, and tokens before chunking (without BOS/EOS), as inspect.py shows them.
    for name in m.sets:
        stem = m.root / "corpus" / sets.file_stem(name)
        ids = [json.loads(x)["id"] for x in stem.with_suffix(".jsonl").read_text().splitlines()]
        assert m.info["domain_documents"][name] == dict(Counter(corpus[i][1] for i in ids))
        assert m.info["tokens"][name] == {d: sum(len(t) for i, t in zip(ids, tok.encode([corpus[i][0] for i in ids]))
                                                 if corpus[i][1] == d) for d in m.sets[name].domains}
    assert sum(n for by in m.info["tokens"].values() for n in by.values()) + 2 * len(corpus) == total_tokens
    assert m.info["corpus_lines"] == {"file": str(corpus_file), "lines": 150, "skipped": 0, "reasons": {}}
    assert m.info["tokens_dropped"] < 32 * sum(len(p["units"]) * 2 for p in json.loads(
        (m.root / "plan.json").read_text())["sets"].values())
    # Splits are disjoint (t: 10 test, 5 evaluator, 35 training documents); overlap moved
    # round(0.2 * 35) = 7 target documents into the source.
    trained = set_ids["t/train"] | set_ids["source/train"]
    assert not set_ids["t/test"] & trained and not set_ids["t/evaluator"] & (trained | set_ids["t/test"])
    assert not set_ids["source/evaluator"] & (trained | set_ids["source/test"])
    assert len(set_ids["t/test"]) == 10 and len(set_ids["t/evaluator"]) == 5
    assert sum(corpus[i][1] == "t" for i in set_ids["source/train"]) == 7 and len(set_ids["t/train"]) == 28
    assert m.sets["source/train"].domains.keys() == {"a", "b", "t"}


def _build_cli(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "shards" / "build.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=kw.get("cwd", REPO), timeout=300)


def _shard_digests(manifest):
    return {name: [(s.name, s.samples, s.sha256) for s in e.shards] for name, e in manifest.sets.items()}


def test_shards_do_not_depend_on_the_number_of_build_workers(tmp_path, configs_dir, corpus_file):
    one = prepare_data(_text_cfg(configs_dir, corpus_file), tmp_path / "one")
    three = prepare_data(_text_cfg(configs_dir, corpus_file, "shards.build_workers=3"), tmp_path / "three")
    # The job-array path: prepare, two slices as separate processes, finalize.
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(_text_cfg(configs_dir, corpus_file).to_yaml())
    for step in (["--prepare"], ["--slice", 1, "--num-slices", 2], ["--slice", 0, "--num-slices", 2], ["--finalize"]):
        res = _build_cli("--config", cfg_file, "--run-dir", tmp_path / "array", *step)
        assert res.returncode == 0, res.stderr
    array = Manifest.load(tmp_path / "array" / "data")
    assert sum(len(e.shards) for e in one.sets.values()) > 10
    assert _shard_digests(one) == _shard_digests(three) == _shard_digests(array)
    strip = lambda m: {k: v for k, v in m.to_dict().items() if k != "data_hash"}  # noqa: E731
    assert strip(one) == strip(three) == strip(array)


def test_up_to_date_build_is_reused_and_config_changes_need_rebuild(tmp_path, configs_dir, corpus_file):
    cfg = _markov_cfg(configs_dir)
    first = prepare_data(cfg, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in first.root.rglob("*") if p.is_file()}
    assert prepare_data(cfg, tmp_path) == first
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*") if p.is_file()} == stamps
    changed = _markov_cfg(configs_dir, "shards.samples_per_shard=50")
    with pytest.raises(BuildError, match="another data/tokenizer/shards config.*--rebuild"):
        prepare_data(changed, tmp_path)
    rebuilt = prepare_data(changed, tmp_path, rebuild=True)
    assert rebuilt.data_hash == data_hash(changed) and len(rebuilt.sets["source/train"].shards) == 40
    assert sorted(p.name for p in rebuilt.root.glob("*.tar")) == sorted(
        s.name for e in rebuilt.sets.values() for s in e.shards)  # the old build's shards are gone


def test_a_fraction_with_no_target_samples_is_an_error(tmp_path, configs_dir, corpus_file):
    with pytest.raises(ManifestError, match=r"target 'sticky' at fraction 0\.01 keeps round\(0\.01 \* 40\) = 0 "
                                            r"of its N=40 training samples \(n_T = 0: .*\); raise 0\.01 in "
                                            r"data\.target_fractions \(to at least 0\.025\), drop it, or add "
                                            r"target data"):
        prepare_data(_markov_cfg(configs_dir, "data.markov.num_target=40", "data.target_fractions=[1.0, 0.01]"),
                     tmp_path / "m")
    with pytest.raises(ManifestError, match=r"target 't' at fraction 0\.001 keeps .* = 0 of its N="):
        prepare_data(_text_cfg(configs_dir, corpus_file, "data.target_fractions=[1.0, 0.001]"), tmp_path / "t")
    assert not (tmp_path / "t" / "data" / "manifest.json").exists()


def test_a_fraction_the_holdout_leaves_without_training_data_is_an_error(tmp_path, configs_dir, corpus_file):
    m = prepare_data(_text_cfg(configs_dir, corpus_file), tmp_path)
    assert m.sets["t/train"].fractions == {"1": 30, "0.5": 15, "0.1": 3}
    # The protocol is no part of the data hash: the same build, now checked with holdout_min=3.
    with pytest.raises(ConfigError, match=re.escape(
            f"{m.path}: target 't' at fraction 0.1 has n_T = round(0.1 * 30) = 3 training sequences and "
            f"protocol.selection=holdout holds out 3 of them (max(protocol.holdout_min=3, "
            f"round(protocol.holdout_fraction=0.2 * 3))), which leaves none to train on. Fix: raise 0.1 in "
            f"data.target_fractions to at least 0.14 (n_T >= 4; then rebuild the data with --rebuild), or "
            f"lower protocol.holdout_min, or set protocol.selection=budget")):
        prepare_data(_text_cfg(configs_dir, corpus_file, "protocol.holdout_min=3"), tmp_path)
    with pytest.raises(ConfigError, match=r"fraction 1\.0 has n_T = round\(1\.0 \* 30\) = 30 .* holds out 30 .* "
                                          r"Fix: add target data \(even fraction 1 has only N = 30\)"):
        prepare_data(_text_cfg(configs_dir, corpus_file, "protocol.holdout_min=30"), tmp_path)
    assert prepare_data(_text_cfg(configs_dir, corpus_file, "protocol.holdout_min=3", "protocol.selection=budget"),
                        tmp_path) == m


@pytest.mark.resume
def test_killed_build_leaves_no_partial_shard_and_resumes_without_rewriting(tmp_path, configs_dir):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(_markov_cfg(configs_dir, "shards.samples_per_shard=2", "data.markov.num_source=600",
                                    "data.markov.num_test=50").to_yaml())  # ~475 one-shard units
    root = tmp_path / "run" / "data"
    proc = subprocess.Popen([sys.executable, str(REPO / "shards" / "build.py"), "--config", str(cfg_file),
                             "--run-dir", str(tmp_path / "run")], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((root / "parts").glob("*.tar"))) < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "manifest.json").exists()
    finished = {}
    for path in root.rglob("*.tar"):
        with tarfile.open(path) as tar:  # a truncated tar fails to list
            members = tar.getmembers()
        assert len(members) == 2 * 2 and all(m.size > 0 for m in members)
        finished[path.stat().st_ino] = path.stat().st_mtime_ns
    assert len(finished) >= 30

    res = _build_cli("--config", cfg_file, "--run-dir", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    m = Manifest.load(root)
    m.verify()
    final = {(root / s.name).stat().st_ino: (root / s.name).stat().st_mtime_ns
             for e in m.sets.values() for s in e.shards}
    assert all(final.get(ino) == mtime for ino, mtime in finished.items())  # same file, never rewritten
    assert not list(root.rglob("*.tmp"))


def test_inspect_cli_verifies_and_decodes(tmp_path, configs_dir, corpus_file):
    # The corpus with two malformed lines (151, 152), skipped and reported.
    with_bad = tmp_path / "corpus.jsonl"
    with_bad.write_text(corpus_file.read_text() + '{"text": "cut\n{"domain": "t"}\n')
    cfg = _text_cfg(configs_dir, with_bad, "data.overlap=0.0")
    m = prepare_data(cfg, tmp_path)
    # No overlap: the tokenizer saw only source text, so a frequent target-only word is no piece.
    tok = Tokenizer(m.tokenizer_path)
    assert tok.sp.piece_to_id("▁alpha") != tok.unk_id and tok.sp.piece_to_id("▁zyxwvu") == tok.unk_id
    script = [sys.executable, str(REPO / "shards" / "inspect.py")]
    ok = subprocess.run(script + [str(m.root), "--samples", "1"], capture_output=True, text=True, timeout=120)
    n = sum(len(e.shards) for e in m.sets.values())
    assert ok.returncode == 0, ok.stderr
    assert f"sha256: {n}/{n} shards OK" in ok.stdout and "[t/train #0 t]" in ok.stdout
    assert any(w in ok.stdout for w in VOCAB["t"])  # decoded text
    # Per domain and set: documents (a 70/20/10 train/test/evaluator split), tokens before
    # chunking, sequences.
    docs = {("a", "source/train"): 42, ("a", "source/test"): 12, ("a", "source/evaluator"): 6,
            ("b", "source/train"): 28, ("b", "source/test"): 8, ("b", "source/evaluator"): 4,
            ("t", "t/train"): 35, ("t", "t/test"): 10, ("t", "t/evaluator"): 5}
    rows = re.findall(r"^  (\S+) +(\S+/\S+) +(\d+) +(\d+) +(\d+)$", ok.stdout, re.M)
    assert rows == [(d, name, str(docs[d, name]), str(m.info["tokens"][name][d]), str(m.sets[name].domains[d]))
                    for d, name in docs]
    fractions = m.sets["t/train"].fractions
    assert (f"  t                1 -> n_T {fractions['1']}, 0.5 -> n_T {fractions['0.5']}, 0.1 -> n_T "
            f"{fractions['0.1']}\n") in ok.stdout
    assert (f"corpus lines of {with_bad}: skipped 2 of 152 lines: 1 not JSON (line 151); 1 key 'text' missing "
            f"(line 152)\n") in ok.stdout
    # With the run's config: each fraction's training and held-out sequences; none left is flagged (exit 1).
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(cfg.to_yaml())
    held = fractions["0.1"]
    checked = subprocess.run(script + [str(m.root), "--samples", "0", "--no-verify", "--config", str(cfg_file),
                                       "--set", f"protocol.holdout_min={held}"],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1, checked.stderr
    assert re.search(rf"t +0\.5  n_T +{fractions['0.5']} = +{fractions['0.5'] - held} train \+ +{held} held out "
                     rf"\(protocol\.selection=holdout\)\n", checked.stdout)
    assert re.search(rf"t +0\.1  n_T +{held} = +0 train \+ +{held} held out \(protocol\.selection=holdout\)  NO "
                     rf"TRAINING SEQUENCE", checked.stdout)
    victim = m.root / m.sets["t/train"].shards[1].name
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = subprocess.run(script + [str(m.root), "--samples", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and f"BAD {victim}: sha256" in bad.stdout
    for cli in ("build.py", "inspect.py"):
        res = subprocess.run([sys.executable, str(REPO / "shards" / cli), "--help"], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage: python shards/" in res.stdout and "manifest" in res.stdout


def test_bad_corpus_path_fails_before_anything_is_built(tmp_path, configs_dir):
    cfg = load_config(configs_dir / "tiny.yaml", ["data.corpus=jsonl", f"data.path={tmp_path / 'none.jsonl'}",
                                                  "data.source_domains=[a]", "data.target_domains=[b]"])
    with pytest.raises(ValueError, match=r"data\.path: \S*none\.jsonl does not exist"):
        prepare_data(cfg, tmp_path)
    assert not (tmp_path / "data" / "plan.json").exists()


def test_build_steps_out_of_order_are_clear_errors(tmp_path, configs_dir):
    from gtl_dist.data.build import finalize, prepare, run_slice
    root = tmp_path / "data"
    with pytest.raises(BuildError, match="plan.json: not prepared yet; run .*--prepare"):
        run_slice(root, 0, 2)
    prepare(_markov_cfg(configs_dir), root)
    with pytest.raises(BuildError, match=r"--slice 2 is outside 0\.\.1"):
        run_slice(root, 2, 2)
    run_slice(root, 1, 2)
    with pytest.raises(BuildError, match=r"build unit\(s\) not finished \(source-train-u00000"):
        finalize(root)
    run_slice(root, 0, 2)
    assert finalize(root).num_samples("sticky/train") == 200


def _flip_byte(path: Path, offset: int = 700) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["markov", "text"])
def test_rerun_rebuilds_exactly_the_damaged_shards(tmp_path, configs_dir, corpus_file, caplog, kind):
    cfg = _markov_cfg(configs_dir) if kind == "markov" else _text_cfg(configs_dir, corpus_file)
    m = prepare_data(cfg, tmp_path)
    flipped = m.root / m.sets["source/train"].shards[1].name
    truncated = m.root / m.sets[m.targets[0] + "/train"].shards[-1].name
    _flip_byte(flipped)
    truncated.write_bytes(truncated.read_bytes()[:-512])
    stamps = {p: p.stat().st_mtime_ns for p in m.root.glob("*.tar") if p not in (flipped, truncated)}
    with caplog.at_level("WARNING", logger="gtl_dist.data.build"):
        again = prepare_data(cfg, tmp_path)
    assert again == m
    again.verify()  # both rebuilt, byte for byte as the manifest records them
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing else rewritten
    assert f"{flipped}: sha256" in caplog.text and "(corrupted); rebuilding it from build unit" in caplog.text
    assert f"{truncated}: " in caplog.text and "(truncated or replaced)" in caplog.text
    assert not list(m.root.rglob("*.tmp")) and not (m.root / "parts").exists()


def test_build_cli_repairs_a_damaged_shard_that_later_stages_name_the_command_for(tmp_path, configs_dir):
    from gtl_dist.data import load_run_manifest
    from gtl_dist.data.shards import ShardError
    run = tmp_path / "run"
    run.mkdir()
    cfg_file = run / "config.yaml"  # the run's own config, as launchers/submit.py writes it
    cfg_file.write_text(_markov_cfg(configs_dir).to_yaml())
    assert _build_cli("--config", cfg_file, "--run-dir", run).returncode == 0
    m = load_run_manifest(load_config(cfg_file), run)
    victim = m.root / m.sets["sticky/test"].shards[0].name
    _flip_byte(victim, 300)
    command = f"python shards/build.py --config {cfg_file} --run-dir {run}"
    with pytest.raises(ShardError, match=rf"{victim}: sha256 .*\(corrupted\); rebuild the data .*: {command}$"):
        m.verify()
    res = _build_cli(*command.split()[2:])  # the command, with this interpreter
    assert res.returncode == 0, res.stderr
    assert f"{victim}: sha256" in res.stderr and "rebuilding it from build unit sticky-test-u00000" in res.stderr
    m.verify()


def test_a_damaged_shard_of_a_manifest_without_units_names_the_rebuild_command(tmp_path, configs_dir):
    cfg = _markov_cfg(configs_dir)
    m = prepare_data(cfg, tmp_path)
    raw = json.loads(m.path.read_text())
    for entry in raw["sets"].values():
        for shard in entry["shards"]:
            del shard["unit"], shard["part"]
    m.path.write_text(json.dumps(raw))
    (m.root / m.sets["source/test"].shards[0].name).unlink()
    with pytest.raises(BuildError, match=r"source-test-000000\.tar: shard listed in the manifest is missing; "
                                         r".*cannot be rebuilt alone: rebuild all with python shards/build.py "
                                         r"--config <config> --run-dir <run_dir> --rebuild"):
        prepare_data(cfg, tmp_path)
