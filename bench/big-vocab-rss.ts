// The load transient of an 8B-shaped vocabulary matrix (128256 × 4096) on a volunteer: its shard blob holds
// it in F32 (2.1 GB) whatever the checkpoint's dtype; the stage keeps it as bf16 (1.05 GB) when every value is
// bf16-exact. Each way is measured in its own child process as VmHWM − VmRSS before the load (peak RSS the
// load added) and what stays after:
//   whole:  decodeShardFile (every tensor read into its own buffer, the node's load path before 2026-12-02)
//           then VocabMatrix.create — float32 matrix and its bf16 form coexist
//   stream: openShardFile + VocabMatrix.fromReader (node/assignment.ts now) — slices of 16 MiB into the bf16 form
// The child also logs its longest event-loop stall (a 10 ms interval, main-thread CPU time).
//
//   node bench/big-vocab-rss.ts [--dtype=bf16|f32]     (prints one JSON object on its last stdout line)
import { readFileSync, existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureBigModelDir, LLAMA_8B } from './big-run.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { decodeShardFile, openShardFile, writeShardFile } from '../engine/formats/shard.ts';
import { VocabMatrix } from '../engine/model/vocab-matrix.ts';
import { NODE, runJsonScript } from './procs.ts';

const MiB = 2 ** 20;
const status = (k: string): number => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024;

async function child(mode: string, file: string): Promise<void> {
  const name = 'model.embed_tokens.weight', V = LLAMA_8B.vocab, C = LLAMA_8B.hidden;
  let maxStall = 0, maxCpu = 0, last = performance.now(), lastCpu = process.threadCpuUsage();
  const iv = setInterval(() => {
    const now = performance.now(), c = process.threadCpuUsage();
    maxStall = Math.max(maxStall, now - last - 10);
    maxCpu = Math.max(maxCpu, (c.user - lastCpu.user + c.system - lastCpu.system) / 1000);
    last = now; lastCpu = c;
  }, 10);
  const before = status('VmRSS');
  const t0 = performance.now();
  let m: VocabMatrix;
  if (mode === 'whole') {
    const t = await decodeShardFile(file, 'embed shard');
    m = await VocabMatrix.create(t.float.get(name)!.data, V, C);
    t.float.clear();
  } else {
    const o = await openShardFile(file, 'embed shard', 64 * MiB);
    const r = o.lazy.get(name)!;
    m = await VocabMatrix.fromReader((s, out) => r.read(s, out), V, C);
    await o.close();
  }
  const ms = performance.now() - t0;
  clearInterval(iv);
  globalThis.gc?.();
  await new Promise((r) => setTimeout(r, 200));
  console.log(JSON.stringify({
    mode, stored_as_bf16: m.storedAsBf16, held_mib: Math.round(m.bytes / MiB), load_s: Number((ms / 1000).toFixed(1)),
    peak_added_mib: Math.round((status('VmHWM') - before) / MiB), kept_mib: Math.round((status('VmRSS') - before) / MiB),
    max_stall_ms: Math.round(maxStall), max_tick_cpu_ms: Math.round(maxCpu),
  }));
}

if (import.meta.main) {
  const c = process.argv.indexOf('--child');
  if (c > 0) await child(process.argv[c + 1]!, process.argv[c + 2]!);
  else {
    const dtype = (process.argv.find((a) => a.startsWith('--dtype='))?.slice(8) ?? 'bf16') === 'f32' ? 'F32' : 'BF16';
    const base = path.join(os.tmpdir(), 'swarmtune-bench-big');
    const dir = await ensureBigModelDir(path.join(base, `model-${dtype.toLowerCase()}-2`), dtype, 2);
    const file = path.join(base, `embed-shard-${dtype.toLowerCase()}.safetensors`);
    if (!existsSync(file)) {
      // the embed shard as the coordinator publishes it (F32, engine/formats/shard.ts)
      const md = await openModelDir(dir);
      try {
        const data = await md.weights.getFloat('model.embed_tokens.weight');
        await writeShardFile({ nf4: new Map(), float: new Map([['model.embed_tokens.weight', { shape: [LLAMA_8B.vocab, LLAMA_8B.hidden], data }]]) }, file);
      } finally { await md.close(); }
    }
    const runs = [];
    for (const mode of ['whole', 'stream']) runs.push(await runJsonScript(NODE, ['--expose-gc', import.meta.filename, '--child', mode, file], `vocab load (${mode})`, 1_200_000));
    console.log(JSON.stringify({ big_vocab_rss: { dtype, runs, loadavg: os.loadavg().map((x) => Number(x.toFixed(2))) } }));
    if (process.argv.includes('--rm')) await rm(file, { force: true });
  }
}
