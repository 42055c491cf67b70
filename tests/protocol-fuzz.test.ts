// Protocol fuzzing at unit level (issue 6.6): mutated frames of every protocol through the frame reader
// and the request schemas, and mutated requests straight into real stage hosts (the volunteer's
// handlers): every refusal is a typed error, and a refused request leaves no trace — a host that saw
// every fuzzed request ends bit-identical to a twin that saw only the ones the first accepted.
//
// The model is a random 4-layer hidden-64 Llama on the float64 reference backend (as in
// tests/swarm-inproc.test.ts), cut into two stages, so the first stage sees token ids and the last
// labels and loss scales. Seeds are printed; FUZZ_SEED=<n> reruns one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { RefBackend } from '../engine/backends/ref.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { FrameReader, decodeBody } from '../protocol/frame.ts';
import { PROTOCOLS } from '../protocol/constants.ts';
import { SCHEMAS, hopChunk, hopHeader, hopReply } from '../protocol/messages.ts';
import type { Assignment } from '../protocol/messages.ts';
import { decodeTensor } from '../protocol/tensor.ts';
import type { WireTensor } from '../protocol/tensor.ts';
import { SwarmError } from '../protocol/errors.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import type { ProtoName } from '../protocol/net.ts';
import { StageHost } from '../node/stage-host.ts';
import { runMicroBatch } from '../node/pipeline.ts';
import { HopError } from '../protocol/hop.ts';
import type { HopInbox } from '../protocol/hop.ts';
import { silentLogger } from '../protocol/log.ts';
import { createShardOptimizer } from '../node/optimizer.ts';
import { Rng, mutate, validRequest, TYPED_ERRORS, pack, frameOf } from './fuzz-frames.ts';
import type { TemplateContext } from './fuzz-frames.ts';

const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : (Date.now() % 1_000_000);
console.log(`# protocol fuzz seed ${SEED} (rerun with FUZZ_SEED=${SEED})`);

const TYPED_LOCAL = new Set([...TYPED_ERRORS].filter((n) => n !== 'TimeoutError'));
function assertTyped(e: unknown, what: string): string {
  assert.ok(e instanceof SwarmError, `${what}: threw a non-protocol error ${(e as Error)?.name}: ${(e as Error)?.message}`);
  assert.ok(TYPED_LOCAL.has(e.name), `${what}: error name ${e.name} is not a typed protocol error (${e.message})`);
  return e.name;
}

/** Chunks a frame arbitrarily, as a network would. */
async function* chunked(rng: Rng, b: Uint8Array): AsyncGenerator<Uint8Array> {
  let o = 0;
  while (o < b.length) { const n = 1 + rng.int(Math.max(1, Math.min(b.length - o, rng.int(3) === 0 ? 7 : 65536))); yield b.subarray(o, o + n); o += n; }
}

// every request/response protocol; hop streams (several frames each) are fuzzed below, frame by frame
const ALL = Object.keys(PROTOCOLS).filter((p) => p !== 'hop') as ProtoName[];

test('frames of every protocol, mutated 1000 ways each: the reader and the schemas answer only typed errors', async () => {
  const rng = new Rng(SEED);
  const ctx: TemplateContext = { runId: 'run-1', step: 3, stageIndex: 1, hidden: 16, batch: 2, seqLen: 4, vocab: 97, sha256: 'ab'.repeat(32), route: ['12D3KooWabc'] };
  const outcomes = new Map<string, number>();
  let frames = 0;
  for (const proto of ALL) {
    for (let i = 0; i < 1000; i++) {
      const m = mutate(rng, validRequest(rng, proto, { ...ctx, stageIndex: rng.int(2) }));
      frames++;
      let name = 'accepted';
      try {
        const raw = await new FrameReader(chunked(rng, m.bytes)).read();
        if (raw === undefined) { name = 'empty'; continue; }
        const req = SCHEMAS[proto].req(raw, `${proto} request`) as Record<string, unknown>;
        for (const [k, v] of Object.entries(req)) if (v !== null && typeof v === 'object' && 'codec' in v) decodeTensor(v as WireTensor, k);
        for (const g of (req.grads as WireTensor[] | undefined) ?? []) decodeTensor(g, 'grads');
      } catch (e) {
        name = assertTyped(e, `${proto} ${m.kind}`);
      } finally {
        outcomes.set(name, (outcomes.get(name) ?? 0) + 1);
      }
    }
  }
  // the frames of a hop stream: header, chunks and the receiver's replies
  const hopFrames: Array<[string, unknown, (x: unknown, w: string) => unknown]> = [
    ['hop header', { runId: 'run-1', step: 3, mb: 1, attempt: 0, kind: 'act', shape: [8, 16], codec: 'bf16' }, hopHeader],
    ['hop chunk', { offset: 64, tensor: { dtype: 'f32', shape: [64], codec: 'f32', bytes: new Uint8Array(256) } }, hopChunk],
    ['hop reply', { credit: 4 }, hopReply],
  ];
  for (const [what, valid, schema] of hopFrames) {
    for (let i = 0; i < 1000; i++) {
      const m = mutate(rng, valid);
      frames++;
      let name = 'accepted';
      try {
        const raw = await new FrameReader(chunked(rng, m.bytes)).read();
        if (raw === undefined) { name = 'empty'; continue; }
        const x = schema(raw, what) as Record<string, unknown>;
        if (x.tensor !== undefined) decodeTensor(x.tensor as WireTensor, 'chunk');
      } catch (e) {
        name = assertTyped(e, `${what} ${m.kind}`);
      } finally {
        outcomes.set(name, (outcomes.get(name) ?? 0) + 1);
      }
    }
  }
  console.log(`# ${frames} frames: ${[...outcomes].map(([k, n]) => `${k}=${n}`).join(' ')}`);
  for (const k of ['DecodeError', 'SchemaError', 'TensorError', 'FrameTooLargeError', 'accepted']) assert.ok((outcomes.get(k) ?? 0) > 0, `some frames end as ${k}`);
  // the decoder keeps working after stack-overflowing nesting and truncated input
  const deep = new Uint8Array(200_001).fill(0x91); deep[200_000] = 0xc0;
  assert.throws(() => decodeBody(deep), { name: 'DecodeError' });
  assert.deepEqual(decodeBody(pack({ a: [1, 2] })), { a: [1, 2] });
  await assert.rejects(new FrameReader(chunked(rng, frameOf(new Uint8Array(8), 2 ** 31))).read(), { name: 'FrameTooLargeError' });
});

// ---- stage hosts

const HF = {
  model_type: 'llama', vocab_size: 97, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4,
  num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 256, tie_word_embeddings: false,
};
const llama = parseLlamaConfig(HF);
const weights = randomWeightSource(llama, 3);
const train = resolveTrainConfig({ flags: { lora_r: 4, lora_alpha: 8, target_modules: 'q_proj,v_proj,down_proj', device: 'ref' } });
const lora = loraConfigOf(train);
const RUN = 'fuzz-run';
const B = 2, S = 8, T = B * S;

async function makeHost(stageIndex: number, dir: string): Promise<StageHost> {
  const [layerStart, layerEnd] = stageIndex === 0 ? [0, 2] : [2, 4];
  const stage = await loadStage(weights, new RefBackend(), { layerStart, layerEnd, lora, seed: 11 });
  const a = {
    runId: RUN, stageIndex, numStages: 2, wireCodec: 'f32', step: 0,
    optim: { optim: 'adamw_torch', adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0, residentBytes: 0 },
  } as unknown as Assignment;
  const optimizer = await createShardOptimizer(a.optim, stage.params, { spillDir: path.join(dir, 'optim'), state: null });
  return new StageHost(stage, a, optimizer, { dir: path.join(dir, 'restore') });
}

type HostProto = 'microbatch' | 'commit' | 'aggregate' | 'adapter' | 'optimizer';
const HOST_PROTOS: HostProto[] = ['microbatch', 'commit', 'aggregate', 'adapter', 'optimizer'];
/** the two stages' peer ids on the fuzzed route */
const ROUTE = ['QmStageA', 'QmStageB'];

/** The hops around the host, made deterministic: the activation from stage 0 is always the same
 *  tensor, a gradient never comes, and no send reaches anyone (each reported as a broken hop). */
function stubHops(stageIndex: number) {
  const hidden = new Float32Array(T * 64).map((_, i) => Math.sin(i) * 0.5);
  const inbox = {
    receive: async (key: { kind: string }) => {
      if (key.kind === 'act') return { data: hidden.slice(), rms: 0.5 };
      throw new HopError(ROUTE[1]!, 'no gradient in this test');
    },
  } as unknown as HopInbox;
  const node = { peerId: { toString: () => ROUTE[stageIndex]! }, dial: async () => { throw new Error('no network in this test'); } };
  return { inbox, node: node as never, coordinator: { addrs: [], peerId: 'QmCoordinator' }, log: silentLogger };
}

async function call(h: StageHost, proto: HostProto, req: unknown): Promise<unknown> {
  switch (proto) {
    // the per-job deadline is the coordinator's; a job past it fails the attempt (a timeout, which the
    // coordinator then discards), so it is held fixed here
    case 'microbatch': return runMicroBatch({ ...stubHops(h.stageIndex), host: h }, { ...(req as object), jobTimeoutMs: 60_000 } as never, { signal: new AbortController().signal });
    case 'commit': h.commit(req as never); return { ok: true };
    case 'aggregate': return h.aggregate(req as never);
    case 'adapter': return h.adapter(req as never);
    case 'optimizer': return h.optimizerChunk(req as never);
  }
}

/** Everything a request could change on a host, private state included (white box on purpose). */
function digest(h: StageHost): string {
  const p = (h as unknown as { gradients: {
    attempts: Map<string, { forwardDone: boolean; grads: Float32Array[] | null }>;
    committed: Map<number, { attempt: number; grads: Float32Array[] }>;
    finalGrads: Float32Array[] | null;
  } }).gradients;
  const g = (xs: Float32Array[] | null) => (xs === null ? 'null' : adapterDigest(xs.map((d, i) => ({ name: String(i), shape: [d.length], data: d }))));
  return JSON.stringify({
    step: h.step,
    params: adapterDigest(h.stage.params),
    attempts: [...p.attempts].map(([k, a]) => `${k}:${a.forwardDone}:${g(a.grads)}`).sort(),
    committed: [...p.committed].map(([mb, c]) => `${mb}:${c.attempt}:${g(c.grads)}`).sort(),
    finalGrads: g(p.finalGrads),
    kept: (h.stage as unknown as { kept: Map<string, unknown> }).kept.size,
  });
}

/** A legit forward through one host, with fixed inputs (the same on both twins). */
function legitForward(stageIndex: number, mb: number, attempt: number, rng: Rng): Parameters<StageHost['forward']>[0] {
  const ids = new Int32Array(T), labels = new Int32Array(T), hidden = new Float32Array(T * 64);
  for (let i = 0; i < T; i++) { ids[i] = rng.int(97); labels[i] = i % S === S - 1 ? -100 : rng.int(97); }
  for (let i = 0; i < hidden.length; i++) hidden[i] = rng.next() - 0.5;
  const t = (a: Int32Array, shape: number[]): WireTensor => ({ dtype: 'i32', shape, codec: 'i32', bytes: new Uint8Array(a.slice().buffer) });
  const req: Parameters<StageHost['forward']>[0] = { runId: RUN, step: 0, mb, attempt, stageIndex, batch: B, seqLen: S, dropoutSeed: 0, train: true };
  if (stageIndex === 0) req.ids = t(ids, [T]); else { req.hidden = hidden; req.labels = t(labels, [T]); }
  return req;
}

for (const stageIndex of [0, 1]) {
  test(`stage ${stageIndex} host: 6000 mutated microbatch/commit/aggregate/adapter/optimizer requests are refused with typed errors and change nothing`, async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-fuzz-host-'));
    try {
      const A = await makeHost(stageIndex, path.join(dir, 'a'));
      const Bh = await makeHost(stageIndex, path.join(dir, 'b'));
      assert.equal(digest(A), digest(Bh), 'twins start equal');
      // a state with something to lose: micro-batch 0 committed, 1 through backward, 2 forwarded
      const setup = async (h: StageHost) => {
        const r = new Rng(99);
        const back = (mb: number) => ({ runId: RUN, step: 0, mb, attempt: 0, stageIndex, ...(stageIndex === 0 ? { gradOut: new Float32Array(T * 64).fill(1e-3) } : { lossScale: 1 / 64 }) });
        for (const mb of [0, 1, 2]) await h.forward(legitForward(stageIndex, mb, 0, r));
        for (const mb of [0, 1]) await h.backward(back(mb));
        h.commit({ runId: RUN, step: 0, mb: 0, attempt: 0, commit: true });
      };
      await setup(A); await setup(Bh);
      assert.equal(digest(A), digest(Bh));

      const rng = new Rng(SEED + stageIndex);
      const shapes = A.stage.params.map((p) => [...p.shape]);
      const outcomes = new Map<string, number>();
      let accepted = 0;
      for (let i = 0; i < 6000; i++) {
        const proto = HOST_PROTOS[i % HOST_PROTOS.length]!;
        const ctx: TemplateContext = { runId: RUN, step: A.step, stageIndex, hidden: 64, batch: B, seqLen: S, vocab: 97, sha256: '00'.repeat(32), route: ROUTE, paramShapes: shapes };
        const m = mutate(rng, validRequest(rng, proto, ctx));
        let req: unknown;
        try {
          // what serve() does before a handler runs
          const raw = await new FrameReader(chunked(rng, m.bytes)).read();
          if (raw === undefined) continue;
          req = SCHEMAS[proto].req(raw, `${proto} request`);
        } catch (e) {
          const n = assertTyped(e, `${proto} ${m.kind} (decode)`);
          outcomes.set(n, (outcomes.get(n) ?? 0) + 1);
          continue;
        }
        const before = digest(A);
        try {
          const resA = await call(A, proto, req);
          // accepted: the twin takes the same request and must answer the same
          const resB = await call(Bh, proto, req);
          assert.deepEqual(resA, resB, `${proto} ${m.kind}: the twin answers differently`);
          accepted++;
          outcomes.set(`accepted ${proto}`, (outcomes.get(`accepted ${proto}`) ?? 0) + 1);
        } catch (e) {
          const n = assertTyped(e, `${proto} ${m.kind} (handler)`);
          outcomes.set(n, (outcomes.get(n) ?? 0) + 1);
          assert.equal(digest(A), before, `${proto} ${m.kind}: the refused request (${n}: ${(e as Error).message}) changed the host's state`);
        }
      }
      console.log(`# stage ${stageIndex}: ${[...outcomes].map(([k, n]) => `${k}=${n}`).join(' ')}`);
      assert.ok(accepted > 0);
      for (const k of ['SchemaError', 'TensorError', 'StaleError', 'DecodeError']) assert.ok((outcomes.get(k) ?? 0) > 0, `some requests end as ${k}`);
      // the fuzzed host and its twin are the same, down to the step sum and the optimizer state
      assert.equal(digest(A), digest(Bh));
      const collect = { runId: RUN, step: A.step, phase: 'collect' as const, from: 0, count: 1 << 16 };
      assert.deepEqual(await A.aggregate(collect), await Bh.aggregate(collect));
      const opt = { runId: RUN, step: A.step, offset: 0, length: 8 << 20 };
      assert.deepEqual(await A.optimizerChunk(opt), await Bh.optimizerChunk(opt));
      await A.dispose(); await Bh.dispose(); A.stage.dispose(); Bh.stage.dispose();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}
