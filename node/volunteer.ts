// The volunteer process: its config, backend, data dir and swarm node; the session that joins and
// serves a stage; Ctrl-C; and a clean exit whatever happens.
import path from 'node:path';
import { rm } from 'node:fs/promises';
import type { Backend } from '../engine/backend.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { createSwarmNode, lockDataDir } from '../protocol/net.ts';
import { PathBook, RelayMembers } from '../protocol/nat.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { silentLogger } from '../protocol/log.ts';
import { probeCapabilities } from './probe.ts';
import type { StageHost } from './stage-host.ts';
import { createShardOptimizer } from './optimizer.ts';
import type { OptimizerFactory } from './optimizer.ts';
import { resolveVolunteerConfig } from './config.ts';
import type { VolunteerConfig, VolunteerOptions } from './config.ts';
import { VolunteerEvents } from './events.ts';
import { LeavingError, VolunteerSession } from './session.ts';
import { serveTable, volunteerHandlers } from './handlers.ts';
import { EXIT_FAILED, EXIT_OK, EXIT_REJECTED } from './constants.ts';

export type { VolunteerOptions } from './config.ts';

/** Injected pieces (tests run a volunteer in-process with a chosen backend). */
export interface VolunteerDeps {
  backend?: Backend;
  createOptimizer?: OptimizerFactory;
  /** stops the volunteer abruptly (its node goes away without a goodbye), as a crash would */
  abort?: AbortSignal;
  /** called with each stage host as it is created (tests instrument it) */
  onHost?: (host: StageHost) => void;
  /** every event the volunteer reports (the same objects --json prints) */
  onEvent?: (e: Record<string, unknown>) => void;
  /** the exit code and one-line message of a fatal error (bin/ gives its table's, bin/errors.ts);
   *  default: the error's name and message, exit EXIT_REJECTED for a refusal (AuthError, CapacityError), else 1 */
  describeError?: (e: Error) => { code: number; message: string };
}

/** The backend for --device, loaded when first needed so an in-process volunteer with an injected
 *  backend does not load the native addon. */
async function createBackendFor(cfg: VolunteerConfig): Promise<Backend> {
  if (cfg.backendKind === 'ref') return new RefBackend();
  const { createBackend } = await import('../engine/backends/index.ts');
  return createBackend(cfg.backendKind);
}

export async function runVolunteer(opts: VolunteerOptions, deps: VolunteerDeps = {}): Promise<number> {
  const events = new VolunteerEvents(opts.json, deps.onEvent);
  const log = opts.log ?? silentLogger;
  // the process's stop: Ctrl-C leaves cleanly, a test's abort as a crash would
  const stop = new AbortController();
  const onSignal = () => {
    events.say('stopping', { reason: 'signal' }, 'stopping on signal');
    stop.abort(new LeavingError(EXIT_OK, 'signal'));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  deps.abort?.addEventListener('abort', () => stop.abort(new LeavingError(EXIT_FAILED, 'aborted')), { once: true });
  let backend: Backend | null = deps.backend ?? null;
  let node: SwarmNode | null = null;
  let paths: PathBook | null = null;
  let unlock: (() => Promise<void>) | null = null;
  try {
    const config = resolveVolunteerConfig(opts);
    backend ??= await createBackendFor(config);
    unlock = await lockDataDir(config.dataDir);
    // step snapshots spilled by an earlier process of this data dir are of no use to this one
    await rm(path.join(config.dataDir, 'restore'), { recursive: true, force: true });
    // NAT traversal: a volunteer relay (--relay) serves the members the coordinator lists; volunteer relays this
    // peer reserves on are added to `relayIds` as the coordinator names them
    const members = config.nat?.relay === true ? new RelayMembers() : null;
    const relayIds = new Set<string>();
    node = await createSwarmNode({
      dataDir: config.dataDir, listen: [config.listen],
      nat: config.nat !== null ? {
        role: 'volunteer', relays: [config.coordinator], announce: config.nat.announce, dialPort: config.nat.dialPort,
        relayServer: members !== null, isMember: members !== null ? (id) => members.has(id) : undefined, isRelay: (id) => relayIds.has(id),
      } : undefined,
    });
    paths = config.nat !== null ? new PathBook(node) : null;
    const blobs = new BlobStore(config.dataDir);
    // blobs of a private run go only to its token holders, allowlisted peers and the coordinator
    blobs.token = config.token;
    const session = new VolunteerSession(config, {
      node, paths, members, relayIds, blobs, backend, createOptimizer: deps.createOptimizer ?? createShardOptimizer, events, log, onHost: deps.onHost,
    }, { signal: stop.signal });
    // a fetch cut short by leaving is no provider's failure
    blobs.onEvent = (e) => { if (!session.signal.aborted) events.blob(e); };
    await serveTable(node, volunteerHandlers(session, blobs), { timeoutsMs: config.handlerTimeoutMs, log: log.child('rpc'), signal: session.signal });
    await session.hops.register(node);
    const caps = await probeCapabilities(backend, { device: config.device, maxMemoryBytes: config.maxMemoryBytes });
    events.say('probe', { capabilities: caps }, `${caps.deviceName}, ${caps.cores} cores, offering ${(caps.memoryBytes / 2 ** 30).toFixed(2)} GiB, ${caps.gemmGflops.toFixed(1)} GFLOP/s`);
    return await session.run(caps);
  } catch (e) {
    const refused = (e as Error).name === 'AuthError' || (e as Error).name === 'CapacityError';
    const d = deps.describeError?.(e as Error) ?? { code: refused ? EXIT_REJECTED : EXIT_FAILED, message: `${(e as Error).name}: ${(e as Error).message}` };
    events.error(e as Error, d.message, d.code);
    return d.code;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    paths?.stop();
    if (node !== null) { try { await node.stop(); } catch { /* already stopped */ } }
    if (deps.backend === undefined) backend?.dispose();
    await unlock?.();
  }
}
