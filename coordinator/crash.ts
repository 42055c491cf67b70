// Testing aid: SWARMTUNE_TEST_CRASH=<point>@<step> makes the coordinator SIGKILL itself at a named
// point of the step that would commit <step> (1-based, as the `step` events count), so tests can
// check a restart from any point of a step. Not for production use; unset, it costs one comparison.
//
// Points, in the order a step reaches them:
//   before-apply   gradients collected and clipped, no replica updated yet
//   mid-apply      stage 0's replicas updated, later stages not (a 2+ stage run is half updated)
//   before-commit  every replica updated and the new adapter uploaded, nothing written to LevelDB
//   after-commit   the step is in LevelDB but not yet announced (no `step` event)

export const CRASH_POINTS = ['before-apply', 'mid-apply', 'before-commit', 'after-commit'] as const;
export type CrashPoint = (typeof CRASH_POINTS)[number];

export interface CrashTarget { point: CrashPoint; step: number }

/** Parse SWARMTUNE_TEST_CRASH (knobs().testCrash); null when unset. */
export function parseCrashTarget(v: string | undefined): CrashTarget | null {
  if (v === undefined || v === '') return null;
  const m = /^([a-z-]+)@(\d+)$/.exec(v);
  if (m === null || !(CRASH_POINTS as readonly string[]).includes(m[1]!)) {
    throw new Error(`SWARMTUNE_TEST_CRASH must be <point>@<step> with point one of ${CRASH_POINTS.join(', ')}, got "${v}"`);
  }
  return { point: m[1] as CrashPoint, step: Number(m[2]) };
}

/** SIGKILL this process when the target names this point of this step. */
export function crashPoint(target: CrashTarget | null, point: CrashPoint, step: number): void {
  if (target !== null && target.point === point && target.step === step) {
    process.stderr.write(`[swarmtune launch] SWARMTUNE_TEST_CRASH: killing the coordinator at ${point} of step ${step}\n`);
    process.kill(process.pid, 'SIGKILL');
  }
}
