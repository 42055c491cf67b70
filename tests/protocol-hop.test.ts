// Hop streams (protocol/hop.ts) between real libp2p nodes on 127.0.0.1: micro-batch activations far
// past the frame cap (128 MiB) and at the tensor element cap (2^25) go through in every codec, f32
// bit-exact, with the receiver's buffering bounded by the credit window; a stranger cannot feed a
// stage; a bad chunk is refused with the sender named; a sender killed mid-stream is a broken hop,
// not a bad tensor.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createSwarmNode, dialableAddrs, parseMultiaddr } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { chunkRows, HopInbox, openHop, sendHop } from '../protocol/hop.ts';
import type { HopKey, HopStats } from '../protocol/hop.ts';
import { HOP_CREDIT, HOP_FRAME_BYTES, INT8_BLOCK, MAX_FRAME_BYTES, MAX_TENSOR_ELEMENTS } from '../protocol/constants.ts';
import { OutputScreen } from '../protocol/screen.ts';
import { decodeFloat, encodeTensor, FLOAT_CODECS, isDeltaCodec } from '../protocol/tensor.ts';
import type { FloatCodec } from '../protocol/tensor.ts';

const nodes: SwarmNode[] = [];
const dirs: string[] = [];
after(async () => {
  for (const n of nodes) await n.stop();
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function node(): Promise<SwarmNode> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-hop-'));
  dirs.push(d);
  const n = await createSwarmNode({ dataDir: d });
  nodes.push(n);
  return n;
}

const addrsOf = (n: SwarmNode) => dialableAddrs(n).map(parseMultiaddr);

/** Deterministic activations with a wide dynamic range (exercises bf16 rounding and int8 blocks). */
function activations(n: number, seed: number): Float32Array {
  const x = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    x[i] = ((s / 2 ** 32) - 0.5) * (1 + (i % 977) / 10);
  }
  return x;
}

/** The codec's documented error bound (docs/protocol.md "Tensors"), checked independently of the codec code. */
function assertWithinCodec(codec: FloatCodec, sent: Float32Array, got: Float32Array): void {
  assert.equal(got.length, sent.length);
  if (codec === 'f32') {
    const a = new Uint32Array(sent.buffer, sent.byteOffset, sent.length), b = new Uint32Array(got.buffer, got.byteOffset, got.length);
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) assert.fail(`f32 element ${i}: ${sent[i]} sent, ${got[i]} arrived`);
    return;
  }
  for (let lo = 0; lo < sent.length; lo += INT8_BLOCK) {
    const hi = Math.min(sent.length, lo + INT8_BLOCK);
    let m = 0;
    for (let i = lo; i < hi; i++) m = Math.max(m, Math.abs(sent[i]!));
    for (let i = lo; i < hi; i++) {
      const err = Math.abs(got[i]! - sent[i]!);
      // bf16: half an ulp of an 8-bit mantissa; int8: half a quantization step of the block, plus the
      // float32 rounding of the decoded value q·(absmax/127) (half an f32 ulp, 2^-24 relative)
      const bound: number = codec === 'bf16' ? 2 ** -8 * Math.abs(sent[i]!) : m / 254 + 2 ** -24 * Math.abs(got[i]!);
      if (err > bound) assert.fail(`${codec} element ${i}: |${got[i]} - ${sent[i]}| = ${err} > ${bound}`);
    }
  }
}

let attempt = 0;
const keyFor = (kind: 'act' | 'grad' = 'act'): HopKey => ({ runId: 'hop', step: 0, mb: 0, attempt: attempt++, kind });

test('4×2048 tokens at hidden 4096 go through a hop in every codec, 1×4096 at hidden 8192 in f32, int8 and lowrank8; f32 bit-exact, receiver buffering bounded', { timeout: 300_000 }, async () => {
  const a = await node(), b = await node();
  const seen: HopStats[] = [];
  const inbox = new HopInbox({ onReceived: (s) => seen.push(s) });
  await inbox.register(b);
  const signal = new AbortController().signal;
  for (const [T, C] of [[4 * 2048, 4096], [1 * 4096, 8192]] as const) {
    const n = T * C;
    // at the element cap, and in f32 past the frame cap: no single frame could carry it
    assert.ok(n >= MAX_TENSOR_ELEMENTS && n * 4 >= MAX_FRAME_BYTES);
    const data = activations(n, T + C);
    // the delta codecs (aq4, aq2) code cold here as int4/int2 per row; their hop path is tests/protocol-hop-delta.
    // At hidden 8192 a codec of each kind (exact, blockwise, low-rank): every codec's chunking is the same
    // code, and the others' 13 s of low-rank SVDs and reference encodes are the test's largest cost
    const codecs = FLOAT_CODECS.filter((c) => !isDeltaCodec(c) && (C === 4096 || c === 'f32' || c === 'int8' || c === 'lowrank8'));
    for (const codec of codecs) {
      const key = keyFor();
      const got = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C] }, { signal, timeoutMs: 240_000 });
      const t0 = performance.now();
      const sent = await sendHop(a, addrsOf(b), key, [T, C], data, { signal, timeoutMs: 240_000, codec, expectPeer: b.peerId.toString() });
      const r = await got;
      const s = seen.at(-1)!;
      console.log(`# [${T}, ${C}] ${codec}: ${(sent.bytes / 2 ** 20).toFixed(1)} MiB in ${s.chunks} chunks, ${((performance.now() - t0) / 1000).toFixed(2)} s; receiver buffered at most ${(s.maxBufferedBytes / 2 ** 20).toFixed(2)} MiB`);
      if (codec === 'f32' || codec === 'bf16' || codec === 'int8') assertWithinCodec(codec, data, r.data);
      else {
        // the newer codecs' error bounds are tested in protocol-codecs.test.ts; here the hop must
        // deliver exactly what the codec makes of each chunk of whole rows, encoded on its own
        const rows = chunkRows(C);
        for (let r0 = 0; r0 < T; r0 += rows) {
          const k = Math.min(rows, T - r0), part = data.subarray(r0 * C, (r0 + k) * C);
          const want = decodeFloat(encodeTensor(part, [k, C], codec), 'local', [k, C]);
          const have = r.data.subarray(r0 * C, (r0 + k) * C);
          for (let i = 0; i < want.length; i++) if (!Object.is(want[i], have[i])) assert.fail(`${codec} rows from ${r0}, element ${i}: ${have[i]} arrived, the codec gives ${want[i]}`);
        }
      }
      // the receiver never held more than the credit window of undecoded frames (+ the header)
      assert.ok(s.maxBufferedBytes <= HOP_CREDIT * HOP_FRAME_BYTES + 4096, `buffered ${s.maxBufferedBytes} bytes`);
      assert.ok(s.chunks >= 16, `${s.chunks} chunks`);
      let ss = 0;
      for (const x of r.data) ss += x * x;
      assert.ok(Math.abs(r.rms - Math.sqrt(ss / n)) <= 1e-9 * r.rms, 'rms of what arrived');
    }
  }
});

test('a stranger cannot feed a stage; a bad chunk is refused naming its sender; a sender killed mid-stream is a broken hop', { timeout: 120_000 }, async () => {
  const a = await node(), b = await node(), stranger = await node();
  const inbox = new HopInbox({ expectWaitMs: 500 });
  await inbox.register(b);
  const signal = new AbortController().signal;
  const T = 64, C = 128, data = activations(T * C, 1);
  const opts = (from: SwarmNode) => ({ signal, timeoutMs: 20_000, codec: 'f32' as const, expectPeer: b.peerId.toString(), log: undefined, from });

  // the route names a; the stranger's stream is refused and the expectation still waits for a
  let key = keyFor();
  const got = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C] }, { signal, timeoutMs: 20_000 });
  await assert.rejects(sendHop(stranger, addrsOf(b), key, [T, C], data, opts(stranger)), (e: Error) => e.name === 'HopError' && /expected from .* not from/.test(e.message));
  await sendHop(a, addrsOf(b), key, [T, C], data, opts(a));
  assert.deepEqual((await got).data, data);
  // a hop nobody expects is refused after the wait, never read
  await assert.rejects(sendHop(stranger, addrsOf(b), keyFor(), [T, C], data, opts(stranger)), (e: Error) => e.name === 'HopError' && /not expected here/.test(e.message));
  // an address that reaches another peer than the route names is refused by the sender
  await assert.rejects(sendHop(a, addrsOf(stranger), keyFor(), [T, C], data, opts(a)), (e: Error) => e.name === 'HopError' && /the address reached/.test(e.message));

  // a NaN chunk: the receiver's screen names the sender; the sender learns it was refused
  key = keyFor();
  const bad = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C] }, { signal, timeoutMs: 20_000 });
  const poison = (t: { bytes: Uint8Array }) => ({ ...t, bytes: new Uint8Array(new Float32Array(t.bytes.length / 4).fill(Number.NaN).buffer) });
  await Promise.all([
    assert.rejects(sendHop(a, addrsOf(b), key, [T, C], data, { ...opts(a), mutate: poison as never }), (e: Error) => e.name === 'HopError' && /refused/.test(e.message)),
    assert.rejects(bad, (e: Error) => e.name === 'BadOutputError' && /non-finite/.test(e.message) && e.message.includes(a.peerId.toString())),
  ]);
  // a wrong shape is the sender's fault too
  key = keyFor();
  const wrong = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C] }, { signal, timeoutMs: 20_000 });
  await Promise.all([
    assert.rejects(sendHop(a, addrsOf(b), key, [T / 2, C * 2], data, opts(a)), { name: 'HopError' }),
    assert.rejects(wrong, (e: Error) => e.name === 'BadOutputError' && /shape \[32,256\], expected \[64, 128\]/.test(e.message)),
  ]);
  // the RMS screen: after enough accepted ones, a tensor 100× larger is refused
  const screen = new OutputScreen({ screenFactor: 50, outputHistory: 64, outputHistoryMin: 2 });
  for (let i = 0; i < 3; i++) {
    key = keyFor();
    const ok = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C], judge: (r) => screen.judge('act:0', r, 'act') }, { signal, timeoutMs: 20_000 });
    await sendHop(a, addrsOf(b), key, [T, C], data, opts(a));
    screen.accept('act:0', (await ok).rms);
  }
  key = keyFor();
  const loud = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C], judge: (r) => screen.judge('act:0', r, 'act') }, { signal, timeoutMs: 20_000 });
  await Promise.all([
    assert.rejects(sendHop(a, addrsOf(b), key, [T, C], data.map((x) => x * 100), opts(a)), { name: 'HopError' }),
    assert.rejects(loud, (e: Error) => e.name === 'BadOutputError' && /over 50x the median/.test(e.message)),
  ]);

  // the sender gives up after a few chunks (its stream is reset, the connection lives on): a broken
  // hop, not a bad tensor, so nobody is accused of sending garbage
  const big = activations(8 * 2 ** 20, 2);
  key = keyFor();
  const reset = inbox.receive(key, { from: a.peerId.toString(), shape: [2 ** 13, 2 ** 10] }, { signal, timeoutMs: 20_000 });
  let sent = 0;
  const giving = sendHop(a, addrsOf(b), key, [2 ** 13, 2 ** 10], big, { ...opts(a), mutate: (t) => { if (++sent === 3) throw new Error('the sender gives up'); return t; } });
  await Promise.all([assert.rejects(giving, /the sender gives up/), assert.rejects(reset, (e: Error) => e.name === 'HopError' && e.message.includes(a.peerId.toString()))]);

  // the sender dies after a few chunks of a large tensor: the receiver sees a broken hop
  key = keyFor();
  const broken = inbox.receive(key, { from: a.peerId.toString(), shape: [2 ** 13, 2 ** 10] }, { signal, timeoutMs: 20_000 });
  let chunks = 0;
  const sending = sendHop(a, addrsOf(b), key, [2 ** 13, 2 ** 10], big, { ...opts(a), mutate: (t) => { if (++chunks === 3) void a.stop(); return t; } });
  await Promise.all([assert.rejects(sending), assert.rejects(broken, (e: Error) => e.name === 'HopError')]);
});

test('a hop opened before its tensor is ready: credited once the receiver expects it, the tensor follows on the same stream; a cancelled one is a broken hop; an unexpected one fails at send', { timeout: 60_000 }, async () => {
  const a = await node(), b = await node();
  const inbox = new HopInbox({ expectWaitMs: 2000 });
  await inbox.register(b);
  const signal = new AbortController().signal;
  const T = 64, C = 128, data = activations(T * C, 3);
  const opts = { signal, timeoutMs: 20_000, codec: 'f32' as const, expectPeer: b.peerId.toString() };
  // opened first: the stream waits for the expectation, and only then is it credited
  let key = keyFor();
  const h = openHop(a, addrsOf(b), key, [T, C], opts);
  let ready = false;
  void h.ready.then(() => { ready = true; });
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(ready, false, 'credited before the receiver expected the hop');
  const got = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C] }, { signal, timeoutMs: 20_000 });
  await h.ready;
  const sent = await h.send(data);
  assert.ok(sent.bytes > data.byteLength);
  assert.deepEqual((await got).data, data);
  await assert.rejects(h.send(data), /sent twice/);
  // the sender's own job failed: the receiver learns at once (a broken hop naming the sender), long
  // before its own deadline
  key = keyFor();
  const waiting = inbox.receive(key, { from: a.peerId.toString(), shape: [T, C] }, { signal, timeoutMs: 20_000 });
  const c = openHop(a, addrsOf(b), key, [T, C], opts);
  await c.ready;
  const t0 = performance.now();
  c.cancel(new Error('the forward failed'));
  await assert.rejects(waiting, (e: Error) => e.name === 'HopError' && e.message.includes(a.peerId.toString()));
  assert.ok(performance.now() - t0 < 5000);
  // nobody expects it: the opening is refused after the wait and send() says so (no unhandled rejection)
  const u = openHop(a, addrsOf(b), keyFor(), [T, C], opts);
  await new Promise((r) => setTimeout(r, 2500));
  await assert.rejects(u.send(data), (e: Error) => e.name === 'HopError' && /not expected here/.test(e.message));
});

test('a receive that nothing completes times out, and an abort cancels it', async () => {
  const inbox = new HopInbox();
  await assert.rejects(inbox.receive(keyFor(), { from: 'x', shape: [1, 1] }, { signal: new AbortController().signal, timeoutMs: 50 }), { name: 'TimeoutError' });
  const ac = new AbortController();
  const p = inbox.receive(keyFor(), { from: 'x', shape: [1, 1] }, { signal: ac.signal, timeoutMs: 10_000 });
  ac.abort(new Error('stop'));
  await assert.rejects(p, /stop/);
});
