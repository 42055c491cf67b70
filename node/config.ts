// The volunteer process's configuration: its options and environment knobs resolved and validated
// once, with the effective value of every timeout and limit the volunteer uses.
import path from 'node:path';
import type { BackendKind } from '../engine/backends/index.ts';
import { knobs } from '../engine/env.ts';
import type { Knobs } from '../engine/env.ts';
import { parseMultiaddr } from '../protocol/net.ts';
import type { Multiaddr } from '../protocol/net.ts';
import { SwarmError } from '../protocol/errors.ts';
import type { Logger } from '../protocol/log.ts';
import {
  COORDINATOR_LOST_MS, DEFAULT_LISTEN, HANDLER_TIMEOUT_MS, JOIN_TIMEOUT_MS, PROGRESS_INTERVAL_MS, REJOIN_RETRY_MS, REJOIN_WINDOW_MS,
  RSS_SAMPLE_MS, SNAPSHOT_RESIDENT_BYTES,
} from './constants.ts';
import type { VolunteerProto } from './constants.ts';
import { testAids } from './test-aids.ts';
import type { TestAids } from './test-aids.ts';

/** What `swarmtune join` is asked to do. */
export interface VolunteerOptions {
  coordinator: string;
  token: string | null;
  device: string;
  maxMemoryBytes?: number;
  dataDir: string;
  json: boolean;
  /** listen multiaddr for serving blobs and stage requests */
  listen?: string;
  /** a progress line at most this often while serving (0: none; default PROGRESS_INTERVAL_MS) */
  progressIntervalMs?: number;
  /** the volunteer's logger, namespace swarmtune:node (children :session, :stage, :rpc); default silent */
  log?: Logger;
  /** NAT traversal (docs/swarm.md "NAT strategy"); absent: off. `relay`: this peer is publicly reachable and
   *  serves circuit relay v2 to the run's members (`join --relay`) */
  nat?: { announce: string[]; dialPort?: number; relay?: boolean };
}

export interface VolunteerConfig {
  /** the coordinator's multiaddr as given, and parsed */
  coordinator: string;
  coordinatorAddr: Multiaddr;
  /** the coordinator's peer id from the /p2p/ part of its address; null: learned at the first join */
  coordinatorId: string | null;
  token: string | null;
  device: string;
  backendKind: BackendKind;
  maxMemoryBytes: number | undefined;
  /** absolute */
  dataDir: string;
  listen: string;
  /** 0: no progress lines */
  progressIntervalMs: number;
  joinTimeoutMs: number;
  coordinatorLostMs: number;
  rejoinWindowMs: number;
  rejoinRetryMs: number;
  rssSampleMs: number;
  /** step snapshots up to this size stay in memory (further capped by a paged optimizer's budget) */
  snapshotResidentBytes: number;
  /** each handler's deadline; compute ones follow SWARMTUNE_COMPUTE_TIMEOUT_MS like the coordinator's requests */
  handlerTimeoutMs: Readonly<Record<VolunteerProto, number>>;
  aids: TestAids;
  /** NAT traversal on: addresses to announce, the dial port, whether this peer serves relay; null: off */
  nat: { announce: string[]; dialPort?: number; relay: boolean } | null;
}

function backendKind(device: string): BackendKind {
  if (device === 'auto' || device === 'cpu' || device === 'ref') return device;
  if (/^cuda(:\d+)?$/.test(device)) return device as BackendKind; // cuda:N selects GPU N
  throw new SwarmError(`--device must be auto, cpu, ref or cuda:N, got "${device}"`);
}

/** Resolve and validate the volunteer's config (a bad value fails here, before anything starts). */
export function resolveVolunteerConfig(opts: VolunteerOptions, env: Knobs = knobs()): VolunteerConfig {
  const coordinatorAddr = parseMultiaddr(opts.coordinator);
  // the relay reservation and the circuit address this peer announces name the coordinator's peer id
  if (opts.nat !== undefined && !opts.coordinator.includes('/p2p/')) throw new SwarmError(`--nat needs the coordinator's address with its /p2p/<peer id> (the relay's id), got "${opts.coordinator}"`);
  for (const a of opts.nat?.announce ?? []) parseMultiaddr(a);
  const compute = env.computeTimeoutMs;
  const handlerTimeoutMs: Record<VolunteerProto, number> = { ...HANDLER_TIMEOUT_MS };
  if (compute !== undefined) for (const p of ['aggregate', 'optimizer'] as const) handlerTimeoutMs[p] = compute;
  return {
    coordinator: opts.coordinator,
    coordinatorAddr,
    coordinatorId: coordinatorAddr.getComponents().findLast((c) => c.name === 'p2p')?.value ?? null,
    token: opts.token,
    device: opts.device,
    backendKind: backendKind(opts.device),
    maxMemoryBytes: opts.maxMemoryBytes,
    dataDir: path.resolve(opts.dataDir),
    listen: opts.listen ?? DEFAULT_LISTEN,
    progressIntervalMs: opts.progressIntervalMs ?? PROGRESS_INTERVAL_MS,
    joinTimeoutMs: JOIN_TIMEOUT_MS,
    coordinatorLostMs: COORDINATOR_LOST_MS,
    rejoinWindowMs: REJOIN_WINDOW_MS,
    rejoinRetryMs: REJOIN_RETRY_MS,
    rssSampleMs: RSS_SAMPLE_MS,
    snapshotResidentBytes: SNAPSHOT_RESIDENT_BYTES,
    handlerTimeoutMs,
    aids: testAids(env),
    nat: opts.nat !== undefined ? { announce: [...opts.nat.announce], dialPort: opts.nat.dialPort, relay: opts.nat.relay === true } : null,
  };
}
