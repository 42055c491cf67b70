// The simulator (sim/): its invariants under churn (no step lost or committed twice), determinism for a seed,
// scenario errors as one line naming the field, the committed scenarios parse, and `swarmtune simulate --json`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseScenario, readScenario, ScenarioError } from '../sim/scenario.ts';
import { simulate } from '../sim/simulate.ts';
import { SimClock, DeadlockError } from '../sim/clock.ts';
import { brokenMicroBatches, donorForEmptyStage, heartbeatVerdict, stageForLateJoiner, stageThroughput } from '../coordinator/decide.ts';

const ROOT = path.resolve(import.meta.dirname, '..');
const scenarioFile = (n: string) => path.join(ROOT, 'bench', 'scenarios', `${n}.json`);
const base = () => JSON.parse(readFileSync(scenarioFile('64-churn'), 'utf8')) as Record<string, any>;

/** 16 fast GPU peers on 4 stages with heavy churn, so volunteers leave in the middle of micro-batches and tails */
function churny(seed: number): Record<string, any> {
  const b = base();
  return {
    ...b, seed, name: 'churny',
    train: { ...b.train, steps: 30, accumulation: 32 },
    peers: { ...b.peers, count: 16, classes: [{ name: 'rtx3090-24g', share: 1, memory_gib: 24, peak_tflops: 71, efficiency: 0.3 }], link_mbit: [200, 1000] },
    churn: { leave_per_hour: 3, arrive_per_hour: 3 },
  };
}

test('simulated time: events run in time order, ties in insertion order, and a wait with nothing left is a deadlock', async () => {
  const c = new SimClock();
  const seen: string[] = [];
  const main = (async () => {
    c.at(5, () => seen.push('b'));
    c.at(1, () => seen.push('a'));
    c.at(5, () => seen.push('c'));
    await c.sleep(10);
    seen.push(`t=${c.now}`);
  })();
  await c.drive(main);
  assert.deepEqual(seen, ['a', 'b', 'c', 't=10']);
  const stuck = new SimClock();
  await assert.rejects(stuck.drive(new Promise(() => {})), (e: Error) => e instanceof DeadlockError && /no event left/.test(e.message));
});

test('the coordinator decisions the simulator shares (coordinator/decide.ts)', () => {
  // the fitting stage with the lowest throughput; a stage without a live replica never takes a late joiner
  assert.equal(stageForLateJoiner(10, [8, 12, 8], () => 1, (s) => [5, 1, 3][s]!), 2);
  assert.equal(stageForLateJoiner(10, [8, 8], (s) => (s === 0 ? 0 : 2), () => 0), 1);
  assert.equal(stageForLateJoiner(4, [8, 8], () => 1, () => 0), null);
  // a replica that has not reported its speed yet counts as its stage's mean, so joiners of one step
  // boundary spread over the stages instead of all taking the one that was slowest before them
  assert.equal(stageThroughput([10, 0, 20]), 45);
  assert.equal(stageThroughput([0, 0]), 0);
  const stages: number[][] = [[10], [12], [30]];
  const picks: number[] = [];
  for (let j = 0; j < 4; j++) {
    const s = stageForLateJoiner(10, [8, 8, 8], (x) => stages[x]!.length, (x) => stageThroughput(stages[x]!))!;
    picks.push(s);
    stages[s]!.push(0);
  }
  assert.deepEqual(picks, [0, 1, 0, 1]);
  // the donor comes from the stage with most replicas, its slowest one that fits
  assert.deepEqual(donorForEmptyStage([['a'], ['b', 'c', 'd'], []], 5, (id) => (id === 'b' ? 4 : 8), (id) => ({ c: 3, d: 1 } as Record<string, number>)[id] ?? 0), { id: 'd', stage: 1 });
  assert.equal(donorForEmptyStage([['a'], ['b'], []], 5, () => 8, () => 0), null);
  assert.deepEqual(brokenMicroBatches([['a', 'b'], null, ['c', 'b'], ['a', 'd']], (s, id) => id !== 'b'), [0, 2]);
  assert.equal(heartbeatVerdict(5001, 5000), 'dead');
  assert.equal(heartbeatVerdict(5000, 5000), 'slow');
});

test('under churn no step is lost or committed twice, and leaves really hit work in flight', async () => {
  const r = await simulate(parseScenario(churny(7)));
  assert.equal(r.steps, 30);
  assert.equal(r.lost_steps, 0);
  assert.equal(r.repeated_steps, 0);
  assert.ok(r.leaves >= 3, `only ${r.leaves} leaves: the scenario does not exercise churn`);
  assert.ok(r.micro_batch_retries > 0, 'no micro-batch was retried: no leave hit work in flight');
  assert.ok(r.joins > 0 && r.join_to_first_microbatch_s.n > 0, 'no joiner computed a micro-batch');
  assert.ok(r.tokens_per_s > 0 && r.tokens_per_s < r.ideal_tokens_per_s, `tokens/s ${r.tokens_per_s} against an ideal of ${r.ideal_tokens_per_s}`);
});

test('a volunteer that leaves fails the hops to it one round trip later: churn does not hold a step until the sender leaves too', async () => {
  // as first built, a hop to a peer that had left waited until its sender left as well (hours at these
  // rates): churn made steps 24× longer (64-churn: 61,354 s a step); now a step under churn stays
  // within a few times the step without it
  const calm = await simulate(parseScenario({ ...churny(7), churn: null }));
  const r = await simulate(parseScenario(churny(7)));
  assert.ok(r.leaves >= 10 && r.micro_batch_retries > 0, `${r.leaves} leaves, ${r.micro_batch_retries} retries`);
  assert.ok(r.step_s.p95 < 5 * calm.step_s.p95, `p95 step ${r.step_s.p95} s under churn against ${calm.step_s.p95} s without`);
});

test('mid-step joins: a joiner loads while steps run and takes micro-batches of the running step; still no step lost or repeated', async () => {
  const blocking = await simulate(parseScenario(churny(7)));
  const mid = await simulate(parseScenario({ ...churny(7), late_join: 'mid-step' }));
  assert.equal(mid.lost_steps, 0);
  assert.equal(mid.repeated_steps, 0);
  assert.ok(mid.join_to_loaded_s.n > 0 && mid.join_to_first_microbatch_s.n > 0, 'no joiner loaded and computed');
  // its first micro-batch comes sooner than behind the step boundary and a blocking load
  assert.ok(mid.join_to_first_microbatch_s.p50! < 0.6 * blocking.join_to_first_microbatch_s.p50!, `join p50 ${mid.join_to_first_microbatch_s.p50} s mid-step, ${blocking.join_to_first_microbatch_s.p50} s as built`);
  assert.ok(mid.tokens_per_s > blocking.tokens_per_s, `${mid.tokens_per_s} against ${blocking.tokens_per_s} tokens/s`);
});

test('one scenario and seed give one run; another seed another', async () => {
  const strip = (x: Record<string, unknown>) => { const { sim_wall_s: _w, planner_ms: _p, ...rest } = x; return rest; };
  const a = await simulate(parseScenario(churny(11)));
  const b = await simulate(parseScenario(churny(11)));
  const c = await simulate(parseScenario(churny(12)));
  assert.deepEqual(strip(a as never), strip(b as never));
  assert.notDeepEqual(strip(a as never), strip(c as never));
});

test('scenario errors name the field; the committed scenarios parse', () => {
  const bad = (edit: (o: Record<string, any>) => void, re: RegExp) => {
    const o = base();
    edit(o);
    assert.throws(() => parseScenario(o), (e: Error) => e instanceof ScenarioError && re.test(e.message), re.source);
  };
  bad((o) => { o.model = 'llama-9000'; }, /scenario\.model must be one of llama-3-8b, llama-3-70b/);
  bad((o) => { o.peers.classes[0].share = 0.9; }, /shares must sum to 1/);
  bad((o) => { o.peers.link_mbit = [1000, 20]; }, /scenario\.peers\.link_mbit must be \[low, high\]/);
  bad((o) => { delete o.train.seq_len; }, /scenario\.train\.seq_len is missing/);
  bad((o) => { o.tail = 'p2p'; }, /scenario\.tail must be one of light, coordinator, stage-allreduce/);
  bad((o) => { o.heartbeats = 'gossip'; }, /scenario\.heartbeats must be one of bounded, per-peer, hierarchical/);
  bad((o) => { o.churn.leave_per_hour = -1; }, /scenario\.churn\.leave_per_hour must be a number in \[0, 10\]/);
  for (const n of ['64-heterogeneous', '64-churn', '1000-70b']) {
    const sc = readScenario(scenarioFile(n));
    assert.equal(sc.name, n);
  }
  assert.equal(readScenario(scenarioFile('1000-70b')).peers.count, 1000);
  assert.throws(() => readScenario(path.join(ROOT, 'no-such.json')), { name: 'ScenarioError', message: /cannot read .*no-such\.json/ });
});

test('swarmtune simulate --json: the last line is one object with the reported keys; a bad config is one line, exit 2', () => {
  const bin = path.join(ROOT, 'bin', 'swarmtune.ts');
  const r = spawnSync(process.execPath, [bin, 'simulate', '--config', scenarioFile('64-heterogeneous'), '--steps', '2', '--json'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const last = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
  for (const k of ['peers', 'steps', 'tokens_per_s', 'ideal_tokens_per_s', 'lost_steps', 'repeated_steps', 'join_to_first_microbatch_s', 'coordinator', 'stages', 'steps_per_hour', 'planner_ms']) assert.ok(k in last, `no ${k}`);
  assert.equal(last.steps, 2);
  for (const k of ['cpu_fraction', 'bytes_per_step']) assert.equal(typeof last.coordinator[k], 'number');
  for (const s of last.stages) assert.ok(s.utilization >= 0 && s.utilization <= 1 && Math.abs(s.utilization + s.bubble - 1) < 1e-9);
  const bad = spawnSync(process.execPath, [bin, 'simulate', '--config', scenarioFile('64-heterogeneous'), '--steps', 'x'], { encoding: 'utf8' });
  assert.equal(bad.status, 2);
  assert.equal(bad.stderr.trim(), 'swarmtune simulate: --steps must be a positive integer, got "x"');
  const missing = spawnSync(process.execPath, [bin, 'simulate', '--config', path.join(ROOT, 'nope.json')], { encoding: 'utf8' });
  assert.equal(missing.status, 4);
  assert.match(missing.stderr.trim(), /^swarmtune simulate: cannot read .*nope\.json: ENOENT/);
});
