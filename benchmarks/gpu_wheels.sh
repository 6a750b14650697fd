#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (run here, where the package registries are
# reachable). The GPU machine runs Python 3.12 on x86-64 with PyTorch but without DeepSpeed,
# submitit or webdataset; benchmarks/gpu_suite.sh installs these wheels there before it runs.
#
#     bash benchmarks/gpu_wheels.sh          # ~1 min; needs a venv with torch (DeepSpeed's build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
# Versions pinned to what the tests here run with, so the GPU run uses the same code.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl submitit==1.5.4 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# DeepSpeed is published as a source archive only: build a pure-Python wheel against local torch.
"$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
ls -1 .whl
du -sh .whl
