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

test('generation_config.json gives generate its defaults as transformers reads them', async () => {
  const { mkdtempSync, writeFileSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { readGenerationConfig, HF_GENERATION_DEFAULTS } = await import('../engine/formats/generation-config.ts');
  const dir = mkdtempSync(path.join(tmpdir(), 'gencfg-'));
  const pick = async () => { const g = await readGenerationConfig(dir); return { doSample: g.doSample, temperature: g.temperature, topP: g.topP, maxNewTokens: g.maxNewTokens, eos: g.eosTokenIds }; };
  try {
    assert.deepEqual(await readGenerationConfig(dir), { ...HF_GENERATION_DEFAULTS, notes: [] });
    writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ do_sample: true, temperature: 0.6, top_p: 0.9, eos_token_id: [128001, 128009] }));
    assert.deepEqual(await pick(), { doSample: true, temperature: 0.6, topP: 0.9, maxNewTokens: null, eos: [128001, 128009] });
    // without do_sample, transformers decodes greedily whatever temperature says (generate passes temperature 0)
    writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ temperature: 0.6, top_p: 0.9, eos_token_id: 2, max_new_tokens: 7 }));
    assert.deepEqual(await pick(), { doSample: false, temperature: 0.6, topP: 0.9, maxNewTokens: 7, eos: [2] });
    writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ do_sample: true }));
    assert.deepEqual(await pick(), { doSample: true, temperature: 1, topP: 1, maxNewTokens: null, eos: null });
    writeFileSync(path.join(dir, 'generation_config.json'), '{ "do_sample": tru');
    await assert.rejects(readGenerationConfig(dir), /generation_config\.json: not valid JSON/);
    writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify({ do_sample: true, temperature: 'hot' }));
    await assert.rejects(readGenerationConfig(dir), /"temperature" must be a number > 0, got "hot"/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
