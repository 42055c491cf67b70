// End-to-end tests of `swarmtune demo`: real coordinator/volunteer/pull processes on 127.0.0.1 with the tiny model.
// Sizes: 2 volunteers and 3 steps keep a full run (start, plan, train, pull, generate) to ~20-30 s on 2 cores with
// the float64 reference backend, which needs no native build; the Ctrl-C test stops a run as soon as it trains.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { readAdapter } from '../engine/formats/peft.ts';

const ROOT = path.resolve(import.meta.dirname, '..');
const CLI = path.join(ROOT, 'bin', 'swarmtune.ts');

/** pids of live processes whose command line mentions `marker` (the test's unique work dir) */
function processesMentioning(marker: string): string[] {
  const out = execFileSync('ps', ['-eo', 'pid=,stat=,args='], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.includes(marker) && !/^\s*\d+\s+Z/.test(l) && !l.includes(' ps -eo')).map((l) => l.trim());
}

async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function startDemo(args: string[]) {
  const child = spawn(process.execPath, [CLI, 'demo', ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const events: Record<string, any>[] = [];
  const stdout: string[] = [];
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += String(d); });
  createInterface({ input: child.stdout }).on('line', (l) => {
    stdout.push(l);
    try { events.push(JSON.parse(l)); } catch { /* human output */ }
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code, sig) => r(code ?? (sig ? 128 : null))));
  return { child, events, stdout, stderr: () => stderr, exited };
}

test('swarmtune demo --json trains through the swarm, pulls a PEFT adapter and leaves no process behind', async () => {
  const work = mkdtempSync(path.join(tmpdir(), 'swarmtune-demo-test-'));
  try {
    const d = startDemo(['--json', '--steps', '3', '--peers', '2', '--device', 'ref', '--no-dashboard', '--questions', '1', '--work-dir', work, '--timeout', '240']);
    const code = await d.exited;
    assert.equal(code, 0, `demo failed:\n${d.stderr().slice(-3000)}\n${d.stdout.slice(-20).join('\n')}`);
    // --json: every stdout line is an event object
    assert.equal(d.events.length, d.stdout.filter((l) => l.trim() !== '').length, 'non-JSON line on stdout');
    const steps = d.events.filter((e) => e.event === 'step');
    assert.deepEqual(steps.map((e) => e.step), [1, 2, 3]);
    for (const e of steps) assert.ok(Number.isFinite(e.loss) && e.loss > 0 && Number.isFinite(e.lr) && e.tokens_per_s > 0, JSON.stringify(e));
    assert.ok(steps[2].loss < steps[0].loss, `loss ${steps.map((e) => e.loss).join(' -> ')} should fall`);
    const plan = d.events.find((e) => e.event === 'plan');
    assert.ok(plan, 'plan event forwarded');
    assert.equal(plan.stages.length, 2, 'two volunteers give a two-stage pipeline');
    const fin = d.events.find((e) => e.event === 'demo_finished');
    assert.ok(fin, 'demo_finished event');
    assert.equal(fin.adapter_dir, path.join(work, 'adapter'));
    assert.equal(fin.answers.length, 1);
    assert.equal(typeof fin.answers[0].after, 'string');
    const adapter = await readAdapter(fin.adapter_dir);
    assert.equal(adapter.lora.r, 16);
    assert.equal(adapter.tensors.length, 4 * 7 * 2, '4 layers x 7 targets x (A, B)');
    // B starts at zero; three steps with lr > 0 must have moved it
    assert.ok(adapter.tensors.some((t) => t.name.endsWith('lora_B.weight') && t.data.some((x) => x !== 0)), 'the adapter trained');
    assert.deepEqual(processesMentioning(work), []);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});

test('Ctrl-C during training stops the demo, the coordinator and every volunteer', async () => {
  const work = mkdtempSync(path.join(tmpdir(), 'swarmtune-demo-sigint-'));
  try {
    const d = startDemo(['--json', '--steps', '1000', '--peers', '2', '--device', 'ref', '--no-dashboard', '--questions', '0', '--work-dir', work]);
    await waitFor(() => d.events.some((e) => e.event === 'plan') || d.child.exitCode !== null, 90_000, 'the pipeline plan');
    assert.equal(d.child.exitCode, null, `demo ended early:\n${d.stderr().slice(-2000)}`);
    assert.ok(processesMentioning(work).length >= 3, 'coordinator and volunteers are running');
    d.child.kill('SIGINT');
    const code = await d.exited;
    assert.equal(code, 130);
    await waitFor(() => processesMentioning(work).length === 0, 10_000, `no process left: ${processesMentioning(work).join('; ')}`);
    assert.ok(existsSync(path.join(work, 'logs', 'coordinator.log')));
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
