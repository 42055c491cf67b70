// sha256 of a set of LoRA tensors, bit for bit: how a restarted coordinator and a volunteer that kept
// its stage agree that the volunteer holds exactly the committed adapter.
import { createHash } from 'node:crypto';

export interface DigestTensor { name: string; shape: readonly number[]; data: Float32Array }

/** Hex sha256 over the tensors sorted by name: each contributes its name, its shape and its float32
 *  values as little-endian bytes, so the digest depends on the bits and not on the tensor order. */
export function adapterDigest(tensors: readonly DigestTensor[]): string {
  const h = createHash('sha256');
  const sorted = [...tensors].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const le = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
  for (const t of sorted) {
    h.update(`${t.name}\0${t.shape.join(',')}\0${t.data.length}\0`);
    if (le) {
      h.update(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    } else {
      const b = Buffer.alloc(t.data.byteLength);
      for (let i = 0; i < t.data.length; i++) b.writeFloatLE(t.data[i]!, 4 * i);
      h.update(b);
    }
  }
  return h.digest('hex');
}
