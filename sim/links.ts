// The simulator's links and requests: a compute queue per volunteer, a FIFO per direction of every link (the
// coordinator's too, for relayed hops and bulk requests), failures one round trip after a peer left, and the
// coordinator's bytes, requests and CPU they cost (sim/cost.ts figures).
import type { SimClock } from './clock.ts';
import { hopPath } from './cost.ts';
import { PeerGoneError } from './peer.ts';
import type { SimPeer } from './peer.ts';
import type { Scenario } from './scenario.ts';
import type { CoordinatorConfig } from '../coordinator/config.ts';
import { heartbeatPeriodMs, heartbeatSilenceMs } from '../coordinator/decide.ts';

export interface HeartbeatTiming { periodMs: number; silenceMs: number; extraMs: number }

/** The heartbeat period and the silence that drops a peer at n beaten peers, by the scenario's heartbeat
 *  design; extraMs: what the drop takes to reach the coordinator after its verdict (hierarchical: the
 *  leader's next beat). 'bounded' is the coordinator's own schedule (coordinator/decide.ts). */
export function heartbeatTiming(sc: Scenario, c: CoordinatorConfig, n: number): HeartbeatTiming {
  if (sc.heartbeats === 'bounded') {
    const periodMs = heartbeatPeriodMs(n, c.heartbeatIntervalMs, c.heartbeatMaxPerSecond);
    return { periodMs, silenceMs: heartbeatSilenceMs(periodMs, c.heartbeatTimeoutMs), extraMs: 0 };
  }
  return { periodMs: c.heartbeatIntervalMs, silenceMs: c.heartbeatTimeoutMs, extraMs: sc.heartbeats === 'hierarchical' ? c.heartbeatIntervalMs : 0 };
}

export interface SimLinksInit {
  clock: SimClock;
  sc: Scenario;
  /** a compute job ended on p (for utilization and the tokens/s its heartbeat reports) */
  onComputed: (p: SimPeer, stage: number, ms: number, backward: boolean) => void;
  /** a hop from a to b goes over `path` */
  onHop: (a: SimPeer, b: SimPeer, path: 'direct' | 'punched' | 'relayed') => void;
}

export class SimLinks {
  private readonly clock: SimClock;
  private readonly sc: Scenario;
  private readonly onComputed: SimLinksInit['onComputed'];
  private readonly onHop: SimLinksInit['onHop'];
  readonly coordBps: number;
  coordUpFreeMs = 0; coordDownFreeMs = 0;
  coordBytes = 0; relayedBytes = 0; coordRequests = 0; coordCpuMs = 0;
  readonly hopPaths = { direct: 0, punched: 0, relayed: 0 };

  constructor(o: SimLinksInit) {
    this.clock = o.clock; this.sc = o.sc; this.onComputed = o.onComputed; this.onHop = o.onHop;
    this.coordBps = o.sc.coordinator.linkMbit * 1e6 / 8;
  }

  /** Fails with PeerGoneError one round trip after the peer left — any of `also` too (a hop fails when
   *  either end leaves: the other end's connection resets). */
  guard<T>(p: SimPeer, run: (ok: (v: T) => void) => void, also: SimPeer[] = []): Promise<T> {
    const ends = [p, ...also];
    const gone = ends.find((x) => x.left);
    if (gone !== undefined) return new Promise((_, rej) => this.clock.at(gone.spec.rttMs, () => rej(new PeerGoneError(gone.id))));
    return new Promise<T>((resolve, reject) => {
      let settled = false;
      const fail = (e: Error) => { if (!settled) { settled = true; for (const x of ends) x.waiting.delete(fail); reject(e); } };
      for (const x of ends) x.waiting.add(fail);
      run((v) => { if (!settled) { settled = true; for (const x of ends) x.waiting.delete(fail); resolve(v); } });
    });
  }

  /** One compute job on p (backward first). */
  job(p: SimPeer, backward: boolean, flops: number, stage: number): Promise<void> {
    const ms = 1000 * flops / p.spec.flops;
    return this.guard<void>(p, (ok) => {
      p.queue.push({ backward, ms, ok: () => ok(undefined), fail: () => {} });
      this.pump(p, stage);
    });
  }

  private pump(p: SimPeer, stage: number): void {
    const qq = p.queue;
    if (p.running || qq.length === 0 || p.left) return;
    let i = qq.findIndex((j) => j.backward);
    if (i < 0) i = 0;
    const j = qq.splice(i, 1)[0]!;
    p.running = true;
    this.clock.at(j.ms, () => {
      p.running = false;
      if (p.left) return;
      p.busyMs += j.ms;
      p.computeMs += j.ms;
      if (j.backward) p.computeTokens += this.sc.microBatch * this.sc.seqLen;
      this.onComputed(p, stage, j.ms, j.backward);
      j.ok();
      this.pump(p, stage);
    });
  }

  /** `bytes` from a to b over their links (FIFO per direction); a relayed hop crosses the coordinator's link both ways. */
  transfer(a: SimPeer, b: SimPeer, bytes: number): Promise<void> {
    const path = hopPath(a.spec.nat, b.spec.nat);
    this.hopPaths[path]++;
    this.onHop(a, b, path);
    return this.guard<void>(a, (ok) => {
      let bps = Math.min(a.spec.bytesPerSecond, b.spec.bytesPerSecond);
      let start = Math.max(this.clock.now, a.upFreeMs, b.downFreeMs);
      let latency = a.spec.rttMs / 2 + b.spec.rttMs / 2;
      if (path === 'relayed') {
        bps = Math.min(bps, this.coordBps);
        start = Math.max(start, this.coordUpFreeMs, this.coordDownFreeMs);
        latency = a.spec.rttMs / 2 + b.spec.rttMs / 2 + 1; // via the coordinator (its own RTT to the core taken as ~2 ms)
        this.coordBytes += 2 * bytes;
        this.relayedBytes += 2 * bytes;
        this.coordCpu(0, 2 * bytes);
      }
      const end = start + 1000 * bytes / bps;
      a.upFreeMs = end; b.downFreeMs = end;
      if (path === 'relayed') { this.coordUpFreeMs = end; this.coordDownFreeMs = end; }
      this.clock.at(end + latency - this.clock.now, () => ok(undefined));
    }, [b]);
  }

  coordCpu(requests: number, bytes: number): void {
    this.coordRequests += requests;
    this.coordCpuMs += requests * this.sc.coordinator.cpuMsPerRequest + bytes * this.sc.coordinator.cpuNsPerByte / 1e6;
  }

  /** A request from the coordinator to p carrying `out` bytes and answered with `back` bytes. */
  request(p: SimPeer, out: number, back: number): Promise<void> {
    this.coordBytes += out + back;
    this.coordCpu(1, out + back);
    return this.guard<void>(p, (ok) => {
      let t = this.clock.now;
      if (out > 1e5) { const s = Math.max(t, this.coordUpFreeMs, p.downFreeMs); t = s + 1000 * out / Math.min(this.coordBps, p.spec.bytesPerSecond); this.coordUpFreeMs = t; p.downFreeMs = t; }
      if (back > 1e5) { const s = Math.max(t, this.coordDownFreeMs, p.upFreeMs); t = s + 1000 * back / Math.min(this.coordBps, p.spec.bytesPerSecond); this.coordDownFreeMs = t; p.upFreeMs = t; }
      this.clock.at(t - this.clock.now + p.spec.rttMs, () => ok(undefined));
    });
  }
}
