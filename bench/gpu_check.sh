#!/usr/bin/env bash
# On a GPU machine with no network, in one call: build the CUDA extension, benchmark (carry the
# liger-kernel and cut-cross-entropy wheels for bench/gpu_aux_head.py's peers, inf-cl for
# bench/gpu_similarity.py's), run the
# tests (CUDA included) and compute-sanitizer on the ops' CUDA tests. Each stage has a time
# limit so that one slow stage cannot cost the others; results are copied to $OUT as soon as
# they exist. Logs and results go to $OUT (default /tmp/llkern-gpu); commit bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llkern-gpu}
mkdir -p "$OUT"
export LLKERN_CUDA=1 LLKERN_STRICT=1 MAX_JOBS=${MAX_JOBS:-16} LLKERN_CUDA_ARCHS=${LLKERN_CUDA_ARCHS:-90a}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== build (LLKERN_CUDA_ARCHS=$LLKERN_CUDA_ARCHS)"
start=$(date +%s)
if ! timeout 300 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -c "import llkern; assert llkern.kernel_available('transport_penalty', 'cuda'), 'no CUDA kernels built'" || exit 1

echo "== benchmarks"
timeout 150 $PY bench/gpu_transport.py 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 150 $PY bench/gpu_aux_head.py 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 200 $PY bench/gpu_similarity.py 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 $PY bench/gpu_context.py 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 $PY bench/gpu_mean_kl.py 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 $PY bench/gpu_miracle_select.py 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# the MIRACLE round trip on the GPU: Mean-KL sampling and candidate selection through the Triton kernels
timeout 300 $PY -m llkern.compress_demo --out "$OUT/lenet.mira" --no-progress --device cuda \
  --json "$OUT/compress.json" 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# issue 6's memory table: ResNet-110, batch 1024, the allocator's peak beside the meter's (table + PNG)
timeout 300 $PY bench/memory_table.py --model resnet110 --batch 1024 --device cuda --ks 2 4 8 16 \
  --out "$OUT/memory-resnet110-cuda" 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp bench/results/results.jsonl "$OUT/results.jsonl" 2>/dev/null

echo "== tests (CPU and CUDA)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests -m "not slow" 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer memcheck on the CUDA op tests"
timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider -x \
  tests/test_transport.py tests/test_aux_head.py tests/test_similarity.py -k "cuda" 2>&1 | tee "$OUT/sanitizer.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider -x \
  tests/test_context.py tests/test_mean_kl.py tests/test_random.py tests/test_miracle_select.py 2>&1 | tee -a "$OUT/sanitizer.log" | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
