// Trust no stage, as units (no processes): the screens' history floors, adapter and optimizer-state
// upload checks against the layout the coordinator derives itself, and bans that stick in the peer
// registry (error-answer streaks, direct evidence, digest disagreements), and a spot check's digest rules.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Screens } from '../coordinator/screening.ts';
import { spotCheck } from '../coordinator/spot-check.ts';
import { floatSha256 } from '../protocol/hop.ts';
import { AdapterState, expectedStageParams } from '../coordinator/adapter.ts';
import { checkOptimizerState } from '../coordinator/stage-states.ts';
import { PeerRegistry } from '../coordinator/peers.ts';
import { RunStatus } from '../coordinator/status.ts';
import { coordinatorConfig } from '../coordinator/config.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import { encodeTensor } from '../protocol/tensor.ts';
import { SchemaError, TimeoutError } from '../protocol/errors.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { encodeOptimizerState } from '../node/optimizer.ts';
import { AdamW } from '../engine/train/optim.ts';
import { tamperAdapter, testAids } from '../node/test-aids.ts';
import { readKnobs } from '../engine/env.ts';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { RunStore } from '../coordinator/store.ts';
import type { Capabilities } from '../protocol/messages.ts';

const limits = { screenFactor: 50, outputHistory: 64, outputHistoryMin: 8, normHistory: 16 };
const wire = (x: Float32Array) => encodeTensor(x, [x.length], 'f32', 'x');
const filled = (v: number, n = 16) => new Float32Array(n).fill(v);

test('screens: near-zero outputs fail once the history has a reference, a zero-target gradient does not; the gradient floor comes from accepted steps only', () => {
  const sc = new Screens(limits);
  // what a receiver does (node/pipeline.ts): judge, then accept what is floor-eligible
  const out = sc.outputs;
  const receive = (key: string, rms: number, what: string, floor = true) => { out.judge(key, rms, what, { floor }); if (floor) out.accept(key, rms); };
  // no reference yet: anything finite passes, even zero
  receive('act:0', 0, 'a');
  for (let i = 0; i < 8; i++) receive('act:0', 1 + i / 100, 'a');
  assert.throws(() => receive('act:0', 0, 'zero act'), { name: 'BadOutputError', message: /zero act: RMS 0\.00e\+0 is under 1\/50 of the median/ });
  assert.throws(() => receive('act:0', 1e-3, 'lazy'), { name: 'BadOutputError' });
  receive('act:0', 0.05, 'small but plausible');
  assert.throws(() => receive('act:0', 100, 'big'), { name: 'BadOutputError', message: /over 50x/ });
  assert.throws(() => receive('act:0', Number.NaN, 'nan'), { name: 'BadOutputError', message: /not finite/ });
  for (let i = 0; i < 8; i++) receive('grad:1', 1, 'g');
  // a micro-batch without trained positions has a zero activation gradient by right
  receive('grad:1', 0, 'no targets', false);
  // ... and still no absurd one
  assert.throws(() => receive('grad:1', 1e3, 'no targets, huge', false), { name: 'BadOutputError', message: /over 50x/ });
  assert.throws(() => receive('grad:1', 0, 'zero grad'), { name: 'BadOutputError', message: /under 1\/50/ });
  // step gradients: a zero one passes at step 0 (no history) and when its micro-batches had no targets
  const g = (id: string, v: number, labelTokens?: number) => ({ id, grads: [filled(v)], microBatches: 2, labelTokens });
  assert.deepEqual(sc.gradients(0, 0, [g('A', 1), g('B', 0)]), []);
  // an outsized replica against one honest partner: only the outsized one is bad (the floor is not symmetric)
  assert.deepEqual(sc.gradients(0, 0, [g('A', 1), g('B', 1e4)]).map((b) => b.id), ['B']);
  sc.accept([[g('A', 1), g('B', 1.1)]]);
  const bad = sc.gradients(0, 1, [g('A', 1), g('B', 0), g('C', 0, 0)]);
  assert.deepEqual(bad.map((b) => b.id), ['B']);
  assert.match(bad[0]!.reason, /under 1\/50 of the median .* of recent accepted steps/);
  assert.deepEqual(sc.gradients(0, 1, [g('A', Number.NaN)]).map((b) => b.reason), ['its step 1 gradient is non-finite']);
  assert.throws(() => sc.stepGradient({ ...wire(filled(1)), bytes: new Uint8Array(new Float32Array([Number.NaN]).buffer) }, 'grad 0', [1]), { name: 'BadOutputError' });
});

const llama = parseLlamaConfig({
  model_type: 'llama', vocab_size: 97, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 4,
  num_attention_heads: 2, num_key_value_heads: 1, rms_norm_eps: 1e-5, rope_theta: 10000, max_position_embeddings: 64,
});
const train = resolveTrainConfig({ flags: { lora_r: 2, target_modules: 'q_proj,down_proj', seed: 3 } });
const lora = loraConfigOf(train);
const stages = [{ layerStart: 0, layerEnd: 2 }, { layerStart: 2, layerEnd: 4 }];

function uploader(page: Array<{ name: string; tensor: ReturnType<typeof encodeTensor> }>): StagePeerClient {
  return { adapter: async () => page } as unknown as StagePeerClient;
}
const pageOf = (ts: Array<{ name: string; shape: number[]; data: Float32Array }>) => ts.map((t) => ({ name: t.name, tensor: encodeTensor(t.data, t.shape, 'f32', t.name) }));

test('adapter uploads: only the stage\'s own names in stage order, exact shapes, finite, and the agreed digest; a refused upload keeps nothing', async () => {
  const a = new AdapterState(null, { llama, lora, seed: 3 });
  a.resetStages(stages);
  const own = expectedStageParams({ llama, lora, seed: 3 }, stages[1]!);
  assert.deepEqual(own.map((t) => t.name.replace('base_model.model.model.', '')), [
    'layers.2.self_attn.q_proj.lora_A.weight', 'layers.2.self_attn.q_proj.lora_B.weight', 'layers.2.mlp.down_proj.lora_A.weight', 'layers.2.mlp.down_proj.lora_B.weight',
    'layers.3.self_attn.q_proj.lora_A.weight', 'layers.3.self_attn.q_proj.lora_B.weight', 'layers.3.mlp.down_proj.lora_A.weight', 'layers.3.mlp.down_proj.lora_B.weight',
  ]);
  assert.deepEqual(own[0]!.shape, [2, 16]);
  assert.deepEqual(own[3]!.shape, [16, 2]);
  assert.equal(a.initialDigest(1), adapterDigest(own), 'the seeded init, computed by the coordinator');
  const aids = (m: string) => testAids(readKnobs({ SWARMTUNE_TEST_BAD_ADAPTER: m }));
  const cases: Array<[string, ReturnType<typeof pageOf>, RegExp]> = [
    ['foreign', tamperAdapter(aids('foreign'), pageOf(own), 0, { ...stages[1]!, isLast: true }), /tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight is not one of stage 1's \(layers \[2, 4\)\)/],
    ['shape', tamperAdapter(aids('shape'), pageOf(own), 0, { ...stages[1]!, isLast: true }), /expected shape \[2,16\], got \[3,16\]/],
    ['nan', tamperAdapter(aids('nan'), pageOf(own), 0, { ...stages[1]!, isLast: true }), /non-finite/],
    ['missing', pageOf(own.slice(1)), /7 tensors, stage 1 \(layers \[2, 4\)\) has 8/],
    ['reordered', pageOf([own[1]!, own[0]!, ...own.slice(2)]), /tensor 0 is .*q_proj\.lora_B.*, stage 1's tensor 0 is .*q_proj\.lora_A/],
  ];
  for (const [what, page, msg] of cases) {
    await assert.rejects(a.upload(uploader(page), 'P', [], 1), { name: 'BadUploadError', message: msg }, what);
    assert.equal(a.stageSlice(stages[1]!).length, 0, `${what}: nothing kept`);
  }
  // honest, but not what the replicas agreed on after the update
  await assert.rejects(a.upload(uploader(pageOf(own)), 'P', [], 1, { digest: '0'.repeat(64) }), { name: 'BadUploadError', message: /hashes to .*, not to 0000000000000000… that its replicas reported/ });
  await a.upload(uploader(pageOf(own)), 'P', [], 1, { digest: adapterDigest(own) });
  assert.equal(a.stageDigest(stages[1]!), adapterDigest(own));
  assert.equal(a.namesOf(1).length, 8);
});

test('optimizer-state uploads: the run\'s optimizer, its own tensors with exact sizes, finite, v >= 0', () => {
  const params = [{ name: 'p.a', numel: 6 }, { name: 'p.b', numel: 4 }];
  const adam = new AdamW(params, { optim: 'adamw_torch', beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 });
  adam.update([new Float32Array(6), new Float32Array(4)], [filled(0.1, 6), filled(-0.2, 4)], 1e-3);
  const good = adam.exportState();
  const e = { optim: 'adamw_torch', step: 1, params };
  checkOptimizerState(encodeOptimizerState(good), e, 'ok');
  checkOptimizerState(encodeOptimizerState(good), { ...e, step: 5 }, 'a replica that counts its steps since it took the stage');
  const bad = (mut: (s: typeof good) => void) => { const s = structuredClone(good); mut(s); return encodeOptimizerState(s); };
  assert.throws(() => checkOptimizerState(encodeOptimizerState(good), { ...e, optim: 'adamw_8bit' }, 'w'), { name: 'BadUploadError', message: /optimizer adamw_torch, the run uses adamw_8bit/ });
  assert.throws(() => checkOptimizerState(encodeOptimizerState(good), { ...e, step: 0 }, 'w'), /1 completed steps, the run has made 0/);
  assert.throws(() => checkOptimizerState(bad((s) => { s.tensors[0]!.name = 'other.stage.exp_avg'; }), e, 'w'), /tensor other\.stage\.exp_avg is not one of the stage's own/);
  assert.throws(() => checkOptimizerState(bad((s) => { s.tensors.pop(); }), e, 'w'), /3 tensors, the stage's state has 4/);
  assert.throws(() => checkOptimizerState(bad((s) => { s.tensors[0] = { ...s.tensors[0]!, shape: [7], data: new Float32Array(7) }; }), e, 'w'), /tensor p\.a\.exp_avg is not F32 \[6\]/);
  assert.throws(() => checkOptimizerState(bad((s) => { (s.tensors[1]!.data as Float32Array)[2] = -1; }), e, 'w'), /p\.a\.exp_avg_sq element 2 is -1/);
  assert.throws(() => checkOptimizerState(bad((s) => { (s.tensors[0]!.data as Float32Array)[0] = Number.NaN; }), e, 'w'), /element 0 is NaN/);
  assert.throws(() => checkOptimizerState(new Uint8Array([0xc1]), e, 'w'), { name: 'BadUploadError' });
});

function registry(): { reg: PeerRegistry; events: Array<Record<string, unknown>>; hb: { ok: boolean } } {
  const events: Array<Record<string, unknown>> = [];
  const hb = { ok: true };
  const client = {
    heartbeat: async () => { if (!hb.ok) throw new TimeoutError('no answer'); return { runId: 'r', ready: true, step: 0, tokensPerSecond: 1, inflight: 0, busy: false, memoryRssBytes: 0 }; },
    finish: async () => {},
  } as unknown as StagePeerClient;
  const status = new RunStatus({ runId: 'r', modelName: 'm', totalSteps: 1, minPeers: 1, step: 0, eventHistory: 50, emit: (e) => events.push(e), log: () => {} });
  const store = { putBans: async () => {}, getBans: async () => null } as unknown as RunStore;
  const reg = new PeerRegistry({ runId: 'r', client, config: coordinatorConfig({}, {}), status, store, signal: new AbortController().signal });
  for (const id of ['A', 'B', 'C']) reg.join(id, { backend: 'cpu', deviceName: 'x' } as Capabilities, [], undefined, false);
  reg.setReplicas([['A', 'B', 'C']]);
  for (const id of ['A', 'B', 'C']) { reg.get(id)!.stageIndex = 0; reg.get(id)!.health = 'ok'; }
  return { reg, events, hb };
}

test('peer registry: three error answers in a row (no success between) ban a peer that stays up; a success resets the streak; timeouts are not errors', async () => {
  const { reg, events } = registry();
  const signal = new AbortController().signal;
  const err = new SchemaError('I refuse');
  await reg.afterFailure('A', err, signal);
  await reg.afterFailure('A', err, signal);
  reg.get('A')!.microBatches++; // it committed one in between
  await reg.afterFailure('A', err, signal);
  await reg.afterFailure('A', err, signal);
  assert.equal(reg.get('A')!.health, 'ok');
  for (let i = 0; i < 5; i++) await reg.afterFailure('B', new TimeoutError('slow'), signal);
  assert.notEqual(reg.get('B')!.health, 'banned');
  await reg.afterFailure('A', err, signal);
  assert.equal(reg.get('A')!.health, 'banned');
  const ban = events.find((e) => e.event === 'peer_banned')!;
  assert.deepEqual([ban.peer_id, ban.evidence], ['A', 'error-answers']);
  assert.match(String(ban.reason), /answered 3 requests in a row with an error, staying up \(last: SchemaError: I refuse\)/);
  assert.deepEqual(reg.liveReplicas(0), ['B', 'C'], 'out of its stage');
});

test('peer registry: a bad step gradient or upload bans (not drops); replica digests: the minority is banned, 1 vs 1 leaves both out unbanned', async () => {
  const { reg, events } = registry();
  const signal = new AbortController().signal;
  await reg.dropAfterFailure('A', Object.assign(new Error('grad 0: non-finite value NaN at element 0'), { name: 'BadOutputError' }), 'collect', signal);
  assert.equal(reg.get('A')!.health, 'banned');
  assert.equal(events.at(-1)!.evidence, 'bad-tensor');
  const d = (a: string) => ({ adapterSha256: a.repeat(64), optimizerSha256: 'f'.repeat(64) });
  const two = registry();
  const agreed = await two.reg.settleDigests(0, 1, [{ peerId: 'A', ...d('a') }, { peerId: 'B', ...d('b') }, { peerId: 'C', ...d('a') }], signal);
  assert.deepEqual(agreed, d('a'));
  assert.equal(two.reg.get('B')!.health, 'banned');
  assert.equal(two.events.find((e) => e.event === 'peer_banned')!.evidence, 'disagreement');
  const tie = registry();
  tie.reg.setReplicas([['A', 'B']]);
  assert.equal(await tie.reg.settleDigests(0, 1, [{ peerId: 'A', ...d('a') }, { peerId: 'B', ...d('b') }], signal), null);
  assert.deepEqual([tie.reg.get('A')!.health, tie.reg.get('B')!.health], ['dead', 'dead']);
  assert.equal(tie.events.filter((e) => e.event === 'peer_banned').length, 0);
  assert.deepEqual(await tie.reg.settleDigests(0, 1, [{ peerId: 'C', ...d('c') }], signal), d('c'), 'one replica: its own digests, checked against its upload');
});

test('spot check: recalled tensors held to both hop digests (a receiver contradicting its own report is banned, a sender/receiver dispute counts nothing and bans nobody); the calls rebuilt from them', async () => {
  const T = 2, C = 3, route = ['P0', 'P1'];
  const act = new Float32Array([1, 2, 3, 4, 5, 6]), grad = new Float32Array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
  const m = { ids: new Int32Array([5, 6]), labels: new Int32Array([6, -100]), batch: 1, seqLen: 2 };
  const a = { m, route, key: { step: 3, mb: 1, attempt: 0 }, lossScale: 0.5, dropoutSeed: 9 };
  const run = async (o: { uploaded?: Float32Array; sentAct?: string }) => {
    const checks: Array<{ s: number; call: any; answer: any }> = [];
    const held: Record<string, Float32Array> = { 'P1:act': o.uploaded ?? act, 'P0:grad': grad };
    let pending: Record<string, (d: Float32Array) => void> = {};
    const ctx = {
      runId: 'r', hiddenSize: C, computeTimeoutMs: 1000, coordinatorId: 'C',
      hops: { receive: (k: { kind: string }, e: { from: string }) => new Promise((res) => { pending[`${e.from}:${k.kind}`] = (d) => res({ data: d, rms: 1 }); }) },
      client: { recall: async (_addrs: unknown, _key: unknown, kind: string) => {
        const id = kind === 'act' ? 'P1' : 'P0';
        await new Promise((r) => setImmediate(r));
        pending[`${id}:${kind}`]!(held[`${id}:${kind}`]!);
        return floatSha256(held[`${id}:${kind}`]!);
      } },
      peers: { addrs: () => [], liveReplicas: (s: number) => [route[s]!, `R${s}`] },
      verifier: { check: async (s: number, call: any, answer: any) => { checks.push({ s, call, answer }); return { counts: true, bans: [], strikes: [], checkedBy: [`R${s}`], detail: 'agrees' }; } },
    } as never;
    const responses = [
      { sentActSha256: o.sentAct ?? floatSha256(act), gradSha256: floatSha256(grad) },
      { actSha256: floatSha256(act), sentGradSha256: floatSha256(grad), lossSum: 2.5 },
    ];
    const r = await spotCheck(ctx, a as never, responses, () => 1, new AbortController().signal);
    pending = {};
    return { r, checks };
  };
  const ok = await run({});
  assert.equal(ok.r.counts, true);
  assert.deepEqual(ok.checks.map((c) => c.s), [0, 1]);
  // stage 0: ids in, the gradient it received; its answer is what stage 1 received
  assert.deepEqual(ok.checks[0]!.answer, { hidden: act });
  assert.equal(ok.checks[0]!.call.hidden, undefined);
  assert.ok(ok.checks[0]!.call.ids !== undefined && ok.checks[0]!.call.gradOut !== undefined);
  // stage 1: the activation it received in, labels and loss scale; its answer is what stage 0 received and its loss
  assert.deepEqual(ok.checks[1]!.answer, { gradIn: grad, lossSum: 2.5 });
  assert.equal(ok.checks[1]!.call.lossScale, 0.5);
  assert.deepEqual(new Float32Array(ok.checks[1]!.call.hidden.bytes.slice().buffer), act);
  const lied = await run({ uploaded: act.map((x) => x * 1.02) });
  assert.equal(lied.r.counts, false);
  assert.deepEqual(lied.r.bans.map((b) => [b.peerId, b.evidence]), [['P1', 'bad-upload']]);
  assert.match(lied.r.bans[0]!.reason, /its recalled copy of the activation of stage 0 in step 3 micro-batch 1 attempt 0 does not hash to the digest it reported/);
  assert.equal(lied.checks.length, 0, 'nothing is recomputed on contradicted evidence');
  const disputed = await run({ sentAct: floatSha256(act.map((x) => x * 2)) });
  assert.equal(disputed.r.counts, false);
  assert.deepEqual(disputed.r.bans, []);
  assert.deepEqual(disputed.r.strikes, ['P0', 'P1']);
  assert.match(disputed.r.detail, /P0 and P1 report different digests of the activation of stage 0/);
});
