// Testing aids for resilience tests (not for production use; unset, each costs one lookup):
//   SWARMTUNE_TEST_DELAY_MS=<ms>        sleep this long inside every forward and backward job of this
//                                        volunteer (counted in its measured tokens/s): a slow peer
//   SWARMTUNE_TEST_BAD_OUTPUT=nan       send NaN in every activation and activation gradient this
//                                        volunteer sends on a hop (every chunk): a bad peer
// Both come from engine/env.ts's knobs(), validated when the volunteer's config is built (a typo
// fails the join); DELAY_MS's range is checked there, BAD_OUTPUT's syntax here.
import type { WireTensor } from '../protocol/tensor.ts';
import { SwarmError } from '../protocol/errors.ts';
import { knobs } from '../engine/env.ts';
import type { Knobs } from '../engine/env.ts';

export interface TestAids { delayMs: number; badOutput: 'nan' | null }

/** The test aids of these knobs (this process's by default). */
export function testAids(k: Pick<Knobs, 'testDelayMs' | 'testBadOutput'> = knobs()): TestAids {
  const b = k.testBadOutput;
  if (b !== undefined && b !== 'nan') throw new SwarmError(`SWARMTUNE_TEST_BAD_OUTPUT must be "nan", got "${b}"`);
  return { delayMs: k.testDelayMs, badOutput: b === 'nan' ? 'nan' : null };
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
