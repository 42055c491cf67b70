// Ban backoff and the operator knobs of the coordinator (unit: no processes).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BanList, inWords } from '../coordinator/bans.ts';
import { BAN_BASE_MS, BAN_MAX_MS } from '../coordinator/constants.ts';
import { banBaseMsFromEnv, computeTimeoutMs } from '../coordinator/config.ts';
import { COMPUTE_TIMEOUT_MS } from '../protocol/constants.ts';

test('bans double per peer id (30 s, 60 s, …), capped at 1 h; expired bans let the peer join', () => {
  const b = new BanList();
  const t0 = 1_000_000;
  const durations = [1, 2, 3, 4, 5, 6, 7, 8, 9].map((i) => b.ban('A', `offence ${i}`, t0).durationMs);
  assert.deepEqual(durations, [30_000, 60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000]);
  assert.equal(b.get('A')!.count, 9);
  assert.equal(b.remainingMs('B', t0), 0, 'bans are per peer id');
  assert.equal(b.refusal('B', t0), null);
  const c = new BanList();
  c.ban('B', 'sent NaN', t0);
  assert.equal(c.remainingMs('B', t0 + 10_000), 20_000);
  assert.match(c.refusal('B', t0 + 10_000)!, /^this peer is banned from the run for another 20 s \(ban 1, 30 s: sent NaN\)/);
  assert.equal(c.refusal('B', t0 + 30_000), null, 'the ban is over');
  assert.equal(c.ban('B', 'again', t0 + 40_000).durationMs, 60_000, 'the next ban is twice as long');
});

test('durations in words; env overrides are validated with a clear error', () => {
  assert.equal(inWords(999), '1 s');
  assert.equal(inWords(45_000), '45 s');
  assert.equal(inWords(125_000), '2 min 5 s');
  assert.equal(inWords(3_600_000), '1 h');
  assert.equal(inWords(3_780_000), '1 h 3 min');
  assert.equal(banBaseMsFromEnv({}), BAN_BASE_MS);
  assert.equal(banBaseMsFromEnv({ SWARMTUNE_BAN_BASE_MS: '5000' }), 5000);
  assert.throws(() => banBaseMsFromEnv({ SWARMTUNE_BAN_BASE_MS: '5s' }), /SWARMTUNE_BAN_BASE_MS must be an integer number of ms in \[1, 3600000\], got "5s"/);
  assert.throws(() => banBaseMsFromEnv({ SWARMTUNE_BAN_BASE_MS: String(BAN_MAX_MS + 1) }), /SWARMTUNE_BAN_BASE_MS/);
  assert.equal(computeTimeoutMs({}), COMPUTE_TIMEOUT_MS);
  assert.equal(computeTimeoutMs({ SWARMTUNE_COMPUTE_TIMEOUT_MS: '1500' }), 1500);
  assert.throws(() => computeTimeoutMs({ SWARMTUNE_COMPUTE_TIMEOUT_MS: '-1' }), /SWARMTUNE_COMPUTE_TIMEOUT_MS must be an integer number of ms/);
  assert.throws(() => new BanList(0), /ban backoff needs 0 < base/);
});

test('saved bans restore exactly; a malformed record is an error naming the peer', () => {
  const a = new BanList(1000);
  a.ban('p1', 'bad tensor', 0);
  a.ban('p1', 'bad tensor again', 5000);
  const b = new BanList(1000);
  b.restore(JSON.parse(JSON.stringify(a.entries())));
  assert.deepEqual(b.entries(), a.entries());
  assert.equal(b.ban('p1', 'third', 10_000).durationMs, 4000, 'the backoff continues where it was');
  assert.throws(() => new BanList().restore({ p2: { count: 0, untilMs: 1, durationMs: 1, reason: 'x' } }), /saved ban of peer p2 is malformed/);
});
