// The machine: CPU model, cores, Node version, load average, and a memory bandwidth ceiling measured
// with memcpy (TypedArray.prototype.set on 64 MiB arrays: native memcpy, far beyond the caches) on one
// thread and on one worker thread per core at once. Bytes counted = read + write (2 x size per copy).
import os from 'node:os';
import { Worker } from 'node:worker_threads';

const SIZE = 64 * 1024 * 1024;

function copyGBps(reps: number): number {
  const a = new Uint8Array(SIZE).fill(1), b = new Uint8Array(SIZE);
  b.set(a); // fault the pages in
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    b.set(a);
    best = Math.min(best, performance.now() - t0);
  }
  return (2 * SIZE) / (best / 1000) / 1e9;
}

const WORKER_SRC = `
const { parentPort, workerData } = require('node:worker_threads');
const a = new Uint8Array(workerData.size).fill(1), b = new Uint8Array(workerData.size);
b.set(a);
const sab = new Int32Array(workerData.flag);
parentPort.postMessage('ready');
Atomics.wait(sab, 0, 0);
const t0 = performance.now();
for (let r = 0; r < workerData.reps; r++) b.set(a);
parentPort.postMessage(performance.now() - t0);
`;

/** all threads copying at once: aggregate GB/s over the slowest thread's time */
async function copyGBpsThreads(threads: number, reps: number): Promise<number> {
  const flag = new SharedArrayBuffer(4);
  const workers = Array.from({ length: threads }, () => new Worker(WORKER_SRC, { eval: true, workerData: { size: SIZE, reps, flag } }));
  try {
    const msgs = workers.map((w) => { const q: unknown[] = []; const waiters: Array<(v: unknown) => void> = []; w.on('message', (m) => { const f = waiters.shift(); if (f) f(m); else q.push(m); }); return () => new Promise((r) => { if (q.length) r(q.shift()); else waiters.push(r); }); });
    await Promise.all(msgs.map((next) => next()));
    const sab = new Int32Array(flag);
    Atomics.store(sab, 0, 1);
    Atomics.notify(sab, 0);
    const times = (await Promise.all(msgs.map((next) => next()))) as number[];
    return (threads * reps * 2 * SIZE) / (Math.max(...times) / 1000) / 1e9;
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

export async function benchMachine(threads: number): Promise<Record<string, unknown>> {
  const cpus = os.cpus();
  const one = copyGBps(5);
  const all = await copyGBpsThreads(threads, 5);
  return {
    cpu_model: cpus[0]?.model ?? 'unknown', logical_cpus: cpus.length, threads_used: threads,
    total_memory_gib: Number((os.totalmem() / 2 ** 30).toFixed(1)),
    node: process.version, platform: `${process.platform} ${process.arch} ${os.release()}`,
    memcpy_GBps_1thread: Number(one.toFixed(2)), memcpy_GBps_all_threads: Number(all.toFixed(2)),
  };
}

if (import.meta.main) console.log(JSON.stringify(await benchMachine(2)));
