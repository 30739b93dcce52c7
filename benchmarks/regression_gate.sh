#!/usr/bin/env bash
# Benchmark regression gate: the package's speed as ratios to references measured in the same run
# (benchmarks/regression_gate.py says how, and why not absolute timings).
#   bash benchmarks/regression_gate.sh save    # measure REPEATS blocks, store ratios and their spread
#   bash benchmarks/regression_gate.sh check   # measure again: a table, exit 1 if a pair regressed
#   bash benchmarks/regression_gate.sh demo    # save, then check with an injected slowdown: must fail
# Python: $PYTHON, else the project's .venv, else python3. Baselines live in .benchmarks/ (ignored by
# git) with the machine that measured them; check refuses a baseline from another machine.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if ! "$PY" -c "import cnpose_trt, onnxruntime" 2>/dev/null; then
  echo "regression gate: $PY cannot import cnpose_trt and onnxruntime: run README command 1, or set PYTHON"; exit 2
fi
exec "$PY" benchmarks/regression_gate.py "$@"
