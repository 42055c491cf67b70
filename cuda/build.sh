#!/usr/bin/env bash
# Builds libswarmtune_cuda.so (nvcc, sm_75..sm_90 + compute_90 PTX) and the N-API addon into cuda/build/.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
  echo "build:cuda: nvcc not found; skipping the CUDA build (the CPU backend is unaffected)" >&2
  exit 0
fi
OUT="${CUDA_BUILD_DIR:-build}"
# a full build every time: objects of sources that no longer exist must not be linked
rm -rf "$OUT/obj"
mkdir -p "$OUT/obj"
# Override with CUDA_ARCHS="80 90" for a quicker local build.
ARCHS="${CUDA_ARCHS:-75 80 86 89 90}"
PTX_ARCH="${CUDA_PTX_ARCH:-90}"
GENCODE=()
for a in $ARCHS; do
  echo "build:cuda: target sm_$a (SASS)"
  GENCODE+=("-gencode" "arch=compute_$a,code=sm_$a")
done
echo "build:cuda: target compute_$PTX_ARCH (PTX, JIT-compiled on newer GPUs)"
GENCODE+=("-gencode" "arch=compute_$PTX_ARCH,code=compute_$PTX_ARCH")
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
# nvcc --threads compiles the architectures of one file in parallel: worth it only with spare cores.
THREADS_FLAG=()
[ "$JOBS" -ge 8 ] && THREADS_FLAG=(--threads 0)
# -Xptxas -v: per kernel and target, registers, shared memory, stack and spills, kept in
# $OUT/resources.txt for tests/cuda-resources.test.ts (launch limits checked without a GPU).
NVFLAGS=("${THREADS_FLAG[@]}" -O3 -std=c++17 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden --expt-relaxed-constexpr -Xptxas -v "${GENCODE[@]}")
start=$(date +%s)
export NVCC OUT
printf '%s\n' "${NVFLAGS[@]}" > "$OUT/obj/nvflags"
# One nvcc per source file, JOBS at a time; the slowest file (attention) bounds the wall time.
ls src/*.cu | xargs -P "$JOBS" -I{} bash -c '
  f="{}"; o="$OUT/obj/$(basename "${f%.cu}").o"
  mapfile -t FL < "$OUT/obj/nvflags"
  echo "build:cuda: nvcc $f"
  if ! "$NVCC" "${FL[@]}" -c "$f" -o "$o" 2>"${o%.o}.ptxas"; then
    grep -v "^ptxas info\|bytes stack frame" "${o%.o}.ptxas" >&2
    exit 1
  fi
  # warnings still reach the build log; the resource lines go to the file only
  grep -v "^ptxas info\|bytes stack frame" "${o%.o}.ptxas" >&2 || true
'
cat "$OUT"/obj/*.ptxas > "$OUT/resources.txt"
"$NVCC" -shared -Xcompiler -fPIC "${GENCODE[@]}" -o "$OUT/libswarmtune_cuda.so" "$OUT"/obj/*.o
echo "build:cuda: linked $OUT/libswarmtune_cuda.so"
# What was built, for tests/cuda-build.test.ts to check against the embedded fatbin.
sass_json=$(printf '%s,' $ARCHS); sass_json="[${sass_json%,}]"
is_default=$([ -z "${CUDA_ARCHS:-}" ] && [ -z "${CUDA_PTX_ARCH:-}" ] && echo true || echo false)
printf '{"sass":%s,"ptx":[%s],"default":%s}\n' "$sass_json" "$PTX_ARCH" "$is_default" > "$OUT/targets.json"

# the N-API addon
NODE_BIN="${NODE_BIN:-../node_modules/.bin/node}"
[ -x "$NODE_BIN" ] || NODE_BIN=node
CXX="${CXX:-g++}"
TAG=build:cuda
source ./build-addon.sh
echo "build:cuda: done in $(( $(date +%s) - start ))s"
