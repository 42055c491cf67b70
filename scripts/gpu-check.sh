#!/usr/bin/env bash
# GPU checks in one go: build the CUDA library, run tests/gpu/*.gpu.ts against the CPU reference, run the 1B training benchmark, write one JSON report.
#
# Usage: scripts/gpu-check.sh [report.json]   (default: $OUT/gpu-report.json when $OUT is set, else cuda/build/gpu-report.json)
# Designed to finish within 10 minutes on an H100/H200: build ~1-2 min, op checks < 1 min, benchmark capped at
# 280 s of training (hard limit 360 s; 3 timed steps usually take far less), then the transformers + PEFT
# baseline (bench/peft_baseline.py, 60 s of steps, hard limit 170 s). The report's `figures` block holds what docs/benchmarks.md needs:
# tokens/s, peak device memory, NF4 dequant GB/s vs the probe's copy bandwidth, bf16 GEMM TFLOP/s.
# Exits nonzero when the build fails or any GPU check fails; a benchmark failure is recorded in the report.
set -uo pipefail
cd "$(dirname "$0")/.."
NODE="${NODE:-node_modules/.bin/node}"
WORK="$(mktemp -d)"
REPORT="${1:-${OUT:-cuda/build}/gpu-report.json}"
mkdir -p "$(dirname "$REPORT")"
t0=$(date +%s)

echo "gpu-check: building (log: $WORK/build.log)"
bs=$(date +%s)
bash cuda/build.sh >"$WORK/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - bs ))
tail -n 3 "$WORK/build.log"

tests_rc=125
bench_rc=125
if [ "$build_rc" -eq 0 ]; then
  echo "gpu-check: GPU op checks"
  ts=$(date +%s)
  "$NODE" --test --test-concurrency=1 --test-timeout=300000 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$WORK/tests.tap" tests/gpu/*.gpu.ts
  tests_rc=$?
  tests_s=$(( $(date +%s) - ts ))
  echo "gpu-check: training benchmark"
  timeout 360 "$NODE" cuda/bench-train.ts --out "$WORK/bench.json" --budget-s 280 2>&1 | tail -n 40
  bench_rc=${PIPESTATUS[0]}
  # what users would otherwise run: transformers + PEFT on the same shape and batch (QLoRA when
  # bitsandbytes is installed, else a bf16 base; the report's peft.recipe says which)
  echo "gpu-check: transformers + PEFT baseline"
  PY="${PYTHON:-python3}"
  PYTHONUNBUFFERED=1 timeout 170 "$PY" bench/peft_baseline.py --budget-s 60 >"$WORK/peft.json" 2>"$WORK/peft.log"
  echo "gpu-check: PEFT baseline exit $? ($(tail -c 300 "$WORK/peft.json"))"
fi

WORK="$WORK" REPORT="$REPORT" BUILD_RC="$build_rc" BUILD_S="$build_s" TESTS_RC="$tests_rc" TESTS_S="${tests_s:-0}" \
BENCH_RC="$bench_rc" TOTAL_S="$(( $(date +%s) - t0 ))" "$NODE" -e '
const fs = require("node:fs");
const w = process.env.WORK;
const read = (f) => { try { return fs.readFileSync(`${w}/${f}`, "utf8"); } catch { return null; } };
const tap = read("tests.tap") ?? "";
const count = (k) => Number((tap.match(new RegExp(`^# ${k} (\\d+)`, "m")) ?? [])[1] ?? 0);
const failures = [...tap.matchAll(/^\s*not ok \d+ - (.*)$/gm)].map((m) => m[1]);
const bench = read("bench.json");
const peftText = (read("peft.json") ?? "").trim().split("\n").pop() ?? "";
let peft;
try { peft = JSON.parse(peftText); } catch { peft = { error: "the PEFT baseline printed no report", logTail: (read("peft.log") ?? "").split("\n").slice(-15) }; }
const report = {
  date: new Date().toISOString(),
  build: { ok: process.env.BUILD_RC === "0", seconds: Number(process.env.BUILD_S), logTail: (read("build.log") ?? "").split("\n").slice(-15) },
  gpuTests: { exitCode: Number(process.env.TESTS_RC), seconds: Number(process.env.TESTS_S), pass: count("pass"), fail: count("fail"), skipped: count("skipped"), failures },
  benchmark: bench ? JSON.parse(bench) : { exitCode: Number(process.env.BENCH_RC), error: "benchmark produced no report" },
  peft,
  totalSeconds: Number(process.env.TOTAL_S),
};
const b = report.benchmark, dev = b.device ?? {}, nf4 = b.nf4 ?? {};
// the figures docs/benchmarks.md asks for, in one place (null where not measured)
report.figures = {
  device: dev.name ?? null,
  tokensPerSecond: b.tokensPerSecond ?? null,
  peakDeviceBytes: b.peakDeviceBytes ?? null,
  devicePoolPeakBytes: b.devicePoolPeakBytes ?? null,
  residentWeightBytes: b.weightCache?.libraryBytes ?? null,
  probeBf16GemmTflops: dev.bf16GemmTflops ?? null,
  probeCopyBandwidthGBs: dev.memoryBandwidthGBs ?? null,
  nf4DequantGBs: nf4.dequantGBs ?? null,
  nf4DequantFractionOfBandwidth: nf4.dequantFractionOfProbeBandwidth ?? null,
  nf4GemmTflops: nf4.gemmNF4Tflops ?? null,
  deviceResident: b.deviceResident ?? null,
  // where a training step's time goes: ops per step, inline launches vs worker ops, launch vs wait seconds
  opsPerStep: b.ops?.opsPerStep ?? null,
  inlineOpsPerStep: b.ops?.inlineOpsPerStep ?? null,
  workerOpsPerStep: b.ops?.workerOpsPerStep ?? null,
  launchSecondsPerStep: b.ops?.launchSecondsPerStep ?? null,
  waitSecondsPerStep: b.ops?.waitSecondsPerStep ?? null,
  peftRecipe: peft.recipe ?? null,
  peftTokensPerSecond: peft.tokensPerSecond ?? null,
  peftPeakDeviceBytes: peft.peakDeviceBytes ?? null,
  // the target of issue 7: >= 1.5 (same model shape, batch and sequence length)
  speedupVsPeft: b.tokensPerSecond && peft.tokensPerSecond ? b.tokensPerSecond / peft.tokensPerSecond : null,
};
fs.writeFileSync(process.env.REPORT, JSON.stringify(report, null, 2) + "\n");
console.log(`gpu-check: report written to ${process.env.REPORT}`);
console.log(JSON.stringify({ build: report.build.ok, pass: report.gpuTests.pass, fail: report.gpuTests.fail, skipped: report.gpuTests.skipped, ...report.figures }));
// skipped GPU checks mean nothing was verified: never let them read as success
if (report.gpuTests.skipped > 0) { console.error("gpu-check: GPU checks were skipped (no usable GPU)"); process.exit(3); }
'
summary_rc=$?
[ "$build_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$summary_rc" -eq 0 ]
