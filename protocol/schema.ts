// Bounded schema validation for decoded network messages: known fields only, types, bounds.
import { SchemaError } from './errors.ts';
import { MAX_ARRAY_LENGTH, MAX_STRING_LENGTH } from './constants.ts';

/** A validator returns the checked value or throws SchemaError naming the path. */
export type Validator<T> = (v: unknown, path: string) => T;

function fail(path: string, what: string, v: unknown): never {
  let got: string;
  if (v === null) got = 'null';
  else if (Array.isArray(v)) got = `array(${v.length})`;
  else if (v instanceof Uint8Array) got = `bytes(${v.length})`;
  else if (typeof v === 'string') got = `string(${v.length})`;
  else if (typeof v === 'number') got = `number ${v}`;
  else got = typeof v;
  throw new SchemaError(`${path}: expected ${what}, got ${got}`);
}

export function str(opts: { max?: number; pattern?: RegExp } = {}): Validator<string> {
  const max = opts.max ?? MAX_STRING_LENGTH;
  return (v, p) => {
    if (typeof v !== 'string' || v.length > max) fail(p, `string of at most ${max} chars`, v);
    if (opts.pattern !== undefined && !opts.pattern.test(v)) fail(p, `string matching ${opts.pattern}`, v);
    return v;
  };
}

export function int(min: number, max: number): Validator<number> {
  return (v, p) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) fail(p, `integer in [${min}, ${max}]`, v);
    return v;
  };
}

export function num(opts: { min?: number; max?: number } = {}): Validator<number> {
  const min = opts.min ?? -Number.MAX_VALUE;
  const max = opts.max ?? Number.MAX_VALUE;
  return (v, p) => {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) fail(p, `finite number in [${min}, ${max}]`, v);
    return v;
  };
}

export const bool: Validator<boolean> = (v, p) => {
  if (typeof v !== 'boolean') fail(p, 'boolean', v);
  return v;
};

export function bytes(max: number): Validator<Uint8Array> {
  return (v, p) => {
    if (!(v instanceof Uint8Array) || v.length > max) fail(p, `bytes of at most ${max}`, v);
    return v;
  };
}

export function oneOf<const T extends readonly string[]>(values: T): Validator<T[number]> {
  return (v, p) => {
    if (typeof v !== 'string' || !values.includes(v)) fail(p, `one of ${values.join('|')}`, v);
    return v as T[number];
  };
}

export function arr<T>(item: Validator<T>, max = MAX_ARRAY_LENGTH): Validator<T[]> {
  return (v, p) => {
    if (!Array.isArray(v) || v.length > max) fail(p, `array of at most ${max}`, v);
    return v.map((x, i) => item(x, `${p}[${i}]`));
  };
}

export function nullable<T>(inner: Validator<T>): Validator<T | null> {
  return (v, p) => (v === null ? null : inner(v, p));
}

/** Marks an object field as optional (absent or undefined). */
export interface Optional<T> { optional: true; v: Validator<T> }
export function opt<T>(v: Validator<T>): Optional<T> {
  return { optional: true, v };
}

type FieldSpec = Validator<unknown> | Optional<unknown>;
type Out<S extends Record<string, FieldSpec>> = {
  [K in keyof S as S[K] extends Optional<unknown> ? never : K]: S[K] extends Validator<infer T> ? T : never;
} & {
  [K in keyof S as S[K] extends Optional<unknown> ? K : never]?: S[K] extends Optional<infer T> ? T : never;
};

/** A plain object with exactly these fields: unknown fields are rejected, missing required ones too. */
export function obj<S extends Record<string, FieldSpec>>(spec: S): Validator<Out<S>> {
  const keys = Object.keys(spec);
  return (v, p) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v) || v instanceof Uint8Array) fail(p, 'object', v);
    const proto = Object.getPrototypeOf(v);
    if (proto !== Object.prototype && proto !== null) fail(p, 'plain object', v);
    const o = v as Record<string, unknown>;
    for (const k of Object.keys(o)) {
      if (!Object.hasOwn(spec, k)) throw new SchemaError(`${p}: unknown field "${k.slice(0, 64)}"`);
    }
    const out: Record<string, unknown> = {};
    for (const k of keys) {
      const f = spec[k]!;
      const has = Object.hasOwn(o, k) && o[k] !== undefined;
      if (typeof f === 'function') {
        if (!has) throw new SchemaError(`${p}: missing field "${k}"`);
        out[k] = f(o[k], `${p}.${k}`);
      } else if (has) {
        out[k] = f.v(o[k], `${p}.${k}`);
      }
    }
    return out as Out<S>;
  };
}

/** A string-keyed map with bounded size (keys validated by length). */
export function record<T>(item: Validator<T>, maxKeys = 1024): Validator<Record<string, T>> {
  return (v, p) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v) || v instanceof Uint8Array) fail(p, 'object', v);
    const o = v as Record<string, unknown>;
    const ks = Object.keys(o);
    if (ks.length > maxKeys) fail(p, `object with at most ${maxKeys} keys`, v);
    const out: Record<string, T> = Object.create(null);
    for (const k of ks) {
      if (k.length > 256 || k === '__proto__') throw new SchemaError(`${p}: bad key "${k.slice(0, 64)}"`);
      out[k] = item(o[k], `${p}.${k}`);
    }
    return out;
  };
}
