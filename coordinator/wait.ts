// Abortable waiting for the coordinator's loops: a stop is the run's AbortSignal, never a flag polled in a loop.
import { setTimeout as delay } from 'node:timers/promises';
import { SwarmError } from '../protocol/errors.ts';

/** The reason the coordinator's signal aborts with when it is stopped deliberately. */
export class CoordinatorStoppedError extends SwarmError {
  override name = 'CoordinatorStoppedError';
}

/** Resolve after `ms`, or reject with the signal's reason once it aborts. `ref: false`: the wait
 *  alone does not keep the process alive. */
export async function sleep(ms: number, signal: AbortSignal, o: { ref?: boolean } = {}): Promise<void> {
  signal.throwIfAborted();
  try {
    await delay(ms, undefined, { signal, ref: o.ref ?? true });
  } catch (e) {
    if (signal.aborted) throw signal.reason;
    throw e;
  }
}

/** Wait until `done()` holds, looking every `intervalMs`: true when it held, false past `timeoutMs`. */
export async function until(done: () => boolean, o: { timeoutMs: number; intervalMs: number; signal: AbortSignal }): Promise<boolean> {
  const deadline = Date.now() + o.timeoutMs;
  for (;;) {
    if (done()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(o.intervalMs, o.signal);
  }
}

/** `p`, or the signal's reason once it aborts first (for work that takes no signal of its own). */
export function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason as Error);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then((v) => { signal.removeEventListener('abort', onAbort); resolve(v); },
      (e: unknown) => { signal.removeEventListener('abort', onAbort); reject(e as Error); });
  });
}
