// Who failed a micro-batch attempt (coordinator/attempt.ts blameOf), from the stages' reports: a
// stage whose own job timed out aborts the hops it opened ahead (protocol/hop.ts openHop), so its
// neighbour's broken-hop report can come first; the blame is that peer's and the cause its timeout.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { blameOf, type AttemptSpec, type Settled } from '../coordinator/attempt.ts';
import { SwarmError, TimeoutError } from '../protocol/errors.ts';

const a = { route: ['A', 'B', 'C'], key: { runId: 'r', step: 0, mb: 0, attempt: 0 } } as unknown as AttemptSpec;
const cancelled = new SwarmError('failed elsewhere');

test('a broken hop from a peer whose own job timed out: blamed on it, as a timeout', () => {
  const hop: Settled = { s: 0, res: { failure: { peerId: 'B', kind: 'hop', message: 'the activation gradient from B: StreamResetError' } } };
  // B answered with its own timeout after A's report
  const own: Settled = { s: 1, err: new TimeoutError('forward of step 0 micro-batch 0 was not done within the 1500 ms per job') };
  const r = blameOf(a, [hop, own, { s: 2, err: cancelled }], cancelled)!;
  assert.equal(r.ok, false);
  assert.equal((r as { blame: string }).blame, 'B');
  assert.equal((r as { cause: Error }).cause.name, 'TimeoutError');
  // the same when B reports its timeout as a failure naming itself
  const own2: Settled = { s: 1, res: { failure: { peerId: 'B', kind: 'timeout', message: 'backward timed out' } } };
  assert.equal((blameOf(a, [hop, own2], cancelled) as { cause: Error }).cause.name, 'TimeoutError');
  // without a timeout of its own (its process died, a reset link) it stays a broken hop
  const r2 = blameOf(a, [hop, { s: 1, err: cancelled }], cancelled)!;
  assert.equal((r2 as { blame: string }).blame, 'B');
  assert.equal((r2 as { cause: Error }).cause.name, 'HopError');
  // another stage's timeout does not turn a hop failure of B into one
  const r3 = blameOf(a, [hop, { s: 2, err: new TimeoutError('C was slow') }], cancelled)!;
  assert.equal((r3 as { cause: Error }).cause.name, 'HopError');
});
