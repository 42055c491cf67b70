// An 8B-shaped run: Llama-3.1-8B's layer shapes (hidden 4096, 32/8 heads, head_dim 128, intermediate 14336,
// vocab 128256, untied head) with 2 layers and random weights, written as an HF dir in bf16 or f32, through
// `swarmtune train` and through a 2-stage swarm (`swarmtune launch` + 2 `swarmtune join`, real processes on
// 127.0.0.1, --wire-dtype f32) with 1×2048-token micro-batches. Prints one JSON object on its last stdout line.
//
//   node bench/big-run.ts [--dtype=bf16|f32|both] [--steps=2] [--seq=2048] [--layers=2] [--no-train] [--no-swarm] [--profile]
//
// Figures per dtype: tokens/s of both; the losses of both (the swarm with f32 wire equals `train` within
// float tolerance); heartbeat answers per volunteer as the coordinator saw them (DEBUG=swarmtune:coordinator:peers:
// the longest heartbeat request, the longest gap between two answered heartbeats, over the whole run from
// `training` to `finished`, apply and state transfers included); each volunteer's RSS (polled every 200 ms
// from /proc) against the planner's bytes for its stage (coordinator/spec.ts stageMemoryFn: what `launch`
// admits peers by), as peak RSS − the RSS when it reported its assignment. Needs ~3 GB (bf16) or ~6 GB (f32) of disk
// for the model dir (cached under os.tmpdir()/swarmtune-bench-big) and about 12 GB of RAM (f32).
import { open, mkdir, readFile, writeFile, rm, mkdtemp, readdir, lstat } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { layoutSafetensors } from '../engine/formats/safetensors/write.ts';
import type { TensorSpec } from '../engine/formats/safetensors/write.ts';
import { encodeFromFloat32 } from '../engine/formats/safetensors/convert.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { TINY_TEXT_FILES } from '../engine/tiny/index.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { stageMemoryFn } from '../coordinator/spec.ts';
import { evenRanges } from '../coordinator/planner.ts';
import { CLI, NODE, ROOT, startCli, startProc, waitEvent, kill } from './procs.ts';
import { blame } from './loop-blame.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import type { Proc } from './procs.ts';

export const LLAMA_8B = { hidden: 4096, heads: 32, kvHeads: 8, headDim: 128, intermediate: 14336, vocab: 128256 } as const;

export class BigRunUsageError extends Error {
  override name = 'BigRunUsageError';
}

const MiB = 2 ** 20;
const median = (xs: number[]): number => { const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length === 0 ? NaN : v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };

/** Writes (once per dir and settings) an HF dir with the 8B layer shapes, `layers` layers and random
 *  weights in `dtype`, streamed in chunks (never a whole 2 GB tensor in memory). */
export async function ensureBigModelDir(dir: string, dtype: 'BF16' | 'F32', layers: number): Promise<string> {
  const m = LLAMA_8B;
  const stamp = path.join(dir, '.big-model');
  const key = JSON.stringify({ ...m, layers, dtype, v: 1 });
  if (existsSync(stamp) && (await readFile(stamp, 'utf8')) === key) return dir;
  await mkdir(dir, { recursive: true });
  for (const name of TINY_TEXT_FILES) {
    const text = await readFile(path.join(TINY_DATA_DIR, name), 'utf8');
    if (name !== 'config.json') { await writeFile(path.join(dir, name), text); continue; }
    const cfg = JSON.parse(text) as Record<string, unknown>;
    Object.assign(cfg, {
      hidden_size: m.hidden, intermediate_size: m.intermediate, num_hidden_layers: layers, num_attention_heads: m.heads,
      num_key_value_heads: m.kvHeads, head_dim: m.headDim, vocab_size: m.vocab, max_position_embeddings: 8192,
      tie_word_embeddings: false, torch_dtype: dtype === 'BF16' ? 'bfloat16' : 'float32', rope_theta: 500000,
    });
    await writeFile(path.join(dir, name), JSON.stringify(cfg, null, 2));
  }
  const C = m.hidden, I = m.intermediate, V = m.vocab, q = m.heads * m.headDim, kv = m.kvHeads * m.headDim;
  const specs: Array<TensorSpec & { std: number | null }> = [{ name: 'model.embed_tokens.weight', dtype, shape: [V, C], std: 0.02 }];
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`;
    specs.push(
      { name: `${p}.input_layernorm.weight`, dtype, shape: [C], std: null },
      { name: `${p}.self_attn.q_proj.weight`, dtype, shape: [q, C], std: 0.02 },
      { name: `${p}.self_attn.k_proj.weight`, dtype, shape: [kv, C], std: 0.02 },
      { name: `${p}.self_attn.v_proj.weight`, dtype, shape: [kv, C], std: 0.02 },
      { name: `${p}.self_attn.o_proj.weight`, dtype, shape: [C, q], std: 0.02 },
      { name: `${p}.post_attention_layernorm.weight`, dtype, shape: [C], std: null },
      { name: `${p}.mlp.gate_proj.weight`, dtype, shape: [I, C], std: 0.02 },
      { name: `${p}.mlp.up_proj.weight`, dtype, shape: [I, C], std: 0.02 },
      { name: `${p}.mlp.down_proj.weight`, dtype, shape: [C, I], std: 0.02 },
    );
  }
  specs.push({ name: 'model.norm.weight', dtype, shape: [C], std: null }, { name: 'lm_head.weight', dtype, shape: [V, C], std: 1 / Math.sqrt(C) });
  const { header, order } = layoutSafetensors(specs, { format: 'pt' });
  const file = path.join(dir, 'model.safetensors');
  const fh = await open(file, 'w');
  try {
    await fh.write(header, 0, header.length, 0);
    const CHUNK = 8 * MiB;                                  // elements per write
    for (const t of order) {
      const spec = specs.find((s) => s.name === t.name)!;
      const n = t.shape.reduce((a, b) => a * b, 1);
      let at = header.length + t.dataOffsets[0];
      for (let off = 0, k = 0; off < n; off += CHUNK, k++) {
        const len = Math.min(CHUNK, n - off);
        const vals = spec.std === null ? new Float32Array(len).fill(1) : uniform(len, spec.std, hash(t.name) ^ Math.imul(k + 1, 2654435761));
        const bytes = encodeFromFloat32(dtype, vals);
        await fh.write(bytes, 0, bytes.length, at);
        at += bytes.length;
      }
    }
  } finally {
    await fh.close();
  }
  await writeFile(stamp, key);
  return dir;
}

/** n values, uniform with mean 0 and standard deviation std (xorshift32: a 3 GB dir in seconds, not minutes;
 *  the shape of the distribution does not matter for a throughput and memory run). */
function uniform(n: number, std: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  const scale = std * Math.sqrt(3) / 2 ** 31;
  let x = (seed >>> 0) || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    out[i] = (x | 0) * scale;
  }
  return out;
}

function hash(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619) >>> 0;
  return h;
}

/** Records long enough for max_seq_length 2048 of the tiny tokenizer. */
async function writeData(file: string, n: number): Promise<string> {
  const syll = ['ka', 'lo', 'mi', 'ren', 'sa', 'tor', 'vel', 'quin', 'dra', 'sol', 'mer', 'ys', 'the', 'and', 'of', 'river', 'sea', 'glass'];
  let s = 99;
  const next = (): number => { s = (s * 1103515245 + 12345) >>> 0; return s >>> 8; };
  const lines: string[] = [];
  for (let r = 0; r < n; r++) {
    const words: string[] = [];
    for (let w = 0; w < 3000; w++) {
      let word = '';
      for (let k = 0, m = 1 + (next() % 3); k < m; k++) word += syll[next() % syll.length];
      words.push(word);
    }
    lines.push(JSON.stringify({ text: words.join(' ') + '.' }));
  }
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, lines.join('\n') + '\n');
  return file;
}

function flags(modelDir: string, dataFile: string, steps: number, seq: number): string[] {
  return ['--model', modelDir, '--data', dataFile, '--max-steps', String(steps), '--per-device-train-batch-size', '1',
    '--gradient-accumulation-steps', '1', '--max-seq-length', String(seq), '--lora-r', '16', '--lora-alpha', '16',
    '--target-modules', 'all-linear', '--lora-dropout', '0', '--no-shuffle', '--learning-rate', '1e-4', '--seed', '3', '--json'];
}

function rssBytes(pid: number): number | null {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : null;
  } catch { return null; }
}

/** The coordinator's heartbeat lines: `<ISO> swarmtune:coordinator:peers heartbeat -> <peer> : <outcome> (<ms> ms)`. */
export function heartbeatFigures(lines: readonly string[], fromMs: number, toMs: number): Record<string, { answered: number; failed: number; max_request_ms: number; max_gap_ms: number }> {
  const re = /^(\S+) swarmtune:coordinator\S* heartbeat -> (\S+) [^:]*: (.*) \((\d+) ms\)$/;
  const per = new Map<string, { ends: number[]; ms: number[]; failed: number }>();
  for (const line of lines) {
    const m = re.exec(line);
    if (m === null) continue;
    const end = Date.parse(m[1]!);
    if (end < fromMs || end > toMs) continue;
    const p = per.get(m[2]!) ?? per.set(m[2]!, { ends: [], ms: [], failed: 0 }).get(m[2]!)!;
    if (m[3] === 'ok') { p.ends.push(end); p.ms.push(Number(m[4])); } else p.failed++;
  }
  const out: Record<string, { answered: number; failed: number; max_request_ms: number; max_gap_ms: number }> = {};
  for (const [peer, p] of per) {
    let gap = 0;
    for (let i = 1; i < p.ends.length; i++) gap = Math.max(gap, p.ends[i]! - p.ends[i - 1]!);
    out[peer.slice(-8)] = { answered: p.ends.length, failed: p.failed, max_request_ms: Math.max(0, ...p.ms), max_gap_ms: gap };
  }
  return out;
}

/** The largest |swarm − train| over the adapters both runs wrote (adapter_model.safetensors at the top of
 *  each output dir), and the largest |train| for scale; null when either is missing. */
async function adapterDiff(a: string, b: string): Promise<{ tensors: number; max_abs_diff: number; max_abs: number } | null> {
  const fa = path.join(a, 'adapter_model.safetensors'), fb = path.join(b, 'adapter_model.safetensors');
  if (!existsSync(fa) || !existsSync(fb)) return null;
  const [x, y] = [await SafetensorsFile.open(fa), await SafetensorsFile.open(fb)];
  try {
    let d = 0, m = 0;
    const names = x.names();
    if (names.length !== y.names().length) throw new Error(`adapters: ${names.length} tensors vs ${y.names().length}`);
    for (const n of names) {
      const [u, v] = [await x.readFloat32(n), await y.readFloat32(n)];
      if (u.length !== v.length) throw new Error(`adapters: ${n} has ${u.length} vs ${v.length} values`);
      for (let i = 0; i < u.length; i++) { d = Math.max(d, Math.abs(u[i]! - v[i]!)); m = Math.max(m, Math.abs(v[i]!)); }
    }
    return { tensors: names.length, max_abs_diff: Number(d.toExponential(2)), max_abs: Number(m.toExponential(2)) };
  } finally {
    await x.close();
    await y.close();
  }
}

/** Bytes of the files under dir (0 when it is missing). */
async function duBytes(dir: string): Promise<number> {
  let n = 0;
  let entries;
  try { entries = await readdir(dir, { withFileTypes: true }); } catch { return 0; }
  for (const e of entries) {
    const f = path.join(dir, e.name);
    if (e.isDirectory()) n += await duBytes(f);
    else if (e.isFile()) n += (await lstat(f)).size;
  }
  return n;
}

async function finish(p: Proc, what: string, timeoutMs: number): Promise<void> {
  const t = setTimeout(() => kill(p), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  if (code !== 0) throw new Error(`${what} exited ${code}: ${p.stderr.join('').slice(-2000)}`);
}

/** A process's event-loop stalls from its loop log (bench/loop-watch.ts): the longest over the whole run and
 *  within [fromMs, toMs], how many passed 500 ms, and (given its --cpu-prof profile) what ran in those. */
export function loopFigures(logText: string, fromMs: number, toMs: number, profile: string | null): Record<string, unknown> {
  const blocks = logText.split('\n').map((l) => /^block (\d+) (\d+) (\d+) (\d+)$/.exec(l)).filter((m) => m !== null).map((m) => ({ endMs: Number(m![2]), ms: Number(m![3]), cpu: Number(m![4]) }));
  const inRun = blocks.filter((b) => b.endMs >= fromMs && b.endMs - b.ms <= toMs);
  const max = /^max (\d+)/m.exec(logText);
  // a stall's main-thread CPU time: what the process itself held the loop for (the rest is waiting for a core)
  const out: Record<string, unknown> = {
    max_stall_ms: max ? Number(max[1]) : Math.max(0, ...blocks.map((b) => b.ms)),
    max_stall_cpu_ms: Math.max(0, ...blocks.map((b) => b.cpu)),
    max_stall_ms_training: Math.max(0, ...inRun.map((b) => b.ms)),
    max_stall_cpu_ms_training: Math.max(0, ...inRun.map((b) => b.cpu)),
    stalls_over_500ms: blocks.filter((b) => b.ms > 500).length,
    stalls_over_500ms_training: inRun.filter((b) => b.ms > 500).length,
    cpu_stalls_over_500ms_training: inRun.filter((b) => b.cpu > 500).length,
  };
  if (profile !== null && existsSync(profile)) {
    out.blame_over_500ms = blame(logText, JSON.parse(readFileSync(profile, 'utf8')), 500).map((b) => `${b.ms} ms: ${b.top.map(([k, p]) => `${p}% ${k}`).join(' | ')}`);
  }
  return out;
}

export async function bigRun(o: { dtype: 'BF16' | 'F32'; steps: number; seq: number; layers: number; train: boolean; swarm?: boolean; profile?: boolean; log: (s: string) => void }): Promise<Record<string, unknown>> {
  const base = path.join(os.tmpdir(), 'swarmtune-bench-big');
  o.log(`big: model dir (${o.dtype}, ${o.layers} layers of Llama-3.1-8B shape) in ${base}`);
  const t0 = performance.now();
  const modelDir = await ensureBigModelDir(path.join(base, `model-${o.dtype.toLowerCase()}-${o.layers}`), o.dtype, o.layers);
  const writeS = (performance.now() - t0) / 1000;
  const dataFile = await writeData(path.join(base, 'long.jsonl'), 8);
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-big-run-'));
  const f = flags(modelDir, dataFile, o.steps, o.seq);
  const stepsOf = (p: Proc) => p.events.filter((e) => e.event === 'step').map((e) => ({ loss: Number(e.loss), tokens_per_s: Number(e.tokens_per_s) }));
  try {
    let train: Record<string, unknown> | null = null;
    if (o.train) {
      o.log('big: swarmtune train');
      const tr = startCli(['train', ...f, '--output-dir', path.join(tmp, 'train'), '--device', 'cpu']);
      let peak = 0;
      const poll = setInterval(() => { peak = Math.max(peak, rssBytes(tr.child.pid!) ?? 0); }, 200);
      await finish(tr, 'swarmtune train', 3_600_000).finally(() => clearInterval(poll));
      train = { steps: stepsOf(tr), peak_rss_mib: Math.round(peak / MiB) };
    }
    if (o.swarm === false) return { dtype: o.dtype, layers: o.layers, seq_len: o.seq, steps: o.steps, model_dir_write_s: Number(writeS.toFixed(1)), train };
    o.log('big: swarmtune launch + 2 x swarmtune join (127.0.0.1, --wire-dtype f32)');
    // every process logs its event-loop stalls (bench/loop-watch.ts); --profile adds a CPU profile each,
    // kept (with the logs) under <base>/logs-<dtype> for bench/loop-blame.ts
    const logs = path.join(base, `logs-${o.dtype.toLowerCase()}`);
    await rm(logs, { recursive: true, force: true });
    await mkdir(logs, { recursive: true });
    const watched = (name: string): { env: NodeJS.ProcessEnv; node: string[] } => ({
      env: { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --import=${path.join(ROOT, 'bench/loop-watch.ts')}`.trim(), SWARMTUNE_LOOP_LOG: path.join(logs, `${name}.loop.log`) },
      node: o.profile === true ? ['--cpu-prof', '--cpu-prof-interval', '2000', '--cpu-prof-dir', logs, '--cpu-prof-name', `${name}.cpuprofile`] : [],
    });
    const cw = watched('coordinator');
    const env = { ...cw.env, DEBUG: 'swarmtune:coordinator:peers' };
    const coord = startProc(NODE, [...cw.node, CLI, 'launch', ...f, '--output-dir', path.join(tmp, 'swarm'), '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', '2',
      '--pipeline-stages', '2', '--wire-dtype', 'f32', '--exit-on-finish'], { env });
    const listening = await waitEvent(coord, (e) => e.event === 'listening', 'listening', 1_800_000);
    const vols = [0, 1].map((i) => startProc(NODE, [...watched(`v${i}`).node, CLI, 'join', String(listening.multiaddr), '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, `v${i}`)], { env: watched(`v${i}`).env }));
    // baseline: the RSS when the volunteer reports its assignment (before its weights arrive and load)
    const rss = vols.map((v) => ({ first: 0, peak: 0, v }));
    let coordPeak = 0;
    const poll = setInterval(() => {
      for (const r of rss) {
        const b = rssBytes(r.v.child.pid!);
        if (b === null) continue;
        r.peak = Math.max(r.peak, b);
        if (r.first === 0 && r.v.events.some((e) => e.event === 'assigned')) r.first = b;
      }
      coordPeak = Math.max(coordPeak, rssBytes(coord.child.pid!) ?? 0);
    }, 200);
    try {
      const training = await waitEvent(coord, (e) => e.event === 'training', 'training', 3_600_000);
      const trainingAt = Date.now() - (performance.now() - training.tMs);
      const finished = await waitEvent(coord, (e) => e.event === 'finished', 'finished', 3_600_000);
      const finishedAt = Date.now() - (performance.now() - finished.tMs);
      await finish(coord, 'swarmtune launch', 120_000);
      for (const [i, v] of vols.entries()) await finish(v, `volunteer ${i}`, 60_000);
      const lines = coord.stderr.join('').split('\n');
      const cfg = parseLlamaConfig(JSON.parse(await readFile(path.join(modelDir, 'config.json'), 'utf8')));
      const tc = resolveTrainConfig({ flags: { max_steps: o.steps, per_device_train_batch_size: 1, gradient_accumulation_steps: 1, max_seq_length: o.seq, lora_r: 16, lora_alpha: 16, target_modules: 'all-linear', lora_dropout: 0 } });
      // what launch admits by: the vocab matrices at 2 bytes per value from a BF16 dir (held as bf16)
      const need = stageMemoryFn(cfg, tc, loraConfigOf(tc), tc.bnb_4bit_use_double_quant, o.dtype === 'BF16' ? 2 : 4);
      const plan = evenRanges(cfg.numHiddenLayers, 2).map((s) => need(s.layerStart, s.layerEnd));
      // which volunteer got which stage: the joins' assignment events name it
      const stageOf = vols.map((v) => Number(v.events.find((e) => e.event === 'assigned')?.stage ?? NaN));
      const peerOf = vols.map((v) => String(v.events.find((e) => e.event === 'joining')?.peer_id ?? '').slice(-8));
      const beats = heartbeatFigures(lines, trainingAt, finishedAt);
      const loop = (name: string): Record<string, unknown> => {
        const f = path.join(logs, `${name}.loop.log`);
        return loopFigures(existsSync(f) ? readFileSync(f, 'utf8') : '', trainingAt, finishedAt, o.profile === true ? path.join(logs, `${name}.cpuprofile`) : null);
      };
      const swarm = stepsOf(coord);
      const trainSteps = (train?.steps ?? []) as Array<{ loss: number }>;
      return {
        dtype: o.dtype, layers: o.layers, seq_len: o.seq, steps: o.steps, model_dir_write_s: Number(writeS.toFixed(1)),
        train, swarm: { steps: swarm, tokens_per_s_median: Number(median((swarm.length > 1 ? swarm.slice(1) : swarm).map((s) => s.tokens_per_s)).toFixed(1)) },
        loss_abs_diff: trainSteps.length === swarm.length ? swarm.map((s, i) => Number(Math.abs(s.loss - trainSteps[i]!.loss).toExponential(2))) : null,
        adapter_vs_train: train === null ? null : await adapterDiff(path.join(tmp, 'swarm'), path.join(tmp, 'train')),
        heartbeats: beats,
        coordinator_loop: loop('coordinator'),
        volunteers: rss.map((r, i) => {
          const st = stageOf[i]!;
          const planned = Number.isInteger(st) ? plan[st]! : null;
          return {
            stage: Number.isInteger(st) ? st : null, peer: peerOf[i], heartbeats: beats[peerOf[i]!] ?? null, loop: loop(`v${i}`),
            rss_at_assignment_mib: Math.round(r.first / MiB), peak_rss_mib: Math.round(r.peak / MiB),
            plan_mib: planned === null ? null : Math.round(planned / MiB),
            rss_over_plan: planned === null ? null : Number(((r.peak - r.first) / planned).toFixed(3)),
          };
        }),
        plan_per_stage_mib: plan.map((b) => Math.round(b / MiB)),
        coordinator_peak_rss_mib: Math.round(coordPeak / MiB),
        disk_mib: {
          model_dir: Math.round((await duBytes(modelDir)) / MiB), volunteer_data_dirs: await Promise.all([0, 1].map(async (i) => Math.round((await duBytes(path.join(tmp, `v${i}`))) / MiB))),
          coordinator_output_dir: Math.round((await duBytes(path.join(tmp, 'swarm'))) / MiB),
        },
        machine: { ram_gib: Number((os.totalmem() / 2 ** 30).toFixed(1)), free_gib_at_end: Number((os.freemem() / 2 ** 30).toFixed(1)), cpus: os.cpus().length, loadavg: os.loadavg().map((x) => Number(x.toFixed(2))) },
      };
    } finally {
      clearInterval(poll);
      for (const v of vols) kill(v);
      kill(coord);
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const arg = (n: string): string | undefined => { const a = process.argv.find((x) => x.startsWith(`--${n}=`)); return a?.slice(n.length + 3); };
  try {
    const d = arg('dtype') ?? 'both';
    if (!['bf16', 'f32', 'both'].includes(d)) throw new BigRunUsageError(`--dtype: "${d}" is not bf16, f32 or both`);
    const steps = Number(arg('steps') ?? 2), seq = Number(arg('seq') ?? 2048), layers = Number(arg('layers') ?? 2);
    for (const [k, v] of [['steps', steps], ['seq', seq], ['layers', layers]] as const) if (!Number.isInteger(v) || v < 1) throw new BigRunUsageError(`--${k}: must be a positive integer`);
    const out: Record<string, unknown>[] = [];
    for (const dtype of d === 'both' ? ['BF16', 'F32'] as const : [d === 'bf16' ? 'BF16' as const : 'F32' as const]) {
      out.push(await bigRun({ dtype, steps, seq, layers, train: !process.argv.includes('--no-train'), swarm: !process.argv.includes('--no-swarm'), profile: process.argv.includes('--profile'), log: (s) => process.stderr.write(`[bench] ${s}\n`) }));
    }
    console.log(JSON.stringify({ big: { runs: out } }));
  } catch (e) {
    process.stderr.write(`${(e as Error).name}: ${(e as Error).message}\n`);
    process.exit(e instanceof BigRunUsageError ? 2 : 1);
  }
}
