// Content addresses: the sha256 (lowercase hex) that names every blob the swarm moves.
import { createHash } from 'node:crypto';

export function sha256Hex(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}
