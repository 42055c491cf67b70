// The light step tail's arithmetic and trust rule, without processes: replicas reducing peer to peer
// (node/step-gradients.ts sumInOrder) and the coordinator's norm and clip coefficient from per-stage
// sums of squares (coordinator/aggregate.ts) give the same bits as the coordinator-side path they
// replace (sumReplicas, globalGradNorm, clipInPlace over the gathered gradients); a partner may pull a
// replica's step sum only once that replica's own reduce named it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { clipInPlace, clipScaleFor, globalGradNorm, majorityOf, normFromStageSums, sumReplicas } from '../coordinator/aggregate.ts';
import { StepGradients, pullWhenNamed, sumInOrder } from '../node/step-gradients.ts';
import { gradSquaredSum, scaleGrads } from '../engine/train/clip.ts';

/** xorshift: reproducible gradients with a spread of magnitudes (so float32 rounding matters). */
function randomGrads(seed: number, sizes: number[]): Float32Array[] {
  let s = seed >>> 0 || 1;
  const next = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s / 2 ** 32; };
  return sizes.map((n) => Float32Array.from({ length: n }, () => (next() - 0.5) * 10 ** (4 * next() - 3)));
}

const bits = (gs: Float32Array[]) => gs.map((g) => Buffer.from(g.buffer, g.byteOffset, g.byteLength).toString('hex'));

test('peer-to-peer reduce, stage sums of squares and the clip coefficient give the bits of the coordinator-side tail', () => {
  const sizes = [[37, 5, 128], [64, 3]];
  // 2 stages; stage 0 with 3 replicas, stage 1 with 2 (peer-id order = index order)
  const replicas = [[1, 2, 3], [4, 5]].map((seeds, s) => seeds.map((seed) => randomGrads(seed * 97, sizes[s]!)));
  for (const maxNorm of [0, 1e-3, 1e6]) {
    // before: the coordinator gathers, sums, computes the norm, clips and sends back
    const heavy = replicas.map((rs) => sumReplicas(rs));
    const heavyNorm = globalGradNorm(heavy);
    clipInPlace(heavy, heavyNorm, maxNorm);
    // now: every replica reduces itself (its own copy of the inputs untouched), answers Σ g²
    const light = replicas.map((rs) => rs.map(() => sumInOrder(rs)));
    const stageSumSq = light.map((perReplica) => majorityOf(perReplica.map(gradSquaredSum))!);
    const norm = normFromStageSums(stageSumSq);
    assert.equal(norm, heavyNorm, 'the same float64 norm');
    const c = clipScaleFor(norm, maxNorm);
    assert.equal(c.clip, maxNorm > 0);
    for (const perReplica of light) for (const g of perReplica) if (c.clip) scaleGrads(g, c.clipScale);
    for (let s = 0; s < light.length; s++) {
      for (const g of light[s]!) assert.deepEqual(bits(g), bits(heavy[s]!), `stage ${s}, max_grad_norm ${maxNorm}: bit-identical`);
    }
    if (maxNorm === 1e-3) assert.ok(c.clipScale < 1, 'this case clips');
  }
  // the inputs were left as they were (a partner may still be pulling a replica's own sum)
  assert.deepEqual(bits(replicas[0]![0]!), bits(randomGrads(97, sizes[0]!)));
  // a different order is a different sum in float32 (the order is what keeps replicas identical)
  const a = [new Float32Array([1e8])], b = [new Float32Array([1])], c = [new Float32Array([-1e8])];
  assert.notDeepEqual(bits(sumInOrder([a, b, c])), bits(sumInOrder([a, c, b])));
  assert.throws(() => clipScaleFor(Number.NaN, 1), /refusing to apply a non-finite update/);
  assert.deepEqual(clipScaleFor(Number.NaN, 0), { clip: false, clipScale: 1 });
  assert.equal(majorityOf([2, 1, 2]), 2);
  assert.equal(majorityOf([1, 2]), 1, 'no majority: the first (the digests after apply decide)');
  assert.equal(majorityOf([undefined, undefined, 3]), undefined);
});

test('a partner pulls a replica\'s step sum only once the replica\'s reduce named it; before that it is told so and asks again', async () => {
  const book = new StepGradients({ newGrads: () => [new Float32Array(2)], release: () => undefined });
  // before the replica's own reduce: refused at once (nothing waits in the handler), in words
  assert.throws(() => book.allowPull('B', 3), { name: 'StaleError', message: /has had no reduce request of step 3 yet/ });
  book.setRoster(3, ['B', 'C']);
  book.allowPull('B', 3);
  book.allowPull('C', 3);
  assert.throws(() => book.allowPull('D', 3), { name: 'AuthError', message: /peer D is not a replica the coordinator named for step 3's reduce/ });
  assert.throws(() => book.allowPull('B', 4), { name: 'StaleError' }, 'another step\'s roster does not open this one');
  // the puller asks again while the partner's reduce is on its way, and only then
  let calls = 0;
  const partner = new StepGradients({ newGrads: () => [new Float32Array(2)], release: () => undefined });
  setTimeout(() => partner.setRoster(7, ['A']), 60);
  const got = await pullWhenNamed(async () => { calls++; partner.allowPull('A', 7); return 'sum'; }, AbortSignal.timeout(5000));
  assert.equal(got, 'sum');
  assert.ok(calls >= 2, `asked ${calls} times`);
  await assert.rejects(pullWhenNamed(async () => { partner.allowPull('Z', 7); }, undefined), { name: 'AuthError' }, 'a refusal is not retried');
  await assert.rejects(pullWhenNamed(async () => { partner.allowPull('A', 8); }, undefined, 100), { name: 'StaleError', message: /no reduce request of step 8/ }, 'a reduce that never comes: given up after the wait');
  // reset (the step applied or abandoned) closes the roster and drops the reduced gradient
  book.setReduced(3, [new Float32Array([1, 2])]);
  assert.deepEqual(book.reducedOf(3), [new Float32Array([1, 2])]);
  book.reset();
  assert.throws(() => book.reducedOf(3), { name: 'StaleError' });
  assert.throws(() => book.allowPull('B', 3), { name: 'StaleError' });
});
