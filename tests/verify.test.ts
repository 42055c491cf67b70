// The ban decision (coordinator/verdicts.ts) and the spot-check verifier (coordinator/verify.ts), as
// units: stand-in recomputations, no processes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { judge, ERROR_STREAK_BAN } from '../coordinator/verdicts.ts';
import { COORDINATOR, CODEC_RTOL, CROSS_BACKEND_RTOL, Verifier, isSelected, sameAnswer, toleranceFor } from '../coordinator/verify.ts';
import type { StageAnswer, StageCall, VerifierInit } from '../coordinator/verify.ts';
import { encodeTensor } from '../protocol/tensor.ts';

test('verdicts: direct evidence bans; error answers ban only at the streak; disagreements go to the majority or the trusted reference', () => {
  assert.deepEqual(judge({ kind: 'bad-tensor', peerId: 'P', what: 'NaN in its step gradient' }),
    { kind: 'ban', bans: [{ peerId: 'P', evidence: 'bad-tensor', reason: 'it sent a bad tensor: NaN in its step gradient' }] });
  assert.equal(judge({ kind: 'bad-upload', peerId: 'P', what: 'x' }).kind, 'ban');
  for (let streak = 1; streak < ERROR_STREAK_BAN; streak++) assert.deepEqual(judge({ kind: 'error-answers', peerId: 'P', streak, last: 'SchemaError' }), { kind: 'clear', strikes: [] });
  const v = judge({ kind: 'error-answers', peerId: 'P', streak: ERROR_STREAK_BAN, last: 'SchemaError: no' });
  assert.equal(v.kind, 'ban');
  assert.match(v.kind === 'ban' ? v.bans[0]!.reason : '', /answered 3 requests in a row with an error/);
  // all agree
  assert.deepEqual(judge({ kind: 'disagreement', what: 'w', results: [{ peerId: 'A', value: 'x' }, { peerId: 'B', value: 'x' }] }), { kind: 'clear', strikes: [] });
  // 1 vs 1 without a referee: nobody can be blamed
  assert.deepEqual(judge({ kind: 'disagreement', what: 'w', results: [{ peerId: 'A', value: 'x' }, { peerId: 'B', value: 'y' }] }), { kind: 'unresolved', peers: ['A', 'B'], what: 'w' });
  // 2 vs 1: the one loses
  const m = judge({ kind: 'disagreement', what: 'w', results: [{ peerId: 'A', value: 'x' }, { peerId: 'B', value: 'y' }, { peerId: 'C', value: 'x' }] });
  assert.deepEqual(m.kind === 'ban' ? m.bans.map((b) => b.peerId) : m, ['B']);
  // 1 vs 1 vs 1: unresolved; 2 vs 2: unresolved
  assert.equal(judge({ kind: 'disagreement', what: 'w', results: [{ peerId: 'A', value: 'x' }, { peerId: 'B', value: 'y' }, { peerId: 'C', value: 'z' }] }).kind, 'unresolved');
  assert.equal(judge({ kind: 'disagreement', what: 'w', results: [{ peerId: 'A', value: 'x' }, { peerId: 'B', value: 'y' }, { peerId: 'C', value: 'x' }, { peerId: 'D', value: 'y' }] }).kind, 'unresolved');
  // a trusted reference outweighs any majority
  const r = judge({ kind: 'disagreement', what: 'w', results: [{ peerId: 'A', value: 'x' }, { peerId: 'B', value: 'x' }, { peerId: 'C', value: 'y' }], reference: 'y' });
  assert.deepEqual(r.kind === 'ban' ? r.bans.map((b) => b.peerId) : r, ['A', 'B']);
});

test('verdicts: an accusation bans nobody until a re-run on another replica confirms it; a wrong one strikes the accuser, never the sender', () => {
  const a = judge({ kind: 'accusation', accuser: 'R', accused: 'S', what: 'hidden of mb 3' });
  assert.deepEqual(a, { kind: 'confirm', suspect: 'S', exclude: ['S', 'R'], what: 'hidden of mb 3' });
  // the re-run agrees with the sender: the honest sender stays, the accuser gets a strike
  assert.deepEqual(judge({ kind: 'confirmation', accuser: 'R', accused: { peerId: 'S', value: 'h1' }, reruns: [{ peerId: 'T', value: 'h1' }], what: 'w' }), { kind: 'clear', strikes: ['R'] });
  // confirmed by the coordinator's own recompute: the sender is banned, with the accusation as evidence
  const c = judge({ kind: 'confirmation', accuser: 'R', accused: { peerId: 'S', value: 'bad' }, reruns: [{ peerId: 'T', value: 'good' }], reference: 'good', what: 'w' });
  assert.equal(c.kind, 'ban');
  assert.deepEqual(c.kind === 'ban' ? c.bans.map((b) => [b.peerId, b.evidence]) : c, [['S', 'accusation'], ]);
  // one re-run disagreeing with the sender is 1 vs 1: not enough to ban it
  assert.equal(judge({ kind: 'confirmation', accuser: 'R', accused: { peerId: 'S', value: 'x' }, reruns: [{ peerId: 'T', value: 'y' }], what: 'w' }).kind, 'unresolved');
  // two re-runs agreeing against it are
  const two = judge({ kind: 'confirmation', accuser: 'R', accused: { peerId: 'S', value: 'x' }, reruns: [{ peerId: 'T', value: 'y' }, { peerId: 'U', value: 'y' }], what: 'w' });
  assert.deepEqual(two.kind === 'ban' ? two.bans.map((b) => b.peerId) : two, ['S']);
  // the sender and a lying re-run vs an honest one: the coordinator referees; the liar among the re-runs loses, the accuser is struck
  const liar = judge({ kind: 'confirmation', accuser: 'R', accused: { peerId: 'S', value: 'x' }, reruns: [{ peerId: 'T', value: 'y' }], reference: 'x', what: 'w' });
  assert.deepEqual(liar, { kind: 'ban', bans: [{ peerId: 'T', evidence: 'disagreement', reason: "w: its result differs from the coordinator's own recomputation" }], strikes: ['R'] });
  assert.throws(() => judge({ kind: 'confirmation', accuser: 'R', accused: { peerId: 'S', value: 'x' }, reruns: [{ peerId: 'R', value: 'y' }], what: 'w' }), /neither the accused nor the accuser/);
});

test('verify: seeded selection hits the fraction; tolerances: bit for bit on one CPU build, backend + codec otherwise', () => {
  let n = 0;
  for (let step = 0; step < 100; step++) for (let mb = 0; mb < 100; mb++) if (isSelected(7, step, mb, 0.05)) n++;
  assert.ok(n > 400 && n < 600, `${n} of 10000 selected at 0.05`);
  assert.equal(isSelected(7, 3, 4, 0.05), isSelected(7, 3, 4, 0.05), 'a function of (seed, step, mb)');
  assert.ok([...Array(50).keys()].some((mb) => isSelected(7, 0, mb, 0.05) !== isSelected(8, 0, mb, 0.05)), 'the seed changes the choice');
  assert.equal(isSelected(1, 0, 0, 1), true);
  assert.equal(isSelected(1, 0, 0, 0), false);
  const cpu = { backend: 'cpu', deviceName: 'Xeon' };
  assert.equal(toleranceFor(cpu, { ...cpu }, 'bf16'), 0);
  // a delta codec's warm answer is never bit-comparable with a cold recomputation, even on one backend
  assert.equal(toleranceFor(cpu, { ...cpu }, 'aq2'), CODEC_RTOL.aq2);
  assert.equal(toleranceFor(cpu, { backend: 'cpu', deviceName: 'EPYC' }, 'f32'), CROSS_BACKEND_RTOL);
  assert.equal(toleranceFor(cpu, { backend: 'cuda', deviceName: 'H100' }, 'int8'), CROSS_BACKEND_RTOL + CODEC_RTOL.int8);
  assert.equal(toleranceFor(cpu, undefined, 'f32'), CROSS_BACKEND_RTOL);
  // a 1.02 scaling is outside every tolerance
  assert.ok(CROSS_BACKEND_RTOL + CODEC_RTOL.int8 < 0.02);
  const x = new Float32Array([1, -2, 3]);
  assert.equal(sameAnswer({ hidden: x }, { hidden: x.slice() }, 0), true);
  const y = x.slice(); y[1] = Math.fround(-2 * (1 + 2 ** -23));
  assert.equal(sameAnswer({ hidden: x }, { hidden: y }, 0), false, 'one ulp differs at rtol 0');
  assert.equal(sameAnswer({ hidden: x }, { hidden: y }, 1e-6), true);
  assert.equal(sameAnswer({ hidden: x }, { hidden: x.map((v) => v * 1.02) }, CROSS_BACKEND_RTOL + CODEC_RTOL.int8), false);
  assert.equal(sameAnswer({ lossSum: 1.5 }, { lossSum: 1.5, gradIn: x }, 0), false, 'a missing field differs');
  assert.equal(sameAnswer({ lossSum: 1.5, gradIn: x }, { lossSum: 1.5, gradIn: x.slice() }, 0), true);
});

const call: StageCall = { step: 2, mb: 5, attempt: 0, batch: 1, seqLen: 3, hidden: encodeTensor(new Float32Array(3), [3, 1], 'f32', 'h'), dropoutSeed: 1, gradOut: encodeTensor(new Float32Array(3), [3, 1], 'f32', 'g') };
const honest: StageAnswer = { hidden: new Float32Array([0.5, 1, -1]), gradIn: new Float32Array([0.1, 0.2, 0.3]) };
const tampered: StageAnswer = { hidden: honest.hidden!.map((v) => v * 1.02), gradIn: honest.gradIn!.map((v) => v * 1.02) };

function verifier(answers: Record<string, StageAnswer | Error>, over: Partial<VerifierInit> = {}): { v: Verifier; asked: string[] } {
  const asked: string[] = [];
  const v = new Verifier({
    fraction: 1, secret: 'k7', codec: 'f32',
    recompute: async (where) => { asked.push(where); const a = answers[where]; if (a === undefined) throw new Error(`nobody asked ${where}`); if (a instanceof Error) throw a; return a; },
    coordinatorCan: () => COORDINATOR in answers,
    deviceOf: () => ({ backend: 'cpu', deviceName: 'same' }),
    ...over,
  });
  return { v, asked };
}
const signal = new AbortController().signal;

test('verify: an honest answer confirmed by a second replica counts; a tampered one is refereed by the coordinator, the cheater banned, the checker not', async () => {
  const a = verifier({ Q: honest });
  const ok = await a.v.check(1, call, honest, { primary: 'P', replicas: ['P', 'Q'] }, { signal });
  assert.deepEqual([ok.counts, ok.bans, ok.checkedBy], [true, [], ['Q']]);
  const b = verifier({ Q: honest, [COORDINATOR]: honest });
  const bad = await b.v.check(1, call, tampered, { primary: 'P', replicas: ['P', 'Q'] }, { signal });
  assert.equal(bad.counts, false);
  assert.deepEqual(bad.bans.map((x) => x.peerId), ['P']);
  assert.deepEqual(bad.checkedBy, ['Q', COORDINATOR]);
  assert.deepEqual(b.v.stats, { ...b.v.stats, checks: 1, mismatches: 1, bans: 1 });
});

test('verify: a lying checker is banned and the honest primary counts; a third replica referees without the coordinator; 1 vs 1 does not count', async () => {
  const lying = verifier({ Q: tampered, [COORDINATOR]: honest });
  const v1 = await lying.v.check(0, call, honest, { primary: 'P', replicas: ['P', 'Q'] }, { signal });
  assert.deepEqual([v1.counts, v1.bans.map((x) => x.peerId)], [true, ['Q']]);
  // three replicas, no coordinator: 2 vs 1
  const three = verifier({ Q: honest, R: honest });
  const v2 = await three.v.check(0, { ...call, step: 0, mb: 0 }, tampered, { primary: 'P', replicas: ['P', 'Q', 'R'] }, { signal });
  assert.deepEqual([v2.counts, v2.bans.map((x) => x.peerId), v2.checkedBy.length], [false, ['P'], 2]);
  // two replicas, no coordinator: nobody can be blamed, and the answer must not count
  const two = verifier({ Q: honest });
  const v3 = await two.v.check(0, call, tampered, { primary: 'P', replicas: ['P', 'Q'] }, { signal });
  assert.deepEqual([v3.counts, v3.bans], [false, []]);
  assert.match(v3.detail, /disagree and nothing referees them/);
});

test('verify: a single-replica stage is checked by the coordinator; a failing checker is skipped; nothing to check with → counts only below fraction 1', async () => {
  const solo = verifier({ [COORDINATOR]: honest });
  const v1 = await solo.v.check(0, call, tampered, { primary: 'P', replicas: ['P'] }, { signal });
  assert.deepEqual([v1.counts, v1.bans.map((x) => x.peerId), v1.checkedBy], [false, ['P'], [COORDINATOR]]);
  const flaky = verifier({ Q: new Error('timed out'), [COORDINATOR]: honest });
  const v2 = await flaky.v.check(0, call, honest, { primary: 'P', replicas: ['P', 'Q'] }, { signal });
  assert.deepEqual([v2.counts, v2.bans, flaky.asked], [true, [], ['Q', COORDINATOR]]);
  const none = verifier({});
  const v3 = await none.v.check(0, call, honest, { primary: 'P', replicas: ['P'] }, { signal });
  assert.deepEqual([v3.counts, none.v.stats.unverified], [false, 1]);
  const some = verifier({}, { fraction: 0.5 });
  assert.equal((await some.v.check(0, call, honest, { primary: 'P', replicas: ['P'] }, { signal })).counts, true);
  // across backends the tolerance applies: a tiny difference passes, 1.02 does not
  const gpu = verifier({ Q: { hidden: honest.hidden!.map((v) => v * (1 + 1e-5)), gradIn: honest.gradIn }, [COORDINATOR]: honest }, { deviceOf: (w) => ({ backend: w === 'Q' ? 'cuda' : 'cpu', deviceName: w }) });
  assert.equal((await gpu.v.check(0, call, honest, { primary: 'P', replicas: ['P', 'Q'] }, { signal })).counts, true);
  assert.throws(() => new Verifier({ ...({} as VerifierInit), fraction: 1.5 }), /verify_fraction must be in \[0, 1\], got 1.5/);
});
