// Link and NAT emulation (tests/netlab/): rates and round trips measured by TCP between namespaces against the
// settings, the two NAT kinds' behaviour seen from both sides, and clean-up after teardown, crashes and signals.
// Needs root, iproute2, cc and nftables (.ci/run installs nftables); without them the lab tests are skipped with
// the reason, and only the plan and rate-arithmetic tests run.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { createLab, labSupport, listNamespaces, listRootInterfaces, sweepLeftovers, type Lab } from './netlab/lab.ts';
import { runOverLink, starSpec, withLab as benchWithLab } from './netlab/bench.ts';
import { FRAME_PER_PAYLOAD, rateOf, type ProbeAgent } from './netlab/probe-client.ts';
import { NetlabSpecError, planLab, type LabSpec } from './netlab/topology.ts';

const whyNot = labSupport({ delay: true }), whyNotNat = whyNot ?? labSupport({ delay: true, nat: true });
const skip = whyNot ? `netlab unavailable: ${whyNot}` : false;
const skipNat = whyNotNat ? `netlab NAT unavailable: ${whyNotNat}` : false;
const sleep = (ms: number): Promise<void> => new Promise(r => setTimeout(r, ms));
/** p, or a rejection with msg after ms (the timer does not outlive p) */
async function within<T>(p: Promise<T>, ms: number, msg: string, onTimeout = (): void => {}): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => { timer = setTimeout(() => { onTimeout(); rej(new Error(msg)); }, ms); })]);
  } finally { clearTimeout(timer); }
}

/** srv on the "internet"; a and c behind cone NATs, b behind a strict one; 2 ms one-way on each NAT's uplink */
const NAT_LAB: LabSpec = {
  hosts: ['srv', 'a', 'b', 'c'], routers: ['inet', 'r1', 'r2', 'r3'],
  links: [
    { a: 'srv', b: 'inet' }, { a: 'r1', b: 'inet', delayMs: 2 }, { a: 'r2', b: 'inet', delayMs: 2 }, { a: 'r3', b: 'inet', delayMs: 2 },
    { a: 'a', b: 'r1', natKind: 'cone' }, { a: 'b', b: 'r2', natKind: 'strict' }, { a: 'c', b: 'r3', natKind: 'cone' },
  ],
};

/** A process is gone when /proc has no live entry for it (a zombie counts as gone: it runs nothing). */
function running(pid: number): boolean {
  const stat = `/proc/${pid}/stat`;
  if (!existsSync(stat)) return false;
  try { return !/^\d+ \(.*\) Z /.test(readFileSync(stat, 'utf8')); } catch { return false; }
}

async function assertNothingLeft(prefix: string, pids: number[]): Promise<void> {
  assert.deepEqual(listNamespaces().filter(n => n.startsWith(prefix)), [], `namespaces of ${prefix} left behind`);
  assert.deepEqual(listRootInterfaces().filter(n => n.startsWith(prefix)), [], `root interfaces of ${prefix} left behind`);
  let left = pids.filter(running);
  for (let i = 0; i < 60 && left.length; i++) { await sleep(50); left = pids.filter(running); }   // SIGKILL takes a moment
  assert.deepEqual(left, [], `processes of ${prefix} still running`);
}

async function withLab(spec: LabSpec, fn: (lab: Lab) => Promise<void>): Promise<void> {
  const lab = await createLab(spec);
  let pids: number[] = [];
  try {
    await fn(lab);
    pids = lab.pids();
    assert.ok(pids.length > 0, 'the lab had no processes to check');
  } finally {
    await lab.teardown();
  }
  await assertNothingLeft(lab.prefix, pids);
}

test('plan: names carry the run prefix and fit IFNAMSIZ; nothing outside a NAT routes to its inside', () => {
  const prefix = 'snl00abc01';
  const plan = planLab(NAT_LAB, prefix);
  for (const l of plan.links) {
    for (const dev of [l.ifA, l.ifB, ...(l.wire ? [l.wire.wireA, l.wire.wireB, l.wire.bridge] : [])]) {
      assert.ok(dev.startsWith(prefix) && dev.length <= 15, `interface name ${dev}`);
    }
  }
  for (const n of plan.nodes.values()) assert.ok(n.ns.startsWith(`${prefix}-`), n.ns);
  const inside = ['10.77.4', '10.77.5', '10.77.6'];             // links 4, 5, 6 are the NATs' insides
  const dests = (node: string): string[] => plan.nodes.get(node)!.routes.map(r => r.dest);
  for (const node of ['srv', 'inet']) assert.deepEqual(dests(node).filter(d => inside.some(p => d.startsWith(p))), [], `${node} routes into a NAT`);
  assert.deepEqual(dests('r1').filter(d => d.startsWith('10.77.5') || d.startsWith('10.77.6')), [], 'r1 routes into another NAT');
  // a reaches the internet and the other NATs' public sides through r1, and nothing private beyond them
  assert.deepEqual(dests('a').sort(), ['10.77.0.0/24', '10.77.1.0/24', '10.77.2.0/24', '10.77.3.0/24']);
  assert.ok(plan.nodes.get('a')!.routes.every(r => r.via === '10.77.4.2'), 'a routes via r1');
  assert.deepEqual(plan.nodes.get('r2')!.nat, { kind: 'strict', inside: [`${prefix}l5b`], outside: [`${prefix}l2a`] });
  assert.equal(plan.links[1].wire?.ns, `${prefix}-w1`, 'a delayed link has a wire namespace');
  assert.equal(plan.links[0].wire, undefined, 'an unshaped link is a plain veth pair');
});

test('plan: a bad spec is refused with one line naming the link or node', () => {
  const cases: [LabSpec, RegExp][] = [
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'x' }] }, /links\[0\] \(a–x\): b "x" is not a host or router/],
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', natKind: 'cone' }] }, /links\[0\] \(a–b\): natKind needs b to be a router .*"b" is a host/],
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b' }, { a: 'a', b: 'b', rateMbit: -1 }] }, /links\[1\] \(a–b\): rateMbit must be a number in \[0.01, 100000\], got -1/],
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', rateMbitBA: 0 }] }, /links\[0\] \(a–b\): rateMbitBA must be a number in \[0.01, 100000\], got 0/],
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', delayMs: Number.NaN }] }, /links\[0\] \(a–b\): delayMs must be a number/],
    [{ hosts: ['a', 'a'], links: [] }, /node "a" is named twice/],
    [{ hosts: ['A-1'], links: [] }, /host name "A-1" must match/],
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'a' }] }, /links\[0\] \(a–a\): a link needs two different nodes/],
    [{ hosts: ['a', 'b', 'c'], links: [{ a: 'a', b: 'b' }] }, /node "c" has no link/],
    [{ hosts: ['a'], routers: ['r'], links: [{ a: 'a', b: 'r', natKind: 'cone' }] }, /NAT router "r" has no outside link/],
    [{ hosts: ['a', 'b'], links: [{ a: 'a', b: 'b', natKind: 'full' as never }] }, /natKind must be one of cone, strict, got "full"/],
  ];
  for (const [spec, re] of cases) {
    assert.throws(() => planLab(spec, 'snl00abc01'), (e: Error) => e instanceof NetlabSpecError && re.test(e.message) && !e.message.includes('\n'), `expected ${re}`);
  }
});

test('rateOf: the windowed median ignores a loss-recovery stall and the burst that follows it', () => {
  // 10 Mbit/s = 1250 bytes/ms, read every 5 ms; from 300 to 500 ms nothing arrives, then at 500 ms the held
  // 250 000 bytes arrive at once (a filled hole), then the steady rate again until 2000 ms
  const tl: [number, number][] = [];
  let bytes = 0;
  for (let t = 5; t <= 2000; t += 5) {
    if (t > 300 && t < 500) continue;
    bytes += t === 500 ? 1250 * 205 : 1250 * 5;
    tl.push([t, bytes]);
  }
  const r = rateOf(tl);
  assert.equal(r.windowMs, 100);
  assert.ok(Math.abs(r.windowed - 10) < 0.01, `windowed ${r.windowed}`);
  assert.ok(Math.abs(r.whole - 10) < 0.1, `whole ${r.whole}`);
  assert.throws(() => rateOf([[0, 1]]), /at least two reads/);
  assert.ok(Math.abs(FRAME_PER_PAYLOAD - 1514 / 1448) < 1e-12);
});

test('links: 20 Mbit/s at 50 ms RTT, 100 Mbit/s at 10 ms RTT and 50/30 Mbit/s without delay, measured by TCP, are within 10% of the settings', { skip, timeout: 60_000 }, async () => {
  const settings = [
    { a: 'a', b: 'b', rateMbit: 20, delayMs: 25, bytes: 3_000_000 },   // delayMs is one-way: RTT 50 ms
    { a: 'c', b: 'd', rateMbit: 100, delayMs: 5, bytes: 8_000_000 },   // RTT 10 ms
  ];
  const links = [...settings.map(({ bytes: _, ...l }) => l), { a: 'e', b: 'f', rateMbit: 50, rateMbitBA: 30 }];
  await withLab({ hosts: ['a', 'b', 'c', 'd', 'e', 'f'], links }, async lab => {
    for (const [i, s] of settings.entries()) {
      const rtt = 2 * s.delayMs;
      const m = await lab.measure(s.a, s.b, { bytes: s.bytes, pings: 20 });
      const what = `${s.rateMbit} Mbit/s, ${rtt} ms RTT: ${JSON.stringify(m)}`;
      assert.ok(Math.abs(m.rttMs.median - rtt) <= 0.1 * rtt, `RTT median ${m.rttMs.median.toFixed(2)} ms; ${what}`);
      assert.ok(m.rttMs.min >= rtt, `a round trip faster than the delay: ${m.rttMs.min.toFixed(2)} ms; ${what}`);
      assert.ok(Math.abs(m.frameMbitPerS! - s.rateMbit) <= 0.1 * s.rateMbit, `rate ${m.frameMbitPerS!.toFixed(2)} Mbit/s of frames; ${what}`);
      const dev = (await lab.deviceStats(i))!;
      assert.equal(dev.a2b.dropsQueue + dev.b2a.dropsQueue + dev.a2b.dropsOther + dev.b2a.dropsOther, 0, `the delay device dropped frames: ${JSON.stringify(dev)}`);
      assert.ok(dev.a2b.bytes >= s.bytes, `the delay device carried ${dev.a2b.bytes} of ${s.bytes} bytes`);
    }
    // a shaped link without delay (a bridge in the wire) with different rates each way: 50 Mbit/s e→f, 30 f→e
    for (const [from, to, mbit] of [['e', 'f', 50], ['f', 'e', 30]] as const) {
      const m = await lab.measure(from, to, { bytes: 2_000_000, pings: 5 });
      assert.ok(Math.abs(m.frameMbitPerS! - mbit) <= 0.1 * mbit, `${from}→${to}: ${m.frameMbitPerS!.toFixed(2)} Mbit/s of frames, set ${mbit}; ${JSON.stringify(m)}`);
      assert.ok(m.rttMs.median < 2, `no delay set, yet a ${m.rttMs.median.toFixed(2)} ms round trip`);
    }
    assert.equal(await lab.deviceStats(2), null, 'a link without delay has no delay device');
  });
});

test('NAT: cone and strict map, filter and punch as their kinds say', { skip: skipNat, timeout: 60_000 }, async () => {
  await withLab(NAT_LAB, async lab => {
    const [srv, a, b, c] = await Promise.all([lab.probe('srv', { tcp: 7000, udp: [5000, 5001, 5002] }), ...['a', 'b', 'c'].map(h => lab.probe(h, { tcp: 7000, udp: [4000] }))]);
    const S = lab.addr('srv'), pub = { a: lab.addr('r1'), b: lab.addr('r2'), c: lab.addr('r3') };

    // outbound TCP leaves, and the server sees the router's public address, not the private one
    for (const [x, router] of [[a, pub.a], [b, pub.b]] as const) {
      const r = await x.call({ op: 'connect', to: `${S}:7000`, line: 'observe', timeoutMs: 3000 });
      assert.equal(String(r.reply).split(' ')[1].split(':')[0], router, `${x.node}: ${JSON.stringify(r)}`);
      assert.notEqual(String(r.local).split(':')[0], router);
    }

    // mapping: the same UDP source port to two destinations — one public port behind cone, two behind strict
    const observe = async (x: ProbeAgent, port: number): Promise<string> => {
      await x.call({ op: 'udp', from: 4000, to: `${S}:${port}`, text: 'observe?' });
      const e = await x.wait(e => e.ev === 'udp' && e.from === `${S}:${port}` && String(e.text).startsWith('observed '), 3000, `observed reply from ${port}`);
      return String(e.text).slice('observed '.length);
    };
    const seen: Record<string, [string, string]> = {};
    for (const x of [a, b, c]) seen[x.node] = [await observe(x, 5000), await observe(x, 5001)];
    assert.equal(seen.a[0], `${pub.a}:4000`, 'cone keeps the source port');
    assert.equal(seen.a[1], seen.a[0], 'cone: endpoint-independent mapping');
    assert.equal(seen.b[0].split(':')[0], pub.b);
    assert.notEqual(seen.b[1], seen.b[0], 'strict: a new mapping per destination');

    // filtering: replies came in (above); unsolicited traffic does not, not even to a live mapping
    await srv.call({ op: 'udp', from: 5002, to: seen.a[0], text: 'unsolicited' });
    await srv.call({ op: 'udp', from: 5002, to: seen.b[0], text: 'unsolicited' });
    await Promise.all([pub.a, pub.b].map(router => assert.rejects(srv.call({ op: 'connect', to: `${router}:7000`, timeoutMs: 700 }),
      (e: NodeJS.ErrnoException) => e.code === 'ETIMEDOUT', `an inbound connection to ${router} must be dropped (a and b listen on 7000 inside)`)));
    await assert.rejects(srv.call({ op: 'connect', to: `${lab.addr('b')}:7000`, timeoutMs: 700 }), (e: NodeJS.ErrnoException) => e.code === 'ENETUNREACH',
      'the private side has no route from outside');
    // and nothing leaves the lab: no default route anywhere, so addresses outside it are unreachable
    for (const x of [srv, a]) {
      await assert.rejects(x.call({ op: 'connect', to: '192.0.2.1:80', timeoutMs: 700 }), (e: NodeJS.ErrnoException) => e.code === 'ENETUNREACH', `${x.node} reached outside`);
    }

    // hole punching, UDP: each side sends to the address the server saw for the other
    for (let i = 0; i < 3; i++) {
      await a.call({ op: 'udp', from: 4000, to: seen.c[0], text: 'punch-a' });
      await c.call({ op: 'udp', from: 4000, to: seen.a[0], text: 'punch-c' });
      await a.call({ op: 'udp', from: 4000, to: seen.b[0], text: 'punch-a' });
      await b.call({ op: 'udp', from: 4000, to: seen.a[0], text: 'punch-b' });
      await sleep(30);
    }
    await c.wait(e => e.ev === 'udp' && e.text === 'punch-a', 2000, 'punch-a at c');
    await a.wait(e => e.ev === 'udp' && e.text === 'punch-c', 2000, 'punch-c at a');
    await sleep(200);
    assert.deepEqual(b.udpReceived(4000, 'punch-a'), [], 'strict let a punch in');
    assert.deepEqual(a.udpReceived(4000, 'punch-b'), [], 'a strict host punched into a cone');
    for (const x of [a, b]) assert.deepEqual(x.udpReceived(4000, 'unsolicited'), [], `${x.node} received unsolicited UDP`);

    // hole punching, TCP simultaneous open (as libp2p's DCUtR does) through two cone NATs; refused by strict
    const [ac, ca] = await Promise.all([
      a.call({ op: 'connect', to: `${pub.c}:4100`, localPort: 4100, line: 'hello-from-a', timeoutMs: 3000 }),
      c.call({ op: 'connect', to: `${pub.a}:4100`, localPort: 4100, line: 'hello-from-c', timeoutMs: 3000 }),
    ]);
    assert.equal(ac.reply, 'hello-from-c');
    assert.equal(ca.reply, 'hello-from-a');
    const strictOpen = await Promise.allSettled([
      a.call({ op: 'connect', to: `${pub.b}:4101`, localPort: 4101, line: 'x', timeoutMs: 1000 }),
      b.call({ op: 'connect', to: `${pub.a}:4101`, localPort: 4101, line: 'x', timeoutMs: 1000 }),
    ]);
    assert.deepEqual(strictOpen.map(r => r.status === 'rejected' && (r.reason as NodeJS.ErrnoException).code), ['ETIMEDOUT', 'ETIMEDOUT'],
      `simultaneous open through the strict NAT: ${JSON.stringify(strictOpen)}`);
  });
});

test('bench hooks: runOverLink runs a server and a client over one shaped link; starSpec joins access lines at a hub', { skip, timeout: 60_000 }, async () => {
  const server = `require('node:net').createServer(s => s.end('hi ' + s.remoteAddress)).listen(7200, process.env.NETLAB_SERVER_ADDR, () => console.log('listening'))`;
  // three connects, the fastest reported (the first one also pays for Node's lazy set-up), then one read
  const client = `const net = require('node:net'); (async () => { let best = Infinity;
    for (let i = 0; i < 3; i++) { const t = performance.now(); await new Promise(r => { const s = net.connect(7200, process.argv[1], () => { best = Math.min(best, performance.now() - t); s.destroy(); r(); }); }); }
    console.log('connect ' + best); net.connect(7200, process.argv[1]).on('data', d => console.log(String(d))); })()`;
  const r = await runOverLink({ rateMbit: 50, delayMs: 10, delayMsBA: 5 }, {
    server: { cmd: process.execPath, args: ['-e', server], ready: /listening/ },
    client: { cmd: process.execPath, args: ['-e', client, '{server}'] },
    timeoutMs: 20_000,
  });
  assert.equal(r.client.code, 0, r.client.stderr);
  assert.equal(r.server.signal, 'SIGTERM', 'the server is stopped when the client is done');
  const connectMs = Number(/connect ([\d.]+)/.exec(r.client.stdout)?.[1]);
  assert.ok(connectMs >= 15 && connectMs < 15 * 1.2, `TCP connect takes one round trip (10 + 5 ms): ${r.client.stdout}`);
  assert.match(r.client.stdout, new RegExp(`hi ${r.addr.client.replace(/\./g, '\\.')}`), 'the server sees the client\'s own address');
  assert.ok(r.device && r.device.a2b.frames > 0 && r.device.b2a.frames > 0, `device statistics: ${JSON.stringify(r.device)}`);
  assert.deepEqual(listNamespaces().filter(n => n.startsWith(`snl${process.pid.toString(36).padStart(5, '0')}`)), [], 'runOverLink left its lab');

  // starSpec: two access lines through a hub router; the round trip is the sum of both lines' round trips
  const rtt = await benchWithLab(starSpec({ x: { delayMs: 4, rateMbit: 100 }, y: { delayMs: 6, rateMbit: 50 } }), async lab => {
    assert.equal(lab.plan.nodes.get('hub')!.kind, 'router');
    return (await lab.measure('x', 'y', { bytes: 0, pings: 10 })).rttMs.median;
  });
  assert.ok(Math.abs(rtt - 20) <= 2, `x↔y round trip ${rtt.toFixed(2)} ms, set 2 × (4 + 6) = 20 ms`);
});

/** Starts tests/netlab/crash-child.ts in one mode and parses the JSON line it prints first. */
async function startChild(mode: 'throw' | 'hang' | 'badcc'): Promise<{ child: ReturnType<typeof spawn>; first: Record<string, unknown> }> {
  const child = spawn(process.execPath, [path.join(import.meta.dirname, 'netlab', 'crash-child.ts'), mode], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', d => { stderr += d; });
  const first = await within(createInterface({ input: child.stdout! })[Symbol.asyncIterator]().next(), 20_000,
    `crash-child ${mode} printed nothing in 20 s: ${stderr}`, () => child.kill('SIGKILL'));
  if (first.done) throw new Error(`crash-child ${mode} exited early: ${stderr}`);
  return { child, first: JSON.parse(first.value) as Record<string, unknown> };
}

async function crashChild(mode: 'throw' | 'hang'): Promise<{ child: ReturnType<typeof spawn>; prefix: string; pids: number[] }> {
  const { child, first } = await startChild(mode);
  const { prefix, pids } = first as { prefix: string; pids: number[] };
  assert.ok(pids.length >= 2, `crash-child's lab has its delay device and a sleep: ${pids}`);
  return { child, prefix, pids };
}

const exitOf = (child: ReturnType<typeof spawn>): Promise<[number | null, NodeJS.Signals | null]> =>
  within(once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>, 20_000, 'crash-child did not exit in 20 s', () => child.kill('SIGKILL'));

test('clean-up: a lab that fails half-built is removed, and its error names the link and the device\'s stderr', { skip, timeout: 30_000 }, async () => {
  const { child, first } = await startChild('badcc');
  await exitOf(child);
  assert.match(String(first.error), /^netlab: link 0 \(a–b\): delay device exited \(2\) before it was ready: fake delay device: cannot open the wire$/);
  assert.deepEqual(first.left, [], 'namespaces of the failed lab remain');
});

test('clean-up: an uncaught exception and SIGTERM tear the lab down; after SIGKILL the next sweep does', { skip, timeout: 90_000 }, async () => {
  const thrown = await crashChild('throw');
  const [code] = await exitOf(thrown.child);
  assert.equal(code, 1, 'the uncaught exception ends the process with 1');
  await assertNothingLeft(thrown.prefix, thrown.pids);

  const termed = await crashChild('hang');
  termed.child.kill('SIGTERM');
  const [, sig] = await exitOf(termed.child);
  assert.equal(sig, 'SIGTERM', 'after its clean-up the process still dies by the signal');
  await assertNothingLeft(termed.prefix, termed.pids);

  const killed = await crashChild('hang');
  killed.child.kill('SIGKILL');
  await exitOf(killed.child);
  const left = listNamespaces().filter(n => n.startsWith(killed.prefix));
  assert.ok(left.length >= 3, `SIGKILL leaves the namespaces (a, b, the wire): ${left}`);
  const removed = sweepLeftovers();
  assert.deepEqual(left.filter(n => !removed.includes(n)), [], `the sweep removed ${removed}`);
  await assertNothingLeft(killed.prefix, killed.pids);
});
