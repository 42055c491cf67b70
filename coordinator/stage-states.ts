// Each stage's optimizer state: where a peer taking a stage gets it, which steps checkpoint it, and how big it is.
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { TrainConfig } from '../engine/train/config.ts';
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
      try { return { bytes: await this.o.client.optimizerState(peers.addrs(id), step, { signal }), from: `the optimizer state of a live replica at step ${step} (exact)` }; } catch (e) {
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

  /** Every stage's state after `step` steps from a replica that applied it; null (and an event) when
   *  some stage has none to give: the step then commits without a checkpoint. */
  async fetch(step: number, numStages: number, applied: ReadonlySet<string>, signal: AbortSignal): Promise<Uint8Array[] | null> {
    const { peers } = this.o;
    const states: Uint8Array[] = [];
    for (let s = 0; s < numStages; s++) {
      let got: Uint8Array | null = null;
      for (const id of peers.liveReplicas(s).filter((x) => applied.has(x))) {
        try { got = await this.o.client.optimizerState(peers.addrs(id), step, { signal }); break; } catch (e) {
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
