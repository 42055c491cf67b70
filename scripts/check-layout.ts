// The house's rules from DESIGN.md, checked from the imports: which folder may import which, no cycles, no long files.
// Usage: node scripts/check-layout.ts [--root DIR]   (exit 1 and one line per violation when a rule is broken)
import { readdirSync, readFileSync, statSync, existsSync } from 'node:fs';
import path from 'node:path';

const SOURCE_EXT = /\.(ts|cc|cpp|h|cu|cuh)$/;
const MAX_LINES = 600;
/** top-level folders whose files are not "source" for the line limit and the dependency rules */
const FREE = new Set(['tests', 'bench', 'node_modules', '.git', 'docs']);
const IGNORED_DIRS = new Set(['node_modules', '.git', 'build', 'build-emu']);

/** what each area may import, by top-level folder (bin may import anything of ours) */
const ALLOWED: Record<string, ReadonlySet<string>> = {
  protocol: new Set(['protocol']),
  engine: new Set(['engine']),
  cuda: new Set(['cuda', 'engine']),
  node: new Set(['node', 'protocol', 'engine']),
  coordinator: new Set(['coordinator', 'protocol', 'engine']),
  scripts: new Set(['scripts', 'protocol', 'engine', 'cuda', 'node', 'coordinator', 'bin', 'sim']),
  bin: new Set(['bin', 'protocol', 'engine', 'cuda', 'node', 'coordinator', 'sim']),
  sim: new Set(['sim', 'coordinator', 'protocol', 'engine']),
};
/** npm packages only some areas may import */
const PACKAGE_HOMES: Record<string, ReadonlySet<string>> = { commander: new Set(['bin']) };

function walk(dir: string, out: string[]): void {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name.startsWith('.') && e.name !== '.ci') continue;
    const p = path.join(dir, e.name);
    if (e.isDirectory()) { if (!IGNORED_DIRS.has(e.name)) walk(p, out); }
    else if (e.isFile()) out.push(p);
  }
}

const IMPORT_RE = /(?:^|[\s;])(?:import|export)\s+(?:type\s+)?(?:[^'";]*?\s+from\s+)?['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g;

/** The module specifiers a TS file imports, comments and template strings stripped first. */
export function importsOf(text: string): string[] {
  const code = text
    .replace(/\/\*[\s\S]*?\*\//g, '')
    .replace(/(^|[^:'"`\\])\/\/.*$/gm, '$1')
    .replace(/`(?:\\[\s\S]|\$\{[^}]*\}|[^`\\])*`/g, '``');
  const specs: string[] = [];
  for (const m of code.matchAll(IMPORT_RE)) specs.push(m[1] ?? m[2]);
  return specs;
}

export interface Violation { file: string; rule: string; detail: string }

export function checkLayout(root: string): Violation[] {
  const files: string[] = [];
  walk(root, files);
  const rel = (p: string) => path.relative(root, p).split(path.sep).join('/');
  const area = (r: string) => r.split('/')[0];
  const violations: Violation[] = [];
  const graph = new Map<string, string[]>();

  for (const abs of files) {
    const r = rel(abs);
    const top = area(r);
    if (FREE.has(top) || !r.includes('/')) continue;
    if (!SOURCE_EXT.test(r)) continue;
    const text = readFileSync(abs, 'utf8');
    const lines = text.split('\n').length - (text.endsWith('\n') ? 1 : 0);
    if (lines > MAX_LINES) violations.push({ file: r, rule: 'file-length', detail: `${lines} lines (limit ${MAX_LINES})` });
    if (!r.endsWith('.ts')) continue;
    const edges: string[] = [];
    for (const spec of importsOf(text)) {
      if (spec.startsWith('.')) {
        const target = rel(path.resolve(path.dirname(abs), spec));
        if (!existsSync(path.join(root, target)) || statSync(path.join(root, target)).isDirectory()) continue;
        edges.push(target);
        const to = area(target);
        const allowed = ALLOWED[top];
        if (allowed !== undefined && !FREE.has(to) && !allowed.has(to)) {
          violations.push({ file: r, rule: 'dependency', detail: `${top}/ must not import ${to}/ (${spec})` });
        } else if (allowed !== undefined && FREE.has(to)) {
          violations.push({ file: r, rule: 'dependency', detail: `source must not import ${to}/ (${spec})` });
        }
      } else if (!spec.startsWith('node:')) {
        const pkg = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0];
        const homes = PACKAGE_HOMES[pkg];
        if (homes !== undefined && !homes.has(top)) violations.push({ file: r, rule: 'package', detail: `${pkg} is imported only in ${[...homes].join(', ')}/` });
      }
    }
    graph.set(r, edges);
  }

  for (const cycle of findCycles(graph)) {
    violations.push({ file: cycle[0], rule: 'cycle', detail: [...cycle, cycle[0]].join(' -> ') });
  }
  return violations;
}

/** Strongly connected components of more than one file (or a file importing itself), each as one cycle through it. */
export function findCycles(graph: Map<string, string[]>): string[][] {
  let index = 0;
  const idx = new Map<string, number>(), low = new Map<string, number>(), onStack = new Set<string>();
  const stack: string[] = [];
  const out: string[][] = [];
  const strong = (v: string): void => {
    idx.set(v, index); low.set(v, index); index++;
    stack.push(v); onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!idx.has(w)) { strong(w); low.set(v, Math.min(low.get(v)!, low.get(w)!)); }
      else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!));
    }
    if (low.get(v) === idx.get(v)) {
      const comp: string[] = [];
      let w: string;
      do { w = stack.pop()!; onStack.delete(w); comp.push(w); } while (w !== v);
      const self = (graph.get(v) ?? []).includes(v);
      if (comp.length > 1 || self) out.push(cyclePath(graph, new Set(comp), comp.sort()[0]));
    }
  };
  for (const v of [...graph.keys()].sort()) if (!idx.has(v)) strong(v);
  return out;
}

/** A shortest cycle through `start` inside one component (breadth first), for a readable report. */
function cyclePath(graph: Map<string, string[]>, comp: Set<string>, start: string): string[] {
  const prev = new Map<string, string>();
  const queue = [start];
  for (let i = 0; i < queue.length; i++) {
    const v = queue[i];
    for (const w of graph.get(v) ?? []) {
      if (!comp.has(w)) continue;
      if (w === start) {
        const p = [v];
        while (p[0] !== start) p.unshift(prev.get(p[0])!);
        return p;
      }
      if (!prev.has(w)) { prev.set(w, v); queue.push(w); }
    }
  }
  return [start];
}

if (import.meta.main) {
  const i = process.argv.indexOf('--root');
  const root = path.resolve(i > 0 ? process.argv[i + 1] : path.join(import.meta.dirname, '..'));
  const v = checkLayout(root);
  for (const x of v) console.log(`${x.file}: ${x.rule}: ${x.detail}`);
  if (v.length > 0) { console.log(`check:layout: ${v.length} violation(s)`); process.exit(1); }
  console.log('check:layout: ok');
}
