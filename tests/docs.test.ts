// Docs that are generated from code must not drift from it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { ORGANIZER_DOC, docWithTable } from '../scripts/config-table.ts';
import { TRAIN_CONFIG_KEYS } from '../engine/train/config.ts';

test('docs/organizer.md lists every run-config key exactly as engine/train/config.ts defines it', () => {
  const doc = readFileSync(ORGANIZER_DOC, 'utf8');
  for (const s of TRAIN_CONFIG_KEYS) assert.ok(doc.includes(`| \`${s.key}\` |`), `docs/organizer.md lacks the run-config key ${s.key}`);
  assert.equal(doc, docWithTable(doc), 'docs/organizer.md is stale: run `node scripts/config-table.ts --write`');
});
