// Screens for activations and activation gradients, applied by whoever receives one (a stage peer on a hop, the coordinator as referee).
import { OUTPUT_HISTORY, OUTPUT_HISTORY_MIN, SCREEN_FACTOR } from './constants.ts';
import { SwarmError } from './errors.ts';

/** A peer sent an activation or activation gradient that is non-finite, misshapen or absurd. */
export class BadOutputError extends SwarmError {
  override name = 'BadOutputError';
}

export function median(xs: readonly number[]): number | null {
  if (xs.length === 0) return null;
  const v = [...xs].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 === 1 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
}

export interface OutputScreenLimits {
  screenFactor: number;
  outputHistory: number;
  outputHistoryMin: number;
}

export const DEFAULT_OUTPUT_SCREEN: OutputScreenLimits = { screenFactor: SCREEN_FACTOR, outputHistory: OUTPUT_HISTORY, outputHistoryMin: OUTPUT_HISTORY_MIN };

/** The RMS bound: per key (what kind of tensor, from which stage), the recent accepted RMS values
 *  are the reference a new one is judged by. Shape, dtype and finiteness are checked where the
 *  tensor is decoded (protocol/tensor.ts decodeFloat, chunk by chunk on a hop). */
export class OutputScreen {
  private readonly limits: OutputScreenLimits;
  private readonly history = new Map<string, number[]>();

  constructor(limits: OutputScreenLimits = DEFAULT_OUTPUT_SCREEN) {
    this.limits = limits;
  }

  /** Throws BadOutputError when `rms` is over screenFactor× the median of the key's recent ones
   *  (once there are outputHistoryMin of them), or — with `floor` (the default) — under 1/screenFactor
   *  of it: a lazy or zeroing peer, near zero where the run's history says otherwise. `floor: false`
   *  is for an activation gradient of a micro-batch without trained positions (zero by right), which
   *  must then stay out of the history too. Nothing is recorded. */
  judge(key: string, rms: number, what: string, opts: { floor?: boolean } = {}): void {
    if (!Number.isFinite(rms)) throw new BadOutputError(`${what}: RMS ${rms} is not finite`);
    const hist = this.history.get(key) ?? [];
    const ref = hist.length >= this.limits.outputHistoryMin ? median(hist) : null;
    const factor = this.limits.screenFactor;
    if (ref !== null && ref > 0 && rms > factor * ref) {
      throw new BadOutputError(`${what}: RMS ${rms.toExponential(2)} is over ${factor}x the median ${ref.toExponential(2)} of recent ones`);
    }
    if (opts.floor !== false && ref !== null && ref > 0 && !(rms * factor >= ref)) {
      throw new BadOutputError(`${what}: RMS ${rms.toExponential(2)} is under 1/${factor} of the median ${ref.toExponential(2)} of recent ones`);
    }
  }

  /** An accepted output's RMS joins the key's reference. */
  accept(key: string, rms: number): void {
    const hist = this.history.get(key) ?? [];
    hist.push(rms);
    if (hist.length > this.limits.outputHistory) hist.shift();
    this.history.set(key, hist);
  }
}

/** Root mean square from a sum of squares over n elements. */
export function rmsOf(sumSquares: number, n: number): number {
  return Math.sqrt(sumSquares / Math.max(1, n));
}
