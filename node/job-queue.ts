// The stage's compute queue: one job at a time, backward before forward (a backward frees a kept
// input, a forward adds one), a finished job's follow-up (its backward) queued before the next is
// picked; a job whose requester gave up while it waited is dropped, not run.
import { SwarmError } from '../protocol/errors.ts';

/** 0 runs before 1. */
export type JobPriority = 0 | 1;

/** Why a signal aborted, as an Error (a signal's reason may be anything). */
function abortReason(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  return r instanceof Error ? r : new SwarmError(`aborted: ${String(r)}`);
}

export class JobQueue {
  private readonly queues: Array<Array<() => Promise<void>>> = [[], []];
  private running = false;
  private idleWaiters: Array<() => void> = [];

  /** a job is running */
  get busy(): boolean { return this.running; }
  get queued(): number { return this.queues[0]!.length + this.queues[1]!.length; }

  /** Run `fn` when the jobs ahead of it are done. Aborting `signal` while the job waits takes it out
   *  of the queue and rejects with the signal's reason; a job that started runs to its end. */
  run<T>(priority: JobPriority, fn: () => Promise<T>, opts: { signal?: AbortSignal } = {}): Promise<T> {
    const signal = opts.signal;
    return new Promise<T>((resolve, reject) => {
      if (signal?.aborted === true) { reject(abortReason(signal)); return; }
      const queue = this.queues[priority]!;
      const onAbort = () => {
        const i = queue.indexOf(job);
        if (i < 0) return;
        queue.splice(i, 1);
        reject(abortReason(signal!));
      };
      const job = async () => {
        signal?.removeEventListener('abort', onAbort);
        try { resolve(await fn()); } catch (e) { reject(e as Error); }
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      queue.push(job);
      void this.pump();
    });
  }

  /** Resolves once no job runs and none waits. */
  idle(): Promise<void> {
    if (!this.running && this.queued === 0) return Promise.resolve();
    return new Promise((resolve) => { this.idleWaiters.push(resolve); });
  }

  private async pump(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      for (;;) {
        const job = this.queues[0]!.shift() ?? this.queues[1]!.shift();
        if (job === undefined) break;
        await job();
        // with jobs waiting, let the finished job's requester queue its follow-up first: the last
        // stage's backward of a micro-batch comes right after its forward, and must not lose its turn
        // to a forward queued behind (1F1B: with several micro-batches in flight, a backward is never
        // overtaken); with none waiting, the queue is idle at once and the next job starts when run
        if (this.queued > 0) await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      this.running = false;
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }
}
