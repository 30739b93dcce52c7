#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the compiled CPU kernels (decode, crop).
# Builds cnpose_trt._C (CPU only) with -fsanitize=address,undefined in a scratch copy, then runs
# the compiled-decode and crop tests (random shapes/dtypes/maps, adversarial values, images over
# 2^31 bytes, refused threads, bad input) under it. The RLIMIT_AS subprocess test is left out:
# AddressSanitizer's shadow memory does not live under an address-space limit.
# Usage: bash tests/sanitize_cpu.sh [python]   (CI runs it; any report fails the run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
# Absolute, without resolving symlinks (a venv's python is a symlink to the base interpreter).
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp -r setup.py pyproject.toml README.md csrc cnpose_trt tests "$WORK"/
rm -f "$WORK"/cnpose_trt/_C*.so
cd "$WORK"
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
CNPOSE_TRT_CUDA=0 CFLAGS="$SAN" LDFLAGS="$SAN" "$PY" setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -30 build.log; exit 1; }
ASAN_LIB="$(gcc -print-file-name=libasan.so)"
UBSAN_LIB="$(gcc -print-file-name=libubsan.so)"
# Python itself leaks by design at exit: leak checking off, everything else fatal.
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The scratch build must be the one imported, not an installed copy.
"$PY" -c "import sys, cnpose_trt._C as c; assert c.__file__.startswith(sys.argv[1]), c.__file__; print('sanitized module:', c.__file__)" "$WORK"
"$PY" -m pytest -q -p no:cacheprovider tests/test_decode_compiled.py tests/test_crop.py \
  -k "not torch_cpu and not torch_heatmaps and not torch_io and not address_space_limit" 2>&1 | tail -3
echo "sanitize_cpu: no AddressSanitizer/UBSan reports"
