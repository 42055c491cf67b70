// Each stage's optimizer state: where a peer taking a stage gets it, which steps checkpoint it, and how big it is.
import { createHash } from 'node:crypto';
import { Unpackr } from 'msgpackr';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { MIN_8BIT_SIZE, OPTIM8_BLOCKSIZE } from '../engine/train/optim.ts';
import { BadUploadError } from './adapter.ts';
import type { AdapterState } from './adapter.ts';
import type { PeerRegistry } from './peers.ts';
import type { StageRange } from './planner.ts';
import type { RunStatus } from './status.ts';
import type { RunStore } from './store.ts';

export interface StageStatesInit {
  /** optimizer state fetches (compute-class requests) */
  client: StagePeerClient;
  peers: PeerRegistry;
  store: RunStore;
  status: RunStatus;
  adapter: AdapterState;
  train: Pick<TrainConfig, 'optim' | 'save_strategy' | 'save_steps'>;
  totalSteps: number;
  checkpointEveryStepMaxBytes: number;
  /** the checkpoint a restarted coordinator resumed from, per stage (for stages no volunteer kept) */
  resumeStates: Uint8Array[] | null;
}

/** What a step does with optimizer state: a requested checkpoint is kept; a small state is saved at
 *  every step anyway (replaced by the next), so a lost stage resumes from exact moments. */
export interface CheckpointPlan { save: boolean; fetch: boolean }

const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number', structuredClone: false });

/** What a stage's optimizer state must hold: the run's optimizer after at most `step` steps, over
 *  these LoRA parameters (stage order). */
export interface StateExpectation { optim: string; step: number; params: ReadonlyArray<{ name: string; numel: number }> }

/** Check an uploaded optimizer state (the trainer optimizer's msgpack format, node/optimizer.ts):
 *  the run's optimizer, no more steps than the run made, exactly the stage's own tensors (per parameter exp_avg and
 *  exp_avg_sq, or the 8-bit codes and block absmax for parameters of MIN_8BIT_SIZE elements and up)
 *  with exact sizes, finite moments and a non-negative second moment; else a BadUploadError. */
export function checkOptimizerState(bytes: Uint8Array, e: StateExpectation, what: string): void {
  let s: unknown;
  try { s = unpackr.unpack(bytes); } catch (err) { throw new BadUploadError(`${what}: not an optimizer state (${(err as Error).message})`); }
  const st = s as { optim?: unknown; step?: unknown; tensors?: unknown };
  if (typeof st !== 'object' || st === null || !Array.isArray(st.tensors)) throw new BadUploadError(`${what}: not an optimizer state`);
  if (st.optim !== e.optim) throw new BadUploadError(`${what}: optimizer ${String(st.optim)}, the run uses ${e.optim}`);
  // a replica whose stage lost its moments (no checkpoint) counts its steps from when it took the stage
  if (!Number.isInteger(st.step) || (st.step as number) < 0 || (st.step as number) > e.step) throw new BadUploadError(`${what}: ${String(st.step)} completed steps, the run has made ${e.step}`);
  const is8 = e.optim.includes('8bit');
  const want = new Map<string, { dtype: 'F32' | 'U8'; numel: number; nonNegative: boolean }>();
  for (const p of e.params) {
    if (is8 && p.numel >= MIN_8BIT_SIZE) {
      const nb = Math.ceil(p.numel / OPTIM8_BLOCKSIZE);
      want.set(`${p.name}.state1`, { dtype: 'U8', numel: p.numel, nonNegative: false });
      want.set(`${p.name}.state2`, { dtype: 'U8', numel: p.numel, nonNegative: false });
      want.set(`${p.name}.absmax1`, { dtype: 'F32', numel: nb, nonNegative: true });
      want.set(`${p.name}.absmax2`, { dtype: 'F32', numel: nb, nonNegative: true });
    } else {
      want.set(`${p.name}.exp_avg`, { dtype: 'F32', numel: p.numel, nonNegative: false });
      want.set(`${p.name}.exp_avg_sq`, { dtype: 'F32', numel: p.numel, nonNegative: true });
    }
  }
  if (st.tensors.length !== want.size) throw new BadUploadError(`${what}: ${st.tensors.length} tensors, the stage's state has ${want.size}`);
  const seen = new Set<string>();
  for (const t of st.tensors as Array<{ name?: unknown; dtype?: unknown; shape?: unknown; data?: unknown }>) {
    const name = String(t?.name);
    const w = want.get(name);
    if (w === undefined || seen.has(name)) throw new BadUploadError(`${what}: tensor ${name.slice(0, 200)} is not one of the stage's own (or appears twice)`);
    seen.add(name);
    const data = t.data;
    const shapeOk = Array.isArray(t.shape) && t.shape.length === 1 && t.shape[0] === w.numel;
    const bytesPer = w.dtype === 'F32' ? 4 : 1;
    if (t.dtype !== w.dtype || !shapeOk || !(data instanceof Uint8Array) || data.length !== w.numel * bytesPer) {
      throw new BadUploadError(`${what}: tensor ${name} is not ${w.dtype} [${w.numel}]`);
    }
    if (w.dtype === 'F32') {
      const f = new Float32Array(new Uint8Array(data).buffer);
      for (let i = 0; i < f.length; i++) {
        if (!Number.isFinite(f[i]!) || (w.nonNegative && f[i]! < 0)) throw new BadUploadError(`${what}: tensor ${name} element ${i} is ${f[i]}`);
      }
    }
  }
}

export class StageStates {
  private readonly o: StageStatesInit;
  /** per stage: size of its optimizer state at the last checkpoint */
  private readonly stateBytes: number[] = [];
  /** the last checkpoint written only because of the every-step policy (deleted by the next one) */
  private prunable: { step: number; stages: number } | null = null;

  constructor(o: StageStatesInit) {
    this.o = o;
  }

  /** the resumed checkpoint's state of stage s, if the run resumed from one */
  resumed(s: number): Uint8Array | null { return this.o.resumeStates?.[s] ?? null; }

  /** The stage's optimizer state for a peer taking it: from a live replica (exact), else the latest
   *  checkpoint in the RunStore, else none (fresh moments). */
  async forNewReplica(s: number, signal: AbortSignal): Promise<{ bytes: Uint8Array | null; from: string }> {
    const { peers, store } = this.o;
    const step = this.o.status.step;
    for (const id of peers.liveReplicas(s)) {
      if (step === 0) return { bytes: null, from: 'fresh optimizer moments (step 0)' };
      try {
        const bytes = await this.o.client.optimizerState(peers.addrs(id), step, { signal });
        checkOptimizerState(bytes, this.expectation(s, step), `the stage ${s} optimizer state of step ${step} from ${id}`);
        return { bytes, from: `the optimizer state of a live replica at step ${step} (exact)` };
      } catch (e) {
        await peers.dropAfterFailure(id, e as Error, 'it failed to send its optimizer state', signal);
      }
    }
    const c = await store.latestCheckpoint();
    if (c !== null && s < c.stages) {
      const bytes = await store.optimizerState(c.step, s);
      if (bytes !== null) {
        return { bytes, from: c.step === step ? `the optimizer checkpoint of step ${c.step} (exact)`
          : `the optimizer checkpoint of step ${c.step} (the moments of steps ${c.step + 1}..${step} are lost)` };
      }
    }
    const resumed = this.resumed(s);
    if (resumed !== null) return { bytes: resumed, from: 'the optimizer checkpoint the run resumed from' };
    return { bytes: null, from: step === 0 ? 'fresh optimizer moments (step 0)' : `fresh optimizer moments (no checkpoint: moments of steps 1..${step} are lost)` };
  }

  /** Bytes of stage s's optimizer state: as measured at the last checkpoint, else estimated from its
   *  LoRA parameter count (32-bit AdamW: m and v, 8 B/param; 8-bit: about 2 B/param). */
  private sizeEstimate(s: number, st: StageRange): number {
    const known = this.stateBytes[s];
    if (known !== undefined) return known;
    const numel = this.o.adapter.stageSlice(st).reduce((a, x) => a + x.data.length, 0);
    return numel * (this.o.train.optim.includes('8bit') ? 2 : 8);
  }

  /** For the step that commits step + 1. */
  plan(step: number, stages: readonly StageRange[]): CheckpointPlan {
    const t = this.o.train;
    const save = step + 1 === this.o.totalSteps || (t.save_strategy === 'steps' && (step + 1) % t.save_steps === 0);
    const everyStep = stages.every((st, s) => this.sizeEstimate(s, st) <= this.o.checkpointEveryStepMaxBytes);
    return { save, fetch: save || everyStep };
  }

  /** Stage s's state after `step` steps as it must be (checkOptimizerState). */
  expectation(s: number, step: number): StateExpectation {
    const a = this.o.adapter;
    return { optim: this.o.train.optim, step, params: a.namesOf(s).map((name, i) => ({ name, numel: (a.shapeOf(s, i) ?? []).reduce((x, y) => x * y, 1) })) };
  }

  /** Every stage's state after `step` steps from a replica that applied it, checked (its own tensors,
   *  and with `digests[s]` the sha256 its replicas reported after the update; a bad one bans its
   *  sender); null (and an event) when some stage has none to give: the step then commits without a
   *  checkpoint. */
  async fetch(step: number, numStages: number, applied: ReadonlySet<string>, signal: AbortSignal, digests: ReadonlyArray<string | undefined> = []): Promise<Uint8Array[] | null> {
    const { peers } = this.o;
    const states: Uint8Array[] = [];
    for (let s = 0; s < numStages; s++) {
      let got: Uint8Array | null = null;
      for (const id of peers.liveReplicas(s).filter((x) => applied.has(x))) {
        try {
          const bytes = await this.o.client.optimizerState(peers.addrs(id), step, { signal });
          const what = `the stage ${s} optimizer state of step ${step} from ${id}`;
          const d = digests[s];
          if (d !== undefined && createHash('sha256').update(bytes).digest('hex') !== d) throw new BadUploadError(`${what}: its sha256 is not the ${d.slice(0, 16)}… its replicas reported after the update`);
          checkOptimizerState(bytes, this.expectation(s, step), what);
          got = bytes;
          break;
        } catch (e) {
          await peers.dropAfterFailure(id, e as Error, `it failed to send its optimizer state of step ${step}`, signal);
        }
      }
      if (got === null) {
        this.o.status.event('checkpoint', `no replica of stage ${s} could send its optimizer state of step ${step}; step ${step} is committed without a checkpoint`);
        return null;
      }
      states.push(got);
      this.stateBytes[s] = got.length;
    }
    return states;
  }

  /** Checkpoints the commit of `states` replaces (an every-step one that was not requested). */
  replaced(states: Uint8Array[] | null): Array<{ step: number; stages: number }> {
    return states !== null && this.prunable !== null ? [this.prunable] : [];
  }

  /** Step `step` is committed with these states. */
  committed(step: number, states: Uint8Array[] | null, plan: CheckpointPlan): void {
    if (states === null) return;
    this.prunable = plan.save ? null : { step, stages: states.length };
    if (plan.save) this.o.status.event('checkpoint', `checkpointed optimizer state of ${states.length} stage(s) at step ${step}`);
  }
}
