// Python values for the chat-template interpreter (jinja.ts): how jinja2 under transformers sees data — str()
// and repr() of None/True/lists/dicts, ==, truthiness, int vs float, json.dumps, str methods with their
// argument semantics, code-point string lengths — plus a JSON reader that keeps what JSON.parse loses
// (float vs int lexemes such as 22.0, the key order of objects) so records render as json.loads would give them.
import { pyFloatRepr } from './pyjson.ts';

export class TemplateError extends Error {
  override readonly name = 'TemplateError';
}

/** A Python float; a plain JS number is a Python int. */
export class PyFloat {
  readonly v: number;
  constructor(v: number) { this.v = v; }
}

/** A Python tuple (prints with parentheses; otherwise a list). */
export class PyTuple extends Array<unknown> {
  static of2(a: unknown, b: unknown): PyTuple {
    const t = new PyTuple();
    t.push(a, b);
    return t;
  }
  static fromList(xs: readonly unknown[]): PyTuple {
    const t = new PyTuple();
    for (const x of xs) t.push(x);
    return t;
  }
}

/** jinja2's Undefined: prints as '', is falsy and iterates as empty; any attribute or operation on it raises. */
export class Undefined {
  readonly hint: string;
  constructor(hint: string) { this.hint = hint; }
}

/** namespace(): the only object a template may assign attributes on. */
export class Namespace {
  readonly map: Map<string, unknown>;
  constructor(map: Map<string, unknown>) { this.map = map; }
}

export type Kwargs = Map<string, unknown>;

export class PyFunc {
  readonly name: string;
  readonly call: (args: unknown[], kwargs: Kwargs) => unknown;
  constructor(name: string, call: (args: unknown[], kwargs: Kwargs) => unknown) {
    this.name = name;
    this.call = call;
  }
}

export type PyDict = Map<unknown, unknown>;

export const isDict = (x: unknown): x is PyDict => x instanceof Map;
export const isList = (x: unknown): x is unknown[] => Array.isArray(x);
export const isInt = (x: unknown): x is number => typeof x === 'number';
export const isNum = (x: unknown): x is number | PyFloat | boolean => typeof x === 'number' || x instanceof PyFloat || typeof x === 'boolean';
export const numVal = (x: number | PyFloat | boolean): number => (x instanceof PyFloat ? x.v : Number(x));

export function typeName(x: unknown): string {
  if (x === null) return 'NoneType';
  if (x instanceof Undefined) return 'Undefined';
  if (typeof x === 'boolean') return 'bool';
  if (typeof x === 'number') return 'int';
  if (x instanceof PyFloat) return 'float';
  if (typeof x === 'string') return 'str';
  if (x instanceof PyTuple) return 'tuple';
  if (Array.isArray(x)) return 'list';
  if (x instanceof Map) return 'dict';
  if (x instanceof Namespace) return 'Namespace';
  if (x instanceof PyFunc) return 'function';
  return typeof x;
}

/** JS data (JSON-like) → Python values: objects become ordered dicts, non-integral numbers floats. */
export function toPy(x: unknown): unknown {
  if (x === undefined) return new Undefined('value');
  if (x === null || typeof x === 'string' || typeof x === 'boolean') return x;
  if (typeof x === 'number') return Number.isInteger(x) ? x : new PyFloat(x);
  if (x instanceof PyFloat || x instanceof Undefined || x instanceof PyFunc || x instanceof Namespace) return x;
  if (x instanceof Map) return new Map([...x].map(([k, v]) => [k, toPy(v)]));
  if (Array.isArray(x)) return x.map(toPy);
  if (typeof x === 'function') {
    const f = x as (...a: unknown[]) => unknown;
    return new PyFunc(f.name || 'function', (args) => toPy(f(...args)));
  }
  if (typeof x === 'object') return new Map(Object.entries(x as Record<string, unknown>).map(([k, v]) => [k, toPy(v)]));
  throw new TemplateError(`cannot pass a ${typeof x} to a template`);
}

// ---- strings by code point (Python indexes characters, JS UTF-16 units) ----

const SURROGATE = /[\uD800-\uDFFF]/;
export const pyChars = (s: string): string[] => (SURROGATE.test(s) ? Array.from(s) : s.split(''));
export const pyLen = (s: string): number => (SURROGATE.test(s) ? Array.from(s).length : s.length);

/** Python's str.isspace() characters (what strip()/split() with no argument remove). */
const PY_WS = new Set([9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 0x85, 0xa0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003, 0x2004,
  0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f, 0x3000]);
const isWs = (c: string): boolean => PY_WS.has(c.codePointAt(0)!);

/** str.strip/lstrip/rstrip(chars=None): chars is a set of characters, None means whitespace. */
export function pyStrip(s: string, chars: unknown, left: boolean, right: boolean): string {
  let test: (c: string) => boolean;
  if (chars === null || chars === undefined || chars instanceof Undefined) test = isWs;
  else if (typeof chars === 'string') {
    const set = new Set(pyChars(chars));
    test = (c) => set.has(c);
  } else throw new TemplateError(`strip arg must be None or str, not ${typeName(chars)}`);
  const cs = pyChars(s);
  let a = 0, b = cs.length;
  if (left) while (a < b && test(cs[a])) a++;
  if (right) while (b > a && test(cs[b - 1])) b--;
  return cs.slice(a, b).join('');
}

/** str.split(sep=None, maxsplit=-1) */
export function pySplit(s: string, sep: unknown, maxsplit: number): string[] {
  if (sep === null || sep === undefined || sep instanceof Undefined) {
    const out: string[] = [];
    const cs = pyChars(s);
    let i = 0;
    while (i < cs.length) {
      while (i < cs.length && isWs(cs[i])) i++;
      if (i >= cs.length) break;
      if (maxsplit >= 0 && out.length >= maxsplit) {
        out.push(pyStrip(cs.slice(i).join(''), null, false, true));
        break;
      }
      let j = i;
      while (j < cs.length && !isWs(cs[j])) j++;
      out.push(cs.slice(i, j).join(''));
      i = j;
    }
    return out;
  }
  if (typeof sep !== 'string') throw new TemplateError(`must be str or None, not ${typeName(sep)}`);
  if (sep === '') throw new TemplateError('empty separator');
  const parts = s.split(sep);
  if (maxsplit >= 0 && parts.length > maxsplit + 1) return [...parts.slice(0, maxsplit), parts.slice(maxsplit).join(sep)];
  return parts;
}

/** Python slice semantics on a sequence of length n. */
export function sliceIndices(n: number, start: number | null, stop: number | null, step: number | null): number[] {
  const st = step ?? 1;
  if (st === 0) throw new TemplateError('slice step cannot be zero');
  const clamp = (v: number, lo: number, hi: number): number => Math.max(lo, Math.min(hi, v));
  let a: number, b: number;
  if (st > 0) {
    a = start === null ? 0 : clamp(start < 0 ? start + n : start, 0, n);
    b = stop === null ? n : clamp(stop < 0 ? stop + n : stop, 0, n);
  } else {
    a = start === null ? n - 1 : clamp(start < 0 ? start + n : start, -1, n - 1);
    b = stop === null ? -1 : clamp(stop < 0 ? stop + n : stop, -1, n - 1);
  }
  const out: number[] = [];
  if (st > 0) for (let i = a; i < b; i += st) out.push(i);
  else for (let i = a; i > b; i += st) out.push(i);
  return out;
}

// ---- str(), repr(), truthiness, equality, ordering ----

/** repr() of a str: single quotes unless it holds ' and no ", Python's escapes for unprintables. */
export function pyStrRepr(s: string): string {
  const q = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = q;
  for (const c of s) {
    const cp = c.codePointAt(0)!;
    if (c === '\\') out += '\\\\';
    else if (c === q) out += '\\' + q;
    else if (c === '\n') out += '\\n';
    else if (c === '\r') out += '\\r';
    else if (c === '\t') out += '\\t';
    else if (cp < 0x20 || cp === 0x7f || (cp >= 0x80 && cp < 0xa0) || cp === 0xad) out += '\\x' + cp.toString(16).padStart(2, '0');
    else if (cp !== 0x20 && /[\p{C}\p{Z}]/u.test(c)) {
      out += cp <= 0xff ? '\\x' + cp.toString(16).padStart(2, '0') : cp <= 0xffff ? '\\u' + cp.toString(16).padStart(4, '0') : '\\U' + cp.toString(16).padStart(8, '0');
    } else out += c;
  }
  return out + q;
}

export function pyRepr(x: unknown): string {
  if (typeof x === 'string') return pyStrRepr(x);
  if (x instanceof Undefined) return 'Undefined';
  if (x instanceof PyTuple) return x.length === 1 ? `(${pyRepr(x[0])},)` : `(${x.map(pyRepr).join(', ')})`;
  if (Array.isArray(x)) return `[${x.map(pyRepr).join(', ')}]`;
  if (x instanceof Map) return `{${[...x].map(([k, v]) => `${pyRepr(k)}: ${pyRepr(v)}`).join(', ')}}`;
  return pyStr(x);
}

/** str(): what {{ x }}, ~ and |string print. */
export function pyStr(x: unknown): string {
  if (typeof x === 'string') return x;
  if (x === null) return 'None';
  if (x instanceof Undefined) return '';
  if (typeof x === 'boolean') return x ? 'True' : 'False';
  if (typeof x === 'number') return Number.isSafeInteger(x) || !Number.isFinite(x) ? String(x) : BigInt(x).toString();
  if (x instanceof PyFloat) return pyFloatRepr(x.v).replace(/^NaN$/, 'nan').replace(/^(-?)Infinity$/, '$1inf');
  if (Array.isArray(x) || x instanceof Map) return pyRepr(x);
  if (x instanceof Namespace) return `<Namespace ${pyRepr(x.map)}>`;
  if (x instanceof PyFunc) return `<function ${x.name}>`;
  return String(x);
}

export function pyTruthy(x: unknown): boolean {
  if (x === null || x instanceof Undefined) return false;
  if (typeof x === 'boolean') return x;
  if (typeof x === 'number') return x !== 0;
  if (x instanceof PyFloat) return x.v !== 0;
  if (typeof x === 'string') return x.length > 0;
  if (Array.isArray(x)) return x.length > 0;
  if (x instanceof Map) return x.size > 0;
  return true;
}

export function pyEq(a: unknown, b: unknown): boolean {
  if (isNum(a) && isNum(b)) return numVal(a) === numVal(b);
  if (a instanceof Undefined || b instanceof Undefined) return a instanceof Undefined && b instanceof Undefined;
  if (typeof a === 'string' || typeof b === 'string') return a === b;
  if (a === null || b === null) return a === b;
  if (Array.isArray(a) && Array.isArray(b)) {
    if ((a instanceof PyTuple) !== (b instanceof PyTuple) || a.length !== b.length) return false;
    return a.every((x, i) => pyEq(x, b[i]));
  }
  if (a instanceof Map && b instanceof Map) {
    if (a.size !== b.size) return false;
    for (const [k, v] of a) {
      if (!b.has(k) || !pyEq(v, b.get(k))) return false;
    }
    return true;
  }
  return a === b;
}

/** <, > and sorting: numbers with numbers, str with str (by code point), lists element-wise. */
export function pyCompare(a: unknown, b: unknown): number {
  if (isNum(a) && isNum(b)) return Math.sign(numVal(a) - numVal(b));
  if (typeof a === 'string' && typeof b === 'string') {
    const ca = pyChars(a), cb = pyChars(b);
    for (let i = 0; i < Math.min(ca.length, cb.length); i++) {
      const d = ca[i].codePointAt(0)! - cb[i].codePointAt(0)!;
      if (d !== 0) return Math.sign(d);
    }
    return Math.sign(ca.length - cb.length);
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    for (let i = 0; i < Math.min(a.length, b.length); i++) {
      const d = pyCompare(a[i], b[i]);
      if (d !== 0) return d;
    }
    return Math.sign(a.length - b.length);
  }
  throw new TemplateError(`'<' not supported between instances of '${typeName(a)}' and '${typeName(b)}'`);
}

// ---- json.dumps (transformers' tojson: ensure_ascii=False, indent, separators, sort_keys) ----

export interface DumpsOptions {
  indent: number | string | null;
  separators: [string, string] | null;
  sortKeys: boolean;
  ensureAscii: boolean;
}

function jsonString(s: string, ensureAscii: boolean): string {
  const j = JSON.stringify(s);
  return ensureAscii ? j.replace(/[\u007f-\uffff]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0')) : j;
}

function jsonKey(k: unknown, ensureAscii: boolean): string {
  if (typeof k === 'string') return jsonString(k, ensureAscii);
  if (typeof k === 'number' || k instanceof PyFloat) return `"${pyStr(k)}"`;
  if (typeof k === 'boolean') return k ? '"true"' : '"false"';
  if (k === null) return '"null"';
  throw new TemplateError(`keys must be str, int, float, bool or None, not ${typeName(k)}`);
}

export function pyJsonDumps(x: unknown, o: DumpsOptions): string {
  const ind = o.indent === null ? null : typeof o.indent === 'number' ? ' '.repeat(o.indent) : o.indent;
  const [itemSep, keySep] = o.separators ?? (ind !== null ? [',', ': '] : [', ', ': ']);
  const go = (v: unknown, depth: number): string => {
    if (v === null) return 'null';
    if (typeof v === 'boolean') return v ? 'true' : 'false';
    if (typeof v === 'number') return pyStr(v);
    if (v instanceof PyFloat) return pyFloatRepr(v.v);
    if (typeof v === 'string') return jsonString(v, o.ensureAscii);
    const nl = ind === null ? '' : '\n' + ind.repeat(depth + 1);
    const close = ind === null ? '' : '\n' + ind.repeat(depth);
    if (Array.isArray(v)) {
      if (v.length === 0) return '[]';
      return `[${nl}${v.map((e) => go(e, depth + 1)).join(itemSep + nl)}${close}]`;
    }
    if (v instanceof Map || v instanceof Namespace) {
      let entries = [...(v instanceof Namespace ? v.map : v)];
      if (entries.length === 0) return '{}';
      if (o.sortKeys) entries = entries.sort(([a], [b]) => pyCompare(a, b));
      return `{${nl}${entries.map(([k, e]) => jsonKey(k, o.ensureAscii) + keySep + go(e, depth + 1)).join(itemSep + nl)}${close}}`;
    }
    throw new TemplateError(`Object of type ${typeName(v)} is not JSON serializable`);
  };
  return go(x, 0);
}

// ---- JSON text → Python values, as json.loads reads it ----

/** Parse JSON keeping float lexemes (1.0, 1e3) as PyFloat and object key order (as ordered dicts). */
export function parsePyJson(text: string): unknown {
  let i = 0;
  const fail = (what: string): never => {
    throw new SyntaxError(`${what} at position ${i}`);
  };
  const ws = (): void => {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i++;
  };
  const str = (): string => {
    const start = i;
    i++;
    while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
    if (i >= text.length) fail('unterminated string');
    i++;
    return JSON.parse(text.slice(start, i)) as string;
  };
  const value = (): unknown => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const m = new Map<string, unknown>();
      ws();
      if (text[i] === '}') { i++; return m; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a string key');
        const k = str();
        ws();
        if (text[i] !== ':') fail("expected ':'");
        i++;
        m.set(k, value());
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === '}') { i++; return m; }
        fail("expected ',' or '}'");
      }
    }
    if (c === '[') {
      i++;
      const a: unknown[] = [];
      ws();
      if (text[i] === ']') { i++; return a; }
      for (;;) {
        a.push(value());
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === ']') { i++; return a; }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return str();
    const lit = /^(?:true|false|null|-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?)/.exec(text.slice(i, i + 400));
    if (!lit) return fail('unexpected token');
    i += lit[0].length;
    if (lit[0] === 'true') return true;
    if (lit[0] === 'false') return false;
    if (lit[0] === 'null') return null;
    const n = Number(lit[0]);
    return lit[1] !== undefined || lit[2] !== undefined ? new PyFloat(n) : n;
  };
  const v = value();
  ws();
  if (i !== text.length) fail('unexpected trailing text');
  return v;
}

/** Python values → plain JS (dicts as objects, floats as numbers): for code outside the template. */
export function fromPy(x: unknown): unknown {
  if (x instanceof PyFloat) return x.v;
  if (x instanceof Map) return Object.fromEntries([...x].map(([k, v]) => [String(k), fromPy(v)]));
  if (Array.isArray(x)) return x.map(fromPy);
  if (x instanceof Undefined) return undefined;
  return x;
}
