// The coordinator's policy defaults (network-wide limits and timeouts are in protocol/constants.ts); coordinator/config.ts turns them into the run's config.

/** failures of one micro-batch at peers that stayed up (a dropped peer's failures do not count) before the step fails */
export const MAX_ATTEMPTS = 4;
/** pause before a micro-batch's next attempt: this times its attempt number, at most 5 times */
export const RETRY_BACKOFF_MS = 100;

/** a peer whose compute requests time out this many times is marked slow and deprioritised */
export const SLOW_AFTER_TIMEOUTS = 2;
/** how long a slow peer stays deprioritised (routes use it only when its stage has no other replica) */
export const SLOW_PENALTY_MS = 5 * 60_000;
/** the short heartbeat that checks a peer right after a failed request (waiting for the heartbeat
 *  timeout would burn the micro-batch's retries) */
export const PROBE_TIMEOUT_MS = 1500;
/** The most heartbeats a second the coordinator sends: above that many peers the period grows
 *  (decide.heartbeatPeriodMs). A heartbeat costs the coordinator 1.2–1.9 ms of CPU (measured,
 *  bench/scale-heartbeat.ts), so this holds heartbeats to about 0.12–0.19 of a core. */
export const HEARTBEAT_MAX_PER_SECOND = 100;
/** best-effort notices to a peer: discarding an attempt, finish, release, ban */
export const NOTICE_TIMEOUT_MS = 5000;

/** error answers in a row (no committed micro-batch between) from a peer that stays up, before the
 *  verdict bans it: under MAX_ATTEMPTS, so a single-replica stage's peer is banned (and its stage
 *  covered by another volunteer) before its micro-batch exhausts its attempts */
export const ERROR_STREAK_BAN = 3;

/** The first ban lasts this long; each further ban of the same peer id doubles it, up to BAN_MAX_MS. */
export const BAN_BASE_MS = 30_000;
export const BAN_MAX_MS = 60 * 60_000;

/** a replica whose per-micro-batch gradient norm, or a stage output whose RMS, exceeds SCREEN_FACTOR
 *  times the median of the reference is banned; the activation screens are network-wide (every
 *  receiver applies them), so they live in protocol/constants.ts */
export { SCREEN_FACTOR, OUTPUT_HISTORY, OUTPUT_HISTORY_MIN } from '../protocol/constants.ts';
/** recent accepted per-micro-batch gradient norms kept per stage for screening */
export const NORM_HISTORY = 16;

/** checkpoint the optimizer state at every step while each stage's state is at most this big */
export const CHECKPOINT_EVERY_STEP_MAX_BYTES = 64 * 1024 * 1024;

/** planned peers must have loaded their stages within this */
export const READY_DEADLINE_MS = 30 * 60_000;
/** silence allowed to a loading peer whose heartbeats time out (decide.silenceAllowedMs) */
export const LOADING_SILENCE_MS = 60_000;
/** a peer placed on a stage mid-run must have loaded it within this */
export const LOAD_DEADLINE_MS = 10 * 60_000;
/** a replica released to take another stage must have joined again within this */
export const REJOIN_DEADLINE_MS = 60_000;
/** how often a wait for peers (ready, loaded, joined again) looks again */
export const READY_POLL_MS = 200;
export const LOAD_POLL_MS = 100;
/** how often a run stalled on a stage without a peer looks for one */
export const COVER_POLL_MS = 250;

/** events the dashboard keeps */
export const EVENT_HISTORY = 200;
/** providers listed in a blob reference */
export const MAX_PROVIDERS = 64;
