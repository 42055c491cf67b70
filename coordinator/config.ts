// The coordinator's one config object: every timeout and policy knob of the run process, built once from the defaults and the environment knobs.
import { knobs, readKnobs } from '../engine/env.ts';
import { COMPUTE_TIMEOUT_MS, CONTROL_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS } from '../protocol/constants.ts';
import type { StageClientTimeouts } from '../protocol/stage-client.ts';
import {
  BAN_BASE_MS, BAN_MAX_MS, HEARTBEAT_MAX_PER_SECOND, ERROR_STREAK_BAN, CHECKPOINT_EVERY_STEP_MAX_BYTES, COVER_POLL_MS, EVENT_HISTORY, LOAD_DEADLINE_MS, LOAD_POLL_MS, LOADING_SILENCE_MS, MAX_ATTEMPTS,
  MAX_PROVIDERS, NORM_HISTORY, NOTICE_TIMEOUT_MS, OUTPUT_HISTORY, OUTPUT_HISTORY_MIN, PROBE_TIMEOUT_MS, READY_DEADLINE_MS,
  READY_POLL_MS, REJOIN_DEADLINE_MS, RETRY_BACKOFF_MS, SCREEN_FACTOR, SLOW_AFTER_TIMEOUTS, SLOW_PENALTY_MS,
} from './constants.ts';
import { parseCrashTarget } from './crash.ts';
import type { CrashTarget } from './crash.ts';

export interface CoordinatorConfig extends StageClientTimeouts {
  heartbeatIntervalMs: number;
  /** heartbeats a second at most (the period grows with the peer count above it) */
  heartbeatMaxPerSecond: number;
  maxAttempts: number;
  retryBackoffMs: number;
  slowAfterTimeouts: number;
  slowPenaltyMs: number;
  banBaseMs: number;
  banMaxMs: number;
  /** error answers in a row that ban a peer (coordinator/verdicts.ts) */
  errorStreakBan: number;
  screenFactor: number;
  outputHistory: number;
  outputHistoryMin: number;
  normHistory: number;
  checkpointEveryStepMaxBytes: number;
  readyDeadlineMs: number;
  /** silence allowed to a peer still loading its stage whose heartbeats time out (decide.silenceAllowedMs) */
  loadingSilenceMs: number;
  loadDeadlineMs: number;
  rejoinDeadlineMs: number;
  readyPollMs: number;
  loadPollMs: number;
  coverPollMs: number;
  eventHistory: number;
  maxProviders: number;
  /** SWARMTUNE_TEST_CRASH: where the coordinator kills itself (tests of restarts), null in production */
  crash: CrashTarget | null;
}

type Env = Readonly<Record<string, string | undefined>>;

/** The effective config: the defaults, the environment knobs of this process (or of `env`; validated
 *  here, so a typo fails at start), then `overrides`. */
export function coordinatorConfig(overrides: Partial<CoordinatorConfig> = {}, env?: Env): CoordinatorConfig {
  const k = env === undefined ? knobs() : readKnobs(env);
  return {
    computeTimeoutMs: k.computeTimeoutMs ?? COMPUTE_TIMEOUT_MS,
    controlTimeoutMs: CONTROL_TIMEOUT_MS,
    heartbeatTimeoutMs: HEARTBEAT_TIMEOUT_MS,
    probeTimeoutMs: PROBE_TIMEOUT_MS,
    noticeTimeoutMs: NOTICE_TIMEOUT_MS,
    heartbeatIntervalMs: HEARTBEAT_INTERVAL_MS,
    heartbeatMaxPerSecond: HEARTBEAT_MAX_PER_SECOND,
    maxAttempts: MAX_ATTEMPTS,
    retryBackoffMs: RETRY_BACKOFF_MS,
    slowAfterTimeouts: SLOW_AFTER_TIMEOUTS,
    slowPenaltyMs: SLOW_PENALTY_MS,
    banBaseMs: k.banBaseMs ?? BAN_BASE_MS,
    banMaxMs: BAN_MAX_MS,
    errorStreakBan: ERROR_STREAK_BAN,
    screenFactor: SCREEN_FACTOR,
    outputHistory: OUTPUT_HISTORY,
    outputHistoryMin: OUTPUT_HISTORY_MIN,
    normHistory: NORM_HISTORY,
    checkpointEveryStepMaxBytes: CHECKPOINT_EVERY_STEP_MAX_BYTES,
    readyDeadlineMs: READY_DEADLINE_MS,
    loadingSilenceMs: LOADING_SILENCE_MS,
    loadDeadlineMs: LOAD_DEADLINE_MS,
    rejoinDeadlineMs: REJOIN_DEADLINE_MS,
    readyPollMs: READY_POLL_MS,
    loadPollMs: LOAD_POLL_MS,
    coverPollMs: COVER_POLL_MS,
    eventHistory: EVENT_HISTORY,
    maxProviders: MAX_PROVIDERS,
    crash: parseCrashTarget(k.testCrash),
    ...overrides,
  };
}

/** The compute-request timeout: COMPUTE_TIMEOUT_MS, or SWARMTUNE_COMPUTE_TIMEOUT_MS (operators, tests). */
export function computeTimeoutMs(env?: Env): number {
  return coordinatorConfig({}, env).computeTimeoutMs;
}

/** The first ban's length: BAN_BASE_MS, or SWARMTUNE_BAN_BASE_MS (tests use a few seconds). */
export function banBaseMsFromEnv(env?: Env): number {
  return coordinatorConfig({}, env).banBaseMs;
}
