#!/usr/bin/env bash
# Builds here, on the CPU machine, everything `tools/gpu_session.sh` carries to a lent GPU, so that
# a session given one spends its device minutes measuring. A new checkout has none of it (the
# folders are ignored by git); it took 5 minutes on the 2-core machine.
#   bash tools/gpu_prepare.sh [--previous REV]... [--no-wheel]
# - .carry-libs/: the libraries for sm_90 (H100, H200), stripped and xz-compressed, with a TREE file;
# - .carry-libs/ab/NAME/: the CUDA library with one setting changed, each an A/B of the op in the
#   session's `ab` section: selectsingle (one CTA a row in the selection), clusterbysms (the
#   selection's clusters sized by the SMs alone, however few the row's cells: it differs below
#   2048 tokens, which the `ab` section's --quick lengths leave out), nodependent (no
#   programmatic dependent launches), stages2 and stages4 (the tensor-core kernel's pipeline),
#   nosplit and splitalways (a query block's key blocks never, or always, split over 2 thread
#   groups: the rule splits them below 3 waves of CTAs), splitregisters (the split 16-bit
#   head_dim-64 kernel held to 96 registers, for 5 CTAs an H200 SM), eagerbase (the 16-bit
#   kernels' softmax base always the row's maximum, not lazy);
#   with --previous REV also REV's kernels (what the commits since moved), for each REV given;
# - .carry-onnx/: the one-layer graphs `ort_cuda_speed.py run` times;
# - .carry/: onnxruntime-gpu's wheel in parts (../shared/gpu/README.md), unless --no-wheel.
# Then prints the device calls to make.
set -euo pipefail
cd "$(dirname "$0")/.."
PREVIOUS=()
WHEEL=1
usage() {  # a one-line error, exit 2
  echo "gpu_prepare.sh: $1; usage: bash tools/gpu_prepare.sh [--previous REV]... [--no-wheel]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --previous) [ $# -ge 2 ] || usage "--previous needs a commit"; PREVIOUS+=("$2"); shift 2 ;;
    --no-wheel) WHEEL=0; shift ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
# Checked before the builds, which take minutes.
for revision in ${PREVIOUS[@]+"${PREVIOUS[@]}"}; do
  git rev-parse --quiet --verify "$revision^{commit}" > /dev/null \
    || usage "--previous $revision is not a commit of this repository"
done
THIRD_PARTY=$(cd .. && pwd)/shared/third_party
[ -f "$THIRD_PARTY/tensorrt/include/NvInferRuntime.h" ] && [ -f "$THIRD_PARTY/onnxruntime/include/onnxruntime_c_api.h" ] \
  || { echo "gpu_prepare.sh: TensorRT's and onnxruntime's headers are not in $THIRD_PARTY; the plugin and the op library need them" >&2; exit 2; }
command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ] \
  || { echo "gpu_prepare.sh: nvcc not found; put the CUDA toolkit's bin on PATH" >&2; exit 2; }
[ -x .venv/bin/python ] || make setup
# What the TREE files say: the commit, and whether the kernels' source differs from it.
TREE="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- plugins || echo ' with uncommitted changes to plugins/')"
ARCH=90

# Everything is built under NEW and replaces .carry-libs and .carry-onnx only once whole: a failed
# or stopped run leaves the last complete carry as it was.
NEW=.carry-new
rm -rf "$NEW" && mkdir -p "$NEW/libs/ab"
WORKTREE=/tmp/gpu-prepare-previous
trap 'rm -rf "$NEW"; git worktree remove --force "$WORKTREE" 2> /dev/null || true' EXIT
PREVIOUS_BUILDS=""  # their A/B names, "previous-ba57bd4 ..."

compress() {  # FILE -> FILE.xz (gpu_session.sh unpacks it): a CUDA library in a sixth of the space or less
  python3 -c "import lzma, os, shutil, sys
with open(sys.argv[1], 'rb') as plain, lzma.open(sys.argv[1] + '.xz', 'wb', preset=9) as packed:
    shutil.copyfileobj(plain, packed)
os.remove(sys.argv[1])" "$1"
}

echo "== the libraries for sm_$ARCH ($TREE)"
make plugins PLUGIN_BUILD=plugins/build-h200 MRA_CUDA_ARCHITECTURES=$ARCH \
  TRT_INCLUDE_DIR="$THIRD_PARTY/tensorrt/include" ORT_INCLUDE_DIR="$THIRD_PARTY/onnxruntime/include" > /tmp/gpu-prepare-build.log 2>&1 \
  || { echo "gpu_prepare.sh: the build failed: /tmp/gpu-prepare-build.log" >&2; exit 1; }
# Stripped (the exported symbols stay) and compressed (gpu_session.sh unpacks them): a call carries
# 64 MiB at most, and with the split kernels the three largest took 4.2 MB each, 13 MB in all.
for library in plugins/build-h200/*.so; do
  cp "$library" "$NEW/libs/" && strip --strip-unneeded "$NEW/libs/$(basename "$library")" \
    && compress "$NEW/libs/$(basename "$library")"
done
echo "$TREE, sm_$ARCH" > "$NEW/libs/TREE"

# `ab_build NAME SOURCE_DIR FLAGS TREE_TEXT`: the CUDA library of SOURCE_DIR/plugins with FLAGS.
ab_build() {
  local name=$1 source=$2 flags=$3 text=$4 build=/tmp/gpu-prepare-$1
  local library="$NEW/libs/ab/$name/libmra_attention_cuda.so"
  echo "== A/B build $name: $text"
  rm -rf "$build"
  cmake -S "$source/plugins" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMRA_CUDA_ARCHITECTURES=$ARCH-real \
    ${flags:+-DCMAKE_CUDA_FLAGS="$flags"} > "$build.log" 2>&1 \
    && cmake --build "$build" -j "$(nproc)" --target mra_attention_cuda >> "$build.log" 2>&1 \
    || { echo "gpu_prepare.sh: the A/B build $name failed: $build.log" >&2; exit 1; }
  mkdir -p "$(dirname "$library")"
  cp "$build/libmra_attention_cuda.so" "$library"
  strip --strip-unneeded "$library" && compress "$library"
  echo "$text" > "$(dirname "$library")/TREE"
}
# `setting NAME FLAG WHAT`: this tree with one setting changed.
setting() {
  ab_build "$1" . "$2" "$TREE with $2${3:+ ($3)}"
}
setting selectsingle -DMRA_SELECT_CLUSTER=1 "one CTA a row in the selection"
setting clusterbysms -DMRA_SELECT_CLUSTER_BY_CELLS=0 "the selection's clusters sized by the SMs alone, not also by the row's cells"
setting nodependent -DMRA_DEPENDENT_LAUNCH=0 "no programmatic dependent launches"
setting stages2 -DMRA_MMA_STAGES=2
setting stages4 -DMRA_MMA_STAGES=4
setting nosplit -DMRA_SPLIT=1 "a query block's key blocks never split over 2 thread groups"
setting splitalways -DMRA_SPLIT_BELOW_WAVES=1000000 "a query block's key blocks always split over 2 thread groups"
setting splitregisters -DMRA_MMA_SPLIT_MIN_CTAS=5 "the split 16-bit head_dim-64 kernel held to 96 registers: 5 CTAs an H200 SM, 16 bytes spilled"
setting eagerbase -DMRA_LAZY_SOFTMAX_BASE=0 "the 16-bit kernels' softmax base always the real keys' maximum"
for revision in ${PREVIOUS[@]+"${PREVIOUS[@]}"}; do  # one worktree, each revision in turn
  short=$(git rev-parse --short "$revision")
  rm -rf "$WORKTREE" && git worktree prune
  git worktree add --detach "$WORKTREE" "$revision" > /dev/null
  ab_build "previous-$short" "$WORKTREE" "" "$short, the kernels before the commits since"
  PREVIOUS_BUILDS+="previous-$short "
done

echo "== the one-layer graphs (.carry-onnx)"
.venv/bin/python tools/ort_cuda_speed.py export "$NEW/onnx" > /tmp/gpu-prepare-onnx.log 2>&1 \
  || { echo "gpu_prepare.sh: the export failed: /tmp/gpu-prepare-onnx.log" >&2; exit 1; }
rm -rf .carry-libs .carry-onnx
mv "$NEW/libs" .carry-libs && mv "$NEW/onnx" .carry-onnx

if [ "$WHEEL" = 1 ]; then
  echo "== onnxruntime-gpu in parts (.carry)"
  rm -rf .carry
  ../shared/gpu/split-wheel.sh onnxruntime-gpu==1.31.1 .carry > /tmp/gpu-prepare-wheel.log 2>&1 \
    || { echo "gpu_prepare.sh: the wheel could not be fetched (/tmp/gpu-prepare-wheel.log); the ort section will be skipped" >&2; rm -rf .carry; }
fi

du -sh .carry-libs .carry-onnx $( [ -d .carry ] && echo .carry ) 2>/dev/null
# A session's 15 device minutes hold the machine's start and about one full call of the kernels'
# sections (which need no graph: .carry-onnx, 45 MB, travels with the ort call only);
# onnxruntime-gpu's parts and its section come after, where minutes are left.
# The A/B builds the last kernel change asked for first (all of them would take the call).
AB="${PREVIOUS_BUILDS}eagerbase splitregisters nosplit"
echo "The device calls, back to back (the machine stays warm about 30 s after each):"
echo "  carry [\".carry-libs\"]: AB_BUILDS=\"$AB\" bash tools/gpu_session.sh smoke tests speed ab check sanitize ncu"
sums=$(ls .carry/*.sha256 2>/dev/null | head -n1 || true)
if [ -n "$sums" ]; then
  echo "then, with 6 minutes or more left, onnxruntime-gpu's parts and its section:"
  for part in $(ls -d .carry/p* 2>/dev/null); do
    echo "  carry [\"$part\"]: mkdir -p /tmp/parts && cp $part/* /tmp/parts/"
  done
  echo "  carry [\".carry-libs\", \".carry-onnx\", \"$sums\"]: bash tools/gpu_session.sh ort"
fi
