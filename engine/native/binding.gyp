{
  "targets": [{
    "target_name": "swarmtune_native",
    "sources": ["src/binding.cc", "src/gemm.cc", "src/ops.cc", "src/bench.cc"],
    "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
    "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
    "cflags_cc": ["-O3", "-march=native", "-std=c++17", "-fno-math-errno", "-pthread", "-Wno-maybe-uninitialized"],
    "cflags_cc!": ["-fno-exceptions", "-O2", "-O1"],
    "ldflags": ["-pthread"]
  }]
}
