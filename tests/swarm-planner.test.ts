// Planner and aggregation unit tests (pure functions; milliseconds).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { evenRanges, planStages } from '../coordinator/planner.ts';
import { clipInPlace, globalGradNorm, sumReplicas } from '../coordinator/aggregate.ts';

const GiB = 2 ** 30;
// a toy memory model: 1 GiB per layer, +0.5 GiB on the first stage (embeddings)
const mem = (a: number, b: number) => (b - a) * GiB + (a === 0 ? 0.5 * GiB : 0);

test('evenRanges covers all layers contiguously with sizes differing by at most one', () => {
  assert.deepEqual(evenRanges(5, 2), [{ layerStart: 0, layerEnd: 3 }, { layerStart: 3, layerEnd: 5 }]);
  assert.deepEqual(evenRanges(4, 4).map((r) => r.layerEnd - r.layerStart), [1, 1, 1, 1]);
  assert.throws(() => evenRanges(3, 4), { name: 'CapacityError' });
});

test('fixed stage count: every peer gets a stage it fits, replicas balanced, order by peer id', () => {
  const peers = [
    { peerId: 'd', memoryBytes: 10 * GiB, gemmGflops: 1 },
    { peerId: 'a', memoryBytes: 10 * GiB, gemmGflops: 1 },
    { peerId: 'c', memoryBytes: 10 * GiB, gemmGflops: 1 },
    { peerId: 'b', memoryBytes: 10 * GiB, gemmGflops: 1 },
  ];
  const p = planStages(4, peers, mem, 2);
  assert.deepEqual(p.stages, [{ layerStart: 0, layerEnd: 2 }, { layerStart: 2, layerEnd: 4 }]);
  assert.deepEqual(p.replicas.map((r) => r.length), [2, 2]);
  for (const r of p.replicas) assert.deepEqual(r, [...r].sort());
  assert.equal(p.rejected.size, 0);
});

test('heterogeneous memory: small peers get the stage that fits them, too-small peers are rejected in words', () => {
  const peers = [
    { peerId: 'big', memoryBytes: 2.6 * GiB, gemmGflops: 1 },    // fits stage 0 (2.5 GiB)
    { peerId: 'small', memoryBytes: 2.1 * GiB, gemmGflops: 1 },  // fits only stage 1 (2 GiB)
    { peerId: 'tiny', memoryBytes: 0.5 * GiB, gemmGflops: 1 },   // fits nothing
  ];
  const p = planStages(4, peers, mem, 2);
  assert.deepEqual(p.replicas, [['big'], ['small']]);
  const why = p.rejected.get('tiny');
  assert.ok(why !== undefined);
  assert.match(why, /offers 0\.50 GiB but the smallest stage of this run needs 2\.00 GiB/);
  for (const [s, r] of p.replicas.entries()) {
    for (const id of r) {
      const peer = peers.find((x) => x.peerId === id)!;
      assert.ok(peer.memoryBytes >= mem(p.stages[s]!.layerStart, p.stages[s]!.layerEnd));
    }
  }
});

test('automatic stage count is the fewest stages every stage of which some peer can hold', () => {
  const peers = [{ peerId: 'x', memoryBytes: 3 * GiB, gemmGflops: 1 }, { peerId: 'y', memoryBytes: 3 * GiB, gemmGflops: 1 }];
  const p = planStages(4, peers, mem); // 1 stage needs 4.5 GiB (no), 2 stages need 2.5 / 2 GiB (yes)
  assert.equal(p.stages.length, 2);
  assert.throws(() => planStages(4, [{ peerId: 'z', memoryBytes: GiB, gemmGflops: 1 }], mem), { name: 'CapacityError', message: /cannot hold the model/ });
});

test('aggregation: replica sum, global norm over stages, torch clip rule', () => {
  const s = sumReplicas([[new Float32Array([1, 2])], [new Float32Array([3, 4])]]);
  assert.deepEqual(s, [new Float32Array([4, 6])]);
  const stages = [[new Float32Array([3])], [new Float32Array([4])]];
  const n = globalGradNorm(stages);
  assert.equal(n, 5);
  const coef = clipInPlace(stages, n, 1);
  assert.ok(Math.abs(coef - 1 / (5 + 1e-6)) < 1e-12);
  assert.ok(Math.abs(stages[0]![0]![0]! - 3 * coef) < 1e-6);
  assert.equal(clipInPlace([[new Float32Array([0.1])]], 0.1, 1), 1);
});

test('route quotas: proportional to measured throughput, summing to the step, even while any rate is unknown', async () => {
  const { routeQuotas } = await import('../coordinator/routes.ts');
  assert.deepEqual(routeQuotas(4, [100]), [4]);
  assert.deepEqual(routeQuotas(4, [100, 100]), [2, 2]);
  assert.deepEqual(routeQuotas(4, [300, 100]), [3, 1]);
  assert.deepEqual(routeQuotas(8, [50, 150]), [2, 6]);
  assert.deepEqual(routeQuotas(5, [100, 100]), [3, 2], 'ties go to the lower route index');
  assert.deepEqual(routeQuotas(3, [1000, 1, 1]), [3, 0, 0]);
  assert.deepEqual(routeQuotas(4, [300, 0]), [2, 2], 'a route not measured yet gets an even share');
  assert.deepEqual(routeQuotas(4, [NaN, 10]), [2, 2]);
  assert.deepEqual(routeQuotas(0, [1, 2]), [0, 0]);
  for (let n = 0; n < 20; n++) assert.equal(routeQuotas(n, [3, 7, 11]).reduce((a, b) => a + b, 0), n);
});
