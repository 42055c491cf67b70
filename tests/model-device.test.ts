// The stage on a device-resident TensorBackend (what a GPU backend's tensors() gives), checked on CPU
// with tests/sim-device.ts: buffers are opaque handles, uploads and downloads copy, every buffer must be
// freed exactly once and never used after, outputs never alias inputs. Results must equal the host path
// bit for bit (the same native ops run in the same order), and nothing may stay allocated after a
// micro-batch's backward, a release, an inference call or dispose.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NativeBackend } from '../engine/backends/native.ts';
import { createDecoder, logits } from '../engine/model/decode.ts';
import { loadStage } from '../engine/model/load.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { Rng } from '../engine/model/rng.ts';
import type { LlamaConfig, LoraConfig, Stage, WeightSource } from '../engine/types.ts';
import { simDeviceBackend } from './sim-device.ts';

const native = new NativeBackend({ threads: 1 });
const ALL: LoraConfig['targetModules'] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const lora = (dropout: number): LoraConfig => ({
  r: 4, loraAlpha: 8, loraDropout: dropout, targetModules: ALL, useRslora: false, initLoraWeights: true,
});

function randomize(stage: Stage, seed: number): void {
  const rng = new Rng(seed);
  for (const p of stage.params) rng.fillNormal(p.data, 0, 0.2);
}

function ids(n: number, V: number, seed: number): Int32Array {
  const rng = new Rng(seed);
  return Int32Array.from({ length: n }, () => rng.nextU32() % V);
}

function labelsFor(x: Int32Array, B: number, S: number): Int32Array {
  const l = new Int32Array(B * S).fill(-100);
  for (let b = 0; b < B; b++) for (let s = 0; s + 1 < S; s++) l[b * S + s] = x[b * S + s + 1];
  l[3] = -100;
  return l;
}

function sameBits(a: Float32Array, b: Float32Array, what: string): void {
  assert.equal(a.length, b.length, `${what}: length`);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length), ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) {
    if (ua[i] !== ub[i]) assert.fail(`${what}[${i}]: ${a[i]} on the device path, ${b[i]} on the host path`);
  }
}

/** the source with the vocabulary matrices rounded to bfloat16, so stages hold them as bf16 */
function bf16Vocab(src: WeightSource): WeightSource {
  return {
    config: src.config, has: (n) => src.has(n), getNF4: (n) => src.getNF4(n),
    async getFloat(n) {
      const t = new Float32Array(await src.getFloat(n));
      if (n === 'model.embed_tokens.weight' || n === 'lm_head.weight') {
        const bits = new Uint32Array(t.buffer);
        for (let i = 0; i < bits.length; i++) bits[i] &= 0xffff0000;
      }
      return t;
    },
  };
}

/** two pipeline stages (split at layer 1) of the same model on the host and on the simulated device */
async function pair(cfg: LlamaConfig, over: { dropout: number; ckpt: boolean; lossChunk: number; bf16?: boolean }) {
  const src = over.bf16 ? bf16Vocab(randomWeightSource(cfg, 7)) : randomWeightSource(cfg, 7);
  const mk = async (be: typeof native | ReturnType<typeof simDeviceBackend>['backend']) => {
    const opts = { lora: lora(over.dropout), gradientCheckpointing: over.ckpt, lossChunk: over.lossChunk };
    const head = await loadStage(src, be, { layerStart: 0, layerEnd: 1, ...opts });
    const tail = await loadStage(src, be, { layerStart: 1, layerEnd: cfg.numHiddenLayers, ...opts });
    randomize(head, 1);
    randomize(tail, 2);
    return { head, tail };
  };
  const { backend, sim } = simDeviceBackend(native);
  return { host: await mk(native), dev: await mk(backend), sim };
}

/** one micro-batch through both stages: loss, gradIn of the tail and every LoRA grad */
async function step(st: { head: Stage; tail: Stage }, key: string, B: number, S: number, V: number, seed: number) {
  const x = ids(B * S, V, seed);
  const labels = labelsFor(x, B, S);
  const gh = st.head.newGrads(), gt = st.tail.newGrads();
  const f1 = await st.head.forward({ key, batch: B, seqLen: S, ids: x, dropoutSeed: seed });
  const f2 = await st.tail.forward({ key, batch: B, seqLen: S, hidden: f1.hidden!, labels, dropoutSeed: seed });
  const b2 = await st.tail.backward(key, gt, { lossScale: 1 / f2.tokens! });
  await st.head.backward(key, gh, { gradOut: b2.gradIn! });
  // a second backward pass accumulates onto the same grads (gradient accumulation)
  const f1b = await st.head.forward({ key: key + 'b', batch: B, seqLen: S, ids: x, dropoutSeed: seed + 1 });
  const f2b = await st.tail.forward({ key: key + 'b', batch: B, seqLen: S, hidden: f1b.hidden!, labels, dropoutSeed: seed + 1 });
  const b2b = await st.tail.backward(key + 'b', gt, { lossScale: 0.5 / f2b.tokens! });
  await st.head.backward(key + 'b', gh, { gradOut: b2b.gradIn! });
  return { loss: [f2.lossSum!, f2b.lossSum!], hidden: f1.hidden!, gradIn: b2.gradIn!, gh, gt };
}

for (const c of [
  { name: 'checkpointing, dropout 0.1, chunked loss', dropout: 0.1, ckpt: true, lossChunk: 30, cfg: tinyLlamaConfig({ numHiddenLayers: 3 }) },
  { name: 'no checkpointing, no dropout, qwen2 biases', dropout: 0, ckpt: false, lossChunk: 4096, cfg: tinyLlamaConfig({ numHiddenLayers: 3, modelType: 'qwen2', attentionBias: true }) },
  { name: 'tied bf16-exact vocab, checkpointing', dropout: 0.05, ckpt: true, lossChunk: 40, bf16: true, cfg: tinyLlamaConfig({ numHiddenLayers: 2, tieWordEmbeddings: true }) },
]) {
  test(`device-resident stage = host stage bit for bit, nothing leaked: ${c.name}`, async () => {
    const { host, dev, sim } = await pair(c.cfg, c);
    const B = 2, S = 9, V = c.cfg.vocabSize;
    const h = await step(host, 'k', B, S, V, 11);
    const d = await step(dev, 'k', B, S, V, 11);
    assert.deepEqual(d.loss, h.loss);
    sameBits(d.hidden, h.hidden, 'hidden');
    sameBits(d.gradIn, h.gradIn, 'gradIn');
    for (let i = 0; i < h.gh.length; i++) sameBits(d.gh[i], h.gh[i], `head grad ${dev.head.params[i].name}`);
    for (let i = 0; i < h.gt.length; i++) sameBits(d.gt[i], h.gt[i], `tail grad ${dev.tail.params[i].name}`);
    assert.ok(h.gt.some((g) => g.some((v) => v !== 0)), 'the grads are not trivially zero');
    assert.equal(sim.live(), 0, `buffers still held after backward: ${sim.live()} (${sim.liveFloats()} floats)`);
    assert.ok(sim.ops > 100 && sim.constantUploads > 0, 'the device path ran its ops on device buffers');
    // frozen weights cross once: a second step uploads no new constants
    const before = sim.constantUploads, uploads = sim.uploads;
    await step(dev, 'again', B, S, V, 12);
    assert.equal(sim.constantUploads, before, 'constants are uploaded once per array');
    // per micro-batch each LoRA tensor crosses once for the forward, once for the backward (recompute
    // included) and its gradient once: 3 per param, plus a few boundary buffers (ids/hidden, gradOut, loss state)
    const nParams = dev.head.params.length + dev.tail.params.length;
    const perMicroBatch = (sim.uploads - uploads) / 2;
    assert.ok(perMicroBatch <= 3 * nParams + 8, `${perMicroBatch} uploads per micro-batch for ${nParams} LoRA tensors`);
    // a device upload from host memory waits for the queued kernels: a pass uploads everything before
    // its first op (the head stage: input and LoRA tensors; its backward: LoRA tensors, grads, gradOut)
    sim.log = [];
    const x = ids(B * S, V, 13);
    const gh = dev.head.newGrads();
    const f = await dev.head.forward({ key: 'order', batch: B, seqLen: S, ids: x, dropoutSeed: 1 });
    const fwdLog = sim.log.join('');
    sim.log = [];
    await dev.head.backward('order', gh, { gradOut: new Float32Array(f.hidden!.length).fill(1e-3) });
    const bwdLog = sim.log.join('');
    sim.log = null;
    for (const [what, log] of [['forward', fwdLog], ['backward', bwdLog]] as const) {
      assert.match(log, /^U+O+D+$/, `head ${what}: uploads, then ops, then downloads (got ${log.replace(/(.)\1+/g, '$1…')})`);
    }
    assert.equal(sim.live(), 0);
  });
}

test('device-resident stage: release, dispose and inference free everything; logits and decoding match the host', async () => {
  const cfg = tinyLlamaConfig({ numHiddenLayers: 2 });
  const src = randomWeightSource(cfg, 3);
  const { backend, sim } = simDeviceBackend(native);
  const opts = { layerStart: 0, layerEnd: 2, lora: lora(0.1), gradientCheckpointing: false, lossChunk: 50 };
  const dev = await loadStage(src, backend, opts);
  const host = await loadStage(src, native, opts);
  randomize(dev, 5);
  randomize(host, 5);
  const B = 2, S = 6, V = cfg.vocabSize;
  const x = ids(B * S, V, 4);
  // kept forwards that are released (or never backpropagated before dispose) give their memory back
  await dev.forward({ key: 'a', batch: B, seqLen: S, ids: x, labels: labelsFor(x, B, S) });
  await dev.forward({ key: 'b', batch: B, seqLen: S, ids: x, labels: labelsFor(x, B, S) });
  assert.ok(sim.live() > 0, 'kept activations live on the device');
  dev.release('a');
  const afterRelease = sim.live();
  assert.ok(afterRelease > 0 && afterRelease < 1000);
  // eval forward keeps nothing
  const e = await dev.forward({ key: 'e', batch: B, seqLen: S, ids: x, labels: labelsFor(x, B, S) }, { train: false });
  const eh = await host.forward({ key: 'e', batch: B, seqLen: S, ids: x, labels: labelsFor(x, B, S) }, { train: false });
  assert.equal(e.lossSum, eh.lossSum);
  assert.equal(sim.live(), afterRelease);
  dev.dispose();
  assert.equal(sim.live(), 0, 'dispose frees the kept micro-batches');

  const dev2 = await loadStage(src, backend, opts);
  randomize(dev2, 5);
  sameBits(await logits(dev2, x, B, S), await logits(host, x, B, S), 'logits');
  assert.equal(sim.live(), 0);
  const dd = createDecoder(dev2, 8), hd = createDecoder(host, 8);
  sameBits(await dd.append([1, 2, 3]), await hd.append([1, 2, 3]), 'decode prefill');
  sameBits(await dd.append([4]), await hd.append([4]), 'decode step');
  assert.equal(sim.live(), 0, 'decoding holds nothing on the device between calls');
});

test('sim-device catches the mistakes it exists for: use after free, double free, aliasing, host reads', async () => {
  const { sim } = simDeviceBackend(native);
  const a = sim.alloc(4), b = sim.alloc(4);
  sim.free(a);
  await assert.rejects(sim.add(b, a, 4), /used after free/);
  assert.throws(() => sim.free(a), /freed twice/);
  await assert.rejects(sim.add(b, sim.slice(b, 0, 2), 2), /overlaps/);
  await assert.rejects(sim.add(new Float32Array(4) as never, b, 4), /not a device buffer/);
  assert.throws(() => sim.free(sim.slice(b, 0, 2)), /slice/);
  sim.free(b);
  assert.equal(sim.live(), 0);
});
