// netlab's probe agent, run inside a lab namespace: TCP/UDP servers plus client operations driven by JSON lines.
// Usage: node tests/netlab/probe.ts --bind ADDR [--tcp PORT] [--udp PORT,PORT...]
//
// stdout: one JSON event per line: {"ev":"ready"} once listening; {"ev":"udp",port,from,text} per datagram;
// {"ev":"accept",port,from} per TCP connection; {"id",ev:"done",...} or {"id",ev:"error",error} per command.
// stdin: one JSON command per line, each with an "id":
//   {op:"udp", from:PORT, to:"ip:port", text}                 send one datagram from one of our UDP ports
//   {op:"connect", to, localPort?, timeoutMs, line}          connect, send line, answer the first line back
//   {op:"ping", to, count}                                   TCP ping-pong of 1 byte: round trip times in ms
//   {op:"bulk", to, bytes}                                   send bytes; the receiver's timing comes back
//   {op:"train", from:PORT, to, count, intervalMs}            timestamped datagrams ("t=<CLOCK_MONOTONIC ns>")
//   {op:"exit"}
// A TCP server answers the first line of a connection: "observe" -> "observed IP:PORT" (the source address
// it sees), "ping" -> echoes every byte, "bulk N" -> reads N bytes then answers a JSON line with its timing.
// A UDP port answers "observe?" with "observed IP:PORT"; a "t=NS" datagram's event carries owdUs, its one-way
// delay (all namespaces share the machine's monotonic clock). Every wait is bounded by a timeout.
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { connect, createServer, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { performance } from 'node:perf_hooks';

type Json = Record<string, unknown>;
const emit = (o: Json): void => { process.stdout.write(JSON.stringify(o) + '\n'); };
const fail = (msg: string): never => { process.stderr.write(`probe: ${msg}\n`); process.exit(2); };

function argValue(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i < 0 ? undefined : process.argv[i + 1];
}
function port(s: string, what: string): number {
  const n = Number(s);
  if (!Number.isInteger(n) || n < 1 || n > 65535) fail(`${what}: "${s}" is not a port`);
  return n;
}
function hostPort(s: unknown, what: string): { host: string; port: number } {
  const m = typeof s === 'string' ? /^(\d+\.\d+\.\d+\.\d+):(\d+)$/.exec(s) : null;
  if (!m) throw new Error(`${what}: "${String(s)}" is not IPv4:port`);
  return { host: m[1], port: port(m[2], what) };
}

const bind = argValue('--bind') ?? fail('--bind ADDR is required');
const tcpPort = argValue('--tcp');
const udpPorts = (argValue('--udp') ?? '').split(',').filter(Boolean).map(p => port(p, '--udp'));
const MAX_BULK_BYTES = 1 << 30;
const MAX_PINGS = 10_000;

/** Reads one '\n'-terminated line from a socket (at most maxBytes), then hands the rest of the stream on. */
function firstLine(sock: Socket, timeoutMs: number, maxBytes = 4096): Promise<{ line: string; rest: Buffer }> {
  return new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => done(new Error(`no line within ${timeoutMs} ms`)), timeoutMs);
    const onData = (d: Buffer): void => {
      buf = Buffer.concat([buf, d]);
      const nl = buf.indexOf(10);
      if (nl >= 0) done(null, buf.subarray(0, nl).toString(), buf.subarray(nl + 1));
      else if (buf.length > maxBytes) done(new Error(`first line longer than ${maxBytes} bytes`));
    };
    const onEnd = (): void => done(new Error('connection closed before a line'));
    const onError = (e: Error): void => done(e);
    function done(err: Error | null, line = '', rest = Buffer.alloc(0)): void {
      clearTimeout(timer);
      sock.off('data', onData); sock.off('end', onEnd); sock.off('error', onError);
      if (err) reject(err); else resolve({ line, rest });
    }
    sock.on('data', onData); sock.on('end', onEnd); sock.on('error', onError);
  });
}

async function serveConnection(sock: Socket): Promise<void> {
  sock.setNoDelay(true);
  const from = `${sock.remoteAddress}:${sock.remotePort}`;
  emit({ ev: 'accept', port: sock.localPort, from });
  const { line, rest } = await firstLine(sock, 10_000);
  if (line === 'observe') { sock.end(`observed ${from}\n`); return; }
  if (line === 'ping') {
    sock.on('data', d => sock.write(d));
    if (rest.length) sock.write(rest);
    return;
  }
  const m = /^bulk (\d+)$/.exec(line);
  if (!m || Number(m[1]) > MAX_BULK_BYTES) { sock.end(`error: unknown request "${line.slice(0, 80)}"\n`); return; }
  const want = Number(m[1]);
  // (ms since the first byte, bytes so far) per read, rounded: the lab computes rates from it
  const timeline: [number, number][] = [];
  let got = 0, t0 = 0;
  const onData = (d: Buffer): void => {
    const now = performance.now();
    if (got === 0) t0 = now;
    got += d.length;
    timeline.push([Math.round((now - t0) * 1000) / 1000, got]);
    if (got >= want) {
      sock.off('data', onData);
      sock.end(JSON.stringify({ bytes: got, ms: now - t0, timeline }) + '\n');
    }
  };
  sock.on('data', onData);
  if (rest.length) onData(rest);
}

function open(to: { host: string; port: number }, timeoutMs: number, localPort?: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: to.host, port: to.port, localAddress: bind, ...(localPort ? { localPort } : {}) });
    const timer = setTimeout(() => { sock.destroy(); reject(Object.assign(new Error(`connect timed out after ${timeoutMs} ms`), { code: 'ETIMEDOUT' })); }, timeoutMs);
    sock.once('connect', () => { clearTimeout(timer); sock.setNoDelay(true); resolve(sock); });
    sock.once('error', e => { clearTimeout(timer); reject(e); });
  });
}

function pingPong(sock: Socket, count: number, timeoutMs: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const samples: number[] = [];
    let sent = 0;
    const timer = setTimeout(() => reject(new Error(`ping: ${samples.length} of ${count} replies within ${timeoutMs} ms`)), timeoutMs);
    const send = (): void => { sent = performance.now(); sock.write('x'); };
    sock.on('data', d => {
      for (let i = 0; i < d.length; i++) {
        samples.push(performance.now() - sent);
        if (samples.length === count) { clearTimeout(timer); resolve(samples); return; }
        send();
      }
    });
    sock.once('error', e => { clearTimeout(timer); reject(e); });
    send();
  });
}

async function bulk(sock: Socket, bytes: number, timeoutMs: number): Promise<Json> {
  const reply = firstLine(sock, timeoutMs, 64 << 20);
  sock.write(`bulk ${bytes}\n`);
  const chunk = Buffer.alloc(64 << 10, 0x5a);
  const deadline = performance.now() + timeoutMs;
  for (let left = bytes; left > 0;) {
    const n = Math.min(left, chunk.length);
    left -= n;
    if (!sock.write(n === chunk.length ? chunk : chunk.subarray(0, n))) {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`bulk: ${bytes - left} of ${bytes} bytes sent within ${timeoutMs} ms`)), Math.max(0, deadline - performance.now()));
        sock.once('drain', () => { clearTimeout(timer); resolve(); });
        sock.once('close', () => { clearTimeout(timer); reject(new Error(`bulk: connection closed after ${bytes - left} of ${bytes} bytes`)); });
      });
    }
  }
  const { line } = await reply;
  return JSON.parse(line) as Json;
}

const udp = new Map<number, UdpSocket>();

async function command(c: Json): Promise<Json> {
  const timeoutMs = typeof c.timeoutMs === 'number' ? c.timeoutMs : 30_000;
  switch (c.op) {
    case 'udp': {
      const s = udp.get(Number(c.from));
      if (!s) throw new Error(`udp: port ${String(c.from)} is not one of --udp`);
      const to = hostPort(c.to, 'udp: to');
      await new Promise<void>((res, rej) => s.send(String(c.text ?? ''), to.port, to.host, e => (e ? rej(e) : res())));
      return {};
    }
    case 'train': {
      const s = udp.get(Number(c.from));
      if (!s) throw new Error(`train: port ${String(c.from)} is not one of --udp`);
      const to = hostPort(c.to, 'train: to'), count = Number(c.count), intervalMs = Number(c.intervalMs);
      if (!Number.isInteger(count) || count < 1 || count > 100_000) throw new Error('train: count must be 1..100000');
      if (!(intervalMs >= 0 && intervalMs <= 10_000)) throw new Error('train: intervalMs must be 0..10000');
      for (let i = 0; i < count; i++) {
        s.send(`t=${process.hrtime.bigint()}`, to.port, to.host);
        await new Promise(r => setTimeout(r, intervalMs));
      }
      return {};
    }
    case 'connect': {
      const sock = await open(hostPort(c.to, 'connect: to'), timeoutMs, typeof c.localPort === 'number' ? c.localPort : undefined);
      const local = `${sock.localAddress}:${sock.localPort}`;
      try {
        const reply = firstLine(sock, timeoutMs);
        sock.write(`${String(c.line ?? 'observe')}\n`);
        return { local, reply: (await reply).line };
      } finally { sock.destroy(); }
    }
    case 'ping': {
      const count = Number(c.count);
      if (!Number.isInteger(count) || count < 1 || count > MAX_PINGS) throw new Error(`ping: count must be 1..${MAX_PINGS}`);
      const sock = await open(hostPort(c.to, 'ping: to'), timeoutMs);
      try { sock.write('ping\n'); return { rttMs: await pingPong(sock, count, timeoutMs) }; } finally { sock.destroy(); }
    }
    case 'bulk': {
      const bytes = Number(c.bytes);
      if (!Number.isInteger(bytes) || bytes < 1 || bytes > MAX_BULK_BYTES) throw new Error(`bulk: bytes must be 1..${MAX_BULK_BYTES}`);
      const sock = await open(hostPort(c.to, 'bulk: to'), timeoutMs);
      try { return await bulk(sock, bytes, timeoutMs); } finally { sock.destroy(); }
    }
    case 'exit': setImmediate(() => process.exit(0)); return {};
    default: throw new Error(`unknown op "${String(c.op)}"`);
  }
}

async function main(): Promise<void> {
  const listening: Promise<void>[] = [];
  if (tcpPort) {
    const server = createServer(sock => { serveConnection(sock).catch(e => { sock.destroy(); emit({ ev: 'serve-error', error: String(e.message) }); }); });
    listening.push(new Promise((res, rej) => { server.once('error', rej); server.listen(port(tcpPort, '--tcp'), bind, () => res()); }));
  }
  for (const p of udpPorts) {
    const s = createSocket('udp4');
    s.on('message', (msg, rinfo) => {
      const now = process.hrtime.bigint();
      const from = `${rinfo.address}:${rinfo.port}`, text = msg.toString();
      const t = /^t=(\d+)$/.exec(text);
      emit({ ev: 'udp', port: p, from, text, ...(t ? { owdUs: Number(now - BigInt(t[1])) / 1000 } : {}) });
      if (text === 'observe?') s.send(`observed ${from}`, rinfo.port, rinfo.address);
    });
    udp.set(p, s);
    listening.push(new Promise((res, rej) => { s.once('error', rej); s.bind(p, bind, () => res()); }));
  }
  await Promise.all(listening);
  emit({ ev: 'ready', pid: process.pid });
  const rl = createInterface({ input: process.stdin });
  rl.on('line', line => {
    let c: Json;
    try { c = JSON.parse(line) as Json; } catch { emit({ ev: 'error', error: `stdin: not JSON: ${line.slice(0, 80)}` }); return; }
    command(c).then(r => emit({ id: c.id, ev: 'done', ...r }), (e: NodeJS.ErrnoException) => emit({ id: c.id, ev: 'error', error: e.message, code: e.code ?? null }));
  });
  rl.on('close', () => process.exit(0));                 // the lab closed our stdin: nothing more to do
}

main().catch(e => fail(String(e?.message ?? e)));
