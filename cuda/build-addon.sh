# Sourced by cuda/build.sh and cuda/build-emu.sh: builds the N-API addon (cuda/addon/*.cc) into
# $OUT/swarmtune_cuda.node, linked against $OUT/libswarmtune_cuda.so. Needs OUT, NODE_BIN, CXX and
# TAG (the prefix of its messages). N-API is ABI-stable, so any Node >= 18 headers work; the running
# Node's are preferred.
NODE_INC=""
for d in "$("$NODE_BIN" -p 'require("path").resolve(process.execPath, "../../include/node")' 2>/dev/null || true)" \
         /usr/include/node /usr/local/include/node "$HOME/.cache/node-gyp/$("$NODE_BIN" -p process.versions.node 2>/dev/null)/include/node"; do
  if [ -n "$d" ] && [ -f "$d/node_api.h" ]; then NODE_INC="$d"; break; fi
done
if [ -z "$NODE_INC" ]; then
  echo "$TAG: node_api.h not found (looked next to node and in /usr/include/node); cannot build the addon" >&2
  exit 1
fi
NAPI_INC="$("$NODE_BIN" -p 'require("path").dirname(require.resolve("node-addon-api/package.json"))')"
"$CXX" -O2 -std=c++17 -shared -fPIC -fvisibility=hidden -DNAPI_VERSION=8 -DNAPI_DISABLE_CPP_EXCEPTIONS \
  -I"$NODE_INC" -I"$NAPI_INC" addon/*.cc -o "$OUT/swarmtune_cuda.node" \
  -L"$OUT" -lswarmtune_cuda -Wl,-rpath,'$ORIGIN'
echo "$TAG: built $OUT/swarmtune_cuda.node (node headers: $NODE_INC)"
