// Testing aid: SWARMTUNE_TEST_CRASH=<point>@<step> makes the coordinator SIGKILL itself at a named
// point of the step that would commit <step> (1-based, as the `step` events count), so tests can
// check a restart from any point of a step. Not for production use; unset, it costs one lookup.
//
// Points, in the order a step reaches them:
//   before-apply   gradients collected and clipped, no replica updated yet
//   mid-apply      stage 0's replicas updated, later stages not (a 2+ stage run is half updated)
//   before-commit  every replica updated and the new adapter uploaded, nothing written to LevelDB
//   after-commit   the step is in LevelDB but not yet announced (no `step` event)

export const CRASH_POINTS = ['before-apply', 'mid-apply', 'before-commit', 'after-commit'] as const;
export type CrashPoint = (typeof CRASH_POINTS)[number];

let parsed: { point: CrashPoint; step: number } | null | undefined;

function target(): { point: CrashPoint; step: number } | null {
  if (parsed !== undefined) return parsed;
  const v = process.env.SWARMTUNE_TEST_CRASH;
  if (v === undefined || v === '') return (parsed = null);
  const m = /^([a-z-]+)@(\d+)$/.exec(v);
  if (m === null || !(CRASH_POINTS as readonly string[]).includes(m[1]!)) {
    throw new Error(`SWARMTUNE_TEST_CRASH must be <point>@<step> with point one of ${CRASH_POINTS.join(', ')}, got "${v}"`);
  }
  return (parsed = { point: m[1] as CrashPoint, step: Number(m[2]) });
}

/** Validate SWARMTUNE_TEST_CRASH early (launch), so a typo fails at start rather than never firing. */
export function checkCrashEnv(): void { target(); }

/** SIGKILL this process when SWARMTUNE_TEST_CRASH names this point of this step. */
export function crashPoint(point: CrashPoint, step: number): void {
  const t = target();
  if (t !== null && t.point === point && t.step === step) {
    process.stderr.write(`[swarmtune launch] SWARMTUNE_TEST_CRASH: killing the coordinator at ${point} of step ${step}\n`);
    process.kill(process.pid, 'SIGKILL');
  }
}
