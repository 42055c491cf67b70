// Preloaded into a bench child (NODE_OPTIONS=--import=<this file>, SWARMTUNE_LOOP_LOG=<file>): logs every
// span over SWARMTUNE_LOOP_BLOCK_MS (default 200) in which the process's event loop ran no timer (a 10 ms interval that came late), and at exit
// the longest span seen. One line each, appended to the log file:
//   block <end hrtime µs> <end epoch ms> <ms> <main-thread cpu ms>   (hrtime: CLOCK_MONOTONIC, the clock of a --cpu-prof profile)
//   max <ms> maxcpu <ms> ticks <n>
// The main thread's CPU time over the span (process.threadCpuUsage) tells a stall the process caused (CPU ≈
// wall: synchronous work on the loop) from one the machine caused (CPU ≪ wall: the thread was not scheduled,
// e.g. a load average of 24 on 2 cores); the bench reports both.
// bench/big-run.ts reads it to report each process's longest event-loop stall and, with --cpu-prof,
// which functions ran during each stall (bench/loop-blame.ts).
import { appendFileSync } from 'node:fs';

const file = process.env.SWARMTUNE_LOOP_LOG;
if (file !== undefined && file !== '') {
  const thresh = Number(process.env.SWARMTUNE_LOOP_BLOCK_MS ?? 200);
  const tick = 10;
  let max = 0, maxCpu = 0, ticks = 0;
  let last = process.hrtime.bigint();
  let lastCpu = process.threadCpuUsage();
  const iv = setInterval(() => {
    const now = process.hrtime.bigint();
    const lag = Number(now - last) / 1e6 - tick;
    const c = process.threadCpuUsage();
    const cpu = (c.user - lastCpu.user + c.system - lastCpu.system) / 1000;
    last = now;
    lastCpu = c;
    ticks++;
    if (lag > max) max = lag;
    if (lag > thresh) {
      if (cpu > maxCpu) maxCpu = cpu;
      appendFileSync(file, `block ${now / 1000n} ${Date.now()} ${lag.toFixed(0)} ${cpu.toFixed(0)}\n`);
    }
  }, tick);
  iv.unref();
  process.on('exit', () => {
    appendFileSync(file, `max ${max.toFixed(0)} maxcpu ${maxCpu.toFixed(0)} ticks ${ticks}\n`);
  });
}
