#!/usr/bin/env bash
# One prepared GPU check (run on the lent GPU machine, or any machine with an NVIDIA GPU):
#   1. build cnpose_trt._C with CUDA (for this GPU's architecture),
#   2. run the CUDA tests and the compiled decode and crop tests (and TensorRT tests where TensorRT exists),
#   3. run the GPU benchmarks (decode, crop-and-normalise) and print the summary table.
#   4. measure the end-to-end throughput curve of the torch CUDA fp16 path (eager, CUDA graphs).
# Logs and JSON results go to $OUT (or ./gpu_check_out), at most 8 files.
# Usage: bash benchmarks/gpu_check.sh [--quick]   (--quick: build and tests only; SKIP_MEMCHECK=1 skips memcheck)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
nvcc --version | tail -1
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
date -u +"date %Y-%m-%dT%H:%M:%SZ"

echo "== build (CUDA forced on)"
ARCH="${CNPOSE_TRT_CUDA_ARCH:-$($PY -c "import torch; a,b=torch.cuda.get_device_capability(); print(f'{a}{b}')")}"
CNPOSE_TRT_CUDA=1 CNPOSE_TRT_CUDA_ARCH="$ARCH" $PY setup.py -q build_ext --inplace --force > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
grep "cnpose_trt build" "$OUT/build.log"
$PY -c "from cnpose_trt import _C; print('built_with_cuda', _C.built_with_cuda, 'devices', _C.cuda_device_count(), 'cpu isa', _C.cpu_isa())"

echo "== tests: CUDA decode and crop, compiled CPU decode and crop, TensorRT (skipped without TensorRT)"
TESTS="tests/test_decode_cuda.py tests/test_crop_cuda.py tests/test_torch_cuda.py tests/test_decode_compiled.py tests/test_decode.py tests/test_crop.py"
ls tests/test_tensorrt*.py >/dev/null 2>&1 && TESTS="$TESTS $(ls tests/test_tensorrt*.py)"
$PY -m pytest -q -p no:cacheprovider -rs $TESTS 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${1:-}" != "--quick" ] && [ -z "${SKIP_MEMCHECK:-}" ] && command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck (small CUDA cases)"
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider \
      tests/test_decode_cuda.py tests/test_crop_cuda.py \
      -k "misaligned or hot_voxel or raw_pointer or fused_post or random_maps or bad_device" > "$OUT/memcheck.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3
  [ $rc -eq 0 ] || { echo "memcheck rc=$rc"; status=1; }
fi

echo "== GPU benchmarks (decode at batch ${CNPOSE_BENCH_GPU_BATCH:-64}: fused vs torch reference vs D2D copy;"
echo "   crop-and-normalise of ${CNPOSE_BENCH_PEOPLE:-16} people: fused CUDA vs cv2 + NumPy + upload)"
$PY -m pytest -q -p no:cacheprovider benchmarks/test_decode.py benchmarks/test_preprocess.py -k cuda --benchmark-only \
    --benchmark-json "$OUT/kernels-gpu.json" 2>&1 | tee "$OUT/bench.log" \
    | sed -n '/cnpose_trt benchmark summary/,/^$/p' | grep -v "^-" | head -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${1:-}" != "--quick" ]; then
  echo "== end-to-end throughput curve: torch CUDA fp16 (eager and CUDA graphs), batch 1..64"
  for graphs in "" "--cuda-graphs"; do
    tag="${graphs:+graphs}"; tag="${tag:-eager}"
    plot=""; [ -n "$graphs" ] && plot="--plot $OUT/bench-torch-cuda-graphs.png"
    timeout 150 $PY -m cnpose_trt.cli bench --variant XS S M L --backend torch --precision fp16 \
        --batch 1 2 4 8 16 32 64 --iterations 5 --warmup 2 --engines "$OUT/engines" $graphs \
        --json "$OUT/bench-torch-cuda-$tag.json" $plot 2>> "$OUT/bench.log" | tee -a "$OUT/bench.log" \
      | grep -E "^(variant|XS|S |M |L )" || status=1
  done
  rm -rf "$OUT/engines"
fi

echo "== done (status $status); results in $OUT"
exit $status
