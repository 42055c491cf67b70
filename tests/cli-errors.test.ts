// Every command's error path, as a user meets it: real `swarmtune` processes given bad input, a missing file,
// a refused or unreachable address; each must print exactly one line `swarmtune <cmd>: …` on stderr (no stack,
// no source excerpt), exit with the code of the table in docs/operations.md, and write nothing it was not
// asked to. Most cases fail before any network; two real coordinators cover the rest (a private run without
// peers, a public run with one volunteer whose progress lines and Ctrl-C are checked too).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { EXIT } from '../bin/errors.ts';
import { EXIT_REJECTED } from '../node/constants.ts';
import { spawnCli } from './swarm-procs.ts';
import type { CliProc } from './swarm-procs.ts';

let root = '';
let model = '';
let env: Record<string, string> = {};
const live: CliProc[] = [];

before(async () => {
  root = mkdtempSync(path.join(tmpdir(), 'swarmtune-cli-errors-'));
  model = await ensureTinyModel(path.join(root, 'tiny'));
  // `--model tiny` writes the embedded model into this cache, not the user's
  env = { SWARMTUNE_CACHE_DIR: path.join(root, 'cache'), SWARMTUNE_NO_CUDA: '1', DEBUG: '' };
  const w = (name: string, text: string) => { writeFileSync(path.join(root, name), text); return path.join(root, name); };
  w('good.jsonl', Array.from({ length: 24 }, (_, i) => JSON.stringify({ question: `What is ${i}?`, answer: `It is the number ${i}.` })).join('\n') + '\n');
  w('bad.jsonl', '{"question": "a",\n');
  w('schema.jsonl', '{"foo": "a"}\n');
  w('typo.json', '{"learning_rat": 0.1}');
  w('badval.json', '{"learning_rate": "abc"}');
  w('badjson.json', '{"learning_rate": ');
  cpSync(model, path.join(root, 'trunc'), { recursive: true });
  truncateSync(path.join(root, 'trunc', 'model.safetensors'), 100_000);
  cpSync(model, path.join(root, 'gpt2'), { recursive: true });
  const cfg = JSON.parse(readFileSync(path.join(model, 'config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(path.join(root, 'gpt2', 'config.json'), JSON.stringify({ ...cfg, model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] }));
});

after(() => {
  for (const p of live) if (p.child.exitCode === null && p.child.signalCode === null) { try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ } }
  if (root) rmSync(root, { recursive: true, force: true });
});

const f = (name: string) => path.join(root, name);

async function cli(args: string[], extraEnv: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  const p = spawnCli(args, { ...env, ...extraEnv });
  live.push(p);
  const t = setTimeout(() => { try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ } }, 120_000);
  const code = await p.exit;
  clearTimeout(t);
  return { code, stdout: p.lines.join('\n'), stderr: p.stderr.join('') };
}

/** The one-line contract: exactly one line, `swarmtune <cmd>: <message matching re>`, no stack, exit `code`. */
function oneLine(r: { code: number; stderr: string }, cmd: string, code: number, re: RegExp, what: string): void {
  const lines = r.stderr.split('\n').filter((l) => l !== '' && !l.startsWith('[swarmtune join]'));
  assert.equal(lines.length, 1, `${what}: expected one line on stderr, got:\n${r.stderr}`);
  assert.ok(lines[0]!.startsWith(`swarmtune ${cmd}: `), `${what}: ${lines[0]}`);
  assert.match(lines[0]!, re, what);
  assert.doesNotMatch(r.stderr, /^\s+at |Node\.js v\d|triggerUncaughtException|faultTolerance/m, `${what}: a stack or internal advice leaked:\n${r.stderr}`);
  assert.equal(r.code, code, `${what}: exit ${r.code}, expected ${code}; stderr: ${r.stderr}`);
}

test('launch refuses bad input in one line with the table\'s code and leaves no output or data dir', async () => {
  const cases: [string, string[], number, RegExp][] = [
    ['malformed JSONL', ['--model', model, '--data', f('bad.jsonl')], EXIT.usage, /bad\.jsonl:1: invalid JSON/],
    ['unknown schema', ['--model', model, '--data', f('schema.jsonl')], EXIT.usage, /schema\.jsonl:1: no known fields.*got keys \["foo"\]/],
    ['missing data', ['--model', model, '--data', f('nothing.jsonl')], EXIT.notFound, /--data \S*nothing\.jsonl: no such file/],
    ['missing model dir', ['--model', f('no-model'), '--data', f('good.jsonl')], EXIT.notFound, /--model \S*no-model: no such directory/],
    ['truncated safetensors', ['--model', f('trunc'), '--data', f('good.jsonl')], EXIT.usage, /model\.safetensors: tensors cover \d+ bytes of data but the file holds \d+ bytes/],
    ['unsupported architecture', ['--model', f('gpt2'), '--data', f('good.jsonl')], EXIT.usage, /"model_type" "gpt2" is not supported \(expected one of llama/],
    ['run.json typo', ['--model', model, '--data', f('good.jsonl'), '--config', f('typo.json')], EXIT.usage, /config \S*typo\.json: unknown key "learning_rat" \(did you mean learning_rate\?\)/],
    ['run.json bad value', ['--model', model, '--data', f('good.jsonl'), '--config', f('badval.json')], EXIT.usage, /config \S*badval\.json: learning_rate: expected a number, got "abc"/],
    ['run.json bad JSON', ['--model', model, '--data', f('good.jsonl'), '--config', f('badjson.json')], EXIT.usage, /config \S*badjson\.json: invalid JSON/],
    ['--learning-rate abc', ['--model', model, '--data', f('good.jsonl'), '--learning-rate', 'abc'], EXIT.usage, /^swarmtune launch: --learning-rate: expected a number, got "abc"$/],
    ['missing --model', ['--data', f('good.jsonl')], EXIT.usage, /--model is required/],
    ['missing --data', ['--model', model], EXIT.usage, /--data is required/],
    ['unknown flag (commander)', ['--model', model, '--data', f('good.jsonl'), '--lerning-rate', '1'], EXIT.usage, /unknown option '--lerning-rate' \(did you mean --learning-rate\?\)$/],
    ['missing eval data', ['--model', model, '--data', f('good.jsonl'), '--eval-strategy', 'steps', '--eval-data', f('nothing.jsonl')], EXIT.notFound, /--eval-data \S*nothing\.jsonl: no such file/],
    ['malformed eval JSONL', ['--model', model, '--data', f('good.jsonl'), '--eval-strategy', 'epoch', '--eval-data', f('bad.jsonl')], EXIT.usage, /bad\.jsonl:1: invalid JSON/],
    ['eval without eval data', ['--model', model, '--data', f('good.jsonl'), '--eval-strategy', 'steps'], EXIT.usage, /eval_strategy steps needs eval_data \(--eval-data FILE\)/],
    ['best model, strategies differ', ['--model', model, '--data', f('good.jsonl'), '--eval-strategy', 'epoch', '--eval-data', f('good.jsonl'), '--load-best-model-at-end'], EXIT.usage, /requires the save and eval strategy to match/],
    ['--report-to wandb', ['--model', model, '--data', f('good.jsonl'), '--report-to', 'wandb'], EXIT.usage, /--report-to: "wandb" is not supported/],
    // `tiny` resolves as in train: the error is then about the data, not the model
    ['--model tiny', ['--model', 'tiny', '--data', f('bad.jsonl')], EXIT.usage, /bad\.jsonl:1: invalid JSON/],
  ];
  for (const [what, args, code, re] of cases) {
    const out = f(`out-${what.replace(/\W+/g, '-')}`);
    const r = await cli(['launch', ...args, '--listen', '/ip4/127.0.0.1/tcp/0', '--output-dir', out]);
    oneLine(r, 'launch', code, re, what);
    assert.equal(existsSync(out), false, `${what}: a refused launch left ${out}`);
  }
});

test('train, eval, plan, quantize, join and pull take the same path; --model tiny works for every model command', async () => {
  oneLine(await cli(['train', '--model', model, '--data', f('bad.jsonl'), '--output-dir', f('t-out')]), 'train', EXIT.usage, /bad\.jsonl:1: invalid JSON/, 'train bad JSONL');
  assert.equal(existsSync(f('t-out')), false);
  oneLine(await cli(['train', '--model', model, '--data', f('good.jsonl'), '--max-steps', 'x']), 'train', EXIT.usage, /--max-steps: expected a number, got "x"/, 'train bad flag');
  oneLine(await cli(['train', '--model', model, '--data', f('good.jsonl'), '--eval-strategy', 'steps', '--eval-data', f('nothing.jsonl'), '--output-dir', f('t-out')]), 'train', EXIT.notFound, /--eval-data \S*nothing\.jsonl: no such file/, 'train missing eval data');
  assert.equal(existsSync(f('t-out')), false);
  oneLine(await cli(['eval', '--model', 'tiny', '--data', f('schema.jsonl'), '--device', 'ref']), 'eval', EXIT.usage, /no known fields/, 'eval --model tiny, bad data');
  oneLine(await cli(['eval', '--data', f('good.jsonl')]), 'eval', EXIT.usage, /required option '--model <dir>' not specified/, 'eval without --model');
  oneLine(await cli(['plan', '--model', f('nope')]), 'plan', EXIT.notFound, /--model \S*nope: no such directory/, 'plan missing model');
  oneLine(await cli(['join', '/ip4/127.0.0.1/tcp/9', '--max-memory', 'lots']), 'join', EXIT.usage, /--max-memory: cannot parse "lots" as a size/, 'join --max-memory lots');
  oneLine(await cli(['join', '/ip4/127.0.0.1/tcp/9', '--relay']), 'join', EXIT.usage, /--relay need --nat/, 'join --relay without --nat');
  oneLine(await cli(['pull', 'garbage', '--out', f('p0')]), 'pull', EXIT.usage, /not a multiaddr: "garbage"/, 'pull bad address');
  oneLine(await cli(['generate', '--model', f('gpt2'), '--prompt', 'hi']), 'generate', EXIT.usage, /"model_type" "gpt2" is not supported/, 'generate unsupported');
  const plan = await cli(['plan', '--model', 'tiny', '--json']);
  assert.equal(plan.code, 0, plan.stderr);
  assert.ok(JSON.parse(plan.stdout).trainable_line.includes('trainable params'), plan.stdout);
  const q = await cli(['quantize', '--model', 'tiny', '--out', f('q')]);
  assert.equal(q.code, 0, q.stderr);
  assert.ok(existsSync(path.join(f('q'), 'config.json')));
  // DEBUG set: the same line, then the stack
  const dbg = await cli(['plan', '--model', f('gpt2')], { DEBUG: 'swarmtune:none' });
  assert.equal(dbg.code, EXIT.usage);
  assert.match(dbg.stderr, /^swarmtune plan: .*"gpt2" is not supported.*\n[\s\S]*\n\s+at /);
  assert.equal(EXIT.refused, EXIT_REJECTED, 'the volunteer\'s own refused exit is the table\'s');
});

test('addresses: unreachable, not swarmtune, in use; a private run without its token', async () => {
  // nothing listens on a port we just closed
  const closed = await new Promise<number>((resolve) => { const s = net.createServer().listen(0, '127.0.0.1', () => { const p = (s.address() as net.AddressInfo).port; s.close(() => resolve(p)); }); });
  const nowhere = `/ip4/127.0.0.1/tcp/${closed}`;
  oneLine(await cli(['status', nowhere]), 'status', EXIT.network, /cannot reach \/ip4\/127\.0\.0\.1\/tcp\/\d+: connection refused/, 'status unreachable');
  oneLine(await cli(['pull', nowhere, '--out', f('p1')]), 'pull', EXIT.network, /cannot reach .*connection refused/, 'pull unreachable');
  assert.equal(existsSync(f('p1')), false);
  const j = await cli(['join', nowhere, '--data-dir', f('v-nowhere'), '--device', 'ref', '--max-memory', '1GiB']);
  oneLine(j, 'join', EXIT.network, /cannot reach .*connection refused/, 'join unreachable');
  // a server that is not libp2p (an SSH-like banner)
  const junk = net.createServer((s) => { s.on('error', () => {}); s.end('SSH-2.0-OpenSSH_9.6\r\n'); });
  await new Promise<void>((r) => junk.listen(0, '127.0.0.1', () => r()));
  const junkAddr = `/ip4/127.0.0.1/tcp/${(junk.address() as net.AddressInfo).port}`;
  try {
    oneLine(await cli(['status', junkAddr]), 'status', EXIT.network, /\/ip4\/127\.0\.0\.1\/tcp\/\d+ is not a swarmtune coordinator \(/, 'status not swarmtune');
    oneLine(await cli(['join', junkAddr, '--data-dir', f('v-junk'), '--device', 'ref', '--max-memory', '1GiB']), 'join', EXIT.network, /is not a swarmtune coordinator/, 'join not swarmtune');
  } finally {
    junk.close();
  }

  const coord = spawnCli(['launch', '--model', model, '--data', f('good.jsonl'), '--listen', '/ip4/127.0.0.1/tcp/0', '--private', '--json',
    '--output-dir', f('priv'), '--min-peers', '1'], env);
  live.push(coord);
  const listening = await until(coord, (e) => e.event === 'listening', 'the private run listening');
  const addr = String(listening.multiaddr);
  const listen = addr.slice(0, addr.indexOf('/p2p/'));
  oneLine(await cli(['pull', addr, '--out', f('p2')]), 'pull', EXIT.refused, /^swarmtune pull: this run is private: a valid --token is required$/, 'pull without token');
  assert.equal(existsSync(f('p2')), false);
  oneLine(await cli(['join', addr, '--data-dir', f('v-priv'), '--device', 'ref', '--max-memory', '1GiB']), 'join', EXIT.refused, /private: a valid --token is required/, 'join without token');
  const inUse = await cli(['launch', '--model', model, '--data', f('good.jsonl'), '--listen', listen, '--output-dir', f('second')]);
  oneLine(inUse, 'launch', EXIT.network, new RegExp(`--listen ${listen.replace(/\./g, '\\.')}: address already in use`), 'launch port in use');
  assert.equal(existsSync(f('second')), false, 'a launch on a used port left its output dir');
  process.kill(-coord.child.pid!, 'SIGINT');
  assert.equal(await coord.exit, 0);
});

async function until(p: CliProc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.find(pred);
    if (e !== undefined) return e;
    if (p.child.exitCode !== null) throw new Error(`exited (${p.child.exitCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('a running run: pull --step 9999 says which steps exist in a few words, join shows progress, Ctrl-C is no failure', async () => {
  const coord = spawnCli(['launch', '--model', model, '--data', f('good.jsonl'), '--listen', '/ip4/127.0.0.1/tcp/0', '--json',
    '--output-dir', f('pub'), '--max-steps', '100000', '--per-device-train-batch-size', '2', '--max-seq-length', '32', '--logging-steps', '1'], env);
  live.push(coord);
  const addr = String((await until(coord, (e) => e.event === 'listening', 'the run listening')).multiaddr);
  const vol = spawnCli(['join', addr, '--device', 'cpu', '--max-memory', '1GiB', '--data-dir', f('vol'), '--progress-interval', '0.2'], env);
  live.push(vol);
  await until(coord, (e) => e.event === 'step' && Number(e.step) >= 3, 'three steps');
  const r = await cli(['pull', addr, '--out', f('p3'), '--step', '9999']);
  oneLine(r, 'pull', EXIT.notFound, /^swarmtune pull: --step 9999: the run has committed steps: 0–\d+ \(\d+ steps\)$/, 'pull --step 9999');
  const [, last, count] = /0–(\d+) \((\d+) steps\)/.exec(r.stderr)!;
  assert.equal(Number(count), Number(last) + 1, 'first..last and the count agree');
  assert.equal(existsSync(f('p3')), false);
  // progress lines: 0-based stage, layers, step, micro-batches served, tokens/s
  const t0 = Date.now();
  while (!/\[swarmtune join\] stage 0 \(layers \[0, 4\)\): step \d+\/\d+, \d+ micro-batches served \(\+\d+\), [\d.]+ tokens\/s/.test(vol.stderr.join(''))) {
    assert.ok(Date.now() - t0 < 60_000, `no progress line from join:\n${vol.stderr.join('')}`);
    await new Promise((res) => setTimeout(res, 100));
  }
  const volLog = vol.stderr.join('');
  assert.match(volLog, /assigned stage 0 \(the only stage\): layers \[0, 4\)/);
  assert.doesNotMatch(volLog, /stage 1\/1/);
  process.kill(-coord.child.pid!, 'SIGINT');
  assert.equal(await coord.exit, 0, coord.stderr.join(''));
  const coordLog = coord.stderr.join('') + coord.lines.join('\n');
  assert.doesNotMatch(coordLog, /run failed|coordinator is stopping|"event":"error"/, 'a deliberate Ctrl-C is reported as a failure');
  assert.doesNotMatch(coordLog, /\(\)/, 'an empty reason was printed');
  process.kill(-vol.child.pid!, 'SIGINT');
  assert.equal(await vol.exit, 0, vol.stderr.join(''));
});
