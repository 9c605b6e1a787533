#!/usr/bin/env bash
# Builds benchmarks/wheels/ for a lent GPU machine (Python 3.12, no network; torch, triton, numpy and
# transformers are there): fxsketch and the packages it needs that such a machine lacks, about 30 MB.
# Run it here, then carry the folder: run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels"]).
# numpy, scipy and scikit-learn are left out (torch brings numpy; the GPU checks do not run the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf benchmarks/wheels
mkdir -p benchmarks/wheels/deps
python -m pip wheel -q --no-deps -w benchmarks/wheels .
python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels/deps \
    optuna pandas networkx typer rich pytest hypothesis
rm -f benchmarks/wheels/deps/numpy-*.whl benchmarks/wheels/deps/scipy-*.whl benchmarks/wheels/deps/scikit_learn-*.whl
mv benchmarks/wheels/deps/*.whl benchmarks/wheels/
rmdir benchmarks/wheels/deps
du -sh benchmarks/wheels
