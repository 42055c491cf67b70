// Testing aids for resilience and security tests (not for production use; unset, each costs one lookup):
//   SWARMTUNE_TEST_DELAY_MS=<ms>        sleep this long inside every forward and backward job of this
//                                        volunteer (counted in its measured tokens/s): a slow peer
//   SWARMTUNE_TEST_BAD_OUTPUT=nan       send NaN in every activation and activation gradient this
//                                        volunteer sends on a hop (every chunk): a bad peer
//                            =scale:<f> multiply each of them by f (finite, plausible: a cheater)
//                            =noise:<rel> add Gaussian noise of standard deviation rel × the tensor's RMS
//                            =zero      send zeros (a lazy peer)
//   SWARMTUNE_TEST_BAD_ADAPTER=foreign  its adapter uploads carry another stage's tensor names
//                             =shape    its first adapter tensor has one row too many
//                             =nan      its first adapter tensor is NaN
// All come from engine/env.ts's knobs(), validated when the volunteer's config is built (a typo
// fails the join); DELAY_MS's range is checked there, the others' syntax here.
import type { WireTensor } from '../protocol/tensor.ts';
import { SwarmError } from '../protocol/errors.ts';
import { knobs } from '../engine/env.ts';
import type { Knobs } from '../engine/env.ts';

export type BadOutput = { kind: 'nan' } | { kind: 'scale'; factor: number } | { kind: 'noise'; rel: number } | { kind: 'zero' };
export type BadAdapter = 'foreign' | 'shape' | 'nan';

export interface TestAids { delayMs: number; badOutput: BadOutput | null; badAdapter: BadAdapter | null }

const BAD_OUTPUT_SYNTAX = 'must be "nan", "zero", "scale:<factor>" or "noise:<relative std>" (a finite number)';

function parseBadOutput(b: string): BadOutput {
  if (b === 'nan' || b === 'zero') return { kind: b };
  const m = /^(scale|noise):(.+)$/.exec(b);
  const x = m !== null ? Number(m[2]) : Number.NaN;
  if (m === null || m[2]!.trim() === '' || !Number.isFinite(x) || (m[1] === 'noise' && x < 0)) {
    throw new SwarmError(`SWARMTUNE_TEST_BAD_OUTPUT ${BAD_OUTPUT_SYNTAX}, got "${b}"`);
  }
  return m[1] === 'scale' ? { kind: 'scale', factor: x } : { kind: 'noise', rel: x };
}

/** The test aids of these knobs (this process's by default). */
export function testAids(k: Pick<Knobs, 'testDelayMs' | 'testBadOutput' | 'testBadAdapter'> = knobs()): TestAids {
  const a = k.testBadAdapter;
  if (a !== undefined && a !== 'foreign' && a !== 'shape' && a !== 'nan') throw new SwarmError(`SWARMTUNE_TEST_BAD_ADAPTER must be "foreign", "shape" or "nan", got "${a}"`);
  return { delayMs: k.testDelayMs, badOutput: k.testBadOutput === undefined ? null : parseBadOutput(k.testBadOutput), badAdapter: a ?? null };
}

/** The same tensor with every element NaN, encoded by hand (encodeTensor refuses non-finite data). */
export function poisoned(t: WireTensor): WireTensor {
  if (t.codec !== 'f32') {
    // bf16/int8 cannot carry NaN the same way; an f32 tensor of the same shape does
    const n = t.shape.reduce((a, b) => a * b, 1);
    return { ...t, codec: 'f32', dtype: 'f32', bytes: new Uint8Array(new Float32Array(n).fill(Number.NaN).buffer) };
  }
  const bytes = new Uint8Array(t.bytes.length);
  new Float32Array(bytes.buffer).fill(Number.NaN);
  return { ...t, bytes };
}

/** xorshift32 → standard normal pairs (Box–Muller): the noise aid, reproducible per process. */
let noiseState = 0x9e3779b9;
function uniform(): number {
  noiseState ^= noiseState << 13; noiseState >>>= 0;
  noiseState ^= noiseState >>> 17;
  noiseState ^= noiseState << 5; noiseState >>>= 0;
  return (noiseState + 0.5) / 2 ** 32;
}

/** An activation or activation gradient as the bad-output aid would send it on a hop (scale, noise,
 *  zero; `nan` is applied to each encoded chunk by `poisoned`, since the encoder refuses NaN); the
 *  original array is left as it was. */
export function tamperOutput(aids: TestAids, x: Float32Array): Float32Array {
  const b = aids.badOutput;
  if (b === null || b.kind === 'nan') return x;
  if (b.kind === 'zero') return new Float32Array(x.length);
  if (b.kind === 'scale') return x.map((v) => v * b.factor);
  let ss = 0;
  for (const v of x) ss += v * v;
  const sd = b.rel * Math.sqrt(ss / Math.max(1, x.length));
  const y = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) y[i] = x[i]! + sd * Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
  return y;
}

/** The adapter page as the bad-adapter aid would upload it: tensors of layers [layerStart, layerEnd)
 *  renamed to another stage's layers (foreign: the next stage's, or for the last stage the first
 *  layers), or the first tensor misshapen or NaN. */
export function tamperAdapter(aids: TestAids, tensors: Array<{ name: string; tensor: WireTensor }>, from: number,
  range: { layerStart: number; layerEnd: number; isLast: boolean }): Array<{ name: string; tensor: WireTensor }> {
  const a = aids.badAdapter;
  if (a === null) return tensors;
  if (a === 'foreign') {
    const n = range.layerEnd - range.layerStart;
    return tensors.map(({ name, tensor }) => ({
      name: name.replace(/\.layers\.(\d+)\./, (_, l: string) => `.layers.${range.isLast ? Number(l) - range.layerStart : Number(l) + n}.`), tensor,
    }));
  }
  if (from > 0 || tensors.length === 0) return tensors;
  const [first, ...rest] = tensors;
  const t = first!.tensor;
  if (a === 'nan') return [{ name: first!.name, tensor: poisoned(t) }, ...rest];
  // one more row of the same codec: the byte length follows the shape, so only the shape is wrong
  const rowBytes = t.bytes.length / t.shape[0]!;
  const bytes = new Uint8Array(t.bytes.length + rowBytes);
  bytes.set(t.bytes);
  return [{ name: first!.name, tensor: { ...t, shape: [t.shape[0]! + 1, ...t.shape.slice(1)], bytes } }, ...rest];
}
