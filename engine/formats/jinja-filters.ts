// jinja2's filters, tests and the str/dict/list methods a sandboxed template may call, with Python's semantics
// (used by jinja.ts). Unknown names are errors that name the filter, test or method.
import {
  Namespace, PyFloat, PyFunc, PyTuple, TemplateError, Undefined, isDict, isInt, isNum, numVal, pyChars, pyCompare, pyEq,
  pyJsonDumps, pyLen, pyRepr, pyStr, pySplit, pyStrip, pyTruthy, typeName,
} from './jinja-values.ts';
import type { Kwargs } from './jinja-values.ts';

/** What filters need from the interpreter: apply another filter or test by name (map, select, ...). */
export interface FilterContext {
  filter(name: string, value: unknown, args: unknown[], kwargs: Kwargs): unknown;
  test(name: string, value: unknown, args: unknown[]): boolean;
}

function undefinedError(u: Undefined): TemplateError {
  return new TemplateError(`${u.hint} is undefined`);
}

/** Items of an iterable, as jinja2's for loop and list() see them. */
export function pyIter(x: unknown): unknown[] {
  if (x instanceof Undefined) return [];
  if (Array.isArray(x)) return x;
  if (typeof x === 'string') return pyChars(x);
  if (isDict(x)) return [...x.keys()];
  throw new TemplateError(`'${typeName(x)}' object is not iterable`);
}

export function pyLength(x: unknown): number {
  if (typeof x === 'string') return pyLen(x);
  if (Array.isArray(x)) return x.length;
  if (isDict(x)) return x.size;
  if (x instanceof Undefined) return 0;
  throw new TemplateError(`object of type '${typeName(x)}' has no len()`);
}

/** environment.getattr(obj, name) / getitem for a plain key: item lookup on dicts, attributes otherwise. */
export function getAttr(obj: unknown, name: string, hint: string): unknown {
  if (obj instanceof Undefined) throw undefinedError(obj);
  const m = method(obj, name);
  if (m !== undefined) return m;
  if (isDict(obj)) return obj.has(name) ? obj.get(name) : new Undefined(`'dict object' has no attribute '${name}' (${hint})`);
  if (obj instanceof Namespace) return obj.map.has(name) ? obj.map.get(name) : new Undefined(`'Namespace' has no attribute '${name}'`);
  return new Undefined(`'${typeName(obj)} object' has no attribute '${name}' (${hint})`);
}

export function getItem(obj: unknown, key: unknown, hint: string): unknown {
  if (obj instanceof Undefined) throw undefinedError(obj);
  if (isDict(obj)) {
    if (obj.has(key)) return obj.get(key);
    for (const [k, v] of obj) if (pyEq(k, key)) return v;
    return typeof key === 'string' ? getAttr(obj, key, hint) : new Undefined(`'dict object' has no item ${pyRepr(key)} (${hint})`);
  }
  if (obj instanceof Namespace && typeof key === 'string') return getAttr(obj, key, hint);
  if ((Array.isArray(obj) || typeof obj === 'string') && (isInt(key) || typeof key === 'boolean')) {
    const seq = typeof obj === 'string' ? pyChars(obj) : obj;
    const i = Number(key) < 0 ? Number(key) + seq.length : Number(key);
    return i >= 0 && i < seq.length ? seq[i] : new Undefined(`${typeName(obj)} index ${Number(key)} out of range (${hint})`);
  }
  if (typeof key === 'string') return getAttr(obj, key, hint);
  return new Undefined(`'${typeName(obj)} object' has no item ${pyRepr(key)} (${hint})`);
}

const fn = (name: string, f: (args: unknown[], kw: Kwargs) => unknown): PyFunc => new PyFunc(name, f);
const arg = (args: unknown[], kw: Kwargs, i: number, name: string, dflt: unknown): unknown =>
  args.length > i ? args[i] : kw.has(name) ? kw.get(name) : dflt;

function strArg(x: unknown, what: string): string {
  if (typeof x !== 'string') throw new TemplateError(`${what} must be str, not ${typeName(x)}`);
  return x;
}

/** Methods of str, dict and list (the read-only ones an ImmutableSandboxedEnvironment allows). */
function method(obj: unknown, name: string): PyFunc | undefined {
  if (typeof obj === 'string') {
    const s = obj;
    switch (name) {
      case 'strip': case 'lstrip': case 'rstrip':
        return fn(name, (a, k) => pyStrip(s, arg(a, k, 0, 'chars', null), name !== 'rstrip', name !== 'lstrip'));
      case 'split':
        return fn(name, (a, k) => pySplit(s, arg(a, k, 0, 'sep', null), Number(arg(a, k, 1, 'maxsplit', -1))));
      case 'startswith': case 'endswith':
        return fn(name, (a) => {
          const p = a[0];
          const ps = Array.isArray(p) ? p.map((x) => strArg(x, `${name} first arg`)) : [strArg(p, `${name} first arg`)];
          return ps.some((x) => (name === 'startswith' ? s.startsWith(x) : s.endsWith(x)));
        });
      case 'replace':
        return fn(name, (a, k) => {
          const [o, n] = [strArg(a[0], 'replace() argument 1'), strArg(a[1], 'replace() argument 2')];
          let count = Number(arg(a, k, 2, 'count', -1));
          if (count < 0) return o === '' ? pyChars(s).join(n).replace(/^/, n) + n : s.split(o).join(n);
          let out = '', rest = s;
          while (count-- > 0) {
            const at = rest.indexOf(o);
            if (at < 0) break;
            out += rest.slice(0, at) + n;
            rest = rest.slice(at + o.length);
          }
          return out + rest;
        });
      case 'upper': return fn(name, () => s.toUpperCase());
      case 'lower': return fn(name, () => s.toLowerCase());
      case 'capitalize': return fn(name, () => { const c = pyChars(s); return c.length ? c[0].toUpperCase() + c.slice(1).join('').toLowerCase() : ''; });
      case 'title': return fn(name, () => s.toLowerCase().replace(/(^|[^\p{L}\p{N}'])(\p{L})/gu, (_, p: string, l: string) => p + l.toUpperCase()));
      case 'find': case 'rfind': case 'count':
        return fn(name, (a) => {
          const sub = strArg(a[0], `${name}() argument`);
          if (name === 'count') return sub === '' ? pyLen(s) + 1 : s.split(sub).length - 1;
          const at = name === 'find' ? s.indexOf(sub) : s.lastIndexOf(sub);
          return at < 0 ? -1 : pyLen(s.slice(0, at));
        });
      case 'join': return fn(name, (a) => pyIter(a[0]).map((x) => strArg(x, 'sequence item')).join(s));
      case 'isdigit': return fn(name, () => s.length > 0 && /^\p{Nd}+$/u.test(s));
      case 'isalpha': return fn(name, () => s.length > 0 && /^\p{L}+$/u.test(s));
      case 'isspace': return fn(name, () => s.length > 0 && pyStrip(s, null, true, true) === '');
      case 'splitlines': return fn(name, () => s.split(/\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]/).filter((x, i, all) => i < all.length - 1 || x !== ''));
      default: return undefined;
    }
  }
  if (isDict(obj)) {
    const d = obj;
    switch (name) {
      case 'items': return fn(name, () => [...d].map(([k, v]) => PyTuple.of2(k, v)));
      case 'keys': return fn(name, () => [...d.keys()]);
      case 'values': return fn(name, () => [...d.values()]);
      case 'get': return fn(name, (a) => {
        for (const [k, v] of d) if (pyEq(k, a[0])) return v;
        return a.length > 1 ? a[1] : null;
      });
      case 'copy': return fn(name, () => new Map(d));
      default: return undefined;
    }
  }
  if (Array.isArray(obj)) {
    const l = obj;
    switch (name) {
      case 'index': return fn(name, (a) => {
        const i = l.findIndex((x) => pyEq(x, a[0]));
        if (i < 0) throw new TemplateError(`${pyRepr(a[0])} is not in list`);
        return i;
      });
      case 'count': return fn(name, (a) => l.filter((x) => pyEq(x, a[0])).length);
      case 'append': case 'extend': case 'pop': case 'insert': case 'remove': case 'clear': case 'sort': case 'reverse':
        return fn(name, () => { throw new TemplateError(`access to ${typeName(l)}.${name} is unsafe: the sandbox is immutable`); });
      default: return undefined;
    }
  }
  return undefined;
}

function attrPath(x: unknown, path: unknown): unknown {
  let v = x;
  for (const part of String(path).split('.')) v = /^\d+$/.test(part) ? getItem(v, Number(part), 'attribute') : getItem(v, part, 'attribute');
  return v;
}

function escapeHtml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&#34;').replace(/'/g, '&#39;');
}

function toInt(x: unknown, dflt: unknown): unknown {
  if (typeof x === 'boolean') return Number(x);
  if (isInt(x)) return x;
  if (x instanceof PyFloat) return Math.trunc(x.v);
  if (typeof x === 'string') {
    const t = pyStrip(x, null, true, true).replace(/_/g, '');
    if (/^[+-]?\d+$/.test(t)) return Number(t);
    if (/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(t)) return Math.trunc(Number(t));
  }
  return dflt;
}

export function applyFilter(ctx: FilterContext, name: string, v: unknown, args: unknown[], kw: Kwargs): unknown {
  const a = (i: number, n: string, d: unknown): unknown => arg(args, kw, i, n, d);
  const k = (n: string, d: unknown): unknown => (kw.has(n) ? kw.get(n) : d);
  if (v instanceof Undefined && ['int', 'float', 'abs', 'round', 'dictsort', 'attr'].includes(name)) throw undefinedError(v);
  switch (name) {
    case 'safe': return v;
    case 'string': return pyStr(v);
    case 'e': case 'escape': return escapeHtml(pyStr(v));
    case 'tojson': {
      if (v instanceof Undefined) throw new TemplateError(`Object of type Undefined is not JSON serializable (${v.hint})`);
      // transformers' tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) = json.dumps
      const indent = a(1, 'indent', null);
      const seps = a(2, 'separators', null);
      return pyJsonDumps(v, {
        indent: indent === null ? null : (isInt(indent) ? indent : String(indent)),
        separators: Array.isArray(seps) ? [String(seps[0]), String(seps[1])] : null,
        sortKeys: pyTruthy(a(3, 'sort_keys', false)),
        ensureAscii: pyTruthy(a(0, 'ensure_ascii', false)),
      });
    }
    case 'length': case 'count': return pyLength(v);
    case 'list': return [...pyIter(v)];
    case 'first': { const it = pyIter(v); return it.length ? it[0] : new Undefined('first item of an empty sequence'); }
    case 'last': { const it = pyIter(v); return it.length ? it[it.length - 1] : new Undefined('last item of an empty sequence'); }
    case 'reverse': return typeof v === 'string' ? pyChars(v).reverse().join('') : [...pyIter(v)].reverse();
    case 'join': {
      const sep = pyStr(a(0, 'd', ''));
      const attr = a(1, 'attribute', null);
      return pyIter(v).map((x) => pyStr(attr === null ? x : attrPath(x, attr))).join(sep);
    }
    case 'trim': return pyStrip(pyStr(v), a(0, 'chars', null), true, true);
    case 'upper': return pyStr(v).toUpperCase();
    case 'lower': return pyStr(v).toLowerCase();
    case 'capitalize': { const c = pyChars(pyStr(v)); return c.length ? c[0].toUpperCase() + c.slice(1).join('').toLowerCase() : ''; }
    case 'title': return pyStr(v).split(/([-\s(\[{<]+)/).map((w) => (w ? w[0].toUpperCase() + w.slice(1).toLowerCase() : w)).join('');
    case 'replace': {
      const count = a(2, 'count', null);
      return (getAttr(pyStr(v), 'replace', 'filter') as PyFunc).call([a(0, 'old', ''), a(1, 'new', ''), count === null ? -1 : count], new Map());
    }
    case 'default': case 'd': {
      const boolean = pyTruthy(a(1, 'boolean', false));
      return v instanceof Undefined || (boolean && !pyTruthy(v)) ? a(0, 'default_value', '') : v;
    }
    case 'int': return toInt(v, a(0, 'default', 0));
    case 'float': {
      if (isNum(v)) return new PyFloat(numVal(v));
      const t = typeof v === 'string' ? pyStrip(v, null, true, true) : '';
      return /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(t) ? new PyFloat(Number(t)) : a(0, 'default', new PyFloat(0));
    }
    case 'abs': return v instanceof PyFloat ? new PyFloat(Math.abs(v.v)) : Math.abs(Number(v));
    case 'round': {
      const p = Number(a(0, 'precision', 0));
      const method = a(1, 'method', 'common');
      const x = numVal(v as number), f = 10 ** p;
      const r = method === 'floor' ? Math.floor(x * f) / f : method === 'ceil' ? Math.ceil(x * f) / f : Math.sign(x) * Math.round(Math.abs(x) * f) / f;
      return new PyFloat(r);
    }
    case 'items': {
      if (v instanceof Undefined) return [];
      if (!isDict(v)) throw new TemplateError(`Can only get item pairs from a mapping, not ${typeName(v)}`);
      return [...v].map(([k, x]) => PyTuple.of2(k, x));
    }
    case 'dictsort': {
      if (!isDict(v)) throw new TemplateError(`dictsort needs a mapping, not ${typeName(v)}`);
      const byValue = a(1, 'by', 'key') === 'value';
      const reverse = pyTruthy(a(2, 'reverse', false));
      const cs = pyTruthy(a(0, 'case_sensitive', false));
      const key = (x: unknown): unknown => (!cs && typeof x === 'string' ? x.toLowerCase() : x);
      const items = [...v].map(([k, x]) => PyTuple.of2(k, x));
      items.sort((p, q) => pyCompare(key(p[byValue ? 1 : 0]), key(q[byValue ? 1 : 0])) * (reverse ? -1 : 1));
      return items;
    }
    case 'sort': {
      const reverse = pyTruthy(a(0, 'reverse', false));
      const cs = pyTruthy(a(1, 'case_sensitive', false));
      const attr = a(2, 'attribute', null);
      const key = (x: unknown): unknown => {
        const y = attr === null ? x : attrPath(x, attr);
        return !cs && typeof y === 'string' ? y.toLowerCase() : y;
      };
      return [...pyIter(v)].sort((p, q) => pyCompare(key(p), key(q)) * (reverse ? -1 : 1));
    }
    case 'unique': {
      const out: unknown[] = [];
      const attr = a(1, 'attribute', null);
      const cs = pyTruthy(a(0, 'case_sensitive', false));
      const key = (x: unknown): unknown => { const y = attr === null ? x : attrPath(x, attr); return !cs && typeof y === 'string' ? y.toLowerCase() : y; };
      for (const x of pyIter(v)) if (!out.some((y) => pyEq(key(x), key(y)))) out.push(x);
      return out;
    }
    case 'min': case 'max': {
      const it = pyIter(v);
      if (it.length === 0) return new Undefined(`${name} of an empty sequence`);
      return it.reduce((p, q) => ((pyCompare(q, p) < 0) === (name === 'min') && pyCompare(q, p) !== 0 ? q : p));
    }
    case 'sum': {
      const attr = a(0, 'attribute', null);
      let acc: unknown = a(1, 'start', 0);
      for (const x of pyIter(v)) {
        const y = attr === null ? x : attrPath(x, attr);
        const isF = acc instanceof PyFloat || y instanceof PyFloat;
        const s = numVal(acc as number) + numVal(y as number);
        acc = isF ? new PyFloat(s) : s;
      }
      return acc;
    }
    case 'map': {
      const attr = k('attribute', undefined);
      if (attr !== undefined) {
        const dflt = k('default', undefined);
        return pyIter(v).map((x) => { const y = attrPath(x, attr); return y instanceof Undefined && dflt !== undefined ? dflt : y; });
      }
      const fname = strArg(args[0], 'map filter name');
      return pyIter(v).map((x) => ctx.filter(fname, x, args.slice(1), kw));
    }
    case 'select': case 'reject': {
      const keep = name === 'select';
      return pyIter(v).filter((x) => (args.length === 0 ? pyTruthy(x) : ctx.test(strArg(args[0], `${name} test name`), x, args.slice(1))) === keep);
    }
    case 'selectattr': case 'rejectattr': {
      const keep = name === 'selectattr';
      const attr = args[0];
      return pyIter(v).filter((x) => {
        const y = attrPath(x, attr);
        return (args.length < 2 ? pyTruthy(y) : ctx.test(strArg(args[1], `${name} test name`), y, args.slice(2))) === keep;
      });
    }
    case 'indent': {
      const width = a(0, 'width', 4);
      const first = pyTruthy(a(1, 'first', false));
      const blank = pyTruthy(a(2, 'blank', false));
      const pad = typeof width === 'string' ? width : ' '.repeat(Number(width));
      const lines = pyStr(v).split('\n');
      return lines.map((l, i) => ((i === 0 && !first) || (!blank && pyStrip(l, null, true, true) === '') ? l : pad + l)).join('\n');
    }
    case 'wordcount': return (pyStr(v).match(/\w+/gu) ?? []).length;
    case 'attr': return getAttr(v, strArg(args[0], 'attr name'), 'attr filter');
    case 'batch': {
      const n = Number(args[0]);
      const it = pyIter(v), out: unknown[][] = [];
      for (let i = 0; i < it.length; i += n) out.push(it.slice(i, i + n));
      if (args.length > 1 && out.length && out[out.length - 1].length < n) while (out[out.length - 1].length < n) out[out.length - 1].push(args[1]);
      return out;
    }
    case 'pprint': return pyRepr(v);
    default: throw new TemplateError(`no filter named '${name}'`);
  }
}

export function applyTest(name: string, v: unknown, args: unknown[]): boolean {
  switch (name) {
    case 'defined': return !(v instanceof Undefined);
    case 'undefined': return v instanceof Undefined;
    case 'none': return v === null;
    case 'boolean': return typeof v === 'boolean';
    case 'true': return v === true;
    case 'false': return v === false;
    case 'integer': return isInt(v);
    case 'float': return v instanceof PyFloat;
    case 'number': return isNum(v);
    case 'string': return typeof v === 'string';
    case 'mapping': return isDict(v);
    // iter() works on str, list, dict and Undefined (an empty iterator)
    case 'iterable': return typeof v === 'string' || Array.isArray(v) || isDict(v) || v instanceof Undefined;
    case 'sequence': return typeof v === 'string' || Array.isArray(v) || isDict(v);
    case 'callable': return v instanceof PyFunc;
    case 'odd': case 'even': {
      if (!isInt(v) && typeof v !== 'boolean') throw new TemplateError(`${name} test needs an int, got ${typeName(v)}`);
      return (((Number(v) % 2) + 2) % 2 === 1) === (name === 'odd');
    }
    case 'divisibleby': return numVal(v as number) % numVal(args[0] as number) === 0;
    case 'eq': case 'equalto': case '==': return pyEq(v, args[0]);
    case 'ne': case '!=': return !pyEq(v, args[0]);
    case 'lt': case 'lessthan': case '<': return pyCompare(v, args[0]) < 0;
    case 'le': case '<=': return pyCompare(v, args[0]) <= 0;
    case 'gt': case 'greaterthan': case '>': return pyCompare(v, args[0]) > 0;
    case 'ge': case '>=': return pyCompare(v, args[0]) >= 0;
    case 'in': return pyContains(args[0], v);
    case 'sameas': return v === args[0] || (v === null && args[0] === null);
    case 'lower': return typeof v === 'string' && v === v.toLowerCase();
    case 'upper': return typeof v === 'string' && v === v.toUpperCase();
    case 'escaped': return false;
    default: throw new TemplateError(`no test named '${name}'`);
  }
}

/** `needle in haystack` */
export function pyContains(hay: unknown, needle: unknown): boolean {
  if (typeof hay === 'string') {
    if (typeof needle !== 'string') throw new TemplateError(`'in <string>' requires string as left operand, not ${typeName(needle)}`);
    return hay.includes(needle);
  }
  if (Array.isArray(hay)) return hay.some((x) => pyEq(x, needle));
  if (isDict(hay)) {
    for (const k of hay.keys()) if (pyEq(k, needle)) return true;
    return false;
  }
  if (hay instanceof Undefined) return false;
  if (hay instanceof Namespace) return typeof needle === 'string' && hay.map.has(needle);
  throw new TemplateError(`argument of type '${typeName(hay)}' is not iterable`);
}
