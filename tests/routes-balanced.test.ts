// The `balanced` wiring design (coordinator/routes.ts LoadRouter, inFlightByMemory, PeerSlots per-peer
// limits) and the simulator's `routes: balanced` variant (sim/wiring.ts): picks follow queue × speed, a
// peer's in-flight bound follows its own memory, and a run with a very slow peer keeps it out of the step.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { inFlightByMemory, LoadRouter, PeerSlots } from '../coordinator/routes.ts';
import { stageMemoryFn } from '../coordinator/spec.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { parseScenario } from '../sim/scenario.ts';
import { simulate } from '../sim/simulate.ts';

test('LoadRouter: each stage takes the replica whose queue finishes first; unknown speeds count as the mean; the hop cost steers the pairing', () => {
  // a takes 1 ms per micro-batch, b 3 ms: held without release, a is picked while (held_a + 1)·1 < (held_b + 1)·3
  const r = new LoadRouter((id) => ({ a: 1, b: 3 } as Record<string, number>)[id]!);
  const picks = Array.from({ length: 8 }, () => r.pick([['a', 'b']])![0]);
  assert.deepEqual(picks, ['a', 'a', 'a', 'b', 'a', 'a', 'a', 'b']); // ties go to the earlier replica
  assert.equal(r.heldBy('a'), 6);
  assert.equal(r.heldBy('b'), 2);
  r.release(['a']);
  assert.equal(r.heldBy('a'), 5);
  // c has no report (NaN): the mean of its stage's known ones, a and b (2 ms): with nothing held it loses
  // to a and beats b; once a holds one (2 ms to finish) c ties a and, listed first, takes the next
  const u = new LoadRouter((id) => ({ a: 1, b: 3, c: NaN } as Record<string, number>)[id]!);
  assert.deepEqual(u.pick([['b', 'c', 'a']]), ['a']);
  assert.deepEqual(u.pick([['b', 'c', 'a']]), ['c']);
  // a stage without a replica: no route, nothing held
  assert.equal(u.pick([['a'], []]), null);
  assert.equal(u.heldBy('a'), 1);
  // two equal replicas of stage 1; the hop from x to y is slow, so y waits until z has a queue that long
  const h = new LoadRouter(() => 1, (prev, id) => (prev === 'x' && id === 'y' ? 2.5 : 0));
  const second = Array.from({ length: 4 }, () => h.pick([['x'], ['y', 'z']])![1]);
  assert.deepEqual(second, ['z', 'z', 'z', 'y']); // y: 1 + 2.5 ms; z: 1, 2, 3, then 4
});

test('inFlightByMemory inverts the planner memory model: one more micro-batch costs its checkpointed layer inputs', () => {
  const cfg = parseScenario(JSON.parse(readFileSync(path.join(import.meta.dirname, '..', 'bench', 'scenarios', '64-heterogeneous.json'), 'utf8'))).model;
  const train = resolveTrainConfig({ flags: { per_device_train_batch_size: 4, gradient_accumulation_steps: 128, max_seq_length: 1024, lora_r: 16, target_modules: 'all-linear', max_steps: 10 } });
  const mem = stageMemoryFn(cfg, train, loraConfigOf(train));
  // 8 layers × 4096 tokens × hidden 4096 × float32: the input of each layer, kept for its backward
  const per = 8 * 4096 * 4096 * 4;
  assert.equal(mem(8, 16, 5) - mem(8, 16, 4), per);
  const four = mem(8, 16, 4);
  assert.equal(inFlightByMemory(four, mem, 8, 16, 16), 4);
  assert.equal(inFlightByMemory(four + per - 1, mem, 8, 16, 16), 4);
  assert.equal(inFlightByMemory(four + 3 * per, mem, 8, 16, 16), 7);
  assert.equal(inFlightByMemory(1e15, mem, 8, 16, 16), 16);
  assert.equal(inFlightByMemory(0, mem, 8, 16, 16), 1);
});

test('PeerSlots with per-peer limits: a route waits for the peer at its own bound', async () => {
  const s = new PeerSlots(1, (id) => (id === 'big' ? 3 : 1));
  assert.ok(s.tryTake(['big', 'p']));
  assert.ok(s.tryTake(['big', 'q']));
  assert.ok(!s.tryTake(['big', 'p']));
  assert.ok(s.tryTake(['big', 'r']));
  assert.ok(!s.tryTake(['big', 't']));
  assert.equal(s.maxHeld, 3);
  s.release(['big', 'q']);
  assert.ok(s.tryTake(['big', 't']));
});

test('simulated balanced wiring keeps a CPU-only peer out of the step that fixed routes wait on', async () => {
  const b = JSON.parse(readFileSync(path.join(import.meta.dirname, '..', 'bench', 'scenarios', '64-heterogeneous.json'), 'utf8')) as Record<string, any>;
  const mk = (routes: string) => parseScenario({
    ...b, name: 'mixed', routes, seed: 3,
    train: { ...b.train, steps: 3, accumulation: 32, pipeline_stages: 2 },
    peers: { ...b.peers, count: 8, nat_share: 0, link_mbit: [1000, 1000], classes: [
      { name: 'rtx3090-24g', share: 0.75, memory_gib: 24, peak_tflops: 71, efficiency: 0.3 },
      { name: 'cpu-8core-24g', share: 0.25, memory_gib: 24, peak_tflops: 0.9, efficiency: 0.56 }] },
  });
  const fixed = await simulate(mk('as-built'));
  const bal = await simulate(mk('balanced'));
  for (const r of [fixed, bal]) { assert.equal(r.lost_steps, 0); assert.equal(r.repeated_steps, 0); assert.equal(r.steps, 3); }
  // the CPU peers are ~40x slower per micro-batch: a fixed route through one sets the phase
  assert.ok(bal.micro_batch_phase_s < fixed.micro_batch_phase_s / 2, `balanced ${bal.micro_batch_phase_s} s vs fixed ${fixed.micro_batch_phase_s} s`);
});
