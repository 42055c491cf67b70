// Trainer configuration (defaults < run.json < flags, validation messages), --init-adapter, and the
// `swarmtune train` CLI as a real process: --json step events, Ctrl-C checkpoint, resume.
// The CLI runs use the embedded tiny model on the native backend for 1-2 steps of batch 2 (about a second each).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { ConfigError, DEFAULT_TRAIN_CONFIG, parseBytes, resolveTrainConfig } from '../engine/train/config.ts';
import { registerTrain as registerTrainCommands } from '../bin/commands/train.ts';
import { trainConfigFromOptions } from '../bin/commands/train-flags.ts';
import { readAdapter } from '../engine/formats/peft.ts';
import { readTrainerState } from '../engine/train/trainer.ts';

function parseTrainArgs(args: string[]): Record<string, unknown> {
  const program = new Command();
  program.exitOverride();
  registerTrainCommands(program);
  const train = program.commands.find((c) => c.name() === 'train')!;
  train.action(() => {});
  program.parse(['node', 'swarmtune', 'train', ...args]);
  return train.opts();
}

test('defaults follow HF; run.json (snake_case) < flags (kebab-case); booleans --x/--no-x', () => {
  const dir = mkdtempSync(join(tmpdir(), 'swarmtune-cfg-'));
  try {
    const file = join(dir, 'run.json');
    writeFileSync(file, JSON.stringify({ learning_rate: 2e-4, lora_r: 64, shuffle: false, target_modules: ['v_proj', 'q_proj'], optim: 'paged_adamw_8bit' }));
    const cfg = trainConfigFromOptions(parseTrainArgs(['--config', file, '--lora-r', '16', '--per-device-train-batch-size', '2', '--shuffle', '--optim-resident-bytes', '64MiB']));
    assert.equal(cfg.learning_rate, 2e-4);
    assert.equal(cfg.lora_r, 16);
    assert.equal(cfg.per_device_train_batch_size, 2);
    assert.equal(cfg.shuffle, true);
    assert.deepEqual(cfg.target_modules, ['q_proj', 'v_proj']);
    assert.equal(cfg.optim_resident_bytes, 64 * 2 ** 20);
    assert.equal(cfg.max_grad_norm, 1.0);
    assert.equal(cfg.adam_epsilon, 1e-8);
    assert.equal(cfg.lr_scheduler_type, 'linear');
    assert.equal(cfg.seed, 42);
    assert.equal(trainConfigFromOptions(parseTrainArgs(['--no-gradient-checkpointing'])).gradient_checkpointing, false);
    assert.equal(resolveTrainConfig({ flags: { target_modules: 'all-linear' } }).target_modules.length, 7);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.equal(DEFAULT_TRAIN_CONFIG.weight_decay, 0);
});

test('validation errors name the key (a flag as typed), the source and what was expected', () => {
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ per_device_train_batch_size: 0 }, /^--per-device-train-batch-size: must be >= 1, got 0$/],
    [{ lr_scheduler_type: 'cosine_restarts' }, /--lr-scheduler-type: expected one of linear, cosine, constant, constant_with_warmup/],
    [{ target_modules: 'q_proj,lm_head' }, /unknown target module "lm_head"/],
    [{ max_steps: 1.5 }, /--max-steps: expected an integer, got 1.5/],
    [{ optim_resident_bytes: '1GiB' }, /applies to paged optimizers only/],
    [{ learning_rate: 'fast' }, /--learning-rate: expected a number, got "fast"/],
    [{ per_device_batch: 2 }, /unknown key "per_device_batch"/],
  ];
  for (const [flags, re] of bad) assert.throws(() => resolveTrainConfig({ flags }), (e: Error) => e instanceof ConfigError && re.test(e.message), JSON.stringify(flags));
  assert.equal(parseBytes('1.5GB', 'x'), 1.5e9);
  assert.throws(() => parseBytes('12 parsecs', 'x'), /cannot parse byte size/);
});

function runCli(args: string[], onLine?: (line: string, child: ReturnType<typeof spawn>) => void): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [join(import.meta.dirname, '..', 'bin', 'swarmtune.ts'), 'train', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '', buf = '';
    child.stdout!.on('data', (d: Buffer) => {
      stdout += d;
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        onLine?.(buf.slice(0, i), child);
        buf = buf.slice(i + 1);
      }
    });
    child.stderr!.on('data', (d: Buffer) => { stderr += d; });
    child.on('error', reject);
    child.on('close', (code) => resolvePromise({ code, stdout, stderr }));
  });
}

test('swarmtune train --json: step events on stdout; Ctrl-C saves a checkpoint; --init-adapter applies its r', { timeout: 120_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'swarmtune-cli-'));
  try {
    const common = ['--model', 'tiny', '--data', 'tiny', '--device', 'auto', '--per-device-train-batch-size', '2', '--max-seq-length', '48', '--json'];
    const a = await runCli([...common, '--max-steps', '2', '--output-dir', join(dir, 'a'), '--lora-r', '4', '--target-modules', 'q_proj,v_proj']);
    assert.equal(a.code, 0, a.stderr);
    const events = a.stdout.trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(events.map((e) => e.step), [1, 2]);
    for (const e of events) {
      assert.equal(e.event, 'step');
      for (const k of ['loss', 'lr', 'grad_norm', 'tokens_per_s']) assert.ok(Number.isFinite(e[k]), k);
    }
    assert.match(a.stderr, /trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}/);

    // SIGINT after the first step event: the step in flight finishes, a checkpoint is written, exit 130
    let sent = false;
    const b = await runCli([...common, '--max-steps', '50', '--output-dir', join(dir, 'b')], (line, child) => {
      if (!sent && line.startsWith('{')) { sent = true; child.kill('SIGINT'); }
    });
    assert.equal(b.code, 130, b.stderr);
    const ck = (await import('../engine/train/trainer.ts')).listCheckpoints(join(dir, 'b'));
    assert.equal(ck.length, 1);
    const st = await readTrainerState(ck[0]);
    assert.ok(st.global_step >= 1 && st.global_step < 50);
    assert.ok(!existsSync(join(dir, 'b', 'adapter_model.safetensors')), 'an interrupted run has only its checkpoint');

    // --init-adapter: its r and targets win over the flags; lr 0 keeps it unchanged
    const c = await runCli([...common, '--max-steps', '1', '--learning-rate', '0', '--lora-r', '32', '--output-dir', join(dir, 'c'), '--init-adapter', join(dir, 'a'), '--save-strategy', 'no']);
    assert.equal(c.code, 0, c.stderr);
    const ra = await readAdapter(join(dir, 'a')), rc = await readAdapter(join(dir, 'c'));
    assert.equal(rc.lora.r, 4);
    assert.deepEqual(rc.lora.targetModules, ra.lora.targetModules);
    rc.tensors.forEach((t, i) => assert.deepEqual(t.data, ra.tensors[i].data, t.name));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
