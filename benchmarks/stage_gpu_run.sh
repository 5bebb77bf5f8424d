#!/usr/bin/env bash
# Stage what a GPU machine without network needs for benchmarks/gpu_check.sh, in ignored folders
# of this checkout (at most 64 MiB travel with one call):
#   bash benchmarks/stage_gpu_run.sh wheels     .whl/: array-api-compat and array-api-strict for CPython 3.12
#   bash benchmarks/stage_gpu_run.sh cifar K    .carry/cifar/: piece K of CIFAR-10 (1: batches 1-2, 2: 3-4,
#                                               3: batch 5, the test batch and batches.meta), ~62 MB each
# On the GPU machine each call then starts with
#   mkdir -p /tmp/cifar && cp .carry/cifar/* /tmp/cifar/ &&
# so that after the third piece /tmp/cifar holds the whole data set (it lasts while the machine stays up),
# and runs one part set of gpu_check.sh: STEPS="tests bench", then STEPS=suite, then STEPS="tta recipe"
# (the full-data runs).
set -eu -o pipefail
cd "$(git rev-parse --show-toplevel)"
case "${1:-}" in
    wheels)
        rm -rf .whl && mkdir -p .whl
        for name in array-api-compat array-api-strict; do
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$name"
        done
        ls -l .whl
        ;;
    cifar)
        source="${XPNET_DATA_DIR:-../shared/datasets}/cifar-10-batches-py"
        [ -f "$source/data_batch_1" ] || { echo "no CIFAR-10 batches under $source (set XPNET_DATA_DIR)" >&2; exit 2; }
        case "${2:-}" in
            1) files="data_batch_1 data_batch_2" ;;
            2) files="data_batch_3 data_batch_4" ;;
            3) files="data_batch_5 test_batch batches.meta" ;;
            *) echo "usage: $0 cifar 1|2|3" >&2; exit 2 ;;
        esac
        rm -rf .carry/cifar && mkdir -p .carry/cifar
        for f in $files; do cp "$source/$f" .carry/cifar/; done
        du -sh .carry/cifar
        ;;
    *)
        echo "usage: $0 wheels | cifar 1|2|3" >&2
        exit 2
        ;;
esac
