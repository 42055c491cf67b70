// The bench's own machinery (npm run bench): argument errors, the doc's generated tables against the
// committed results file, and the measurement code of the swarm trace and the network bench on small
// sizes. Speed itself is never asserted here; only what each measurement must satisfy whatever the speed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs, BenchUsageError } from '../bench/run.ts';
import { BENCH_DOC, blobSourceOf, docWithBlobTables, renderBlobTables, docWithDoubleQuantTables, docWithPackingTables, docWithTables, docWithWanTables, doubleQuantSourceOf, packingSourceOf, renderDoubleQuantTables, renderPackingTables, renderTables, renderWanTables, sourceOf, wanSourceOf, ReportError } from '../bench/report.ts';
import { benchWan, LINKS, parseRequestLines, parseWanArgs, stepBreakdown, WanUsageError } from '../bench/wan.ts';
import { labSupport } from './netlab/lab.ts';
import { traceSwarm } from '../bench/swarm-trace.ts';
import { benchNet } from '../bench/net.ts';
import { benchBlobFetch } from '../bench/blob-fetch.ts';
import { benchSwarmBytes } from '../bench/swarm-bytes.ts';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';

const ROOT = path.resolve(import.meta.dirname, '..');

test('bench arguments: sections, --quick, and clear errors for bad input', () => {
  assert.deepEqual(parseArgs(['--only', 'kernels,net', '--quick']).only, ['kernels', 'net']);
  assert.equal(parseArgs(['--only=model']).quick, false);
  assert.deepEqual(parseArgs([]).only, ['kernels', 'memory', 'model', 'swarm', 'net', 'store', 'convergence', 'blobs', 'packing', 'verify', 'scale']);
  assert.deepEqual(parseArgs(['--only', 'memory']).only, ['memory']);
  assert.throws(() => parseArgs(['--only', 'kernels,gpu']), (e: Error) => e instanceof BenchUsageError && /unknown section "gpu"/.test(e.message));
  assert.throws(() => parseArgs(['--only']), { name: 'BenchUsageError', message: /--only needs a value/ });
  assert.throws(() => parseArgs(['--fast']), { name: 'BenchUsageError', message: /unknown argument "--fast"/ });
});

test('docs/benchmarks.md tables are generated from the committed results file they name', () => {
  const doc = readFileSync(BENCH_DOC, 'utf8');
  const source = sourceOf(doc);
  assert.ok(source !== null, 'docs/benchmarks.md names no results file (run `node bench/report.ts bench/results/FILE.json --write`)');
  assert.ok(existsSync(path.join(ROOT, source)), `${source}, named by docs/benchmarks.md, is not in the repository`);
  const results = JSON.parse(readFileSync(path.join(ROOT, source), 'utf8'));
  assert.equal(doc, docWithTables(doc, renderTables(results, source)), `docs/benchmarks.md is stale: run \`node bench/report.ts ${source} --write\``);
  assert.throws(() => renderTables({ ...results, schema: 'other' }, source), (e: Error) => e instanceof ReportError && /schema/.test(e.message));
  assert.throws(() => renderTables({ ...results, machine: 3 }, source), { name: 'ReportError', message: /machine must be an object/ });
});

test('docs/benchmarks.md double-quantization section is generated from the results file it names', () => {
  const doc = readFileSync(BENCH_DOC, 'utf8');
  const source = doubleQuantSourceOf(doc);
  assert.ok(source !== null, 'docs/benchmarks.md names no double-quantization results file (node bench/report.ts FILE --part=double-quant --write)');
  assert.ok(existsSync(path.join(ROOT, source)), `${source} is not in the repository`);
  const results = JSON.parse(readFileSync(path.join(ROOT, source), 'utf8'));
  assert.equal(doc, docWithDoubleQuantTables(doc, renderDoubleQuantTables(results, source)), `stale: run \`node bench/report.ts ${source} --part=double-quant --write\``);
  // what the section claims: the held form matches the theory, and plan matches the stage's ArrayBuffer bytes
  for (const r of results.memory.runs) {
    assert.ok(Math.abs(r.bits_per_param - r.theory_bits_per_param) < 0.001, `${r.config}: ${r.bits_per_param} bits/param held, theory ${r.theory_bits_per_param}`);
    assert.ok(Math.abs(r.array_buffers_over_plan - 1) < 0.01, `${r.config}: ArrayBuffers ${r.array_buffers_over_plan}× plan`);
  }
  assert.throws(() => renderDoubleQuantTables({ ...results, memory: 3 }, source), { name: 'ReportError', message: /memory must be an object/ });
});

test('docs/benchmarks.md packing section is generated from the results file it names', () => {
  const doc = readFileSync(BENCH_DOC, 'utf8');
  const source = packingSourceOf(doc);
  assert.ok(source !== null, 'docs/benchmarks.md names no packing results file (node bench/report.ts FILE --part=packing --write)');
  assert.ok(existsSync(path.join(ROOT, source)), `${source} is not in the repository`);
  const results = JSON.parse(readFileSync(path.join(ROOT, source), 'utf8'));
  assert.equal(doc, docWithPackingTables(doc, renderPackingTables(results, source)), `stale: run \`node bench/report.ts ${source} --part=packing --write\``);
  // what the section claims: the same tokens both ways, no padding when packed, the same mean token loss
  const { padded, packed, data } = results.packing;
  assert.equal(packed.token_positions, data.real_tokens);
  assert.equal(packed.padding_fraction, 0);
  assert.ok(padded.token_positions > data.real_tokens && padded.padding_fraction > 0);
  assert.ok(Math.abs(packed.mean_token_loss - padded.mean_token_loss) <= 1e-5 * padded.mean_token_loss, `${packed.mean_token_loss} vs ${padded.mean_token_loss}`);
  assert.throws(() => renderPackingTables({ ...results, packing: 3 }, source), { name: 'ReportError', message: /packing must be an object/ });
});

test('swarm trace: every micro-batch is accounted for and the wire bytes per token match the codec', async () => {
  const llama = tinyLlamaConfig({ hiddenSize: 64, intermediateSize: 128, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 2, vocabSize: 97 });
  const T = 2 * 16;
  for (const [codec, perToken] of [['f32', 64 * 4], ['int8', 64 + 4]] as const) {
    const r = await traceSwarm({ llama, codec, steps: 2, microBatches: 2, batch: 2, seqLen: 16, threads: 1 });
    assert.equal(r.wire_dtype, codec);
    const w = r.wire_bytes_per_token as Record<string, number>;
    assert.equal(w.theory_tensor_only, perToken);
    // the hop's chunk frames hold the tensor plus a small msgpack envelope (offset, shape, codec, field names)
    for (const k of ['forward_activation_hop', 'backward_gradient_hop'] as const) {
      assert.ok(w[k]! >= perToken && w[k]! < perToken + 200 / T, `${codec} ${k}: ${w[k]} B/token, tensor alone ${perToken}`);
    }
    const b = r.breakdown_ms as Record<string, number>;
    assert.ok(b.compute! > 0 && b.step_tail! > 0 && b.transfer! >= 0);
    // the parts are measured separately; summed over micro-batches they cover the whole step (within
    // the clock reads in between) and exceed it by exactly the pipeline overlap
    const parts = b.compute! + b.serialization_tensor_codec! + b.stage_queue_wait! + b.transfer! + b.serialization_frames! + b.step_start! + b.step_tail!;
    assert.ok(parts >= 0.95 * Number(r.step_ms) - 5, `parts ${parts} ms cover less than the step ${r.step_ms} ms`);
    assert.ok(Math.abs(parts - b.pipeline_overlap! + b.unaccounted! - Number(r.step_ms)) <= 0.5, 'overlap and unaccounted reconcile the parts with the step');
    const frames = r.frames as Record<string, { bytes: number }>;
    // one hop each way at the stage boundary; the coordinator relays nothing
    assert.deepEqual(Object.keys(frames).sort(), ['hop_activation', 'hop_gradient']);
    assert.equal(frames.hop_activation!.bytes, frames.hop_gradient!.bytes, 'activation and gradient have the same shape and codec');
  }
});

test('network bench: exact byte counts at the receiver, libp2p framing counted on the wire', async () => {
  const r = await benchNet({ bytes: 2 * 1024 * 1024, reps: 1 });
  for (const k of ['tcp_MBps', 'libp2p_stream_MBps', 'rpc_weights_8MiB_frames_MBps'] as const) assert.ok(Number(r[k]) > 0, k);
  const ov = r.wire_overhead as { stream_payload_bytes: number; stream_wire_bytes: number; overhead_pct: number; connection_setup_and_1_byte_stream_bytes: { to_receiver: number } };
  // Noise adds a 16-byte tag and a 2-byte length per message, Yamux a 12-byte header per frame
  assert.ok(ov.stream_wire_bytes > ov.stream_payload_bytes, 'the proxy saw the stream');
  assert.ok(ov.overhead_pct > 0.01 && ov.overhead_pct < 1, `overhead ${ov.overhead_pct}%`);
  assert.ok(ov.connection_setup_and_1_byte_stream_bytes.to_receiver > 100, 'handshake bytes counted');
});

test('swarm bytes: the coordinator\'s bytes per micro-batch do not grow with the hidden size; the volunteers carry the activations', async () => {
  const perMb: number[] = [];
  for (const hiddenSize of [64, 256]) {
    const llama = tinyLlamaConfig({ hiddenSize, intermediateSize: 2 * hiddenSize, numHiddenLayers: 2, numAttentionHeads: 4, numKeyValueHeads: 2, vocabSize: 97 });
    const r = await benchSwarmBytes({ llama, codec: 'f32', steps: 2, microBatches: 2, batch: 2, seqLen: 32 });
    const boundary = Number(r.boundary_tensor_bytes_per_micro_batch_theory);
    assert.equal(boundary, 2 * 2 * 32 * hiddenSize * 4, 'an activation and its gradient per micro-batch');
    perMb.push(Number(r.coordinator_micro_batch_phase_per_micro_batch_bytes));
    // every boundary tensor crossed between the volunteers: each sent at least its share of them
    for (const v of r.volunteers_per_step as Array<{ in_bytes: number; out_bytes: number }>) assert.ok(v.out_bytes >= 2 * boundary / 2 && v.in_bytes >= 2 * boundary / 2, JSON.stringify(v));
  }
  // control only: token ids, labels, reports and commits (the activations grew 4x)
  assert.ok(Math.abs(perMb[1]! - perMb[0]!) <= 0.1 * perMb[0]!, `coordinator bytes per micro-batch ${perMb.join(' -> ')}`);
});

test('blob bench: every provider serves its share through its rate limit, the joiner gets every byte once; the doc\'s table comes from the file it names', async () => {
  const r = await benchBlobFetch({ sizeBytes: 1 << 20, chunkBytes: 64 << 10, rateMBps: 50, providerCounts: [1, 4], reps: 1 });
  assert.equal(r.chunks, 16);
  const runs = r.runs as Array<{ providers: number; served_bytes_per_provider: number[]; ready_ms: number; speedup_vs_1: number }>;
  assert.deepEqual(runs.map((x) => x.providers), [1, 4]);
  for (const x of runs) {
    assert.equal(x.served_bytes_per_provider.length, x.providers);
    assert.equal(x.served_bytes_per_provider.reduce((a, b) => a + b, 0), 1 << 20, 'each byte served once');
    assert.ok(x.served_bytes_per_provider.every((b) => b > 0), `every provider served: ${x.served_bytes_per_provider}`);
    assert.ok(x.ready_ms > 0);
  }
  assert.equal(runs[0]!.speedup_vs_1, 1);
  const doc = readFileSync(BENCH_DOC, 'utf8');
  const source = blobSourceOf(doc);
  assert.ok(source !== null, 'docs/benchmarks.md names no blob results file (node bench/report.ts FILE --part=blobs --write)');
  const results = JSON.parse(readFileSync(path.join(ROOT, source), 'utf8'));
  assert.equal(doc, docWithBlobTables(doc, renderBlobTables(results, source)), `stale: run \`node bench/report.ts ${source} --part=blobs --write\``);
  for (const c of results.blobs.configs.slice(0, 2)) assert.deepEqual(c.runs.map((x: { providers: number }) => x.providers), [1, 4, 8]);
  assert.throws(() => renderBlobTables({ ...results, blobs: 3 }, source), { name: 'ReportError', message: /blobs must be an object/ });
});

test('wan bench arguments and the coordinator request log it reads', () => {
  const q = parseWanArgs(['--quick']);
  assert.deepEqual([q.stages, q.links.map((l) => l.name), q.codecs, q.steps], [[2], ['loopback', '100/50'], ['f32', 'int8'], 2]);
  const f = parseWanArgs(['--stages', '2,4', '--links=20/100', '--codecs', 'lowrank8']);
  assert.deepEqual(f.links.map((l) => [l.name, l.rateMbit, l.rttMs]), [['loopback', null, 0], ['20/100', 20, 100]], 'every ratio needs its loopback run');
  assert.deepEqual(f.stages, [2, 4]);
  assert.equal(LINKS.length, 4);
  assert.throws(() => parseWanArgs(['--codecs', 'f16']), (e: Error) => e instanceof WanUsageError && /unknown wire codec "f16"/.test(e.message));
  assert.throws(() => parseWanArgs(['--links', 'fast']), { name: 'WanUsageError', message: /"fast" is neither loopback nor RATE_MBIT\/RTT_MS/ });
  assert.throws(() => parseWanArgs(['--steps', '1']), { name: 'WanUsageError', message: /≥ 2/ });
  assert.throws(() => parseWanArgs(['--stage', '2']), { name: 'WanUsageError', message: /unknown argument "--stage"/ });
  // the lines as protocol/net.ts request() writes them; the tail requests (adapter, optimizer) do not all name the step
  const at = (ms: number) => new Date(Date.UTC(2026, 0, 1) + ms).toISOString();
  const lines = [
    `${at(1000)} swarmtune:coordinator:step microbatch -> P1 step=0 mb=0 attempt=0 stage=1: ok (900 ms)`,
    `${at(1200)} swarmtune:coordinator:step microbatch -> P0 step=0 mb=0 attempt=0 stage=0: ok (1100 ms)`,
    `${at(1300)} swarmtune:coordinator:step aggregate -> P0 step=0 phase=collect from=0: ok (50 ms)`,
    `${at(1500)} swarmtune:coordinator:step adapter -> P0 from=0: ok (100 ms)`,
    `${at(1700)} swarmtune:coordinator:placement optimizer -> P0 step=1 offset=0: ok (100 ms)`,
    `${at(1750)} swarmtune:coordinator:peers heartbeat -> P0 : ok (3 ms)`,
    `${at(2500)} swarmtune:coordinator:step microbatch -> P0 step=1 mb=0 attempt=0 stage=0: ok (600 ms)`,
    '[swarmtune launch] run finished after 2 steps',
  ];
  const reqs = parseRequestLines(lines);
  assert.equal(reqs.length, 7);
  assert.deepEqual(reqs[2], { proto: 'aggregate', step: 0, phase: 'collect', startMs: Date.UTC(2026, 0, 1) + 1250, endMs: Date.UTC(2026, 0, 1) + 1300 });
  const b = stepBreakdown(reqs);
  // step 0: micro-batches from 100 ms to the collect at 1250 ms; the tail to the optimizer's end at 1700 ms
  assert.deepEqual([...b.entries()], [[0, { mbS: 1.15, tailS: 0.45 }]]);
});

test('wan bench, quick: real launch + join processes; the loss is the same on every link and the wire carries at least the boundary tensors', { timeout: 300_000 }, async () => {
  const why = labSupport({ delay: true });
  const links = why === null ? LINKS.filter((l) => l.name === 'loopback' || l.name === '100/50') : LINKS.filter((l) => l.rateMbit === null);
  if (why !== null) console.log(`# wan bench: loopback only on 127.0.0.1 (${why})`);
  const r = await benchWan({ stages: [2], links, codecs: ['f32'], steps: 2, microBatch: 1, accumulation: 2, seqLen: 64, runTimeoutMs: 200_000 });
  const runs = r.runs as Array<Record<string, number | string | null>>;
  assert.deepEqual(r.failed, []);
  assert.equal(runs.length, links.length);
  for (const x of runs) {
    assert.ok(Number(x.tokens_per_s) > 0, JSON.stringify(x));
    assert.ok(Number(x.micro_batch_phase_s) > 0 && Number(x.step_tail_s) > 0, `breakdown ${x.micro_batch_phase_s} / ${x.step_tail_s}`);
    // f32 activations and their gradients cross the stage boundary: 2 × 4 bytes × hidden 512 per token at least
    if (why === null) assert.ok(Number(x.bytes_per_token_on_wire) >= 2 * 4 * 512, `${x.link}: ${x.bytes_per_token_on_wire} B/token on the wire`);
  }
  assert.equal(new Set(runs.map((x) => x.final_loss)).size, 1, `the link changes no number: ${runs.map((x) => `${x.link} ${x.final_loss}`).join(', ')}`);
  assert.equal(runs.find((x) => x.link === 'loopback')!.vs_loopback, 1);
});

test('docs/benchmarks.md WAN section is generated from the results file it names', () => {
  const doc = readFileSync(BENCH_DOC, 'utf8');
  const source = wanSourceOf(doc);
  assert.ok(source !== null, 'docs/benchmarks.md names no WAN results file (node bench/report.ts FILE --part=wan --write)');
  assert.ok(existsSync(path.join(ROOT, source)), `${source} is not in the repository`);
  const results = JSON.parse(readFileSync(path.join(ROOT, source), 'utf8'));
  assert.equal(doc, docWithWanTables(doc, renderWanTables(results, source)), `stale: run \`node bench/report.ts ${source} --part=wan --write\``);
  // the same data and steps under every link and codec of a stage count: the f32 runs' losses agree
  for (const stages of new Set(results.wan.runs.map((x: { stages: number }) => x.stages))) {
    const f32 = results.wan.runs.filter((x: { stages: number; codec: string }) => x.stages === stages && x.codec === 'f32');
    assert.equal(new Set(f32.map((x: { final_loss: number }) => x.final_loss)).size, 1, `${stages} stages, f32: losses ${f32.map((x: { final_loss: number }) => x.final_loss)}`);
  }
  assert.throws(() => renderWanTables({ ...results, wan: 3 }, source), { name: 'ReportError', message: /wan must be an object/ });
});

test('scale section (quick): every scenario and design variant simulated, no step lost or repeated, the figures it reports present', async () => {
  const { benchScale, SCENARIOS, variantsOf } = await import('../bench/scale.ts');
  const r = await benchScale({ quick: true, real: false }) as { runs: Array<{ scenario: string; variant: string; result: Record<string, any> }> };
  assert.deepEqual(r.runs.map((x) => `${x.scenario} ${x.variant}`), SCENARIOS.flatMap((n) => variantsOf(n, true).map(([v]) => `${n} ${v}`)));
  for (const { scenario, variant, result } of r.runs) {
    const what = `${scenario} (${variant})`;
    // a run that cannot go on (joins backed up behind blocking loads, a step re-run by every leave) stops at the
    // scenario's max_hours and says so
    assert.ok(result.steps === 2 || (result.stopped_at_time_cap === true && result.steps < 2), `${what}: ${result.steps} steps`);
    assert.equal(result.lost_steps, 0, what);
    assert.equal(result.repeated_steps, 0, what);
    if (result.steps > 0) assert.ok(result.tokens_per_s > 0 && result.tokens_per_s <= result.ideal_tokens_per_s, `${what}: ${result.tokens_per_s} tokens/s, ideal ${result.ideal_tokens_per_s}`);
    assert.ok(result.coordinator.bytes_per_step > 0 && result.coordinator.cpu_fraction > 0, what);
  }
  assert.equal(r.runs.find((x) => x.scenario === '1000-70b')!.result.peers, 1000);
});
