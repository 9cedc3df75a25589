#!/usr/bin/env bash
# On a GPU machine with no network: build the CUDA extension, benchmark, run the tests and
# compute-sanitizer. The device tool allows 10 minutes a call, so the work comes in stages, each
# under that limit and each with its own time limits inside (one slow step cannot cost the others):
#
#   bash bench/gpu_check.sh verify       # build (or reuse a carried build), the op tests, the probe, a table
#   bash bench/gpu_check.sh build        # pip install -e . with the CUDA kernels (~5 min the first time)
#   bash bench/gpu_check.sh bench        # op benchmarks against eager / torch.compile / peers
#   bash bench/gpu_check.sh system       # MIRACLE round trip, ResNet-110 memory table, torchrun + NCCL
#   bash bench/gpu_check.sh tests        # the CUDA tests, then the rest of the suite (torch 2.11 there)
#   bash bench/gpu_check.sh sanitizer    # compute-sanitizer memcheck on the ops' CUDA tests
#   bash bench/gpu_check.sh              # all of them in one go (over 10 minutes)
#
# Carry the liger-kernel and cut-cross-entropy wheels for bench/gpu_aux_head.py's peers, inf-cl for
# bench/gpu_similarity.py's. Logs and results go to $OUT (default /tmp/llkern-gpu); commit bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llkern-gpu}
mkdir -p "$OUT"
export LLKERN_CUDA=1 LLKERN_STRICT=1 MAX_JOBS=${MAX_JOBS:-16} LLKERN_CUDA_ARCHS=${LLKERN_CUDA_ARCHS:-90a}
export PYTHONUNBUFFERED=1
# The device image sets CXX=/opt/gcc/bin/g++, a wrapper around the same GCC 13.3: an extension built with
# it segfaulted on every C++ exception whose message formats a number (seen 2026-12-04 on the H200; built
# with /usr/bin/g++ the same sources raise cleanly). Build with the system compiler unless told otherwise.
if [ -x /usr/bin/g++ ]; then
  export CXX=${LLKERN_CXX:-/usr/bin/g++} CC=${LLKERN_CC:-/usr/bin/gcc}
fi
PY=${PYTHON:-python3}
status=0
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build bench system tests sanitizer)

# run LIMIT LOG COMMAND...: a step with its own time limit, its output shown and appended to LOG
run() {
  local limit=$1 log=$2; shift 2
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "!! failed or timed out: $*"; status=1; }
}

check_built() {
  $PY -c "import llkern; assert llkern.kernel_available('transport_penalty', 'cuda'), 'no CUDA kernels built'" \
    || { echo "!! llkern is not built with CUDA here: run the build stage first"; exit 1; }
}

# The build's identity: a hash of everything the compiled extension is made of.
src_hash() { cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16; }

# A deadline for the verify stage: every step's limit is cut so the whole stage ends inside 8.5 minutes.
DEADLINE=$(( $(date +%s) + ${VERIFY_SECONDS:-500} ))
left() { local l=$(( DEADLINE - $(date +%s) - ${2:-0} )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo $l; }

# build_or_reuse: a carried build (.prebuilt/ holding _C*.so and its csrc hash) when the sources match,
# else pip install -e . with the CUDA kernels. Copies the .so and its hash to $OUT either way.
build_or_reuse() {
  local hash; hash=$(src_hash)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if [ -f .prebuilt/csrc.sha ] && [ "$(cat .prebuilt/csrc.sha)" = "$hash" ] && ls .prebuilt/_C*.so >/dev/null 2>&1; then
    echo "== reusing the carried build ($hash)"
    cp .prebuilt/_C*.so llkern/
    ln -sfn ../triton_kernels llkern/triton_kernels  # what the editable install's package_dir maps
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "== build (LLKERN_CUDA_ARCHS=$LLKERN_CUDA_ARCHS, csrc $hash)"
    local start; start=$(date +%s)
    if ! timeout "$(left 330 150)" $PY -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
      tail -40 "$OUT/build.log"; echo "!! build failed"; exit 1
    fi
    echo "built in $(( $(date +%s) - start )) s"
  fi
  cp llkern/_C*.so "$OUT/" && echo "$hash" >"$OUT/csrc.sha"
  check_built
}

for stage in "${stages[@]}"; do
  case $stage in
  verify)
    build_or_reuse
    echo "== op tests on the GPU (no -x: every failure shows)"
    run "$(left 240 100)" verify-tests.log $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 150 -rfE \
      --junitxml="$OUT/verify-tests.xml" tests/test_transport.py tests/test_aux_head.py tests/test_similarity.py \
      tests/test_context.py tests/test_mean_kl.py tests/test_miracle_select.py tests/test_random.py \
      tests/test_triton_sm90.py tests/test_build.py tests/test_value_checks.py tests/test_fast_divmod.py \
      tests/test_compression.py tests/test_miracle.py tests/test_contsup.py
    if [ "${VERIFY_PROBE:-1}" = 1 ]; then
      echo "== probe"
      run "$(left 150 5)" verify-probe.log $PY bench/gpu_probe.py --json "$OUT/probe.json"
    fi
    grep -E "passed|failed|error" "$OUT/verify-tests.log" | tail -3 ;;
  smoke)
    $PY -c "import llkern; assert llkern.kernel_available('transport_penalty', 'cuda')" 2>/dev/null || build_or_reuse
    echo "== compute-sanitizer memcheck on every op once, forward and backward, at odd sizes"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run "$(left 240 0)" sanitizer.log compute-sanitizer --tool memcheck \
      --error-exitcode 3 $PY bench/gpu_probe.py --smoke --json "$OUT/smoke.json" ;;
  build)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "== build (LLKERN_CUDA_ARCHS=$LLKERN_CUDA_ARCHS)"
    start=$(date +%s)
    if ! timeout 540 $PY -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
      tail -40 "$OUT/build.log"; exit 1
    fi
    echo "built in $(( $(date +%s) - start )) s"
    check_built ;;
  bench)
    check_built
    echo "== benchmarks"
    run 100 bench.txt $PY bench/gpu_transport.py
    run 100 bench.txt $PY bench/gpu_aux_head.py
    run 150 bench.txt $PY bench/gpu_similarity.py
    run 60 bench.txt $PY bench/gpu_context.py
    run 60 bench.txt $PY bench/gpu_mean_kl.py
    run 60 bench.txt $PY bench/gpu_miracle_select.py
    cp bench/results/results.jsonl "$OUT/results.jsonl" 2>/dev/null ;;
  system)
    check_built
    echo "== system runs"
    # issue 6's memory table: ResNet-110, batch 1024, the allocator's peak beside the meter's (table + PNG)
    run 280 system.txt $PY bench/memory_table.py --model resnet110 --batch 1024 --device cuda --ks 2 4 8 16 \
      --out "$OUT/memory-resnet110-cuda"
    # data parallel through torchrun and NCCL: one DDP per module on the GPU (one process: the machine has one GPU)
    run 90 system.txt $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m llkern train --distributed \
      --device cuda -k 4 --epochs 2 --no-progress --precision bf16 --log-file "$OUT/ddp-nccl.json"
    # the MIRACLE round trip on the GPU: Mean-KL sampling and candidate selection through the Triton kernels
    run 200 system.txt $PY -m llkern.compress_demo --out "$OUT/lenet.mira" --no-progress --device cuda \
      --json "$OUT/compress.json" ;;
  tests)
    check_built
    echo "== tests: CUDA first, then the rest (this machine's torch and triton versions)"
    run 240 tests.log $PY -m pytest -q -p no:cacheprovider tests -m "not slow" -k "cuda or gpu or sm90"
    run 300 tests.log $PY -m pytest -q -p no:cacheprovider -x tests -m "not slow" -k "not (cuda or gpu or sm90)" ;;
  sanitizer)
    check_built
    echo "== compute-sanitizer memcheck on the CUDA op tests"
    run 240 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider \
      -x tests/test_transport.py tests/test_aux_head.py tests/test_similarity.py -k "cuda"
    run 240 sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider \
      -x tests/test_context.py tests/test_mean_kl.py tests/test_random.py tests/test_miracle_select.py ;;
  *)
    echo "unknown stage $stage (build, bench, system, tests, sanitizer)"; exit 2 ;;
  esac
done
exit $status
