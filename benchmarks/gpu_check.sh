#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install what the CUDA path needs, run the tests that use
# CUDA and the engine benchmark for each precision built for CUDA, and print one table.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (default /tmp/gpu_check)
#
# onnxruntime-gpu 1.31.1 (CUDA 13) comes from, in this order: an already installed build
# that offers CUDAExecutionProvider; the parts of its unpacked wheel in $ORT_PARTS
# (ort.part*, an xz tar, for a machine with no network: see README "GPU"); pip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/gpu_site}
ORT_PARTS=${ORT_PARTS:-.gl}
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE:$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

has_cuda_ort() {
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || exit 1
"$PY" --version

echo "== install"
if ! has_cuda_ort; then
  if ls "$ORT_PARTS"/ort.part* >/dev/null 2>&1; then
    cat "$ORT_PARTS"/ort.part* | xz -d | tar -x -C "$SITE" || exit 1
  else
    "$PY" -m pip install -q --target "$SITE" onnxruntime-gpu==1.31.1 || exit 1
  fi
fi
if ! "$PY" -c "import gguf" 2>/dev/null; then
  wheel=$(ls "$ORT_PARTS"/gguf-*.whl 2>/dev/null | head -n 1)
  "$PY" -m pip install -q --no-deps --target "$SITE" ${wheel:-gguf==0.19.0} || exit 1
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
has_cuda_ort || { echo "onnxruntime offers no CUDA provider"; exit 1; }

echo "== tests that use CUDA"
"$PY" -m pytest -q -p no:cacheprovider --noconftest -o addopts="-ra" tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark"
# Three layouts (concat, device slots, slots with CUDA graphs) x three models fit the 8 minutes
# with one repeat; each row is printed as soon as it is measured.
"$PY" benchmarks/gpu_bench.py --device cuda --profile --repeats 1 --out "$OUT/gpu_bench.json" \
  ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "== tests exit code: $tests_rc"
exit "$tests_rc"
