"""gtl_dist/compat.py: the private calls into submitit and torch, pinned to the versions they were
checked against, and each one exercised."""

import torch
from torch.utils.data import DataLoader, IterableDataset

from gtl_dist import compat


def test_the_installed_libraries_are_the_versions_compat_was_checked_against():
    mismatches = compat.version_mismatches()
    assert not mismatches, (
        f"gtl_dist/compat.py reaches into private parts of these libraries and was checked against "
        f"other versions: {'; '.join(mismatches)}. Check each function of gtl_dist/compat.py against "
        f"the installed version (this file's other tests exercise them), then update "
        f"compat.TESTED_VERSIONS (and submitit's pin in pyproject.toml)")


def test_sbatch_script_renders_what_submitit_would_submit(tmp_path):
    script = compat.sbatch_script("python -u -m submitit.core._submit /x", tmp_path / "%j", nodes=2,
                                  ntasks_per_node=4, time=30, job_name="gtl-test",
                                  additional_parameters={"kill-on-invalid-dep": "yes"})
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --time=30",
                 "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --job-name=gtl-test"):
        assert line in script
    assert "python -u -m submitit.core._submit /x" in script


class _Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)


def test_dataloader_workers_are_found_and_shut_down():
    iterator = iter(DataLoader(_Endless(), batch_size=None, num_workers=2))
    next(iterator)
    workers = compat.dataloader_workers(iterator)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    compat.shut_down_dataloader_workers(iterator)
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)


def test_slurm_hostnames_expands_a_hostlist():
    assert compat.slurm_hostnames("gpu[007-009,012],cpu1") == ["gpu007", "gpu008", "gpu009", "gpu012", "cpu1"]
    assert compat.slurm_hostnames("rack[2-3]-node[05-06]")[:2] == ["rack2-node05", "rack2-node06"]
