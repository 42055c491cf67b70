// Screens for what stage peers send the coordinator: step gradients before they count, and the
// activations the coordinator receives as referee (the activation screens are protocol/screen.ts's,
// applied by every receiver).
import { BadOutputError, median, OutputScreen } from '../protocol/screen.ts';
import { decodeFloat } from '../protocol/tensor.ts';
import type { WireTensor } from '../protocol/tensor.ts';
import { globalGradNorm } from './aggregate.ts';

export interface ScreenLimits {
  screenFactor: number;
  outputHistory: number;
  outputHistoryMin: number;
  normHistory: number;
}

/** One replica's step gradient as collected, for the gradient screen. `labelTokens`: trained
 *  positions of the micro-batches it folded in, when the step knows them (0: a zero gradient is right). */
export interface ReplicaGradient { id: string; grads?: Float32Array[]; sumSq?: number; microBatches: number; labelTokens?: number }

/** A replica's step-gradient norm: from the Σ g² it reported (the light tail), else from its tensors. */
function normOf(r: ReplicaGradient): number {
  return r.sumSq !== undefined ? Math.sqrt(r.sumSq) : globalGradNorm([r.grads ?? []]);
}

/** Per stage, what its peers sent recently: the reference a new output or step gradient is judged by. */
export class Screens {
  private readonly limits: ScreenLimits;
  /** per (kind, sending stage): the RMS of activations and activation gradients that receivers
   *  reported accepting (micro-batch reports), the reference for the referee's RMS screen; a median
   *  over many receivers' reports, so one lying receiver moves it little */
  readonly outputs: OutputScreen;
  /** per stage: recent accepted per-micro-batch gradient norms of replicas */
  private readonly normHistory: number[][] = [];

  constructor(limits: ScreenLimits) {
    this.limits = limits;
    this.outputs = new OutputScreen(limits);
  }

  /** Decode a replica's step gradient: non-finite or misshapen is a BadOutputError (its sender is
   *  banned, not dropped: coordinator/peers.ts). */
  stepGradient(t: WireTensor, what: string, shape: number[] | undefined): Float32Array {
    try {
      return decodeFloat(t, what, shape);
    } catch (e) {
      throw new BadOutputError((e as Error).message);
    }
  }

  /** The replicas of stage s whose step gradient is non-finite, over screenFactor× the median of the
   *  other replicas of this step and the stage's recent accepted steps, or under 1/screenFactor of
   *  the median of the recent accepted steps (only for a replica whose micro-batches had trained
   *  positions), with the reason. */
  gradients(s: number, step: number, replicas: readonly ReplicaGradient[]): Array<{ id: string; reason: string }> {
    const perMb = replicas.map((r) => normOf(r) / Math.max(1, r.microBatches));
    const hist = this.normHistory[s] ?? [];
    const factor = this.limits.screenFactor;
    const bad: Array<{ id: string; reason: string }> = [];
    // the lower bound from accepted steps only: against this step's other replicas it would be
    // symmetric, and one outsized replica would make its honest partner look lazy
    const low = median(hist);
    replicas.forEach((r, i) => {
      const ref = median([...perMb.filter((_, j) => j !== i), ...hist]);
      if (!Number.isFinite(perMb[i]!)) {
        bad.push({ id: r.id, reason: `its step ${step} gradient is non-finite` });
      } else if (ref !== null && ref > 0 && perMb[i]! > factor * ref) {
        bad.push({ id: r.id, reason: `its step ${step} gradient (${perMb[i]!.toExponential(2)} per micro-batch) is over ${factor}x the median ${ref.toExponential(2)}` });
      } else if (low !== null && low > 0 && r.microBatches > 0 && r.labelTokens !== 0 && !(perMb[i]! * factor >= low)) {
        bad.push({ id: r.id, reason: `its step ${step} gradient (${perMb[i]!.toExponential(2)} per micro-batch) is under 1/${factor} of the median ${low.toExponential(2)} of recent accepted steps` });
      }
    });
    return bad;
  }

  /** The step's gradients counted: they become part of each stage's reference. */
  accept(collected: readonly (readonly ReplicaGradient[])[]): void {
    for (let s = 0; s < collected.length; s++) {
      const hist = (this.normHistory[s] ??= []);
      for (const r of collected[s]!) if (r.microBatches > 0 && r.labelTokens !== 0) hist.push(normOf(r) / r.microBatches);
      while (hist.length > this.limits.normHistory) hist.shift();
    }
  }
}
