// Testing aids for resilience tests (not for production use; unset, each costs one lookup):
//   SWARMTUNE_TEST_DELAY_MS=<ms>        sleep this long inside every forward and backward job of this
//                                        volunteer (counted in its measured tokens/s): a slow peer
//   SWARMTUNE_TEST_BAD_OUTPUT=nan       send NaN in every activation (forward.hidden) and activation
//                                        gradient (backward.gradIn) this volunteer returns: a bad peer
// Both are read once, when the first stage host is created, and validated (a typo fails the join).
import type { WireTensor } from '../protocol/tensor.ts';
import { SwarmError } from '../protocol/errors.ts';

export interface TestAids { delayMs: number; badOutput: 'nan' | null }

let aids: TestAids | undefined;

export function testAids(): TestAids {
  if (aids !== undefined) return aids;
  const d = process.env.SWARMTUNE_TEST_DELAY_MS;
  const b = process.env.SWARMTUNE_TEST_BAD_OUTPUT;
  let delayMs = 0;
  if (d !== undefined && d !== '') {
    delayMs = Number(d);
    if (!Number.isInteger(delayMs) || delayMs < 0 || delayMs > 3_600_000) throw new SwarmError(`SWARMTUNE_TEST_DELAY_MS must be an integer number of ms in [0, 3600000], got "${d}"`);
  }
  if (b !== undefined && b !== '' && b !== 'nan') throw new SwarmError(`SWARMTUNE_TEST_BAD_OUTPUT must be "nan", got "${b}"`);
  aids = { delayMs, badOutput: b === 'nan' ? 'nan' : null };
  return aids;
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
