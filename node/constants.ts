// The volunteer's own timeouts, limits and defaults (network-wide ones live in protocol/constants.ts).
import { BLOB_TIMEOUT_MS, COMPUTE_TIMEOUT_MS, CONTROL_TIMEOUT_MS, HEARTBEAT_TIMEOUT_MS } from '../protocol/constants.ts';

/** Joining waits for the coordinator to reach --min-peers and plan; an hour covers slow organizers. */
export const JOIN_TIMEOUT_MS = 60 * 60_000;
/** Without a coordinator heartbeat for this long (it pings every second), the coordinator is
 *  considered gone: the volunteer abandons the step in flight, keeps its stage state (and the state
 *  from before its last update) and rejoins, offering that state (a restarted coordinator keeps its
 *  peer id and address, and resumes the volunteer at its last committed step). */
export const COORDINATOR_LOST_MS = 8_000;
/** How long a volunteer keeps trying to rejoin a lost coordinator before giving up. */
export const REJOIN_WINDOW_MS = 10 * 60_000;
/** Pause between rejoin attempts: a restarting coordinator refuses connections for a while. */
export const REJOIN_RETRY_MS = 1000;
/** Process RSS costs a /proc read (~2 ms): heartbeats reuse a sample this young. */
export const RSS_SAMPLE_MS = 1000;
/** Step snapshots above 64 MiB (or above the paged optimizer's resident budget) go to disk. */
export const SNAPSHOT_RESIDENT_BYTES = 64 * 1024 * 1024;
/** Where a volunteer listens when no --listen is given. */
export const DEFAULT_LISTEN = '/ip4/127.0.0.1/tcp/0';

/** The backstop deadline of a `microbatch` handler (see HANDLER_TIMEOUT_MS). */
export const MICROBATCH_HANDLER_TIMEOUT_MS = 4 * 60 * 60_000;

/** How long a handler may take before its signal aborts (a job still queued is then dropped): the
 *  requester's own timeout for that kind of request, so nothing is dropped that could still be answered. */
export const HANDLER_TIMEOUT_MS = {
  weights: BLOB_TIMEOUT_MS,
  heartbeat: HEARTBEAT_TIMEOUT_MS,
  // one micro-batch attempt: the stage's waits for its hop inputs have their own deadlines (the
  // control message's jobTimeoutMs per compute job waited on), so this only bounds a handler whose
  // requester vanished without closing the stream
  microbatch: MICROBATCH_HANDLER_TIMEOUT_MS,
  commit: CONTROL_TIMEOUT_MS,
  // a kept tensor sent back to the coordinator by a hop (a spot check)
  recall: COMPUTE_TIMEOUT_MS,
  aggregate: COMPUTE_TIMEOUT_MS,
  adapter: CONTROL_TIMEOUT_MS,
  optimizer: COMPUTE_TIMEOUT_MS,
  finish: CONTROL_TIMEOUT_MS,
} as const;
/** The protocols a volunteer serves. */
export type VolunteerProto = keyof typeof HANDLER_TIMEOUT_MS;

/** Exit codes of `swarmtune join`: the values of the table every command shares (bin/errors.ts EXIT,
 *  docs/operations.md "Exit codes"); its other codes come from bin/, which classifies the errors. */
export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
/** the coordinator refused this peer (a rejected join: fits no stage, banned, run over) */
export const EXIT_REJECTED = 3;
/** How often (at most) a serving volunteer prints a progress line when none is asked for. */
export const PROGRESS_INTERVAL_MS = 10_000;
/** NAT traversal: a volunteer relay learns a new member with its next heartbeat (every second), so a peer it
 *  refuses right after admission asks again this often, for at most this long, before it makes do with the
 *  coordinator's relay */
export const VOLUNTEER_RELAY_RETRY_MS = 300;
export const VOLUNTEER_RELAY_WINDOW_MS = 15_000;
