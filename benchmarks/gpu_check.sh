#!/usr/bin/env bash
# One GPU session's checks: the CuPy test suite and the benchmark, results under $OUT.
# Expects wheels for the pure-Python packages the machine lacks in .whl/ and,
# for the time-to-accuracy figure, a CIFAR-10 subset in .carry/cifar_subset.npz.
#   bash benchmarks/gpu_check.sh          (OUT defaults to ./gpu-out)
set -u -o pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"

echo "== fused kernels, CUDA graphs, CuPy against NumPy"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"

echo "== benchmark"
npz=()
[ -f .carry/cifar_subset.npz ] && npz=(--time-to-accuracy --cifar-npz .carry/cifar_subset.npz --target "${TARGET:-0.47}")
timeout 300 python3 scripts/bench.py --backend cupy --json "$OUT/bench_gpu.json" "${npz[@]}" 2>&1 | tee "$OUT/bench.log"

echo "== the whole suite on CuPy"
XPNET_TEST_BACKENDS=cupy timeout "${SUITE_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests \
    2>&1 | tee "$OUT/suite_cupy.log" | tail -15
