#!/usr/bin/env bash
# Builds the CUDA library from the unmodified cuda/src for the CPU, against the emulator in cuda/testing/emu (no nvcc,
# no GPU: only g++), into cuda/build-emu/: libswarmtune_cuda.so and the same N-API addon as cuda/build.sh.
# Load it with SWARMTUNE_CUDA_EMU=1 (cuda/native.ts); see docs/cuda.md, section "Emulator".
#   CUDA_EMU_SRC=dir   build another copy of the sources (default cuda/src)
#   CUDA_EMU_OUT=dir   output directory (default cuda/build-emu)
#   CUDA_EMU_OPT=-O1   optimization level (default -O2)
set -euo pipefail
cd "$(dirname "$0")"
SRC="${CUDA_EMU_SRC:-src}"
OUT="${CUDA_EMU_OUT:-build-emu}"
OPT="${CUDA_EMU_OPT:--O2}"
CXX="${CXX:-g++}"
NODE_BIN="${NODE_BIN:-../node_modules/.bin/node}"
[ -x "$NODE_BIN" ] || NODE_BIN=node
if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "build:cuda-emu: $CXX not found; skipping the emulator build" >&2
  exit 0
fi
EMU=testing/emu
start=$(date +%s)
# a full build every time: objects of sources that no longer exist must not be linked
rm -rf "$OUT/src" "$OUT/obj"
mkdir -p "$OUT/src" "$OUT/obj/emu"
# 1. the CUDA-only syntax (<<<>>>, __shared__, __launch_bounds__) rewritten into $OUT/src, in the .cu files and in the
# .cuh headers that hold kernels; plain headers copied
for f in "$SRC"/*.cu "$SRC"/*.cuh; do
  if [ -e "$f" ]; then "$NODE_BIN" "$EMU/transform.ts" "$f" "$OUT/src/$(basename "$f")" "cuda/src/$(basename "$f")"; fi
done
for h in "$SRC"/*.h; do
  if [ -e "$h" ]; then cp "$h" "$OUT/src/"; fi
done
# 2. every .cu as C++ (emulator headers first on the include path), plus the emulator runtime, in parallel.
# -ffp-contract=off: no FMA contraction (documented difference from nvcc's default); no fast-math.
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
CXXFLAGS=("$OPT" -g0 -std=c++17 -fPIC -fvisibility=hidden -ffp-contract=off -U_FORTIFY_SOURCE -D__CUDA_ARCH__=800
  -DSTC_CUDA_EMULATOR=1 -I"$EMU" -I"$OUT/src" -include "$EMU/stc_emu.h" -Wno-unused-function -Wno-attributes)
printf '%s\n' "${CXXFLAGS[@]}" > "$OUT/obj/cxxflags"
export CXX OUT
# the runtime's objects go to obj/emu/, apart from the library's (the self-test links only them)
{ ls "$OUT"/src/*.cu; ls "$EMU"/*.cc; } | xargs -P "$JOBS" -I{} bash -c '
  set -e; f="{}"; b="$(basename "$f")"
  mapfile -t FL < "$OUT/obj/cxxflags"
  if [[ "$f" == *.cu ]]; then "$CXX" "${FL[@]}" -x c++ -c "$f" -o "$OUT/obj/${b%.*}.o"
  else "$CXX" "${FL[@]}" -c "$f" -o "$OUT/obj/emu/${b%.*}.o"; fi
  echo "build:cuda-emu: compiled $b"
'
"$CXX" -shared -fPIC -o "$OUT/libswarmtune_cuda.so" "$OUT"/obj/*.o "$OUT"/obj/emu/*.o -lpthread
echo "build:cuda-emu: linked $OUT/libswarmtune_cuda.so"

# 3. the addon, as cuda/build.sh builds it, linked against the emulated library
TAG=build:cuda-emu
source ./build-addon.sh
# 4. the emulator's self-test program (tests/cuda-emu.test.ts)
"$NODE_BIN" "$EMU/transform.ts" "$EMU/selftest.cu" "$OUT/selftest.cu" "cuda/$EMU/selftest.cu"
mapfile -t FL < "$OUT/obj/cxxflags"
"$CXX" "${FL[@]}" -x c++ "$OUT/selftest.cu" -x none "$OUT"/obj/emu/*.o -o "$OUT/selftest" -lpthread
echo "build:cuda-emu: built $OUT/selftest"
echo "build:cuda-emu: done in $(( $(date +%s) - start ))s"
