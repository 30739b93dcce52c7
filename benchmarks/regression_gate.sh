#!/usr/bin/env bash
# Benchmark regression gate (pytest-benchmark's --benchmark-save / --benchmark-compare-fail).
#   bash benchmarks/regression_gate.sh save    # measure the gate's subset, save it as the baseline
#   bash benchmarks/regression_gate.sh check   # measure again; fail if a median regressed > $THRESHOLD
#   bash benchmarks/regression_gate.sh demo    # save, then check with an injected slowdown: must fail
# The subset: XS end to end and engine only at batch 1, preprocessing, CPU decode of 2UP heatmaps.
# Baselines live in .benchmarks/ (ignored by git); compare on the same machine only.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
THRESHOLD="${THRESHOLD:-30%}"
SUBSET=(benchmarks/test_pipeline.py benchmarks/test_decode.py
        -k "(XS-1-onnxruntime-fp32 or XS-1] or preprocess) or (cpu and 2UP)")
export CNPOSE_BENCH_VARIANTS=XS CNPOSE_BENCH_BATCHES=1 CNPOSE_BENCH_HEADS=2UP-D32 CNPOSE_BENCH_ROUNDS="${ROUNDS:-5}"
run() { "$PY" -m pytest -q -p no:cacheprovider "${SUBSET[@]}" --benchmark-only --benchmark-storage=file://.benchmarks "$@"; }

case "${1:-check}" in
  save)  run --benchmark-save=baseline ;;
  check) run --benchmark-compare --benchmark-compare-fail="median:$THRESHOLD" ;;
  demo)
    run --benchmark-save=baseline > /tmp/cnpose_gate_save.log 2>&1 || { tail -20 /tmp/cnpose_gate_save.log; exit 1; }
    echo "baseline saved; checking again with CNPOSE_BENCH_SLOWDOWN_MS=${SLOWDOWN_MS:-40} injected"
    CNPOSE_BENCH_SLOWDOWN_MS="${SLOWDOWN_MS:-40}" run --benchmark-compare \
      --benchmark-compare-fail="median:$THRESHOLD" > /tmp/cnpose_gate_check.log 2>&1
    rc=$?
    grep -E "Performance has regressed|FAILED|regress" /tmp/cnpose_gate_check.log | head -8
    if [ $rc -ne 0 ] && grep -q "Performance has regressed" /tmp/cnpose_gate_check.log; then
      echo "regression gate: the injected slowdown was caught (exit $rc), as it must be"
    else
      echo "regression gate: the injected slowdown was NOT caught (exit $rc)"; exit 1
    fi ;;
  *) echo "usage: $0 save|check|demo"; exit 2 ;;
esac
