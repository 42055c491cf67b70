// netlab: link and NAT emulation for tests and benches, in network namespaces this harness makes and removes.
//
//   const lab = await createLab({ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', rateMbit: 20, delayMs: 25 }] });
//   try { lab.spawn('b', process.execPath, ['server.ts', lab.addr('b')]); ... } finally { await lab.teardown(); }
//
// Needs root, iproute2 (ip, tc), a C compiler for the delay device (links with a delay) and nftables (NAT).
// labSupport() says what is missing. Names: every namespace and interface starts with the run's prefix
// snl<pid, 5 base-36 digits><sequence, 2>; nothing is made in the root namespace. Teardown (also on
// failure, at process exit and on SIGINT/SIGTERM/SIGHUP) kills every process in the lab's namespaces and
// deletes them; createLab first sweeps what crashed runs (their pid is gone) left behind.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { cCompiler, delayDevice } from './device.ts';
import { NetlabCommandError, sh, shSync } from './sh.ts';
import { natRuleset, planLab, type LabSpec, type Plan, type PlannedLink, type PlannedNode } from './topology.ts';
import { measure, spawnProbe, type Measurement, type MeasureOptions, type ProbeAgent, type ProbeOptions } from './probe-client.ts';

export type { LabSpec, LinkSpec, NatKind } from './topology.ts';
export type { Measurement, MeasureOptions, ProbeAgent } from './probe-client.ts';

export const FAMILY = 'snl';
const FAMILY_RE = /^snl([0-9a-z]{5})([0-9a-z]{2})(?:-|l)/;
/** the delay devices exit by themselves after this long, whatever happens to the lab's process */
const DEFAULT_MAX_SECONDS = 3600;
const KILL_GRACE_MS = 1000;
const DEFAULT_RT_PRIORITY = 10;

export interface DirectionStats { frames: number; bytes: number; gsoFrames: number; dropsQueue: number; dropsShaper: number; dropsOther: number; lastError: string; lateP50Us: number; lateP99Us: number; lateMaxUs: number; queuedBytes: number }
/** What a link's delay device reports: CPU time (the kernel's delivery into the far end's stack runs in the
 *  device's send() and counts as its system time), loop wake-ups, and per direction frames, drops and lateness. */
export interface DeviceStats { cpuMs: number; userMs: number; sysMs: number; wakeups: number; a2b: DirectionStats; b2a: DirectionStats }

/** Why netlab cannot run here, or null when it can (with `delay`: a C compiler too; with `nat`: nftables).
 *  Tries the real thing in a throw-away namespace: a veth pair, a tbf qdisc, an nftables table. */
export function labSupport(need: { delay?: boolean; nat?: boolean } = {}): string | null {
  if (process.platform !== 'linux') return `netlab needs Linux network namespaces (this is ${process.platform})`;
  if (process.getuid?.() !== 0) return 'netlab needs root (network namespaces, veth, tc, nftables)';
  for (const tool of ['ip', 'tc'] as const) if (shSync([tool, '-V'], { timeoutMs: 5000 }) === null) return `\`${tool}\` (iproute2) is missing`;
  if (need.delay && !cCompiler()) return 'no C compiler (cc or $CC) to build the delay device tests/netlab/delay.c';
  if (need.nat && shSync(['nft', '--version'], { timeoutMs: 5000 }) === null) return '`nft` is missing (apt-get install -y nftables)';
  const ns = `${FAMILY}${process.pid.toString(36).padStart(5, '0')}zz-probe`, dev = `${FAMILY}${process.pid.toString(36).padStart(5, '0')}zzp`;
  const steps: [string, string[]][] = [
    ['create a network namespace', ['ip', 'netns', 'add', ns]],
    ['create a veth pair in it', ['ip', 'link', 'add', `${dev}a`, 'netns', ns, 'type', 'veth', 'peer', 'name', `${dev}b`, 'netns', ns]],
    ['add a tbf qdisc', ['tc', '-n', ns, 'qdisc', 'add', 'dev', `${dev}a`, 'root', 'tbf', 'rate', '10mbit', 'burst', '16384', 'limit', '65536']],
    ...(need.nat ? [['create an nftables NAT table', ['ip', 'netns', 'exec', ns, 'nft', 'add table ip netlab; add chain ip netlab p { type nat hook postrouting priority srcnat; }; add rule ip netlab p masquerade random']] as [string, string[]]] : []),
  ];
  try {
    for (const [what, argv] of steps) if (shSync(argv, { timeoutMs: 5000 }) === null) return `cannot ${what} (\`${argv.join(' ')}\` failed)`;
    return null;
  } finally {
    shSync(['ip', 'netns', 'del', ns], { timeoutMs: 5000 });
  }
}

const live = new Set<Lab>();
let handlersInstalled = false;
let sequence = 0;

function installExitHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on('exit', () => { for (const lab of live) lab.teardownSync(); });
  const onSignal = (sig: NodeJS.Signals): void => {
    for (const lab of live) lab.teardownSync();
    for (const s of SIGNALS) process.off(s, onSignal);
    if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);   // default action: die by the signal
  };
  const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const s of SIGNALS) process.on(s, onSignal);
}

/** p, or a rejection with msg after ms; the timer is cleared either way. */
async function within<T>(p: Promise<T>, ms: number, msg: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => { timer = setTimeout(() => rej(new Error(msg())), ms); })]);
  } finally { clearTimeout(timer); }
}

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === 'EPERM'; }
}

/** Names of the namespaces that exist now (`ip netns list`). */
export function listNamespaces(): string[] {
  const out = shSync(['ip', 'netns', 'list'], { timeoutMs: 5000 }) ?? '';
  return out.split('\n').map(l => l.split(' ')[0]).filter(Boolean);
}

/** Names of the interfaces in the root namespace (`ip -o link show`). */
export function listRootInterfaces(): string[] {
  const out = shSync(['ip', '-o', 'link', 'show'], { timeoutMs: 5000 }) ?? '';
  return out.split('\n').map(l => /^\d+:\s+([^:@\s]+)/.exec(l)?.[1]).filter((n): n is string => !!n);
}

function killNamespace(ns: string): number[] {
  const pids = (shSync(['ip', 'netns', 'pids', ns], { timeoutMs: 5000 }) ?? '').split('\n').map(Number).filter(p => p > 0 && p !== process.pid);
  for (const p of pids) { try { process.kill(p, 'SIGKILL'); } catch { /* already gone */ } }
  return pids;
}

/** Removes namespaces and root interfaces of netlab runs whose process is gone (a crash, a SIGKILL); returns their names. */
export function sweepLeftovers(): string[] {
  const removed: string[] = [];
  const dead = (name: string): boolean => {
    const m = FAMILY_RE.exec(name);
    return !!m && !alive(parseInt(m[1], 36));
  };
  for (const ns of listNamespaces().filter(dead)) {
    killNamespace(ns);
    if (shSync(['ip', 'netns', 'del', ns], { timeoutMs: 5000 }) !== null) removed.push(ns);
  }
  for (const dev of listRootInterfaces().filter(dead)) {
    if (shSync(['ip', 'link', 'del', dev], { timeoutMs: 5000 }) !== null) removed.push(dev);
  }
  return removed;
}

export interface LabOptions {
  /** delay devices exit after this many seconds whatever happens (default 3600) */
  maxSeconds?: number;
  /** SCHED_FIFO priority of the delay devices, so that other load does not delay the wire; 0: normal (default 10) */
  rtPriority?: number;
}

/** Builds the lab of `spec`; on any failure everything made so far is removed before the error is thrown. */
export async function createLab(spec: LabSpec, opts: LabOptions = {}): Promise<Lab> {
  const maxSeconds = opts.maxSeconds ?? DEFAULT_MAX_SECONDS, rtPriority = opts.rtPriority ?? DEFAULT_RT_PRIORITY;
  if (!Number.isInteger(maxSeconds) || maxSeconds < 1 || maxSeconds > 86400) throw new Error(`netlab: maxSeconds must be an integer in [1, 86400], got ${maxSeconds}`);
  if (!Number.isInteger(rtPriority) || rtPriority < 0 || rtPriority > 99) throw new Error(`netlab: rtPriority must be an integer in [0, 99], got ${rtPriority}`);
  sweepLeftovers();
  if (sequence >= 36 * 36 - 1) throw new Error('netlab: more than 1295 labs in one process');   // zz: labSupport's probe
  const prefix = FAMILY + process.pid.toString(36).padStart(5, '0') + (sequence++).toString(36).padStart(2, '0');
  const plan = planLab(spec, prefix);
  const needDelay = plan.links.some(l => l.delayABus > 0 || l.delayBAus > 0);
  const why = labSupport({ delay: needDelay, nat: [...plan.nodes.values()].some(n => n.nat) });
  if (why) throw new Error(`netlab: ${why}`);
  const lab = new Lab(plan, maxSeconds, rtPriority);
  installExitHandlers();
  live.add(lab);
  try {
    await lab.build(needDelay ? await delayDevice() : null);
  } catch (e) {
    await lab.teardown().catch(() => { /* the build error is the one to report */ });
    throw e;
  }
  return lab;
}

export class Lab {
  private readonly made: string[] = [];                 // namespaces, in creation order
  private readonly children = new Set<ChildProcess>();
  private readonly devices = new Map<number, { child: ChildProcess; lines: AsyncIterator<string> }>();
  private down: Promise<void> | null = null;

  readonly plan: Plan;
  private readonly maxSeconds: number;
  private readonly rtPriority: number;
  constructor(plan: Plan, maxSeconds: number, rtPriority: number) { this.plan = plan; this.maxSeconds = maxSeconds; this.rtPriority = rtPriority; }

  get prefix(): string { return this.plan.prefix; }

  /** Namespace of a host or router (for `ip netns exec`). */
  ns(node: string): string { return this.node(node).ns; }

  /** The node's address: on the link toward `toward` when given; else a router's first outside link, a host's first link. */
  addr(node: string, toward?: string): string {
    const n = this.node(node);
    const candidates = n.links.map(i => this.plan.links[i]);
    const l = toward !== undefined
      ? candidates.find(c => c.a === toward || c.b === toward)
      : candidates.find(c => !(c.b === node && c.natKind)) ?? candidates[0];
    if (!l) throw new Error(`netlab: ${node} has no link toward ${toward}`);
    return l.a === node ? l.addrA : l.addrB;
  }

  /** Planned links (addresses, interfaces, shaping) in spec order. */
  get links(): readonly PlannedLink[] { return this.plan.links; }

  /** Runs cmd inside the node's namespace (`ip netns exec`); the process is killed at teardown. */
  spawn(node: string, cmd: string, args: readonly string[] = [], opts: SpawnOptions = {}): ChildProcess {
    if (this.down) throw new Error(`netlab: lab ${this.prefix} is torn down`);
    const child = spawn('ip', ['netns', 'exec', this.ns(node), cmd, ...args], { stdio: 'pipe', ...opts });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    child.once('error', () => this.children.delete(child));
    return child;
  }

  /** Starts a probe agent (tests/netlab/probe.ts) in node, bound to its address. */
  probe(node: string, opts: ProbeOptions = {}): Promise<ProbeAgent> { return spawnProbe(this, node, opts); }

  /** RTT (TCP ping-pong, median) and throughput a→b (bulk TCP, measured at b) between two hosts. */
  measure(a: string, b: string, opts: MeasureOptions = {}): Promise<Measurement> { return measure(this, a, b, opts); }

  /** Statistics of link i's delay device, or null when the link has no delay device. */
  async deviceStats(link: number, timeoutMs = 5000): Promise<DeviceStats | null> {
    const d = this.devices.get(link);
    if (!d) return null;
    d.child.kill('SIGUSR1');
    const line = await within(d.lines.next(), timeoutMs, () => `netlab: link ${link}'s delay device sent no statistics within ${timeoutMs} ms`);
    if (line.done) throw new Error(`netlab: link ${link}'s delay device has exited`);
    return JSON.parse(line.value) as DeviceStats;
  }

  /** Every pid inside the lab's namespaces now. */
  pids(): number[] {
    return this.made.flatMap(ns => (shSync(['ip', 'netns', 'pids', ns], { timeoutMs: 5000 }) ?? '').split('\n').map(Number).filter(p => p > 0));
  }

  private node(name: string): PlannedNode {
    const n = this.plan.nodes.get(name);
    if (!n) throw new Error(`netlab: no host or router "${name}" in lab ${this.prefix}`);
    return n;
  }

  private async addNamespace(ns: string, forward: boolean): Promise<void> {
    await sh(['ip', 'netns', 'add', ns]);
    this.made.push(ns);
    // no IPv6 (no link-local chatter on the wires), forwarding only on routers
    await sh(['ip', 'netns', 'exec', ns, 'sh', '-c', `echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && echo ${forward ? 1 : 0} > /proc/sys/net/ipv4/ip_forward`]);
  }

  /** Called once by createLab: namespaces one by one, then one `ip -batch` for all veth pairs, one per
   *  namespace for its addresses, neighbours, bridge and routes, one `tc -batch` per wire, nft per NAT. */
  async build(delayExe: string | null): Promise<void> {
    const links = this.plan.links;
    for (const n of this.plan.nodes.values()) await this.addNamespace(n.ns, n.kind === 'router');
    for (const l of links) if (l.wire) await this.addNamespace(l.wire.ns, false);
    const veths: string[] = [];
    const perNs = new Map<string, string[]>([...this.made].map(ns => [ns, ['link set lo up']]));
    const add = (ns: string, line: string): void => { perNs.get(ns)!.push(line); };
    const tcPerNs = new Map<string, string[]>();
    for (const l of links) {
      const nsA = this.ns(l.a), nsB = this.ns(l.b), w = l.wire;
      if (!w) veths.push(`link add ${l.ifA} address ${l.macA} netns ${nsA} type veth peer name ${l.ifB} address ${l.macB} netns ${nsB}`);
      else {
        veths.push(`link add ${l.ifA} address ${l.macA} netns ${nsA} type veth peer name ${w.wireA} netns ${w.ns}`);
        veths.push(`link add ${l.ifB} address ${l.macB} netns ${nsB} type veth peer name ${w.wireB} netns ${w.ns}`);
        const delayed = l.delayABus > 0 || l.delayBAus > 0;
        if (!delayed) add(w.ns, `link add ${w.bridge} type bridge`);
        for (const dev of [w.wireA, w.wireB]) add(w.ns, delayed ? `link set ${dev} up` : `link set ${dev} master ${w.bridge} up`);
        if (!delayed) add(w.ns, `link set ${w.bridge} up`);
        // shapers on the wire's egress toward each end: wireB carries a→b, wireA carries b→a
        const tc: string[] = [];
        for (const [dev, mbit] of [[w.wireB, l.rateAB], [w.wireA, l.rateBA]] as const) {
          if (mbit === undefined) continue;
          const burst = Math.max(16 << 10, Math.ceil(mbit * 1e6 / 8 * 0.002));   // 2 ms at the rate, at least 16 KiB
          tc.push(`qdisc add dev ${dev} root tbf rate ${Math.round(mbit * 1000)}kbit burst ${burst} limit ${Math.round(l.queueBytes)}`);
        }
        if (tc.length) tcPerNs.set(w.ns, tc);
      }
      for (const [ns, dev, addr, peer, peerMac] of [[nsA, l.ifA, l.addrA, l.addrB, l.macB], [nsB, l.ifB, l.addrB, l.addrA, l.macA]]) {
        add(ns, `addr add ${addr}/24 dev ${dev}`);
        add(ns, `link set ${dev} up`);
        // no ARP over the link: on a delayed link it would add a round trip to every first contact
        add(ns, `neigh replace ${peer} lladdr ${peerMac} dev ${dev} nud permanent`);
      }
    }
    for (const n of this.plan.nodes.values()) for (const r of n.routes) add(n.ns, `route add ${r.dest} via ${r.via} dev ${r.dev}`);
    await sh(['ip', '-batch', '-'], { input: veths.join('\n') + '\n' });
    await Promise.all([...perNs].map(([ns, lines]) => sh(['ip', '-n', ns, '-batch', '-'], { input: lines.join('\n') + '\n' })));
    await Promise.all([...tcPerNs].map(([ns, lines]) => sh(['tc', '-n', ns, '-batch', '-'], { input: lines.join('\n') + '\n' })));
    await Promise.all([...this.plan.nodes.values()].filter(n => n.nat).map(n => sh(['ip', 'netns', 'exec', n.ns, 'nft', '-f', '-'], { input: natRuleset(n.nat!) })));
    await Promise.all(links.filter(l => l.delayABus > 0 || l.delayBAus > 0).map(l => this.startDevice(l, delayExe!)));
  }

  private async startDevice(l: PlannedLink, exe: string): Promise<void> {
    const w = l.wire!;
    // the device's ring must hold everything in flight during the delay, at the rate (or 1 Gbit/s unshaped)
    const mbit = Math.max(l.rateAB ?? 1000, l.rateBA ?? 1000);
    const inFlight = mbit * 1e6 / 8 * Math.max(l.delayABus, l.delayBAus) / 1e6;
    const ring = Math.min(256 << 20, Math.max(16 << 20, Math.ceil(4 * inFlight)));
    const args = [w.wireA, w.wireB, String(l.delayABus), String(l.delayBAus), String(ring), String(this.maxSeconds), String(this.rtPriority)];
    const child = spawn('ip', ['netns', 'exec', w.ns, exe, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    let stderr = '';
    child.stderr!.on('data', d => { stderr = (stderr + d).slice(-2000); });
    const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
    const failed = once(child, 'exit').then(([code, sig]) => { throw new Error(`netlab: link ${l.index} (${l.a}–${l.b}): delay device exited (${sig ?? code}) before it was ready: ${stderr.trim()}`); });
    const first = await within(Promise.race([lines.next(), failed]), 5000, () => `netlab: link ${l.index} (${l.a}–${l.b}): delay device not ready within 5000 ms: ${stderr.trim()}`);
    failed.catch(() => { /* exits after ready are teardown's business */ });
    if (first.done) await within(failed, 2000, () => `netlab: link ${l.index} (${l.a}–${l.b}): delay device closed its output before it was ready: ${stderr.trim()}`);
    if (first.value !== 'ready') throw new Error(`netlab: link ${l.index} (${l.a}–${l.b}): delay device said "${String(first.value)}" instead of "ready": ${stderr.trim()}`);
    this.devices.set(l.index, { child, lines });
  }

  /** Kills every process of the lab and deletes its namespaces; idempotent; rejects (after trying all) if something stays. */
  teardown(): Promise<void> {
    this.down ??= this.teardownAsync();
    return this.down;
  }

  private async teardownAsync(): Promise<void> {
    const waits = [...this.children].map(c => (c.exitCode !== null || c.signalCode !== null ? Promise.resolve() : once(c, 'exit').then(() => undefined)));
    for (const c of this.children) c.kill('SIGTERM');
    const graceful = await within(Promise.all(waits), KILL_GRACE_MS, () => 'grace').then(() => true, () => false);
    if (!graceful) {
      for (const c of this.children) c.kill('SIGKILL');
      await within(Promise.all(waits), KILL_GRACE_MS, () => 'kill').catch(() => { /* the namespace sweep below kills by pid */ });
    }
    const errors: string[] = [];
    for (const ns of [...this.made].reverse()) {
      killNamespace(ns);
      try { await sh(['ip', 'netns', 'del', ns]); } catch (e) { errors.push((e as NetlabCommandError).message); }
    }
    live.delete(this);
    const left = listNamespaces().filter(n => n.startsWith(this.prefix));
    if (left.length || errors.length) throw new Error(`netlab: teardown of ${this.prefix} left ${left.join(', ') || 'nothing'}; ${errors.join('; ')}`);
  }

  /** Synchronous teardown for exit and signal handlers (no waiting: SIGKILL, then delete). */
  teardownSync(): void {
    for (const c of this.children) c.kill('SIGKILL');
    for (const ns of [...this.made].reverse()) { killNamespace(ns); shSync(['ip', 'netns', 'del', ns], { timeoutMs: 5000 }); }
    this.made.length = 0;
    live.delete(this);
    this.down ??= Promise.resolve();
  }
}
