// The volunteer process: probe, join, fetch and verify shard blobs, load the stage, serve it, exit cleanly.
import path from 'node:path';
import { rm } from 'node:fs/promises';
import type { Backend } from '../engine/backend.ts';
import type { BackendKind } from '../engine/backends/index.ts';
import { loadStage } from '../engine/model/load.ts';
import { loraTargets } from '../engine/model/lora.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import type { LoraConfig } from '../engine/types.ts';
import { createSwarmNode, lockDataDir, request, serve, parseMultiaddr } from '../protocol/net.ts';
import type { HandlerContext, SwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import type { BlobEvent } from '../protocol/blobs.ts';
import { decodeShard } from '../engine/formats/shard.ts';
import type { Assignment } from '../protocol/messages.ts';
import { AuthError, StaleError, SwarmError } from '../protocol/errors.ts';
import { probeCapabilities } from './probe.ts';
import { BlobWeightSource } from './weights.ts';
import { SNAPSHOT_RESIDENT_BYTES, StageHost } from './stage-host.ts';
import type { KeptOffer } from './stage-host.ts';
import { createShardOptimizer } from './optimizer.ts';
import type { ShardOptimizer } from './stage-host.ts';
import type { NamedTensor } from '../engine/types.ts';
import type { OptimSpec } from '../protocol/messages.ts';

/** Joining waits for the coordinator to reach --min-peers and plan; an hour covers slow organizers. */
const JOIN_TIMEOUT_MS = 60 * 60_000;
/** Without a coordinator heartbeat for this long (it pings every second), the coordinator is
 *  considered gone: the volunteer abandons the step in flight, keeps its stage state (and the state
 *  from before its last update) and rejoins, offering that state (a restarted coordinator keeps its
 *  peer id and address, and resumes the volunteer at its last committed step). */
const COORDINATOR_LOST_MS = 8_000;
/** How long a volunteer keeps trying to rejoin a lost coordinator before giving up. */
const REJOIN_WINDOW_MS = 10 * 60_000;

export interface VolunteerOptions {
  coordinator: string;
  token: string | null;
  device: string;
  maxMemoryBytes?: number;
  dataDir: string;
  json: boolean;
  /** listen multiaddr for serving blobs and stage requests */
  listen?: string;
}

export const EXIT_OK = 0;
export const EXIT_REJECTED = 2;
export const EXIT_FAILED = 1;

function backendKind(device: string): BackendKind {
  if (device === 'auto' || device === 'cpu' || device === 'ref') return device;
  if (/^cuda(:\d+)?$/.test(device)) return device as BackendKind; // cuda:N selects GPU N
  throw new SwarmError(`--device must be auto, cpu, ref or cuda:N, got "${device}"`);
}

/** The backend factory, loaded when first needed so an in-process volunteer with an injected
 *  backend does not load the native addon. */
async function loadCreateBackend(): Promise<(kind: BackendKind) => Promise<Backend>> {
  const { createBackend } = await import('../engine/backends/index.ts');
  return (k) => createBackend(k);
}

export type OptimizerFactory = (spec: OptimSpec, params: NamedTensor[], opts: { spillDir: string; state: Uint8Array | null; backend?: Backend }) => Promise<ShardOptimizer>;

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
}

export async function runVolunteer(opts: VolunteerOptions, deps: VolunteerDeps = {}): Promise<number> {
  const say = (event: string, fields: Record<string, unknown>, human: string) => {
    deps.onEvent?.({ event, ...fields });
    if (opts.json) process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
    else process.stderr.write(`[swarmtune join] ${human}\n`);
  };
  const dataDir = path.resolve(opts.dataDir);
  let backend: Backend | null = deps.backend ?? null;
  const createOptimizer: OptimizerFactory = deps.createOptimizer ?? createShardOptimizer;
  let node: SwarmNode | null = null;
  let unlock: (() => Promise<void>) | null = null;
  let host: StageHost | null = null;
  /** the stage kept after losing the coordinator, with what it offers the restarted one */
  let kept: { host: StageHost; offer: KeptOffer } | null = null;
  let runId: string | null = null;
  let lastCoordinatorMs = Date.now();
  /** set while serving a stage: the coordinator released this peer (finish with rejoinAfterMs) */
  let release: ((rejoinAfterMs: number) => void) | null = null;
  let done!: (code: number) => void;
  const finished = new Promise<number>((r) => { done = r; });

  const onSignal = () => { say('stopping', { reason: 'signal' }, 'stopping on signal'); done(EXIT_OK); };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  deps.abort?.addEventListener('abort', () => done(EXIT_FAILED), { once: true });

  try {
    if (backend === null) {
      const kind = backendKind(opts.device);
      backend = kind === 'ref' ? new RefBackend() : await (await loadCreateBackend())(kind);
    }
    unlock = await lockDataDir(dataDir);
    // step snapshots spilled by an earlier process of this data dir are of no use to this one
    await rm(path.join(dataDir, 'restore'), { recursive: true, force: true });
    node = await createSwarmNode({ dataDir, listen: [opts.listen ?? '/ip4/127.0.0.1/tcp/0'] });
    const blobs = new BlobStore(dataDir);
    blobs.onEvent = (e: BlobEvent) => {
      const human = e.kind === 'cache-hit' ? `blob ${e.name} ${e.sha256.slice(0, 12)} verified from cache`
        : e.kind === 'fetched' ? `blob ${e.name} ${e.sha256.slice(0, 12)} fetched (${e.sizeBytes} bytes) from ${e.from}`
          : e.kind === 'corrupt-cache' ? `cached blob ${e.name} ${e.sha256.slice(0, 12)} is corrupt (hashes to ${e.got.slice(0, 12)}); refused, fetching again`
            : `provider ${e.from} failed for blob ${e.name}: ${e.error}`;
      say('blob', { ...e }, human);
    };
    const notReady = async (): Promise<never> => { throw new StaleError('this peer has no stage loaded yet'); };
    // only the coordinator (its Noise-authenticated peer id, from the /p2p/ part of its address) may
    // drive the stage, heartbeat or end this peer; verified blobs go to anyone in a public run
    const coord = parseMultiaddr(opts.coordinator);
    let coordinatorId: string | null = coord.getComponents().findLast((c) => c.name === 'p2p')?.value ?? null;
    const fromCoordinator = (proto: string, ctx: HandlerContext): void => {
      if (ctx.peerId !== coordinatorId) throw new AuthError(`${proto}: only the coordinator ${coordinatorId ?? '(not yet known)'} may send this, not ${ctx.peerId}`);
    };
    // blobs of a private run go only to its token holders, allowlisted peers and the coordinator
    blobs.token = opts.token;
    let allowPeers: Set<string> | null = null;
    await serve(node, 'weights', (req, ctx) => {
      const open = opts.token === null && allowPeers === null;
      if (!open && ctx.peerId !== coordinatorId && !(opts.token !== null && req.token === opts.token) && !(allowPeers?.has(ctx.peerId) ?? false)) {
        throw new AuthError('weights: this run is private: blobs go only to peers with its join token or on its allowlist');
      }
      return blobs.serveChunk(req);
    });
    // process RSS costs a /proc read (~2 ms): sample it at most once a second, not per heartbeat
    let rss = { bytes: process.memoryUsage.rss(), atMs: Date.now() };
    await serve(node, 'heartbeat', async (_req, ctx) => {
      fromCoordinator('heartbeat', ctx);
      lastCoordinatorMs = Date.now();
      if (lastCoordinatorMs - rss.atMs > 1000) rss = { bytes: process.memoryUsage.rss(), atMs: lastCoordinatorMs };
      return {
        runId, ready: host !== null, step: host?.step ?? 0, tokensPerSecond: host?.tokensPerSecond ?? 0,
        inflight: host?.inflight ?? 0, busy: host?.busy ?? false, memoryRssBytes: rss.bytes,
      };
    });
    await serve(node, 'forward', async (req, ctx) => { fromCoordinator('forward', ctx); return host === null ? notReady() : host.forward(req); });
    await serve(node, 'backward', async (req, ctx) => { fromCoordinator('backward', ctx); return host === null ? notReady() : host.backward(req); });
    await serve(node, 'commit', async (req, ctx) => { fromCoordinator('commit', ctx); if (host === null) return notReady(); host.commit(req); return { ok: true }; });
    await serve(node, 'aggregate', async (req, ctx) => { fromCoordinator('aggregate', ctx); return host === null ? notReady() : host.aggregate(req); });
    await serve(node, 'adapter', async (req, ctx) => { fromCoordinator('adapter', ctx); return host === null ? notReady() : host.adapter(req); });
    await serve(node, 'optimizer', async (req, ctx) => { fromCoordinator('optimizer', ctx); return host === null ? notReady() : host.optimizerChunk(req); });
    await serve(node, 'finish', async (req, ctx) => {
      fromCoordinator('finish', ctx);
      if (req.runId !== runId) throw new StaleError(`finish for run ${req.runId}, this peer is in run ${runId}`);
      if (req.rejoinAfterMs !== undefined) {
        // released from the stage, not from the run: join again (at once, or when a ban ends)
        say('released', { run_id: runId, reason: req.reason, rejoin_after_ms: req.rejoinAfterMs }, `released from the stage: ${req.reason}; joining again in ${Math.round(req.rejoinAfterMs / 1000)} s`);
        const r = release;
        setImmediate(() => r?.(req.rejoinAfterMs!));
        return { ok: true };
      }
      say('finished', { run_id: runId, reason: req.reason }, `run finished: ${req.reason}`);
      setImmediate(() => done(EXIT_OK));
      return { ok: true };
    });

    const caps = await probeCapabilities(backend, { device: opts.device, maxMemoryBytes: opts.maxMemoryBytes });
    say('probe', { capabilities: caps }, `${caps.deviceName}, ${caps.cores} cores, offering ${(caps.memoryBytes / 2 ** 30).toFixed(2)} GiB, ${caps.gemmGflops.toFixed(1)} GFLOP/s`);
    const listenAddrs = node.getMultiaddrs().map((m) => m.toString());
    let lostSinceMs: number | null = null;
    let previousRunId: string | null = null;
    for (;;) {
      say('joining', { coordinator: opts.coordinator, peer_id: node.peerId.toString() }, `joining ${opts.coordinator} as ${node.peerId.toString()}`);
      let res;
      try {
        const joinP = request(node, coord, 'join', {
          token: opts.token, capabilities: caps, listenAddrs, previousRunId, ...(kept !== null ? { kept: kept.offer } : {}),
        }, { timeoutMs: JOIN_TIMEOUT_MS });
        res = await Promise.race([joinP, finished.then(() => null)]);
      } catch (e) {
        // a restarting coordinator refuses connections for a while: keep trying within the window
        if (lostSinceMs !== null && Date.now() - lostSinceMs < REJOIN_WINDOW_MS && (e as Error).name !== 'AuthError') {
          const stop = await Promise.race([new Promise((r) => setTimeout(() => r(false), 1000)), finished.then(() => true)]);
          if (stop === true) return await finished;
          continue;
        }
        throw e;
      }
      if (res === null) return await finished;
      // an address without /p2p/: the coordinator is the peer this join reached
      coordinatorId ??= node.getConnections().find((c) => c.remoteAddr.toString().startsWith(coord.toString()))?.remotePeer.toString() ?? null;
      if (res.status === 'rejected' || res.assignment === null) {
        say('rejected', { reason: res.reason }, `the coordinator did not give this peer a stage: ${res.reason ?? 'no reason given'}`);
        return EXIT_REJECTED;
      }
      const a: Assignment = res.assignment;
      allowPeers = a.allowPeers !== undefined ? new Set(a.allowPeers) : null;
      runId = a.runId;
      previousRunId = a.runId;
      lastCoordinatorMs = Date.now();
      say('assigned', { run_id: a.runId, stage: a.stageIndex, layer_start: a.layerStart, layer_end: a.layerEnd, num_stages: a.numStages, step: a.step },
        `assigned stage ${a.stageIndex + 1}/${a.numStages}: layers [${a.layerStart}, ${a.layerEnd}) at step ${a.step}`);
      let active: StageHost;
      if (a.keep !== undefined) {
        // the restarted coordinator resumes the stage this peer kept, at its last committed step
        const k = kept;
        if (k === null || k.offer.runId !== a.runId || k.offer.stageIndex !== a.stageIndex || k.offer.layerStart !== a.layerStart || k.offer.layerEnd !== a.layerEnd) {
          throw new SwarmError(`the coordinator asked this peer to keep stage ${a.stageIndex} layers [${a.layerStart}, ${a.layerEnd}) of run ${a.runId}, but it ${k === null ? 'kept no stage' : `kept stage ${k.offer.stageIndex} layers [${k.offer.layerStart}, ${k.offer.layerEnd}) of run ${k.offer.runId}`}`);
        }
        const from = k.host.step;
        const { rolledBack } = await k.host.resumeAt(a.step, a.keep.adapterSha256);
        kept = null;
        active = k.host;
        say('resumed', { stage: a.stageIndex, step: a.step, from_step: from, rolled_back: rolledBack },
          rolledBack ? `kept stage ${a.stageIndex}: rolled back the uncommitted update of step ${from} to the committed step ${a.step}`
            : `kept stage ${a.stageIndex} at the committed step ${a.step}`);
      } else {
        if (kept !== null) { await kept.host.dispose(); kept.host.stage.dispose(); kept = null; }
        active = await loadAssignment(node, blobs, backend, a, dataDir, createOptimizer);
      }
      host = active;
      deps.onHost?.(active);
      say('ready', { stage: a.stageIndex, params: active.stage.params.length }, `stage loaded (${active.stage.params.length} LoRA tensors); serving`);

      let watchdog: NodeJS.Timeout | undefined;
      const lost = new Promise<'lost'>((resolve) => {
        watchdog = setInterval(() => { if (Date.now() - lastCoordinatorMs > COORDINATOR_LOST_MS) resolve('lost'); }, 250);
      });
      const released = new Promise<{ rejoinAfterMs: number }>((resolve) => { release = (ms) => resolve({ rejoinAfterMs: ms }); });
      const outcome = await Promise.race([finished, lost, released]);
      clearInterval(watchdog);
      release = null;
      if (typeof outcome === 'object') {
        // drop the stage; join again as a new peer of the run (the coordinator places it)
        host = null;
        runId = null;
        await active.detach(); // waits for the job computing now and drops the step in flight
        while (active.busy) await new Promise((r) => setTimeout(r, 50));
        await active.dispose();
        active.stage.dispose();
        const stop = await Promise.race([new Promise((r) => setTimeout(() => r(false), outcome.rejoinAfterMs)), finished.then(() => true)]);
        if (stop === true) return await finished;
        continue;
      }
      if (outcome !== 'lost') return outcome;
      const old: StageHost = active;
      host = null; // not ready (heartbeats say so) until a coordinator assigns a stage again
      runId = null;
      const offer = await old.detach();
      kept = { host: old, offer };
      say('coordinator_lost', { kept_steps: offer.states.map((x) => x.step) },
        `no heartbeat from the coordinator for ${COORDINATOR_LOST_MS / 1000} s; keeping stage ${offer.stageIndex} (restorable at step ${offer.states.map((x) => x.step).join(' or ')}) and rejoining (for up to ${REJOIN_WINDOW_MS / 60_000} min)`);
      lostSinceMs = Date.now();
    }
  } catch (e) {
    const err = e as Error;
    say('error', { name: err.name, message: err.message }, `error: ${err.name}: ${err.message}`);
    return EXIT_FAILED;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (host !== null) { await host.dispose().catch(() => {}); host.stage.dispose(); }
    if (kept !== null) { await kept.host.dispose().catch(() => {}); kept.host.stage.dispose(); }
    if (node !== null) { try { await node.stop(); } catch { /* already stopped */ } }
    if (deps.backend === undefined) backend?.dispose();
    await unlock?.();
  }
}

/** Fetch, verify and decode the stage's shard blobs, load the stage, apply the run's current adapter. */
async function loadAssignment(node: SwarmNode, blobs: BlobStore, backend: Backend, a: Assignment, dataDir: string, createOptimizer: OptimizerFactory): Promise<StageHost> {
  const config = parseLlamaConfig(JSON.parse(a.modelConfigJson), `run ${a.runId} model config`);
  const shards = [];
  for (const ref of a.blobs) shards.push(decodeShard(await blobs.get(node, ref), `shard ${ref.name}`));
  const source = new BlobWeightSource(config, shards);
  const lora: LoraConfig = {
    r: a.lora.r, loraAlpha: a.lora.loraAlpha, loraDropout: a.lora.loraDropout, targetModules: loraTargets(a.lora.targetModules),
    useRslora: a.lora.useRslora, initLoraWeights: a.lora.initLoraWeights === 'gaussian' ? 'gaussian' : true,
  };
  const stage = await loadStage(source, backend, {
    layerStart: a.layerStart, layerEnd: a.layerEnd, lora, seed: a.seed, gradientCheckpointing: a.gradientCheckpointing,
  });
  source.clear();
  if (a.adapterBlob !== null) {
    const t = decodeShard(await blobs.get(node, a.adapterBlob), `adapter ${a.adapterBlob.name}`);
    for (const p of stage.params) {
      const x = t.float.get(p.name);
      if (x === undefined) throw new SwarmError(`adapter blob ${a.adapterBlob.name} lacks ${p.name}`);
      if (x.data.length !== p.data.length) throw new SwarmError(`adapter ${p.name}: ${x.data.length} elements, the stage expects ${p.data.length} [${p.shape}]`);
      p.data.set(x.data);
    }
  }
  const optimizer = await createOptimizer(a.optim, stage.params, {
    spillDir: path.join(dataDir, "optimizer"),
    state: a.optimizerBlob !== null ? await blobs.get(node, a.optimizerBlob) : null,
    backend,
  });
  const budget = a.optim.residentBytes > 0 ? a.optim.residentBytes : Infinity;
  return new StageHost(stage, a, optimizer, { dir: path.join(dataDir, 'restore'), residentBytes: Math.min(SNAPSHOT_RESIDENT_BYTES, budget) });
}
