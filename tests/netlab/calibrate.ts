// Calibration of netlab's link emulation: at each rate, does the delay device still hold its delay, and what does
// it cost? Prints one JSON object (figures for docs/benchmarks.md's "Link emulation" section).
// Usage: node tests/netlab/calibrate.ts [--delay-ms 5] [--rates 20,100,500,1000,2000,0] [--seconds 2] [--rt 10] [--mss-frames]
//        (root; rate 0 = unshaped; --rt: the delay device's SCHED_FIFO priority, 0 = the normal policy;
//        --mss-frames: the hosts send one TCP segment per frame (gso_max_segs 1), the device's worst case in
//        frames per second; by default TCP hands veth GSO frames of up to 64 KiB, as it does on every lab link)
//
// Per rate, a fresh lab a—b with that rate and one-way delay both ways. While a bulk TCP transfer runs a→b
// (rate × seconds bytes; 400 MB unshaped), b sends a timestamped UDP datagram to a every 10 ms: its one-way
// delay b→a (one monotonic clock for all namespaces) is the delay as the traffic sees it, and b→a carries only
// the bulk's ACKs, so no shaper queue adds to it; what does is the device falling behind (it serves both
// directions in one loop). The same train before the transfer gives the idle figure. Separate probe processes
// send, receive and time, so a busy event loop on the bulk path does not delay the timing datagrams.
import { cpus, loadavg } from 'node:os';
import { createLab } from './lab.ts';
import { FRAME_PER_PAYLOAD, rateOf } from './probe-client.ts';
import { sh } from './sh.ts';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(name);
  return i < 0 ? dflt : process.argv[i + 1];
}
const delayMs = Number(arg('--delay-ms', '5'));
const rates = arg('--rates', '20,100,500,1000,2000,0').split(',').map(Number);
const seconds = Number(arg('--seconds', '2'));
const rtPriority = Number(arg('--rt', '10'));
const mssFrames = process.argv.includes('--mss-frames');
if (!(delayMs > 0) || rates.some(r => !(r >= 0)) || !(seconds > 0 && seconds <= 30)) {
  process.stderr.write('calibrate: --delay-ms > 0, --rates of numbers >= 0, --seconds in (0, 30]\n');
  process.exit(2);
}

const pct = (xs: number[], p: number): number => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; };
const r2 = (x: number): number => Math.round(x * 100) / 100;

async function one(rateMbit: number): Promise<Record<string, unknown>> {
  const lab = await createLab({ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', delayMs, ...(rateMbit > 0 ? { rateMbit } : {}) }] }, { rtPriority });
  try {
    if (mssFrames) for (const [n, dev] of [['a', lab.links[0].ifA], ['b', lab.links[0].ifB]]) await sh(['ip', '-n', lab.ns(n), 'link', 'set', dev, 'gso_max_segs', '1']);
    const timer = await lab.probe('a', { udp: [6000] });
    const sender = await lab.probe('a');
    const sink = await lab.probe('b', { tcp: 7101 });
    const ticker = await lab.probe('b', { udp: [6001] });
    const to = `${lab.addr('a')}:6000`;
    const owd = (): number[] => timer.udpReceived(6000).map(e => Number(e.owdUs) / 1000);
    await ticker.call({ op: 'train', from: 6001, to, count: 30, intervalMs: 10 });
    await timer.wait(() => owd().length >= 30, 2000, '30 idle timing datagrams').catch(() => undefined);
    const idle = owd();
    timer.events.length = 0;
    const before = (await lab.deviceStats(0))!;
    const bytes = rateMbit > 0 ? Math.min(1e9, Math.round(rateMbit * 1e6 / 8 * seconds)) : 400_000_000;
    const t0 = performance.now();
    const trainDone = ticker.call({ op: 'train', from: 6001, to, count: Math.round(seconds * 100), intervalMs: 10 }, 120_000);
    const bulk = await sender.call({ op: 'bulk', to: `${lab.addr('b')}:7101`, bytes }, 120_000);
    const wallMs = performance.now() - t0;
    const after = (await lab.deviceStats(0))!;
    await trainDone;
    const loaded = owd().slice(0, Math.max(1, Math.floor(owd().length * Math.min(1, wallMs / (seconds * 1000)))));  // sent during the bulk
    const rate = rateOf(bulk.timeline as [number, number][]);
    return {
      rateMbit: rateMbit || 'unshaped',
      frameMbitPerS: r2(rate.windowed * FRAME_PER_PAYLOAD),
      idleOwdMs: { median: r2(pct(idle, 0.5)), p99: r2(pct(idle, 0.99)) },
      loadedOwdMs: { n: loaded.length, median: r2(pct(loaded, 0.5)), p90: r2(pct(loaded, 0.9)), p99: r2(pct(loaded, 0.99)), max: r2(Math.max(...loaded)) },
      deviceCpuShare: r2((after.cpuMs - before.cpuMs) / wallMs),
      deviceSysShare: r2((after.sysMs - before.sysMs) / wallMs),
      deviceWakeupsPerFrame: r2((after.wakeups - before.wakeups) / Math.max(1, after.a2b.frames - before.a2b.frames + after.b2a.frames - before.b2a.frames)),
      deviceCpuUsPerFrame: r2((after.cpuMs - before.cpuMs) * 1000 / Math.max(1, after.a2b.frames - before.a2b.frames + after.b2a.frames - before.b2a.frames)),
      deviceLateP99Us: { a2b: after.a2b.lateP99Us, b2a: after.b2a.lateP99Us },
      deviceFrames: after.a2b.frames - before.a2b.frames + after.b2a.frames - before.b2a.frames,
      drops: { queue: after.a2b.dropsQueue + after.b2a.dropsQueue, shaper: after.a2b.dropsShaper - before.a2b.dropsShaper },
    };
  } finally {
    await lab.teardown();
  }
}

const out: Record<string, unknown>[] = [];
const load0 = loadavg().map(r2);
for (const r of rates) {
  const row = await one(r);
  process.stderr.write(JSON.stringify(row) + '\n');
  out.push(row);
}
process.stdout.write(JSON.stringify({ delayMs, seconds, rtPriority, mssFrames, cpu: `${cpus()[0]?.model} x${cpus().length}`, loadavgBefore: load0, loadavgAfter: loadavg().map(r2), rows: out }, null, 1) + '\n');
