#!/usr/bin/env bash
# One prepared GPU check (run on the lent GPU machine, or any machine with an NVIDIA GPU):
#   1. build cnpose_trt._C with CUDA (for this GPU's architecture),
#   2. run the CUDA tests (decode, crop, torch CUDA engine, the device-resident pipeline) and the
#      protocol tests (TensorRT tests too where TensorRT exists),
#   3. the end-to-end GPU curve against the engine alone (benchmarks/gpu_e2e.py), run twice, and
#      the host side of that path alone (benchmarks/host_ceiling.py, no GPU work),
#   4. the GPU kernel benchmarks (decode, crop-and-normalise), then a short compute-sanitizer pass.
# Every step has a time limit inside BUDGET seconds (default 330), so the script ends in time.
# Test, e2e and kernel logs and JSON results go to $OUT (or ./gpu_check_out): 7 files.
# Usage: bash benchmarks/gpu_check.sh [--quick]   (--quick: build and tests only; SKIP_KERNELS=1 skips step 4's benchmarks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOGS="$(mktemp -d)"  # logs only read here (the device tool brings back at most 8 files from $OUT)
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BUDGET="${BUDGET:-330}"
T0=$(date +%s)
status=0
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
limit() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
nvcc --version | tail -1
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nproc; date -u +"date %Y-%m-%dT%H:%M:%SZ"

echo "== build (CUDA forced on)"
ARCH="${CNPOSE_TRT_CUDA_ARCH:-$($PY -c "import torch; a,b=torch.cuda.get_device_capability(); print(f'{a}{b}')")}"
CNPOSE_TRT_CUDA=1 CNPOSE_TRT_CUDA_ARCH="$ARCH" timeout "$(limit 150)" $PY setup.py -q build_ext --inplace --force \
  > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; echo "BUILD FAILED"; exit 1; }
grep "cnpose_trt build" "$LOGS/build.log"
$PY -c "from cnpose_trt import _C; print('built_with_cuda', _C.built_with_cuda, 'devices', _C.cuda_device_count(), 'cpu isa', _C.cpu_isa())"
echo "   ($(( $(date +%s) - T0 )) s)"

echo "== tests: CUDA decode and crop, torch CUDA engine and the device pipeline, protocol (TensorRT where present)"
TESTS="tests/test_decode_cuda.py tests/test_crop_cuda.py tests/test_torch_cuda.py tests/test_protocol.py"
ls tests/test_tensorrt*.py >/dev/null 2>&1 && TESTS="$TESTS $(ls tests/test_tensorrt*.py)"
timeout "$(limit 150)" $PY -m pytest -q -p no:cacheprovider -rs --durations=5 $TESTS > "$OUT/tests.log" 2>&1
rc=$?
tail -20 "$OUT/tests.log"
[ $rc -eq 0 ] || status=1
echo "   ($(( $(date +%s) - T0 )) s)"
[ "${1:-}" = "--quick" ] && { echo "== done (status $status)"; exit $status; }

for run in 1 2; do
  echo "== end to end vs engine only, run $run (torch fp16 + CUDA graphs)"
  timeout "$(limit 120)" $PY benchmarks/gpu_e2e.py --json "$OUT/gpu-e2e-run$run.json" >> "$OUT/e2e.log" 2>&1 \
    || { status=1; tail -25 "$OUT/e2e.log"; }
  tail -11 "$OUT/e2e.log"
  echo "   ($(( $(date +%s) - T0 )) s)"
done

echo "== host side of the GPU path alone (the engine call enqueues nothing): the ceiling for e2e"
timeout "$(limit 40)" $PY benchmarks/host_ceiling.py --threads 8 --batches 20 --json "$OUT/host-ceiling.json" \
    > "$LOGS/host-ceiling.log" 2>&1 || status=1
tail -2 "$LOGS/host-ceiling.log"
timeout "$(limit 30)" $PY benchmarks/host_ceiling.py --threads 8 --batches 20 --no-copy > "$LOGS/host-nocopy.log" 2>&1 \
    && { echo "   without the pixel copies (the Python share alone):"; tail -2 "$LOGS/host-nocopy.log"; }

if [ -z "${SKIP_KERNELS:-}" ]; then
echo "== GPU kernel benchmarks (decode fused vs torch reference; crop fused CUDA vs cv2 + NumPy + upload)"
timeout "$(limit 90)" $PY -m pytest -q -p no:cacheprovider benchmarks/test_decode.py benchmarks/test_preprocess.py -k cuda \
    --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-json "$OUT/kernels-gpu.json" \
    > "$OUT/kernels.log" 2>&1 || status=1
sed -n '/cnpose_trt benchmark summary/,/^$/p' "$OUT/kernels.log" | grep -v "^-" | head -20
echo "   ($(( $(date +%s) - T0 )) s)"
fi

if command -v compute-sanitizer >/dev/null && [ "$(left)" -gt 30 ]; then
  echo "== compute-sanitizer memcheck (small CUDA cases)"
  timeout "$(limit 60)" compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider \
      tests/test_decode_cuda.py tests/test_crop_cuda.py \
      -k "misaligned or hot_voxel or raw_pointer or fused_post or random_maps or bad_device or photo_sized" \
      > "$LOGS/memcheck.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$LOGS/memcheck.log" | tail -3
  [ $rc -eq 0 ] || [ $rc -eq 124 ] || { echo "memcheck rc=$rc"; status=1; }
fi
echo "== done (status $status, $(( $(date +%s) - T0 )) s); results in $OUT"
exit $status
