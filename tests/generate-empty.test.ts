// An empty answer is a normal answer: `generate --max-new-tokens 0` (and an answer that is only EOS) prints nothing and exits 0.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';

const ROOT = path.resolve(import.meta.dirname, '..');

test('generate --max-new-tokens 0 on the tiny model: empty output, exit 0, no error line', () => {
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin/swarmtune.ts'), 'generate', '--model', 'tiny', '--prompt', 'hello', '--max-new-tokens', '0', '--device', 'cpu'],
    { encoding: 'utf8', timeout: 120_000 });
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), '');
  assert.doesNotMatch(r.stderr, /token_ids must be a non-empty array/);
});
