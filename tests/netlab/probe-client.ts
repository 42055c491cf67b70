// The lab's side of tests/netlab/probe.ts: start an agent in a namespace, send it commands, wait for its events;
// measure() builds the RTT and throughput self-check on two agents.
import type { ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import path from 'node:path';
import type { Lab } from './lab.ts';

export const PROBE_SCRIPT = path.join(import.meta.dirname, 'probe.ts');
export type ProbeEvent = Record<string, unknown> & { ev: string };

export interface ProbeOptions {
  /** TCP port to serve on (observe / ping / bulk) */
  tcp?: number;
  /** UDP ports to open (they report every datagram and answer "observe?") */
  udp?: number[];
  /** address to bind; default lab.addr(node) */
  bind?: string;
}

/** One probe process inside a lab namespace. */
export class ProbeAgent {
  readonly events: ProbeEvent[] = [];
  private waiters: { pred: (e: ProbeEvent) => boolean; resolve: (e: ProbeEvent) => void }[] = [];
  private nextId = 1;
  private exited: string | null = null;
  private stderr = '';

  readonly node: string;
  readonly addr: string;
  readonly child: ChildProcess;
  constructor(node: string, addr: string, child: ChildProcess) {
    this.node = node; this.addr = addr; this.child = child;
    createInterface({ input: child.stdout! }).on('line', line => {
      let e: ProbeEvent;
      try { e = JSON.parse(line) as ProbeEvent; } catch { e = { ev: 'garbage', line }; }
      this.events.push(e);
      for (const w of this.waiters.filter(w => w.pred(e))) { this.waiters.splice(this.waiters.indexOf(w), 1); w.resolve(e); }
    });
    child.stderr!.on('data', d => { this.stderr = (this.stderr + d).slice(-2000); });
    child.once('exit', (code, sig) => { this.exited = `probe in ${node} exited (${sig ?? code})${this.stderr ? ': ' + this.stderr.trim() : ''}`; });
  }

  /** The first event (already seen or coming) that satisfies pred, within timeoutMs. */
  wait(pred: (e: ProbeEvent) => boolean, timeoutMs: number, what = 'event'): Promise<ProbeEvent> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve: (e: ProbeEvent) => { clearTimeout(timer); resolve(e); } };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`netlab: probe in ${this.node}: no ${what} within ${timeoutMs} ms${this.exited ? `; ${this.exited}` : ''}`));
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  /** Sends a command (its own timeoutMs, else the argument, else 30 s); resolves with its "done" event, rejects
   *  with its "error" (the message names node and op, `code` is the errno code such as ETIMEDOUT). */
  async call(cmd: Record<string, unknown>, timeoutMs = typeof cmd.timeoutMs === 'number' ? cmd.timeoutMs : 30_000): Promise<ProbeEvent> {
    const id = this.nextId++;
    this.child.stdin!.write(JSON.stringify({ ...cmd, id, timeoutMs }) + '\n');
    const e = await this.wait(x => x.id === id, timeoutMs + 2000, `answer to ${String(cmd.op)}`);
    if (e.ev === 'error') throw Object.assign(new Error(`netlab: probe in ${this.node}: ${String(cmd.op)} failed: ${String(e.error)}`), { code: e.code });
    return e;
  }

  /** Datagrams received on one of our UDP ports so far (optionally only those with this text). */
  udpReceived(port: number, text?: string): ProbeEvent[] {
    return this.events.filter(e => e.ev === 'udp' && e.port === port && (text === undefined || e.text === text));
  }

  close(): void { this.child.stdin!.end(); }
}

/** Starts a probe agent in a node of the lab and waits until it listens. */
export async function spawnProbe(lab: Lab, node: string, opts: ProbeOptions = {}): Promise<ProbeAgent> {
  const addr = opts.bind ?? lab.addr(node);
  const args = [PROBE_SCRIPT, '--bind', addr];
  if (opts.tcp) args.push('--tcp', String(opts.tcp));
  if (opts.udp?.length) args.push('--udp', opts.udp.join(','));
  const agent = new ProbeAgent(node, addr, lab.spawn(node, process.execPath, args));
  await agent.wait(e => e.ev === 'ready', 10_000, '"ready"');
  return agent;
}

export interface MeasureOptions {
  /** round trips timed (after 2 warm-ups); default 20 */
  pings?: number;
  /** bytes of the bulk transfer a→b; default 4 MB; 0 skips it */
  bytes?: number;
  /** TCP port of the server in b; default 7101 */
  port?: number;
  timeoutMs?: number;
}

export interface Measurement {
  /** TCP ping-pong round trips of 1 byte a→b→a, ms */
  rttMs: { median: number; min: number; max: number; samples: number };
  /** bulk a→b goodput (TCP payload, as b read it), Mbit/s: the median over windows of windowMs (see rateOf) */
  mbitPerS: number | null;
  /** the same goodput over the whole transfer (slow start and loss recovery included) */
  mbitPerSWhole: number | null;
  /** mbitPerS in Ethernet frame bits (what a shaper's rate counts): × 1514/1448, the frame per MSS with TCP timestamps */
  frameMbitPerS: number | null;
  windowMs: number | null;
  bytes: number;
}

/** Frame bytes per TCP payload byte on a 1500-byte MTU: 14 Ethernet + 20 IPv4 + 20 TCP + 12 timestamp option. */
export const FRAME_PER_PAYLOAD = 1514 / 1448;

const median = (xs: number[]): number => { const s = [...xs].sort((p, q) => p - q); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };

/** Rates from a receiver's (ms, bytes so far) timeline: over the whole transfer, and the median of fixed windows
 *  (100 ms, or a tenth of the transfer when that is shorter), which ignores slow start and the bursts that a
 *  filled hole releases after a loss (bytes that arrived earlier, held out of order by TCP). */
export function rateOf(timeline: readonly (readonly [number, number])[]): { whole: number; windowed: number; windowMs: number } {
  if (timeline.length < 2) throw new Error('netlab: a bulk timeline needs at least two reads');
  const end = timeline[timeline.length - 1][0], total = timeline[timeline.length - 1][1] - timeline[0][1];
  const bytesAt = (t: number): number => {                 // linear between reads
    let lo = 0, hi = timeline.length - 1;
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (timeline[mid][0] <= t) lo = mid; else hi = mid; }
    const [t0, b0] = timeline[lo], [t1, b1] = timeline[hi];
    return t1 === t0 ? b1 : b0 + (b1 - b0) * Math.min(1, Math.max(0, (t - t0) / (t1 - t0)));
  };
  const windowMs = Math.min(100, end / 10);
  const rates: number[] = [];
  for (let t = 0; t + windowMs <= end && rates.length < 100_000; t += windowMs) rates.push((bytesAt(t + windowMs) - bytesAt(t)) * 8 / (windowMs * 1000));
  return { whole: total * 8 / (end * 1000), windowed: median(rates), windowMs };
}

export async function measure(lab: Lab, a: string, b: string, opts: MeasureOptions = {}): Promise<Measurement> {
  const pings = opts.pings ?? 20, bytes = opts.bytes ?? 4_000_000, port = opts.port ?? 7101, timeoutMs = opts.timeoutMs ?? 60_000;
  const [server, client] = await Promise.all([spawnProbe(lab, b, { tcp: port }), spawnProbe(lab, a)]);
  try {
    const to = `${server.addr}:${port}`;
    const ping = await client.call({ op: 'ping', to, count: pings + 2 }, timeoutMs);
    const rtt = (ping.rttMs as number[]).slice(2);
    let rate: ReturnType<typeof rateOf> | null = null;
    if (bytes > 0) rate = rateOf((await client.call({ op: 'bulk', to, bytes }, timeoutMs)).timeline as [number, number][]);
    return {
      rttMs: { median: median(rtt), min: Math.min(...rtt), max: Math.max(...rtt), samples: rtt.length },
      mbitPerS: rate?.windowed ?? null, mbitPerSWhole: rate?.whole ?? null,
      frameMbitPerS: rate ? rate.windowed * FRAME_PER_PAYLOAD : null, windowMs: rate?.windowMs ?? null, bytes,
    };
  } finally {
    server.close();
    client.close();
  }
}
