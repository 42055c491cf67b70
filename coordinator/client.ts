// Client side of status and pull: ask a coordinator for its state or a committed adapter.
import { mkdtemp, rm } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';
import os from 'node:os';
import path from 'node:path';
import { writeAdapter } from '../engine/formats/peft.ts';
import type { LoraConfig, NamedTensor } from '../engine/types.ts';
import { createSwarmNode, request, parseMultiaddr } from '../protocol/net.ts';
import type { StatusResponse } from '../protocol/messages.ts';
import { decodeFloat } from '../protocol/tensor.ts';
import { SchemaError, SwarmError } from '../protocol/errors.ts';
import { readPages } from '../protocol/pager.ts';
import { PAGE_TENSORS } from '../protocol/constants.ts';

/** A throwaway client identity: status and pull need no stable peer id. */
async function withClient<T>(fn: (node: Awaited<ReturnType<typeof createSwarmNode>>) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-client-'));
  const node = await createSwarmNode({ dataDir: dir, listen: [] });
  try {
    return await fn(node);
  } finally {
    await node.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

/** status and pull are one-shot tools: a dial reset by the other side (a busy or just-restarted
 *  coordinator closing new sockets) is retried twice after a short pause; every other error is final. */
const retryResets: typeof request = async (node, target, proto, msg, opts) => {
  for (let attempt = 0; ; attempt++) {
    try {
      return await request(node, target, proto, msg, opts);
    } catch (e) {
      // a reset while connecting (libp2p throttles new inbound connections per host) may arrive wrapped in
      // the handshake's EncryptionFailedError: retried too
      const reset = (e as NodeJS.ErrnoException).code === 'ECONNRESET' ||
        ((e as Error).name === 'EncryptionFailedError' && /ECONNRESET/.test((e as Error).message));
      if (attempt >= 2 || !reset) throw e;
      await delay(250 * (attempt + 1), undefined, { signal: opts?.signal });
    }
  }
};

export async function fetchStatus(addr: string, timeoutMs = 10_000, opts: { signal?: AbortSignal } = {}): Promise<StatusResponse> {
  return withClient((node) => retryResets(node, parseMultiaddr(addr), 'status', {}, { timeoutMs, signal: opts.signal }));
}

/** `pull --step N` of a step the run has not committed (or no longer keeps); the message lists what it has. */
export class StepNotFoundError extends SwarmError {
  override name = 'StepNotFoundError';
}

export interface PulledAdapter { step: number; lora: LoraConfig; baseModel: string; tensors: NamedTensor[] }

export async function pullAdapter(addr: string, opts: { step?: number; timeoutMs?: number; token?: string; signal?: AbortSignal } = {}): Promise<PulledAdapter> {
  try {
    return await pullFrom(addr, opts);
  } catch (e) {
    // the coordinator answers a step it has no adapter for as stale; for the puller it is not there
    if ((e as Error).name === 'StaleError' && opts.step !== undefined && /^no committed adapter for step/.test((e as Error).message)) {
      throw new StepNotFoundError(`--step ${opts.step}: the run has ${(e as Error).message.replace(/^no committed adapter for step \d+; /, '')}`);
    }
    throw e;
  }
}

async function pullFrom(addr: string, opts: { step?: number; timeoutMs?: number; token?: string; signal?: AbortSignal }): Promise<PulledAdapter> {
  return withClient(async (node) => {
    const target = parseMultiaddr(addr);
    const once = async (): Promise<PulledAdapter> => {
      let step = opts.step ?? -1, spec: string | null = null;
      const tensors = await readPages<NamedTensor>(async (from, signal) => {
        // after the first page the step is pinned: every page comes from the same committed adapter
        const res = await retryResets(node, target, 'adapter', { step: step >= 0 ? step : undefined, from, count: PAGE_TENSORS, ...(opts.token !== undefined ? { token: opts.token } : {}) },
          { timeoutMs: opts.timeoutMs ?? 60_000, signal });
        if (step >= 0 && res.step !== step) throw new SchemaError(`pull: asked for step ${step}, the coordinator sent step ${res.step}`);
        step = res.step;
        spec ??= res.adapterSpecJson;
        return { total: res.total, items: res.tensors.map(({ name, tensor }) => ({ name, shape: [...tensor.shape], data: decodeFloat(tensor, `adapter ${name}`) })) };
      }, 'pull', { signal: opts.signal });
      if (spec === null) throw new SchemaError('pull: the coordinator sent no adapter spec');
      const parsed = JSON.parse(spec) as { lora: LoraConfig; baseModel: string };
      return { step, lora: parsed.lora, baseModel: parsed.baseModel, tensors };
    };
    try {
      return await once();
    } catch (e) {
      // a pull of "the latest" whose step was pruned mid-transfer (a newer one committed) starts again
      // once at the new latest; a pull of a named step reports the StaleError
      if (opts.step !== undefined || !isStale(e)) throw e;
      return once();
    }
  });
}

function isStale(e: unknown): boolean {
  return (e as Error).name === 'StaleError' || (e as { remoteName?: string }).remoteName === 'StaleError';
}

/** Pull and write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors). */
export async function pullToDir(addr: string, outDir: string, opts: { step?: number; token?: string; signal?: AbortSignal } = {}): Promise<PulledAdapter> {
  const a = await pullAdapter(addr, opts);
  await writeAdapter(outDir, { lora: a.lora, baseModel: a.baseModel, tensors: a.tensors });
  return a;
}

function inWordsMs(ms: number): string {
  const s = Math.ceil(ms / 1000);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function formatStatus(s: StatusResponse): string {
  const banned = s.peers.filter((p) => (p.banRemainingMs ?? 0) > 0).length;
  const lines = [
    `run ${s.runId}: ${s.state}, step ${s.step}/${s.totalSteps}` +
      (s.loss !== null ? `, loss ${s.loss.toFixed(4)}` : '') +
      (s.lr !== null ? `, lr ${s.lr.toExponential(3)}` : '') +
      (s.tokensPerSecond !== null ? `, ${s.tokensPerSecond.toFixed(1)} tokens/s` : ''),
    `${s.numStages} stage(s), ${s.peers.length} peer(s), ${s.retries} retries, ${s.reassignments} reassignments, ${s.bans ?? 0} bans (${banned} in force)`,
  ];
  if (s.waitingFor !== undefined && s.waitingFor !== null) lines.push(`waiting: ${s.waitingFor}`);
  if (s.runConfig !== undefined) lines.push(`config: ${s.runConfig}`);
  lines.push('peer                                                  stage  layers     device                          tok/s    mbs  retries  t/o  moved  health');
  for (const p of s.peers) {
    const layers = p.layerStart !== null ? `[${p.layerStart},${p.layerEnd})` : '-';
    const ban = (p.banRemainingMs ?? 0) > 0 ? ` (ban ${p.bans ?? 1}, ${inWordsMs(p.banRemainingMs!)} left: ${p.banReason ?? ''})`
      : (p.bans ?? 0) > 0 ? ` (banned ${p.bans} time(s) before)` : '';
    lines.push(`${p.peerId.padEnd(54)}${String(p.stageIndex ?? '-').padEnd(7)}${layers.padEnd(11)}${p.device.slice(0, 31).padEnd(32)}` +
      `${p.tokensPerSecond.toFixed(1).padStart(7)}${String(p.microBatches).padStart(6)}${String(p.retries ?? 0).padStart(9)}${String(p.timeouts ?? 0).padStart(5)}` +
      `${String(p.reassignments ?? 0).padStart(7)}  ${p.health}${ban}`);
  }
  return lines.join('\n');
}
