// Routes prefer direct hops (issue 15): coordinator/routes.ts preferDirectHops pairs the replicas of
// neighbouring stages over the cheapest expected paths, and PeerRegistry.hopCost says what a hop costs
// from what the peers reported (hop paths) and what the relay knows (reservations = behind a NAT).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { preferDirectHops, routeFor } from '../coordinator/routes.ts';
import { PeerRegistry } from '../coordinator/peers.ts';
import { coordinatorConfig } from '../coordinator/config.ts';
import { RunStatus } from '../coordinator/status.ts';
import type { RunStore } from '../coordinator/store.ts';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { Capabilities } from '../protocol/messages.ts';

test('preferDirectHops: no path information moves nothing; a known relayed pair is split, an unknown NAT-NAT pair avoided', () => {
  const stages = [['a', 'b'], ['c', 'd'], ['e', 'f']];
  assert.deepEqual(preferDirectHops(stages, () => 0), stages);
  // a–c was relayed (a strict NAT between them): a goes with d, b with c
  const relayed = new Set(['a-c', 'c-a']);
  const got = preferDirectHops(stages, (x, y) => (relayed.has(`${x}-${y}`) ? 2 : 0));
  assert.deepEqual(got, [['a', 'b'], ['d', 'c'], ['e', 'f']]);
  assert.deepEqual([routeFor(0, got), routeFor(1, got)], [['a', 'd', 'e'], ['b', 'c', 'f']]);
  // d and e both behind NATs and never hopped (1), d–f expected direct (f is public): d goes with f
  const nat = new Set(['a', 'd', 'e']);
  const cost = (x: string, y: string) => (relayed.has(`${x}-${y}`) ? 2 : nat.has(x) && nat.has(y) ? 1 : 0);
  assert.deepEqual(preferDirectHops(stages, cost), [['a', 'b'], ['d', 'c'], ['f', 'e']]);
  // uneven replica counts: every replica still placed exactly once
  const uneven = preferDirectHops([['a'], ['c', 'd', 'x']], (x, y) => (x === 'a' && y === 'c' ? 2 : 0));
  assert.deepEqual(uneven, [['a'], ['d', 'x', 'c']], 'every route through a avoids the relayed a–c while it can');
  assert.deepEqual(preferDirectHops([], () => 0), []);
});

test('PeerRegistry.hopCost: reported paths first (either end), then reachability; without NAT traversal every hop is direct', () => {
  const status = new RunStatus({ runId: 'r', modelName: 'm', totalSteps: 1, minPeers: 1, step: 0, eventHistory: 50, emit: () => {}, log: () => {} });
  const store = {} as unknown as RunStore;
  const make = (reachability?: (id: string) => 'public' | 'relay' | undefined) => {
    const reg = new PeerRegistry({ runId: 'r', client: {} as StagePeerClient, config: coordinatorConfig({}, {}), status, store, signal: new AbortController().signal, reachability });
    for (const id of ['A', 'B', 'C', 'D']) reg.join(id, { backend: 'cpu', deviceName: 'x' } as Capabilities, [], undefined, false);
    return reg;
  };
  const plain = make();
  assert.equal(plain.hopCost('A', 'B'), 0);
  const behind = new Set(['A', 'B', 'C']);
  const reg = make((id) => (behind.has(id) ? 'relay' : 'public'));
  assert.equal(reg.hopCost('A', 'D'), 0, 'D is public: A dials it');
  assert.equal(reg.hopCost('A', 'B'), 1, 'both behind NATs, never hopped');
  reg.get('B')!.hopPaths = [{ peerId: 'A', path: 'hole-punched' }, { peerId: 'C', path: 'relayed' }];
  assert.equal(reg.hopCost('A', 'B'), 0, 'A–B was hole-punched (reported by B)');
  assert.equal(reg.hopCost('C', 'B'), 2, 'B–C was relayed (reported by B, asked from C)');
  reg.get('D')!.hopPaths = [{ peerId: 'A', path: 'relayed' }];
  assert.equal(reg.hopCost('A', 'D'), 2, 'a report beats the reachability guess');
});
