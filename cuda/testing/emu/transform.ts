// Rewrites the CUDA-only syntax of a cuda/src file so g++ compiles it against the emulator (cuda/testing/emu/stc_emu.h).
// Only syntax changes; the kernels' code is untouched:
//   k<<<grid, block[, smem[, stream]]>>>(args)  ->  ::stc_emu::launch(k, "k", grid, block, smem, stream, args)
//   extern __shared__ [__align__(n)] T name[];  ->  T* const name = (T*)::stc_emu::dynamic_shared();
//   __shared__ [__align__(n)] T a[..], b[..];   ->  static T a[..]; ::stc_emu::shared_static(&a, sizeof(a)); ...
//   __launch_bounds__(n[, m]) ... {             ->  ... { if (::stc_emu::launch_bounds(n)) return;
// Every replacement stays on its line, and a #line directive names the original file, so compiler messages and
// __FILE__/__LINE__ (the library's error messages) point into cuda/src.
//
// Usage: node cuda/testing/emu/transform.ts <in.cu> <out.cu> [name-for-#line]
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** A copy of `src` with comments, string and character literals blanked (same length), for searching. */
export function maskCode(src: string): string {
  const out = src.split('');
  let i = 0;
  const blank = (a: number, b: number) => { for (let k = a; k < b; k++) if (out[k] !== '\n') out[k] = ' '; };
  while (i < src.length) {
    const c = src[i], d = src[i + 1];
    if (c === '/' && d === '/') {
      const e = src.indexOf('\n', i);
      const end = e < 0 ? src.length : e;
      blank(i, end);
      i = end;
    } else if (c === '/' && d === '*') {
      const e = src.indexOf('*/', i + 2);
      const end = e < 0 ? src.length : e + 2;
      blank(i, end);
      i = end;
    } else if (c === '"' || c === "'") {
      let j = i + 1;
      while (j < src.length && src[j] !== c) j += src[j] === '\\' ? 2 : 1;
      blank(i + 1, j);
      i = j + 1;
    } else {
      i++;
    }
  }
  return out.join('');
}

const OPEN: Record<string, string> = { '(': ')', '[': ']', '{': '}' };

/** Index of the bracket closing the one at `open` (code must be masked). */
function matchForward(code: string, open: number): number {
  const stack: string[] = [];
  for (let i = open; i < code.length; i++) {
    const c = code[i];
    if (OPEN[c]) stack.push(OPEN[c]);
    else if (c === ')' || c === ']' || c === '}') {
      if (stack.pop() !== c) throw new Error(`unbalanced '${c}' at offset ${i}`);
      if (stack.length === 0) return i;
    }
  }
  throw new Error(`no closing bracket for offset ${open}`);
}

/** Splits at commas outside (), [], {} and template angle brackets that are not comparisons we can see. */
function splitTopLevel(s: string): string[] {
  const parts: string[] = [];
  let depth = 0, start = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === '(' || c === '[' || c === '{') depth++;
    else if (c === ')' || c === ']' || c === '}') depth--;
    else if (c === ',' && depth === 0) { parts.push(s.slice(start, i)); start = i + 1; }
  }
  parts.push(s.slice(start));
  return parts.map((p) => p.trim());
}

interface Edit { start: number; end: number; text: string }

function launches(src: string, code: string, edits: Edit[]): void {
  let from = 0;
  for (;;) {
    const at = code.indexOf('<<<', from);
    if (at < 0) return;
    // the kernel expression: an identifier (with ::) optionally followed by template arguments
    let k = at - 1;
    while (k >= 0 && /\s/.test(code[k])) k--;
    if (code[k] === '>') {
      let depth = 0;
      for (; k >= 0; k--) {
        if (code[k] === '>') depth++;
        else if (code[k] === '<' && --depth === 0) break;
      }
      k--;
    }
    while (k >= 0 && /[\w:]/.test(code[k])) k--;
    const kStart = k + 1;
    const kernel = src.slice(kStart, at).trim();
    if (!/^[\w:]+\s*(<[^;]*>)?$/.test(kernel)) throw new Error(`cannot parse the kernel before <<< at offset ${at}: '${kernel}'`);
    // the configuration, up to the matching >>>
    let depth = 0, close = -1;
    for (let i = at + 3; i < code.length; i++) {
      const c = code[i];
      if (c === '(' || c === '[' || c === '{') depth++;
      else if (c === ')' || c === ']' || c === '}') depth--;
      else if (depth === 0 && code.startsWith('>>>', i)) { close = i; break; }
    }
    if (close < 0) throw new Error(`no >>> for the <<< at offset ${at}`);
    const conf = splitTopLevel(src.slice(at + 3, close));
    if (conf.length < 2 || conf.length > 4) throw new Error(`launch configuration needs 2 to 4 values at offset ${at}`);
    let p = close + 3;
    while (/\s/.test(code[p])) p++;
    if (code[p] !== '(') throw new Error(`expected '(' after >>> at offset ${p}`);
    const argsEnd = matchForward(code, p);
    const args = src.slice(p + 1, argsEnd);
    const name = kernel.replace(/\s+/g, ' ').replace(/"/g, '');
    const text = `::stc_emu::launch(${kernel}, "${name}", ${conf[0]}, ${conf[1]}, ${conf[2] ?? '0'}, ${conf[3] ?? '0'}` +
      `${args.trim() ? ', ' + args : ''})`;
    edits.push({ start: kStart, end: argsEnd + 1, text: text.replace(/\n/g, ' ') + '\n'.repeat(countLines(src.slice(kStart, argsEnd + 1))) });
    from = argsEnd + 1;
  }
}

function countLines(s: string): number {
  let n = 0;
  for (const c of s) if (c === '\n') n++;
  return n;
}

const DECL = /^(.*?)\b([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)$/s;
const NEXT_DECL = /^\s*([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)$/s;

function sharedDecls(src: string, code: string, edits: Edit[]): void {
  const re = /(\bextern\s+)?\b__shared__\b/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(code))) {
    const start = m.index;
    const semi = code.indexOf(';', start);
    if (semi < 0) throw new Error(`__shared__ declaration without ';' at offset ${start}`);
    let body = src.slice(start + m[0].length, semi).trim();
    let align = '';
    const am = /^__align__\s*\(\s*([^)]*)\)\s*/.exec(body);
    if (am) { align = `__attribute__((aligned(${am[1]}))) `; body = body.slice(am[0].length); }
    let text: string;
    if (m[1]) {
      const d = DECL.exec(body);
      if (!d || !/^\[\s*\]$/.test(d[3].trim())) throw new Error(`cannot parse extern __shared__ declaration '${body}'`);
      const type = d[1].trim();
      text = `${type}* const ${d[2]} = reinterpret_cast<${type}*>(::stc_emu::dynamic_shared());`;
    } else {
      const parts = splitTopLevel(body);
      const first = DECL.exec(parts[0]);
      if (!first) throw new Error(`cannot parse __shared__ declaration '${body}'`);
      const type = first[1].trim();
      const decls: [string, string][] = [[first[2], first[3]]];
      for (const p of parts.slice(1)) {
        const n = NEXT_DECL.exec(p);
        if (!n) throw new Error(`cannot parse __shared__ declarator '${p}' in '${body}'`);
        decls.push([n[1], n[2]]);
      }
      text = decls.map(([name, dims]) =>
        `static ${align}${type} ${name}${dims.trim()}; ::stc_emu::shared_static(&${name}, sizeof(${name}));`).join(' ');
    }
    edits.push({ start, end: semi + 1, text: text + '\n'.repeat(countLines(src.slice(start, semi + 1))) });
    re.lastIndex = semi + 1;
  }
}

function launchBounds(src: string, code: string, edits: Edit[]): void {
  const re = /\b__launch_bounds__\s*\(/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(code))) {
    const open = m.index + m[0].length - 1;
    const close = matchForward(code, open);
    const maxThreads = splitTopLevel(src.slice(open + 1, close))[0];
    edits.push({ start: m.index, end: close + 1, text: '' });
    // the body: the first '{' after the parameter list
    let i = close + 1, depth = 0;
    for (; i < code.length; i++) {
      const c = code[i];
      if (c === '(') depth++;
      else if (c === ')') depth--;
      else if (c === '{' && depth === 0) break;
      else if (c === ';' && depth === 0) throw new Error(`__launch_bounds__ on a declaration without a body at offset ${m.index}`);
    }
    edits.push({ start: i + 1, end: i + 1, text: ` if (::stc_emu::launch_bounds(${maxThreads})) return;` });
    re.lastIndex = close + 1;
  }
}

export function transform(src: string, lineName: string): string {
  const code = maskCode(src);
  const edits: Edit[] = [];
  launches(src, code, edits);
  sharedDecls(src, code, edits);
  launchBounds(src, code, edits);
  edits.sort((a, b) => a.start - b.start || a.end - b.end);
  let out = '', pos = 0;
  for (const e of edits) {
    if (e.start < pos) throw new Error(`overlapping rewrites at offset ${e.start}`);
    out += src.slice(pos, e.start) + e.text;
    pos = e.end;
  }
  out += src.slice(pos);
  return `#line 1 "${lineName}"\n${out}`;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const [input, output, name] = process.argv.slice(2);
  if (!input || !output) {
    console.error('usage: node cuda/testing/emu/transform.ts <in.cu> <out.cu> [name-for-#line]');
    process.exit(2);
  }
  try {
    writeFileSync(output, transform(readFileSync(input, 'utf8'), name ?? input));
  } catch (e) {
    console.error(`transform ${input}: ${(e as Error).message}`);
    process.exit(1);
  }
}
