#!/usr/bin/env bash
# The GPU check of issue 15, on a GPU machine with no network, in stages. The device tool allows 10
# minutes a call, so every stage ends inside 8.5 minutes (STAGE_SECONDS, default 500, the build included):
# each step's time limit is cut to what is left. Each stage builds first unless this checkout already has
# the CUDA kernels (or a carried build in .prebuilt/ matches csrc/), writes its logs and a JSON summary
# ($OUT/<stage>-summary.json) and prints a short table last. The device tool brings back at most 8 files from
# $OUT, so each stage ends by packing its logs and results into $OUT/<stage>-files.tar.gz: $OUT then holds
# <stage>-summary.json, <stage>-files.tar.gz, the stripped _C*.so and csrc.sha (to carry as .prebuilt/ next
# time). One stage per device call: each may take its whole 500 s.
#
#   bash bench/gpu_check.sh verify     # op tests (no -x), probe (errors, syncs, times), memcheck on every op
#   bash bench/gpu_check.sh fused      # the fused Triton losses' tests (InfoNCE, SupCon, Rényi; both forms)
#   bash bench/gpu_check.sh bench      # op benchmarks against eager / torch.compile / peers: transport, aux
#                                      # head, InfoNCE
#   bash bench/gpu_check.sh bench2     # the same for SupCon and Rényi, context add, Mean-KL, MIRACLE, activations
#   bash bench/gpu_check.sh system     # ResNet-110 memory table, torchrun + NCCL, the MIRACLE round trip
#   bash bench/gpu_check.sh sanitize   # compute-sanitizer racecheck and synccheck on every op
#   bash bench/gpu_check.sh tests      # the rest of the suite on this machine's torch and triton
#
# The bench stage installs the peers' wheels from .whl/ (make gpu-wheels here, then carry .whl): liger-kernel
# and cut-cross-entropy for bench/gpu_aux_head.py, inf-cl for bench/gpu_similarity.py.
# Logs and results go to $OUT (default /tmp/llkern-gpu); commit bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
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
[ ${#stages[@]} -eq 0 ] && { echo "name a stage: verify, fused, bench, bench2, system, sanitize, tests"; exit 2; }
STEPS=()  # "name rc seconds" of the current stage, for its summary
STEPS_FILE=$(mktemp)  # (not in $OUT: every file there counts against the 8 that come back)

# left LIMIT [RESERVE]: LIMIT, cut so that RESERVE seconds remain before the stage's deadline (at least 5)
left() { local l=$(( DEADLINE - $(date +%s) - ${2:-0} )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo $l; }

# run NAME LIMIT LOG COMMAND...: a step with its own time limit, its output shown and appended to LOG
run() {
  local name=$1 limit=$2 log=$3; shift 3
  local start; start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"  # (KILL if TERM is not enough)
  local rc=${PIPESTATUS[0]}
  STEPS+=("$name $rc $(( $(date +%s) - start ))")
  [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc; 124 = over its ${limit} s)"; status=1; }
}

has_cuda_kernels() {
  $PY -c "import llkern, sys; sys.exit(0 if llkern.kernel_available('transport_penalty', 'cuda') else 1)" 2>/dev/null
}

# The build's identity: a hash of everything the compiled extension is made of.
src_hash() { cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16; }

# ensure_built: nothing if this checkout already imports with CUDA kernels; else a carried build
# (.prebuilt/ holding _C*.so and its csrc hash) when the sources match; else pip install -e . with the
# CUDA kernels. A stripped copy of the .so (and its hash) goes to $OUT, to be carried next time.
ensure_built() {
  local hash; hash=$(src_hash)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if has_cuda_kernels; then
    echo "== already built here"
    return
  fi
  local carried=0
  if [ -f .prebuilt/csrc.sha ] && [ "$(cat .prebuilt/csrc.sha)" = "$hash" ] && ls .prebuilt/_C*.so >/dev/null 2>&1; then
    echo "== reusing the carried build ($hash)"
    cp .prebuilt/_C*.so llkern/
    ln -sfn ../triton_kernels llkern/triton_kernels  # what the editable install's package_dir maps
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    if has_cuda_kernels; then
      carried=1
    else  # (another Python's ABI, say): build after all
      echo "!! the carried build has no CUDA kernels here: building"
      rm -f llkern/_C*.so
    fi
  fi
  if [ "$carried" -eq 0 ]; then
    echo "== build (LLKERN_CUDA_ARCHS=$LLKERN_CUDA_ARCHS, CXX=${CXX:-default}, csrc $hash)"
    run build "$(left 330 120)" build.log $PY -m pip install -v --no-build-isolation --no-deps -e . >/dev/null
    if ! has_cuda_kernels; then
      tail -40 "$OUT/build.log"; echo "!! llkern has no CUDA kernels after the build"
      summary "$stage"; exit 1
    fi
  fi
  for so in llkern/_C*.so; do strip --strip-debug -o "$OUT/$(basename "$so")" "$so" 2>/dev/null || cp "$so" "$OUT/"; done
  echo "$hash" >"$OUT/csrc.sha"
}

# summary STAGE: $OUT/STAGE-summary.json (GPU, steps, pytest counts from any junit files) and a table; then the
# stage's other files in $OUT go into $OUT/STAGE-files.tar.gz
summary() {
  printf '%s\n' "${STEPS[@]}" >"$STEPS_FILE"
  $PY - "$1" "$OUT" "$STEPS_FILE" <<'EOF'
import glob, json, os, subprocess, sys, xml.etree.ElementTree as ET
stage, out, steps_file = sys.argv[1], sys.argv[2], sys.argv[3]
steps = [dict(zip(("step", "rc", "seconds"), line.split())) for line in open(steps_file) if line.strip()]
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
tests = {}
for path in sorted(glob.glob(os.path.join(out, f"{stage}-*.xml"))):
    try:
        suite = ET.parse(path).getroot()
    except ET.ParseError as error:  # (a run cut off while writing it)
        tests[os.path.basename(path)] = {"unreadable": str(error)}
        continue
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests[os.path.basename(path)] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump({"stage": stage, "gpu": gpu, "steps": steps, "tests": tests}, open(os.path.join(out, f"{stage}-summary.json"), "w"), indent=1)
print(f"\n== {stage} on {gpu}")
print(f"{'step':28} {'exit':>4} {'seconds':>8}")
for s in steps:
    print(f"{s['step']:28} {s['rc']:>4} {s['seconds']:>8}")
for name, t in tests.items():
    if "unreadable" in t:
        print(f"{name}: unreadable ({t['unreadable']})")
        continue
    print(f"{name}: {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
EOF
  local files=() f
  for f in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$f" ] || continue
    case ${f##*/} in *-summary.json|*-files.tar.gz|_C*.so|csrc.sha) ;; *) files+=("${f##*/}") ;; esac
  done
  if [ ${#files[@]} -gt 0 ]; then
    tar -czf "$OUT/$1-files.tar.gz" -C "$OUT" -- "${files[@]}" && (cd "$OUT" && rm -rf -- "${files[@]}")
  fi
  echo "(\$OUT: $(cd "$OUT" && echo *))"
}

# (tests/test_triton_sm90.py compiles for sm_90 without a GPU: CI runs it, the GPU's minutes need not)
OP_TESTS=(tests/test_transport.py tests/test_aux_head.py tests/test_similarity.py
          tests/test_context.py
          tests/test_mean_kl.py tests/test_miracle_select.py tests/test_random.py
          tests/test_build.py tests/test_value_checks.py tests/test_fast_divmod.py tests/test_compression.py
          tests/test_miracle.py tests/test_contsup.py tests/test_relu_mask.py tests/test_batch_norm_relu.py
          tests/test_activation_memory.py tests/test_recompute.py)
# the fused Triton losses: their own stage, since each kernel variant compiles on first use (~1 s each)
FUSED_TESTS=(tests/test_info_nce_fused.py tests/test_supcon_fused.py tests/test_renyi_fused.py)
# not on the GPU's minutes at all: ~100 sequential sm_90 compiles in one test (up to its own 600 s), which CI runs
CPU_ONLY_TESTS=(tests/test_triton_sm90.py)

for stage in "${stages[@]}"; do
  DEADLINE=$(( $(date +%s) + ${STAGE_SECONDS:-500} ))
  STEPS=()
  case $stage in
  verify)
    ensure_built
    echo "== op tests on the GPU (no -x: every failure shows)"
    run op-tests "$(left 240 150)" verify-tests.log env OMP_NUM_THREADS=2 $PY -m pytest -q -p no:cacheprovider -n 16 --timeout 150 -rfE \
      -m "not slow" --junitxml="$OUT/verify-tests.xml" "${OP_TESTS[@]}"  # (slow: CPU training runs, not ops)
    echo "== compute-sanitizer memcheck: every op once, forward and backward, at odd sizes"
    run memcheck "$(left 120 70)" verify-memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
      --tool memcheck --error-exitcode 3 $PY bench/gpu_probe.py --smoke --json "$OUT/smoke.json"
    echo "== probe: errors against float64, host syncs, time against eager"
    run probe "$(left 150 5)" verify-probe.log $PY bench/gpu_probe.py --json "$OUT/probe.json"
    summary verify ;;
  fused)
    ensure_built
    echo "== the fused Triton losses on the GPU: InfoNCE, SupCon, Rényi (no -x)"
    run fused-tests "$(left 420 10)" fused-tests.log env OMP_NUM_THREADS=2 $PY -m pytest -q -p no:cacheprovider -n 16 --timeout 200 -rfE \
      --junitxml="$OUT/fused-tests.xml" "${FUSED_TESTS[@]}"
    summary fused ;;
  bench)
    ensure_built
    if compgen -G ".whl/*.whl" >/dev/null; then
      echo "== the peers' wheels: $(cd .whl && echo *.whl)"
      $PY -m pip install -q --no-deps --no-index .whl/*.whl || echo "!! the peers' wheels did not install"
    else
      echo "== no .whl/ (make gpu-wheels, then carry .whl): the peers are skipped"
    fi
    # (split in two stages on 2026-12-07, when the fused InfoNCE/SupCon rows, the low-memory aux head and Liger's
    # float32 rows were added: the eight steps' limits no longer fitted one 500 s stage)
    echo "== benchmarks"
    run transport "$(left 70 335)" bench.txt $PY bench/gpu_transport.py
    run aux-head "$(left 130 205)" bench.txt $PY bench/gpu_aux_head.py
    run similarity "$(left 200 5)" bench.txt $PY bench/gpu_similarity.py --part info-nce
    cp bench/results/results.jsonl "$OUT/results.jsonl" 2>/dev/null
    summary bench ;;
  bench2)
    ensure_built
    echo "== benchmarks, second part"
    run similarity-one-view "$(left 190 300)" bench.txt $PY bench/gpu_similarity.py --part one-view
    # (context: 8 torch.compile graphs, 2 dtypes × 1 or 2 contexts × with or without the backward)
    run context "$(left 70 230)" bench.txt $PY bench/gpu_context.py
    run mean-kl "$(left 90 140)" bench.txt $PY bench/gpu_mean_kl.py  # (its torch.compile row compiles ~20 s)
    run miracle-select "$(left 60 80)" bench.txt $PY bench/gpu_miracle_select.py  # (C = 10, 12 and 16)
    run activation "$(left 75 5)" bench.txt $PY bench/gpu_activation.py  # relu masks, BN+ReLU recompute
    cp bench/results/results.jsonl "$OUT/results.jsonl" 2>/dev/null
    summary bench2 ;;
  system)
    ensure_built
    echo "== system runs"
    # ResNet-110, batch 1024: the allocator's peak beside the meter's (table + PNG)
    # (two rows per K with recomputed segments: 2 timed steps per row instead of 3, to stay inside the budget)
    run memory-table "$(left 200 280)" system.txt $PY bench/memory_table.py --model resnet110 --batch 1024 --steps 2 \
      --device cuda --ks 2 4 8 16 --out "$OUT/memory-resnet110-cuda"
    # data parallel through torchrun and NCCL: one DDP per module on the GPU (one process: one GPU)
    run ddp-nccl "$(left 60 220)" system.txt $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m llkern \
      train --distributed --device cuda -k 4 --epochs 2 --no-progress --precision bf16 --log-file "$OUT/ddp-nccl.json"
    # the decoupled pipeline on NCCL: one stage (one process), then two stages as two processes on the one GPU
    # (NCCL may refuse two ranks on one device; the log records which)
    run pipeline-nccl-1 "$(left 50 170)" system.txt $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
      -m llkern train --pipeline-stages 1 --device cuda -k 4 --epochs 2 --no-progress --log-file "$OUT/pipeline-1.json"
    run pipeline-nccl-2 "$(left 60 110)" system.txt $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
      -m llkern train --pipeline-stages 2 --device cuda -k 4 --epochs 2 --no-progress --log-file "$OUT/pipeline-2.json"
    # the MIRACLE round trip on the GPU: Mean-KL sampling and candidate selection through the Triton kernels
    run miracle "$(left 110 5)" system.txt $PY -m llkern.cli.compress_demo --out "$OUT/lenet.mira" --no-progress \
      --device cuda --json "$OUT/compress.json"
    summary system ;;
  sanitize)
    ensure_built
    for tool in racecheck synccheck; do
      echo "== compute-sanitizer $tool: every op once, forward and backward, at odd sizes"
      run "$tool" "$(left 200 10)" sanitize.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
        --tool "$tool" --error-exitcode 3 $PY bench/gpu_probe.py --smoke
    done
    summary sanitize ;;
  tests)
    ensure_built
    echo "== the rest of the suite (this machine's torch and triton)"
    run suite "$(left 400 10)" tests.log env OMP_NUM_THREADS=2 $PY -m pytest -q -p no:cacheprovider -n 16 --timeout 200 -rfE \
      -m "not slow" --junitxml="$OUT/tests-suite.xml" tests \
      $(printf -- '--ignore=%s ' "${OP_TESTS[@]}" "${FUSED_TESTS[@]}" "${CPU_ONLY_TESTS[@]}")
    summary tests ;;
  *)
    echo "unknown stage $stage (verify, fused, bench, bench2, system, sanitize, tests)"; exit 2 ;;
  esac
done
exit $status
