#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU: the GPU tests, then the benchmark.
# Needs the fixtures in $RWKVPY_FIXTURES (default ../shared/fixtures) and writes logs to $OUT
# (default ./gpu-out). Optional: wheels in .whl/ (BlinkDL's rwkv package, for the comparison).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -s -rs -p no:cacheprovider tests/test_gpu.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "on GPU vs|F32 .*F16|passed|failed|Error|assert" "$OUT/tests.log" | tail -40
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu.py --out "$OUT/bench.json" "$@" \
  2> "$OUT/bench.err"
echo "bench rc=$?"; tail -15 "$OUT/bench.err"
