// scripts/check-layout.ts: each rule fires on a tree made to break it, and the real tree passes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { checkLayout, importsOf } from '../scripts/check-layout.ts';

function tree(files: Record<string, string>): string {
  const root = mkdtempSync(path.join(tmpdir(), 'layout-'));
  for (const [f, text] of Object.entries(files)) {
    mkdirSync(path.dirname(path.join(root, f)), { recursive: true });
    writeFileSync(path.join(root, f), text);
  }
  return root;
}

function rulesOf(files: Record<string, string>): string[] {
  const root = tree(files);
  try { return checkLayout(root).map((v) => `${v.file}: ${v.rule}: ${v.detail}`); } finally { rmSync(root, { recursive: true, force: true }); }
}

test('importsOf reads static, type, re-export and literal dynamic imports, not comments or template strings', () => {
  const src = [
    "import { a } from './a.ts';",
    "import type { B } from '../b.ts';",
    "export { c } from './c.ts';",
    "export * from './d.ts';",
    "import './side.ts';",
    "const m = await import('./lazy.ts');",
    "// import { no } from './comment.ts';",
    "/* import { no } from './block.ts'; */",
    "const t = `import { no } from './template.ts';`;",
    "import {\n  x,\n  y,\n} from './multi.ts';",
  ].join('\n');
  assert.deepEqual(importsOf(src), ['./a.ts', '../b.ts', './c.ts', './d.ts', './side.ts', './lazy.ts', './multi.ts']);
});

test('a clean tree passes', () => {
  assert.deepEqual(rulesOf({
    'engine/a.ts': "export const a = 1;\n",
    'protocol/p.ts': "export const p = 1;\n",
    'node/n.ts': "import { a } from '../engine/a.ts';\nimport { p } from '../protocol/p.ts';\n",
    'coordinator/c.ts': "import { a } from '../engine/a.ts';\n",
    'cuda/k.ts': "import { a } from '../engine/a.ts';\n",
    'bin/cli.ts': "import { Command } from 'commander';\nimport '../cuda/k.ts';\nimport '../node/n.ts';\nimport '../coordinator/c.ts';\n",
  }), []);
});

test('each dependency rule fires', () => {
  const v = rulesOf({
    'engine/a.ts': "import '../cuda/k.ts';\n",
    'cuda/k.ts': "export {};\n",
    'protocol/p.ts': "import type { X } from '../engine/a.ts';\n",
    'node/n.ts': "import '../coordinator/c.ts';\nimport('../cuda/k.ts');\n",
    'coordinator/c.ts': "import '../node/x.ts';\n",
    'node/x.ts': "export {};\n",
    'engine/cli.ts': "import { Command } from 'commander';\n",
  });
  assert.deepEqual(v.sort(), [
    'coordinator/c.ts: dependency: coordinator/ must not import node/ (../node/x.ts)',
    'engine/a.ts: dependency: engine/ must not import cuda/ (../cuda/k.ts)',
    'engine/cli.ts: package: commander is imported only in bin/',
    'node/n.ts: dependency: node/ must not import coordinator/ (../coordinator/c.ts)',
    'node/n.ts: dependency: node/ must not import cuda/ (../cuda/k.ts)',
    'protocol/p.ts: dependency: protocol/ must not import engine/ (../engine/a.ts)',
  ]);
});

test('an import cycle is reported with its path, type-only edges included', () => {
  const v = rulesOf({
    'engine/a.ts': "import { b } from './b.ts';\n",
    'engine/b.ts': "import type { C } from './sub/c.ts';\n",
    'engine/sub/c.ts': "import { a } from '../a.ts';\n",
    'engine/d.ts': "import { a } from './a.ts';\n",
  });
  assert.deepEqual(v, ['engine/a.ts: cycle: engine/a.ts -> engine/b.ts -> engine/sub/c.ts -> engine/a.ts']);
});

test('a source file over 600 lines is reported, in C++ and CUDA too; tests and bench are exempt', () => {
  const long = 'x\n'.repeat(601);
  const ok = 'x\n'.repeat(600);
  const v = rulesOf({ 'engine/long.ts': long, 'cuda/src/k.cu': long, 'engine/ok.ts': ok, 'tests/big.test.ts': long, 'bench/b.ts': long });
  assert.deepEqual(v.sort(), ['cuda/src/k.cu: file-length: 601 lines (limit 600)', 'engine/long.ts: file-length: 601 lines (limit 600)']);
});

test('the repository itself keeps the rules', () => {
  const v = checkLayout(path.join(import.meta.dirname, '..'));
  assert.deepEqual(v.map((x) => `${x.file}: ${x.rule}: ${x.detail}`), []);
});

test('sim/ may import coordinator, protocol and engine; only bin (and tests, bench) may import sim', () => {
  const v = rulesOf({
    'sim/s.ts': "import '../coordinator/c.ts';\nimport '../protocol/p.ts';\nimport '../engine/e.ts';\nimport '../node/n.ts';\n",
    'coordinator/c.ts': "import '../sim/t.ts';\n",
    'protocol/p.ts': "export {};\n", 'engine/e.ts': "export {};\n", 'node/n.ts': "export {};\n", 'sim/t.ts': "export {};\n",
    'bin/b.ts': "import '../sim/t.ts';\n",
  });
  assert.deepEqual(v.sort(), [
    'coordinator/c.ts: dependency: coordinator/ must not import sim/ (../sim/t.ts)',
    'sim/s.ts: dependency: sim/ must not import node/ (../node/n.ts)',
  ]);
});
