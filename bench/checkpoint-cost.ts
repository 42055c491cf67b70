// What an every-step optimizer checkpoint costs the coordinator (docs/swarm.md "Failure handling"):
// a stage's AdamW state serialized by the volunteer (saveState), pulled over libp2p on loopback in
// 8 MiB chunks (the `optimizer` stream), and written to LevelDB in the step's atomic batch.
// Run: node_modules/.bin/node bench/checkpoint-cost.ts [MiB of LoRA params per stage ...]
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createShardOptimizer } from '../node/optimizer.ts';
import { createSwarmNode, request, serve } from '../protocol/net.ts';
import { RunStore } from '../coordinator/store.ts';

const sizes = process.argv.slice(2).map(Number);
const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-ckpt-'));
const a = await createSwarmNode({ dataDir: path.join(dir, 'a') });
const b = await createSwarmNode({ dataDir: path.join(dir, 'b') });
const store = await RunStore.open(path.join(dir, 'db'));
let state: Uint8Array = new Uint8Array(0);
await serve(b, 'optimizer', async (req) => ({ sizeBytes: state.length, bytes: state.subarray(req.offset, Math.min(state.length, req.offset + req.length)) }));
const out: Array<Record<string, unknown>> = [];
let prev: { step: number; stages: number } | null = null;
for (const [i, mib] of (sizes.length > 0 ? sizes : [1, 4, 16]).entries()) {
  for (const optim of ['adamw_torch', 'paged_adamw_8bit'] as const) {
    const numel = Math.round(mib * 2 ** 20 / 4);
    const params = [{ name: 'w', shape: [numel], data: new Float32Array(numel).fill(0.01) }];
    const opt = await createShardOptimizer({ optim, adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0, residentBytes: 0 }, params, { spillDir: dir, state: null });
    await opt.step([new Float32Array(numel).fill(1e-3)], 1e-3);
    let t = performance.now();
    state = await opt.saveState();
    const saveMs = performance.now() - t;
    t = performance.now();
    const chunks: Uint8Array[] = [];
    for (let off = 0; off < state.length;) {
      const r = await request(a, b.getMultiaddrs()[0]!, 'optimizer', { runId: 'x', step: 1, offset: off, length: 8 * 2 ** 20 });
      chunks.push(r.bytes); off += r.bytes.length;
    }
    const pullMs = performance.now() - t;
    t = performance.now();
    const step = 10 * i + (optim === 'adamw_torch' ? 1 : 2);
    await store.commitStep({ step, loss: 0, lr: 0, gradNorm: 0, tokens: 0, tokensPerSecond: 0, timeMs: 0, cursor: 0 }, new Uint8Array(1024), [Buffer.concat(chunks)], prev !== null ? [prev] : []);
    prev = { step, stages: 1 };
    const writeMs = performance.now() - t;
    out.push({ lora_params_mib: mib, optim, state_mib: +(state.length / 2 ** 20).toFixed(2), save_ms: +saveMs.toFixed(1), pull_ms: +pullMs.toFixed(1), leveldb_ms: +writeMs.toFixed(1) });
  }
}
console.log(JSON.stringify(out, null, 1));
await store.close(); await a.stop(); await b.stop();
await rm(dir, { recursive: true, force: true });
