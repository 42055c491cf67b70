// node/: the volunteer's handler table, session states, config, job queue and server-side paging,
// without a network (the swarm tests run them end to end).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import os from 'node:os';
import { tinyLlamaConfig, randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { readKnobs } from '../engine/env.ts';
import { encodeTensor } from '../protocol/tensor.ts';
import { PAGE_TENSORS, COMPUTE_TIMEOUT_MS } from '../protocol/constants.ts';
import type { Assignment } from '../protocol/messages.ts';
import type { HandlerContext } from '../protocol/net.ts';
import { dispatch, volunteerHandlers } from '../node/handlers.ts';
import { LeavingError, VolunteerSession } from '../node/session.ts';
import { VolunteerEvents } from '../node/events.ts';
import { resolveVolunteerConfig } from '../node/config.ts';
import { JobQueue } from '../node/job-queue.ts';
import { StageHost } from '../node/stage-host.ts';
import { createShardOptimizer } from '../node/optimizer.ts';
import { testAids } from '../node/test-aids.ts';

const COORD = '12D3KooWGzBvQ1sn4W3qJ5mA9WiF5N1rZ2gVZwNTn4CBfU8vGQLz';
const ADDR = `/ip4/127.0.0.1/tcp/4001/p2p/${COORD}`;
const opts = { coordinator: ADDR, token: null, device: 'ref', dataDir: os.tmpdir(), json: true };

function session(): VolunteerSession {
  const config = resolveVolunteerConfig(opts, readKnobs({}));
  return new VolunteerSession(config, { node: {} as never, blobs: {} as never, backend: new RefBackend(), createOptimizer: createShardOptimizer, events: new VolunteerEvents(true, () => {}) });
}

const ctx = (peerId: string): HandlerContext => ({ peerId, connection: {} as never, signal: new AbortController().signal });

test('the handler table: an unknown message is a SchemaError; stage traffic only from the coordinator, and only while serving', async () => {
  const s = session();
  const table = volunteerHandlers(s, {} as never);
  assert.deepEqual(Object.keys(table), ['weights', 'heartbeat', 'microbatch', 'commit', 'recall', 'aggregate', 'adapter', 'optimizer', 'finish']);
  await assert.rejects(dispatch(table, 'status', {}, ctx(COORD)), { name: 'SchemaError', message: /unknown message status/ });
  await assert.rejects(dispatch(table, 'toString', {}, ctx(COORD)), { name: 'SchemaError' });
  const hb = { runId: 'r', step: 0, sentAtMs: 0 };
  await assert.rejects(dispatch(table, 'heartbeat', hb, ctx('12D3KooWother')), { name: 'AuthError', message: `heartbeat: only the coordinator ${COORD} may send this, not 12D3KooWother` });
  const res = await dispatch(table, 'heartbeat', hb, ctx(COORD)) as Record<string, unknown>;
  assert.deepEqual({ ...res, memoryRssBytes: 0 }, { runId: null, ready: false, step: 0, tokensPerSecond: 0, inflight: 0, busy: false, memoryRssBytes: 0 });
  assert.equal(s.stateName, 'starting');
  // a large swarm's coordinator beats each peer less often and says so: the volunteer waits that much longer
  assert.equal(s.coordinatorLostAfterMs(), 8000);
  await dispatch(table, 'heartbeat', { ...hb, periodMs: 10_000 }, ctx(COORD));
  assert.equal(s.coordinatorLostAfterMs(), 17_000);
  await dispatch(table, 'heartbeat', hb, ctx(COORD));
  assert.equal(s.coordinatorLostAfterMs(), 8000);
  for (const proto of ['microbatch', 'commit', 'recall', 'aggregate', 'adapter', 'optimizer']) {
    await assert.rejects(dispatch(table, proto, {}, ctx('12D3KooWother')), { name: 'AuthError' });
    await assert.rejects(dispatch(table, proto, {}, ctx(COORD)), { name: 'StaleError', message: 'this peer has no stage loaded yet' });
  }
  await assert.rejects(dispatch(table, 'finish', { runId: 'r', reason: 'x' }, ctx(COORD)), { name: 'StaleError', message: 'finish for run r, this peer is in run null' });
});

test('leaving is an abort of the session signal; the first reason wins', () => {
  const stop = new AbortController();
  const config = resolveVolunteerConfig(opts, readKnobs({}));
  const s = new VolunteerSession(config, { node: {} as never, blobs: {} as never, backend: new RefBackend(), createOptimizer: createShardOptimizer, events: new VolunteerEvents(true, () => {}) }, { signal: stop.signal });
  assert.equal(s.signal.aborted, false);
  stop.abort();
  assert.equal(s.signal.aborted, true);
  assert.equal(s.exitCode, 1, 'a stop without a reason leaves as a failure');
  s.leave(new LeavingError(0, 'run finished'));
  assert.equal(s.exitCode, 1);
  assert.equal((s.signal.reason as Error).name, 'LeavingError');
});

test('the config: validated once, knobs from engine/env.ts, compute deadlines follow SWARMTUNE_COMPUTE_TIMEOUT_MS', () => {
  const c = resolveVolunteerConfig(opts, readKnobs({}));
  assert.equal(c.coordinatorId, COORD);
  assert.equal(c.handlerTimeoutMs.aggregate, COMPUTE_TIMEOUT_MS);
  assert.equal(c.listen, '/ip4/127.0.0.1/tcp/0');
  assert.deepEqual(c.aids, { delayMs: 0, badOutput: null, badAdapter: null });
  assert.equal(resolveVolunteerConfig({ ...opts, coordinator: '/ip4/127.0.0.1/tcp/4001' }, readKnobs({})).coordinatorId, null);
  const k = resolveVolunteerConfig(opts, readKnobs({ SWARMTUNE_COMPUTE_TIMEOUT_MS: '1500', SWARMTUNE_TEST_DELAY_MS: '20', SWARMTUNE_TEST_BAD_OUTPUT: 'nan' }));
  assert.equal(k.handlerTimeoutMs.aggregate, 1500);
  assert.deepEqual(k.aids, { delayMs: 20, badOutput: { kind: 'nan' }, badAdapter: null });
  assert.deepEqual(testAids(readKnobs({ SWARMTUNE_TEST_BAD_OUTPUT: 'scale:1.02', SWARMTUNE_TEST_BAD_ADAPTER: 'foreign' })), { delayMs: 0, badOutput: { kind: 'scale', factor: 1.02 }, badAdapter: 'foreign' });
  assert.deepEqual(testAids(readKnobs({ SWARMTUNE_TEST_BAD_OUTPUT: 'noise:0.01' })).badOutput, { kind: 'noise', rel: 0.01 });
  assert.deepEqual(testAids(readKnobs({ SWARMTUNE_TEST_BAD_OUTPUT: 'zero' })).badOutput, { kind: 'zero' });
  for (const bad of ['scale:', 'scale:x', 'noise:-1', 'scale:1e999', 'zeros']) {
    assert.throws(() => resolveVolunteerConfig(opts, readKnobs({ SWARMTUNE_TEST_BAD_OUTPUT: bad })), { name: 'SwarmError', message: `SWARMTUNE_TEST_BAD_OUTPUT must be "nan", "zero", "scale:<factor>" or "noise:<relative std>" (a finite number), got "${bad}"` });
  }
  assert.throws(() => resolveVolunteerConfig(opts, readKnobs({ SWARMTUNE_TEST_BAD_ADAPTER: 'foriegn' })), { name: 'SwarmError', message: 'SWARMTUNE_TEST_BAD_ADAPTER must be "foreign", "shape" or "nan", got "foriegn"' });
  assert.throws(() => resolveVolunteerConfig({ ...opts, device: 'gpu' }, readKnobs({})), { message: '--device must be auto, cpu, ref or cuda:N, got "gpu"' });
  assert.throws(() => testAids(readKnobs({ SWARMTUNE_TEST_BAD_OUTPUT: 'inf' })), { name: 'SwarmError', message: 'SWARMTUNE_TEST_BAD_OUTPUT must be "nan", "zero", "scale:<factor>" or "noise:<relative std>" (a finite number), got "inf"' });
  assert.throws(() => readKnobs({ SWARMTUNE_TEST_DELAY_MS: '-5' }), { message: 'SWARMTUNE_TEST_DELAY_MS must be an integer number of ms in [0, 3600000], got "-5"' });
});

test('job queue: backward before forward, a job aborted while it waits is dropped, idle after the last', async () => {
  const q = new JobQueue();
  const ran: string[] = [];
  let release!: () => void;
  const first = q.run(1, () => new Promise<void>((r) => { release = () => { ran.push('first'); r(); }; }));
  const fwd = q.run(1, async () => { ran.push('forward'); });
  const bwd = q.run(0, async () => { ran.push('backward'); });
  const gone = new AbortController();
  const dropped = q.run(1, async () => { ran.push('dropped'); }, { signal: gone.signal });
  assert.equal(q.busy, true);
  assert.equal(q.queued, 3);
  gone.abort(new Error('the requester gave up'));
  await assert.rejects(dropped, { message: 'the requester gave up' });
  assert.equal(q.queued, 2);
  const idle = q.idle();
  release();
  await Promise.all([first, fwd, bwd, idle]);
  assert.deepEqual(ran, ['first', 'backward', 'forward']);
  assert.equal(q.busy, false);
  await assert.rejects(q.run(0, async () => 1, { signal: AbortSignal.abort(new Error('already')) }), { message: 'already' });
});

test('job queue under a deep window: the last stage\'s backward of a micro-batch, queued right after its forward, runs before the forwards queued behind (1F1B)', async () => {
  const q = new JobQueue();
  const ran: string[] = [];
  const work = (name: string) => async () => { ran.push(name); await new Promise((r) => setTimeout(r, 2)); };
  // as node/pipeline.ts on the last stage: forward, then (a few awaits later) its backward
  const handler = async (k: number) => {
    await q.run(1, work(`f${k}`));
    await Promise.resolve();
    await q.run(0, work(`b${k}`));
  };
  await Promise.all([0, 1, 2, 3].map(handler));
  assert.deepEqual(ran, ['f0', 'b0', 'f1', 'b1', 'f2', 'b2', 'f3', 'b3']);
});

test('stage host: pages of adapter tensors and step sums come from the pager, a dropped forward leaves no attempt', async () => {
  // 12 layers x 3 targets x (A, B) = 72 LoRA tensors: more than one page
  const cfg = tinyLlamaConfig({ numHiddenLayers: 12, hiddenSize: 32, intermediateSize: 64 });
  const lora = { r: 2, loraAlpha: 4, loraDropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'] as ('q_proj' | 'v_proj' | 'down_proj')[], useRslora: false, initLoraWeights: true as const };
  const stage = await loadStage(randomWeightSource(cfg, 5), new RefBackend(), { layerStart: 0, layerEnd: 12, lora, seed: 1 });
  const spec = { optim: 'adamw_torch' as const, adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0, residentBytes: 0 };
  const a = { runId: 'r', stageIndex: 0, wireCodec: 'f32', step: 0, optim: spec } as unknown as Assignment;
  const host = new StageHost(stage, a, await createShardOptimizer(spec, stage.params, { spillDir: os.tmpdir(), state: null }), { aids: { delayMs: 0, badOutput: null, badAdapter: null } });
  const total = stage.params.length;
  assert.equal(total, 72);
  const page = host.adapter({ runId: 'r', from: 0, count: 1000 });
  assert.equal(page.total, total);
  assert.equal(page.tensors.length, PAGE_TENSORS);
  assert.equal(host.adapter({ runId: 'r', from: PAGE_TENSORS, count: 1000 }).tensors.length, total - PAGE_TENSORS);
  assert.throws(() => host.adapter({ runId: 'r', from: total + 1, count: 1 }), { name: 'SchemaError' });
  const collect = await host.aggregate({ runId: 'r', step: 0, phase: 'collect', from: 60, count: 1 << 16 });
  assert.deepEqual([collect.total, collect.grads!.length, collect.microBatches], [total, total - 60, 0]);
  await assert.rejects(host.aggregate({ runId: 'r', step: 0, phase: 'collect', from: total + 1, count: 1 }), { name: 'SchemaError' });
  const opt = await host.optimizerChunk({ runId: 'r', step: 0, offset: 0, length: 16 });
  assert.equal(opt.bytes.length, Math.min(16, opt.sizeBytes));
  await assert.rejects(host.optimizerChunk({ runId: 'r', step: 0, offset: opt.sizeBytes + 1, length: 1 }), { name: 'SchemaError' });

  const T = 2 * 4;
  const ids = new Int32Array(T).map((_, i) => i % 97);
  const fwd = (mb: number, signal?: AbortSignal) => host.forward({
    runId: 'r', step: 0, mb, attempt: 0, stageIndex: 0, batch: 2, seqLen: 4,
    ids: encodeTensor(ids, [T], 'i32'), labels: encodeTensor(ids, [T], 'i32'), dropoutSeed: 0, train: true,
  }, { signal });
  const gone = new AbortController();
  const running = fwd(0);
  const queued = fwd(1, gone.signal);
  gone.abort(new Error('the requester closed the stream'));
  await assert.rejects(queued, { message: 'the requester closed the stream' });
  await running;
  assert.equal(host.inflight, 1, 'only the forward that ran keeps its attempt');
  await host.dispose();
  stage.dispose();
});
