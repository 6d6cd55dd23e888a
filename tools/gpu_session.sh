#!/usr/bin/env bash
# One call on a lent GPU (the device tool), with what `bash tools/gpu_prepare.sh` built beforehand
# on the CPU machine (it says how, and prints the calls to make): the libraries in .carry-libs and
# each A/B build of libmra_attention_cuda.so in .carry-libs/ab/NAME/ (all xz-compressed, unpacked
# here, with a file TREE saying what each is), the one-layer graphs in .carry-onnx, and
# onnxruntime-gpu joined from the parts that earlier calls copied to /tmp/parts.
# Writes its logs and tables under $OUT and prints the tables.
#
# `bash tools/gpu_session.sh` runs the sections below in this order, the most needed first, each
# with a time limit, and stops starting them DEADLINE seconds in (570 by default: a device call
# may run 600), so a call always ends with its results written; it then names the sections it
# skipped, for the next call: `bash tools/gpu_session.sh SECTION...` runs those alone.
#   smoke     the carried kernels on tools/sanitize_kernels.py's tiny cases, within 60 s: where they
#             fail or hang, the sections that would wait on them (tests speed ncu ort bench) are
#             left out of this call, and check, sanitize and ab (other builds) say more
#   tests     the GPU tests: the fused PyTorch op, the plugin through TensorRT's interfaces, the kernels
#   speed     the op against SDPA, the whole model against RoBERTa (tools/gpu_speed.py)
#   ab        the op with each build in .carry-libs/ab/ (gpu_speed.py --op-only; AB_BUILDS="NAME ..."
#             picks them and their order)
#   check     gpu_check's correctness cases on the carried library
#   sanitize  compute-sanitizer's memcheck, racecheck and synccheck
#   ncu       Nsight Compute: each kernel's time and distance to the GPU's peaks
#   ort       onnxruntime-gpu (joined from /tmp/parts): the op's CUDA kernel, the graphs' speed
#   bench     `mra-export bench --device cuda`, every GPU column (not in the default list: a call
#             of its own)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MRA_EXPORT_PLUGIN_BUILD=$PWD/.carry-libs
OUT=${OUT:-/tmp/gpu-session}
DEADLINE=${DEADLINE:-570}
LIBRARY=$MRA_EXPORT_PLUGIN_BUILD/libmra_attention_cuda.so
SKIPPED=()

# `section NAME SECONDS TITLE`: prints the title and sets LIMIT to SECONDS or what is left before
# DEADLINE, whichever is less; false, with NAME noted as skipped, where under 20 s are left.
section() {
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    SKIPPED+=("$1")
    return 1
  fi
  LIMIT=$(($2 < left ? $2 : left))
  echo "== [${SECONDS}s] $3 (at most ${LIMIT}s)"
}

install_onnxruntime_gpu() {  # from the parts; returns 1 where there are none
  local wheel name
  wheel=$(ls .carry/*.whl.sha256 2>/dev/null | head -n1)
  [ -n "$wheel" ] && [ -d /tmp/parts ] || return 1
  name=$(basename "$wheel" .sha256)
  cat /tmp/parts/part.* > "/tmp/$name" && sha256sum -c "$wheel" \
    && python3 -m pip install -q --no-index --no-deps --target /tmp/site "/tmp/$name" \
    && export PYTHONPATH=/tmp/site:$PWD
  python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
}

unpack_xz() {  # FILE.xz -> FILE, by Python's lzma (the machine may have no xz)
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], 'wb'))" "$1"
}

# `unpacked FILE`: FILE's path, unpacked from FILE.xz where needed (gpu_prepare.sh compresses the
# libraries); nothing, and false, where there is neither.
unpacked() {
  if [ ! -f "$1" ] && [ -f "$1.xz" ]; then
    unpack_xz "$1.xz" || echo "could not unpack $1.xz" >&2
  fi
  [ -f "$1" ] && echo "$1"
}

# Deletes the libraries unpacked from FILE.xz, when the script ends: run on the CPU machine, it
# would otherwise leave .carry-libs four times its packed size, past what a device call carries.
remove_unpacked() {
  local library
  for library in $(find "$MRA_EXPORT_PLUGIN_BUILD" -name '*.so' 2> /dev/null); do
    [ ! -f "$library.xz" ] || rm -f "$library"
  done
}

# `ab_library DIR`: the path of the A/B build DIR's library (nothing where it has none).
ab_library() {
  unpacked "$1/libmra_attention_cuda.so"
}

run_smoke() {
  section smoke 60 "smoke: the carried kernels on sanitize_kernels' tiny cases" || return
  timeout "$LIMIT" python3 tools/sanitize_kernels.py --library "$LIBRARY" > "$OUT/smoke.log" 2>&1
  local rc=$?
  tail -n 2 "$OUT/smoke.log"
  if [ "$rc" -ne 0 ]; then
    echo "== smoke FAILED (rc=$rc$([ "$rc" -eq 124 ] && echo ': a hang')): this call leaves out" \
      "${NEEDS_WORKING_KERNELS[*]}; check, sanitize and ab (other builds) say more"
    KERNELS_BROKEN=1
  fi
}

run_tests() {
  section tests 150 "GPU tests: the fused PyTorch op, the plugin through TensorRT's interfaces, the kernels" || return
  timeout "$LIMIT" python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_fused_op.py \
    tests/test_plugin_gpu.py tests/test_cuda_kernels.py 2>&1 | tee "$OUT/pytest-gpu.log" | tail -15
}

run_speed() {
  section speed 200 "speed: the op against SDPA, the whole model against RoBERTa" || return
  timeout "$LIMIT" python3 tools/gpu_speed.py --out "$OUT" 2>&1 | tail -30
}

run_ab() {
  local build name
  # AB_BUILDS="NAME ..." picks the builds and their order (the most wanted first: a section that
  # runs out of time is named for the next call, which starts it over); all, by name, if unset.
  for name in ${AB_BUILDS:-$(ls "$MRA_EXPORT_PLUGIN_BUILD/ab" 2>/dev/null)}; do
    build=$MRA_EXPORT_PLUGIN_BUILD/ab/$name
    # The same op timed with another build's kernels (what it is in $build/TREE): what the
    # difference moves, on the same GPU in the same call.
    section "ab" 90 "A/B: the op with build $name: $(cat "$build/TREE" 2>/dev/null || echo 'no TREE file')" || return
    ab_library "$build" > /dev/null || { echo "no library in $build"; continue; }
    MRA_EXPORT_PLUGIN_BUILD=$build timeout "$LIMIT" python3 tools/gpu_speed.py --op-only --quick \
      --out "$OUT/ab-$name" 2>&1 | tail -12
  done
}

run_check() {
  section check 150 "gpu_check's correctness cases on the carried library (no build, no timing)" || return
  timeout "$LIMIT" python3 tools/gpu_check.py --library "$LIBRARY" --no-timing \
    --out "$OUT/gpu_check.json" > "$OUT/gpu_check.txt" 2>&1
  echo "gpu_check rc=$?"; tail -4 "$OUT/gpu_check.txt"
}

run_sanitize() {
  section sanitize 150 "compute-sanitizer on small cases (the three tools in parallel, split and not)" || return
  local tool sanitizer nosplit
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  # Small cases split the high-resolution kernels' query blocks over 2 thread groups; the nosplit
  # build runs them with one, as large ones run.
  nosplit=$(ab_library "$MRA_EXPORT_PLUGIN_BUILD/ab/nosplit")
  for tool in memcheck racecheck synccheck; do
    (timeout "$LIMIT" "$sanitizer" --tool $tool --error-exitcode 1 python3 tools/sanitize_kernels.py \
       --library "$LIBRARY" > "/tmp/sanitize-$tool.log" 2>&1
     echo "$tool rc=$?" >> "/tmp/sanitize-$tool.log") &
    if [ -n "$nosplit" ]; then
      (timeout "$LIMIT" "$sanitizer" --tool $tool --error-exitcode 1 python3 tools/sanitize_kernels.py \
         --library "$nosplit" > "/tmp/sanitize-$tool-nosplit.log" 2>&1
       echo "$tool (nosplit) rc=$?" >> "/tmp/sanitize-$tool-nosplit.log") &
    fi
  done
  wait
  for tool in memcheck racecheck synccheck; do
    echo "-- $tool"; cat "/tmp/sanitize-$tool.log"
    [ -z "$nosplit" ] || { echo "-- $tool (nosplit)"; cat "/tmp/sanitize-$tool-nosplit.log"; }
  done > "$OUT/sanitize.log"
  grep -E "^-- |rc=|ERROR SUMMARY|FAIL|passed" "$OUT/sanitize.log"
}

run_ncu() {
  section ncu 240 "Nsight Compute: each kernel's time and distance to the GPU's peaks (tools/kernel_profile.py)" || return
  local ncu
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout "$LIMIT" "$ncu" --section SpeedOfLight --section Occupancy --csv --page details --print-kernel-base function \
    --kernel-name regex:"blockMeans|lowResolution|selectBlocks|highResolution" \
    python3 tools/kernel_profile.py > "$OUT/ncu.csv" 2> "$OUT/ncu.log"
  echo "ncu rc=$?"
  python3 tools/kernel_profile.py --report "$OUT/ncu.csv" \
    --gpu "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)" | tee "$OUT/kernel-profile.md"
  # Nsight Compute's memory tables (shared wavefronts and bank conflicts, global sectors) of
  # batch 1's calls, to set beside `python tools/memory_counts.py --profile`, the same case's
  # counts under the emulation (tools/results/memory-counts-profile-case.md): 60 s at most,
  # within DEADLINE.
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -ge 20 ]; then
    timeout $((left < 60 ? left : 60)) "$ncu" --section MemoryWorkloadAnalysis_Tables --csv --page details \
      --print-kernel-base function --kernel-name regex:"lowResolutionTerms|highResolution" --launch-count 4 \
      python3 tools/kernel_profile.py > "$OUT/ncu-shared.csv" 2> "$OUT/ncu-shared.log"
    echo "ncu (shared-memory table) rc=$?"
    grep -i -E "bank|wavefront" "$OUT/ncu-shared.csv" | cut -c1-300 | head -n 24
  fi
}

run_ort() {
  section ort 240 "onnxruntime-gpu: the op library's CUDA kernel, and the graphs' speed" || return
  if ! install_onnxruntime_gpu; then
    echo "skipped: no onnxruntime-gpu parts in /tmp/parts"
    return
  fi
  # test_ort_op.py whole (its parity test runs the CUDA row where the provider is); of the
  # placement and pipeline tests only the GPU ones: the rest export models and run in CI.
  timeout "$LIMIT" python3 -m pytest -q -rs -p no:cacheprovider tests/test_ort_op.py \
    tests/test_ort_cuda_placement.py::test_the_cuda_provider_copies_nothing_between_host_and_device \
    tests/test_ort_cuda_placement.py::test_a_bound_run_on_the_cuda_provider_leaves_its_outputs_on_the_gpu \
    tests/test_ort_pipelines.py::test_cuda_inputs_on_the_cuda_provider_give_outputs_on_the_gpu \
    2>&1 | tee "$OUT/pytest-ort.log" | tail -8
  # RoBERTa's graph (issue 25's 0.7x is against it) is exported here: with the MRA graphs and
  # the libraries it would pass the 64 MB a call carries.
  section ort 60 "onnxruntime-gpu: RoBERTa's graph exported here" || return
  timeout "$LIMIT" python3 tools/ort_cuda_speed.py export .carry-onnx --graphs dense > "$OUT/export-dense.log" 2>&1 \
    || echo "RoBERTa's graph did not export (its column is left out): $OUT/export-dense.log"
  # its table, then the copies and the nodes on the CPU provider per graph
  section ort 180 "onnxruntime-gpu: the graphs' speed and placement" || return
  timeout "$LIMIT" python3 tools/ort_cuda_speed.py run .carry-onnx --out "$OUT" 2>&1 | tail -30
}

run_bench() {
  section bench 540 "mra-export bench --device cuda: every GPU column in fp32 and fp16" || return
  install_onnxruntime_gpu || echo "no onnxruntime-gpu parts in /tmp/parts: its columns will say so"
  timeout "$LIMIT" python3 -m mra_export bench --device cuda --lengths 1024,2048,4096 --batches 1,8 \
    --budget 0.5 --out "$OUT/bench" 2>&1 | tail -60
}

SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(smoke tests speed ab check sanitize ncu ort)
# The sections a hang or a fault of the carried kernels would stall to their time limits.
NEEDS_WORKING_KERNELS=(tests speed ncu ort bench)
KERNELS_BROKEN=0
for name in "${SECTIONS[@]}"; do
  if ! declare -F "run_$name" > /dev/null; then
    echo "gpu_session.sh: no section '$name'; the sections:" $(declare -F | sed -n 's/^declare -f run_//p') >&2
    exit 2
  fi
done
mkdir -p "$OUT"
trap remove_unpacked EXIT
for packed in "$MRA_EXPORT_PLUGIN_BUILD"/*.so.xz; do
  [ ! -f "$packed" ] || unpacked "${packed%.xz}" > /dev/null
done
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for name in "${SECTIONS[@]}"; do
  if [ "$KERNELS_BROKEN" = 1 ] && [[ " ${NEEDS_WORKING_KERNELS[*]} " == *" $name "* ]]; then
    echo "== [${SECONDS}s] $name left out: the kernels failed the smoke test"
    continue
  fi
  "run_$name"
done
if [ ${#SKIPPED[@]} -gt 0 ]; then
  echo "== [${SECONDS}s] out of time for: ${SKIPPED[*]}; next call: bash tools/gpu_session.sh $(printf '%s\n' "${SKIPPED[@]}" | uniq | tr '\n' ' ')"
else
  echo "== [${SECONDS}s] done"
fi
