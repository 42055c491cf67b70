// Python-compatible JSON text (json.dumps) so files we write byte-match what transformers, PEFT and bitsandbytes write.

/** repr() of a Python float: shortest round-trip digits, exponent form when exp < -4 or exp >= 16,
 *  always a '.0' on integral values ("1.0", "1e-05", "1e+16"). */
export function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return 'Infinity';
  if (x === -Infinity) return '-Infinity';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  // toExponential() without an argument gives the shortest digit string that round-trips
  const m = /^(-?)(\d)(?:\.(\d+))?e([+-]\d+)$/.exec(x.toExponential());
  if (!m) throw new Error(`pyFloatRepr: unexpected toExponential() output for ${x}`);
  const sign = m[1];
  const digits = m[2] + (m[3] ?? '');
  const exp = Number(m[4]);
  if (exp < -4 || exp >= 16) {
    const mant = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    const e = Math.abs(exp).toString().padStart(2, '0');
    return `${sign}${mant}e${exp < 0 ? '-' : '+'}${e}`;
  }
  if (exp < 0) return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
  const intLen = exp + 1;
  if (digits.length <= intLen) return `${sign}${digits}${'0'.repeat(intLen - digits.length)}.0`;
  return `${sign}${digits.slice(0, intLen)}.${digits.slice(intLen)}`;
}

/** json.dumps string escaping with ensure_ascii=True (everything outside ' '..'~' as lowercase \uXXXX). */
export function pyJsonString(s: string): string {
  return JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

/** A number that must be written as a Python float even when integral (e.g. rope_theta 500000.0). */
export class PyFloat {
  readonly value: number;
  constructor(value: number) { this.value = value; }
}

export interface PyJsonOptions {
  /** json.dumps(indent=...): null = single line with ", " and ": " separators */
  indent?: number | null;
  sortKeys?: boolean;
  /** keys whose numeric values are Python floats (written with a '.0' when integral) */
  floatKeys?: ReadonlySet<string>;
}

/** json.dumps(value, indent, sort_keys) with Python's default separators and float repr. Non-integral
 *  numbers are floats; integral numbers are ints unless wrapped in PyFloat or named in floatKeys. */
export function pyJsonDumps(value: unknown, opts: PyJsonOptions = {}): string {
  const indent = opts.indent ?? null;
  const floatKeys = opts.floatKeys ?? new Set<string>();
  const num = (x: number, asFloat: boolean): string =>
    (!asFloat && Number.isInteger(x) && Math.abs(x) < 1e21) ? x.toFixed(0) : pyFloatRepr(x);
  const enc = (v: unknown, depth: number, asFloat: boolean): string => {
    if (v === null || v === undefined) return 'null';
    if (v instanceof PyFloat) return pyFloatRepr(v.value);
    if (typeof v === 'boolean') return v ? 'true' : 'false';
    if (typeof v === 'number') return num(v, asFloat);
    if (typeof v === 'bigint') return v.toString();
    if (typeof v === 'string') return pyJsonString(v);
    const pad = indent === null ? '' : '\n' + ' '.repeat(indent * (depth + 1));
    const padEnd = indent === null ? '' : '\n' + ' '.repeat(indent * depth);
    const sep = indent === null ? ', ' : ',';
    if (Array.isArray(v) || ArrayBuffer.isView(v)) {
      const arr = Array.from(v as ArrayLike<unknown>);
      if (arr.length === 0) return '[]';
      return '[' + arr.map((x) => pad + enc(x, depth + 1, asFloat)).join(sep) + padEnd + ']';
    }
    if (typeof v === 'object') {
      let keys = Object.keys(v as object).filter((k) => (v as Record<string, unknown>)[k] !== undefined);
      if (opts.sortKeys) keys = keys.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      if (keys.length === 0) return '{}';
      const rec = v as Record<string, unknown>;
      return '{' + keys.map((k) => pad + pyJsonString(k) + ': ' + enc(rec[k], depth + 1, floatKeys.has(k))).join(sep) + padEnd + '}';
    }
    throw new Error(`pyJsonDumps: cannot encode a value of type ${typeof v}`);
  };
  return enc(value, 0, false);
}
