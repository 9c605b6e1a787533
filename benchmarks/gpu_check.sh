#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (no network there): the CUDA tests, the device tests and
# the GPU benchmark, everything written under $OUT. `bash benchmarks/gpu_wheels.sh` first builds
# benchmarks/wheels/ (optuna and the rest the tests import; torch, triton and transformers are on the
# machine already): carry that folder. Record the figures in benchmarks/RESULTS.md with the device named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps benchmarks/wheels/*.whl
fi
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
TRITON_INTERPRET=0 PYTHONPATH=. timeout 300 python -m pytest -q -p no:cacheprovider \
    tests/test_ops_cuda.py tests/test_devices.py tests/test_compiled_graph.py 2>&1 | tail -30 > "$OUT/cuda_tests.txt"
PYTHONPATH=. timeout 480 python benchmarks/bench_gpu_models.py --quick --csv "$OUT/gpu_models.csv" \
    > "$OUT/gpu_models.txt" 2>&1
tail -40 "$OUT/cuda_tests.txt" "$OUT/gpu_models.txt"
