// The organizer's progress line, in the format of `swarmtune train`'s (engine/tasks/train.ts) plus the peer count.

export function fmtDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '?';
  const s = Math.round(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

export interface ProgressInput {
  step: number;
  totalSteps: number;
  loss: number;
  lr: number;
  tokensPerSecond: number;
  /** peers serving a stage */
  peers: number;
  /** since training started (or resumed) in this process, and the steps committed in that time */
  elapsedMs: number;
  stepsDone: number;
}

export function progressLine(p: ProgressInput): string {
  const width = 20;
  const filled = Math.round(width * Math.min(1, p.step / Math.max(1, p.totalSteps)));
  const etaMs = p.stepsDone > 0 ? p.elapsedMs / p.stepsDone * (p.totalSteps - p.step) : Number.NaN;
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] step ${p.step}/${p.totalSteps} | loss ${p.loss.toFixed(4)} | lr ${p.lr.toExponential(2)} | ` +
    `${Math.round(p.tokensPerSecond)} tok/s | ${p.peers} peer${p.peers === 1 ? '' : 's'} | ETA ${fmtDuration(etaMs)}`;
}
