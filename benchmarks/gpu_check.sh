#!/usr/bin/env bash
# One GPU session's checks: the fused-kernel and graph tests, the benchmark (FC steps, conv
# rows in fp32 and TF32, the ThreeLayerConvNet step), the time to accuracy with its
# breakdown, and the fast CIFAR-10 recipe against PyTorch's (full data set only); results under $OUT. Expects wheels for the pure-Python packages the machine
# lacks in .whl/ (array-api-compat, array-api-strict; optuna and dask for sweeps) and, for
# the time to accuracy, CIFAR-10 as .carry/cifar_subset.npz or the batches under /tmp/cifar
# (carried two files per call, see the brief).
# benchmarks/stage_gpu_run.sh stages both (wheels; CIFAR-10 in three pieces of ~62 MB).
#   bash benchmarks/gpu_check.sh          (OUT defaults to ./gpu-out; SKIP_SUITE=1 skips the whole-suite run)
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

echo "== fused kernels, CUDA graphs (schedules, groups), TF32, conv on CuPy against NumPy"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -15

echo "== benchmark: fully connected steps, conv2d fp32 and TF32 (im2col + cuBLAS, and cuDNN) against PyTorch, ThreeLayerConvNet"
timeout 300 python3 scripts/bench.py --backend cupy --suite all --repeats 5 --json "$OUT/bench_gpu.json" \
    2>&1 | tee "$OUT/bench.log" | tail -40

echo "== time to accuracy, with the breakdown"
data=()
[ -f .carry/cifar_subset.npz ] && data=(--cifar-npz .carry/cifar_subset.npz --target "${TARGET:-0.47}")
[ -f /tmp/cifar/data_batch_5 ] && [ -f /tmp/cifar/test_batch ] && data=(--data-dir /tmp/cifar --target 0.5)
if [ ${#data[@]} -gt 0 ]; then
    timeout 240 python3 scripts/bench.py --backend cupy --suite none --time-to-accuracy --breakdown "${data[@]}" \
        --json "$OUT/tta_gpu.json" 2>&1 | tee "$OUT/tta.log" | tail -12
fi

if [ -f /tmp/cifar/data_batch_5 ] && [ -f /tmp/cifar/test_batch ]; then
    echo "== fast94: xpnet against PyTorch (fp32, then PyTorch fp16 channels-last beside), ${RUNS:-5} runs"
    timeout "${RECIPE_TIMEOUT:-300}" python3 scripts/bench.py --backend cupy --recipe fast94 --runs "${RUNS:-5}" \
        --data-dir /tmp/cifar --json "$OUT/fast94_gpu.json" 2>&1 | tee "$OUT/fast94.log" | tail -14
fi

if [ -z "${SKIP_SUITE:-}" ]; then
    echo "== the whole suite on CuPy"
    XPNET_TEST_BACKENDS=cupy timeout "${SUITE_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests \
        -m "not slow" 2>&1 | tee "$OUT/suite_cupy.log" | tail -15
fi

echo "== the issues' GPU targets"
python3 benchmarks/done_when.py "$OUT"/bench_gpu.json "$OUT"/tta_gpu.json "$OUT"/fast94_gpu.json 2>&1 | tee "$OUT/done_when.txt"
