"""Atomic writes: outputs get the permissions the process umask gives, so colleagues can read them."""

import os
import stat

import pytest

from gtl_dist.config import load_config
from gtl_dist.data import prepare_data
from gtl_dist.io import atomic_dir, atomic_path, atomic_write_json


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"b")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.bin") == 0o666 & ~umask
    (tmp_path / "report").mkdir()
    with atomic_dir(tmp_path / "report") as fresh:  # replaces an existing folder
        (fresh / "report.md").write_text("ok")
    assert mode(tmp_path / "report") == 0o777 & ~umask
    assert (tmp_path / "report" / "report.md").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "report"]  # no temporaries left


def test_every_file_and_folder_of_a_data_build_follows_the_umask(tmp_path, configs_dir, umask):
    m = prepare_data(load_config(configs_dir / "tiny.yaml", ["shards.build_workers=1"]), tmp_path)
    wrong = {str(p): oct(mode(p)) for p in m.root.rglob("*")
             if mode(p) != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert list(m.root.rglob("*.tar")) and wrong == {}
