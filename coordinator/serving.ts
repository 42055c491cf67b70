// What the coordinator answers: joins, shard blobs, status, and pulls of committed adapters (paged with the pager).
import type { LoraConfig } from '../engine/types.ts';
import type { BlobStore } from '../protocol/blobs.ts';
import { StaleError } from '../protocol/errors.ts';
import type { Logger } from '../protocol/log.ts';
import type { AdapterResponse, JoinRequest, JoinResponse, StatusResponse } from '../protocol/messages.ts';
import { serve } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { servePage } from '../protocol/pager.ts';
import { decodeShard } from '../engine/formats/shard.ts';
import { encodeTensor } from '../protocol/tensor.ts';
import { authorize } from './admission.ts';
import type { AccessRules } from './admission.ts';
import type { RunStore } from './store.ts';

export interface RunServerInit {
  node: SwarmNode;
  blobs: BlobStore;
  store: RunStore;
  access: AccessRules;
  /** a private run's adapter may still be pulled by anyone */
  publicPull: boolean;
  lora: LoraConfig;
  modelName: string;
  onJoin: (req: JoinRequest, peerId: string) => Promise<JoinResponse>;
  status: () => StatusResponse;
  /** the latest committed step (what a pull without a step gets) */
  committedStep: () => number;
  /** a request that failed validation: it counts against the peer */
  onViolation: (peerId: string, proto: string, err: Error) => void;
  log: Logger;
}

/** Serve the run's protocols until `signal` aborts (which also aborts handlers still running). */
export async function serveRun(o: RunServerInit, opts: { signal: AbortSignal }): Promise<void> {
  const so = { onError: o.onViolation, signal: opts.signal, log: o.log };
  await serve(o.node, 'join', (req, ctx) => o.onJoin(req, ctx.peerId), so);
  await serve(o.node, 'weights', (req, ctx) => { authorize(o.access, ctx.peerId, req.token, 'weights'); return o.blobs.serveChunk(req); }, so);
  await serve(o.node, 'status', async () => o.status(), so);
  await serve(o.node, 'adapter', (req, ctx) => {
    if (!o.publicPull) authorize(o.access, ctx.peerId, req.token, 'pull');
    return pull(o, req.step, req.from, req.count);
  }, so);
}

/** Committed steps in a few words however many there are: runs of consecutive steps as first–last, at most
 *  three runs from each end, and the count ("0–400 (401 steps)", "0, 100, 200–205 (8 steps)"). */
export function stepRanges(steps: readonly number[]): string {
  if (steps.length === 0) return 'none yet';
  const sorted = [...steps].sort((a, b) => a - b);
  const runs: string[] = [];
  let start = sorted[0]!, prev = start;
  for (const s of [...sorted.slice(1), Number.NaN]) {
    if (s === prev + 1) { prev = s; continue; }
    runs.push(start === prev ? String(start) : `${start}–${prev}`);
    start = prev = s;
  }
  const shown = runs.length > 6 ? [...runs.slice(0, 3), '…', ...runs.slice(-3)] : runs;
  return `${shown.join(', ')} (${sorted.length} step${sorted.length === 1 ? '' : 's'})`;
}

/** A page of a committed adapter, in the shard encoding's (stable, by name) tensor order. */
async function pull(o: RunServerInit, step: number | undefined, from: number, count: number): Promise<AdapterResponse> {
  const want = step ?? o.committedStep();
  const bytes = await o.store.adapter(want);
  if (bytes === null) {
    // a step pruned under save_total_limit (perhaps between two pages of this pull) is named as such
    const kept = await o.store.committedSteps();
    if (want < o.committedStep() && (want === 0 || await o.store.wasCommitted(want))) {
      throw new StaleError(`the adapter of step ${want} is no longer kept (pruned under save_total_limit); pullable steps: ${stepRanges(kept)}`);
    }
    throw new StaleError(`no committed adapter for step ${want}; committed steps: ${stepRanges(kept)}`);
  }
  const t = decodeShard(bytes, `adapter of step ${want}`);
  const names = [...t.float.keys()];
  const page = servePage(names.length, from, count, `adapter of step ${want}`, (i) => t.float.get(names[i]!)!.data.length * 4);
  const tensors = names.slice(page.from, page.from + page.count).map((name) => {
    const x = t.float.get(name)!;
    return { name, tensor: encodeTensor(x.data, x.shape, 'f32', name) };
  });
  return {
    step: want, total: names.length, tensors,
    adapterSpecJson: JSON.stringify({ lora: o.lora, baseModel: o.modelName }),
  };
}
