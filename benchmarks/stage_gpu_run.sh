#!/usr/bin/env bash
# Stage what a GPU machine without network needs for benchmarks/gpu_check.sh, in ignored folders
# of this checkout (at most 64 MiB travel with one call, the checkout and what `carry` names together):
#   bash benchmarks/stage_gpu_run.sh wheels     .whl/: array-api-compat and array-api-strict for CPython 3.12
#   bash benchmarks/stage_gpu_run.sh cifar K    .carry/cifarK/: piece K of CIFAR-10 (1: batches 1-3, 2: batches
#                                               4-5, the test batch and batches.meta), each file compressed with a
#                                               delta filter and LZMA2 (xz), ~59 MiB a piece
# Stage both pieces before the GPU machine starts (each takes minutes to compress, and a machine left idle
# for ~30 s is released). Call 1 then carries [".whl", ".carry/cifar1"] and call 2 [".whl", ".carry/cifar2"];
# gpu_check.sh unpacks whatever piece came into /tmp/cifar, which lasts while the machine stays up, so
# after call 2 it holds the whole data set. Each `cifar K` prints what one call would carry in all.
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
            1) files="data_batch_1 data_batch_2 data_batch_3" ;;
            2) files="data_batch_4 data_batch_5 test_batch batches.meta" ;;
            *) echo "usage: $0 cifar 1|2" >&2; exit 2 ;;
        esac
        dest=".carry/cifar$2"
        rm -rf "$dest" && mkdir -p "$dest"
        for f in $files; do
            # pixels sit in rows of 32 bytes: differences of neighbours compress to about two thirds
            xz --delta=dist=1 --lzma2=preset=9 -T2 -c "$source/$f" > "$dest/$f.xz"
        done
        # what one call carries: the tracked and untracked-unignored files, the wheels, this piece
        tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null \
            | awk '$2 == "total" {s += $1} END {print s + 0}')
        carried=("$dest") && [ -d .whl ] && carried+=(.whl)
        extra=$(du -cb "${carried[@]}" | awk '$2 == "total" {print $1}')
        total=$((tree + extra))
        echo "one call carries $((total / 1048576)) MiB of 64 ($dest, .whl and the checkout)"
        [ "$total" -le $((63 * 1048576)) ] || { echo "too close to the 64 MiB a call may carry" >&2; exit 1; }
        ;;
    *)
        echo "usage: $0 wheels | cifar 1|2" >&2
        exit 2
        ;;
esac
