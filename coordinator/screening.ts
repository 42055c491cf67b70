// Screens for what stage peers send the coordinator: step gradients before they count, and the
// activations the coordinator receives as referee (the activation screens are protocol/screen.ts's,
// applied by every receiver).
import { median, OutputScreen } from '../protocol/screen.ts';
import { globalGradNorm } from './aggregate.ts';

export interface ScreenLimits {
  screenFactor: number;
  outputHistory: number;
  outputHistoryMin: number;
  normHistory: number;
}

/** One replica's step gradient as collected, for the gradient screen. */
export interface ReplicaGradient { id: string; grads: Float32Array[]; microBatches: number }

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

  /** The replicas of stage s whose step gradient is non-finite or over screenFactor× the median of
   *  the other replicas of this step and the stage's recent accepted steps, with the reason. */
  gradients(s: number, step: number, replicas: readonly ReplicaGradient[]): Array<{ id: string; reason: string }> {
    const perMb = replicas.map((r) => globalGradNorm([r.grads]) / Math.max(1, r.microBatches));
    const hist = this.normHistory[s] ?? [];
    const factor = this.limits.screenFactor;
    const bad: Array<{ id: string; reason: string }> = [];
    replicas.forEach((r, i) => {
      const ref = median([...perMb.filter((_, j) => j !== i), ...hist]);
      if (!Number.isFinite(perMb[i]!) || (ref !== null && ref > 0 && perMb[i]! > factor * ref)) {
        bad.push({ id: r.id, reason: `its step ${step} gradient (${perMb[i]!.toExponential(2)} per micro-batch) is over ${factor}x the median ${ref?.toExponential(2)}` });
      }
    });
    return bad;
  }

  /** The step's gradients counted: they become part of each stage's reference. */
  accept(collected: readonly (readonly ReplicaGradient[])[]): void {
    for (let s = 0; s < collected.length; s++) {
      const hist = (this.normHistory[s] ??= []);
      for (const r of collected[s]!) if (r.microBatches > 0) hist.push(globalGradNorm([r.grads]) / r.microBatches);
      while (hist.length > this.limits.normHistory) hist.shift();
    }
  }
}
