// A simulated volunteer: its drawn machine, its compute queue and link FIFOs, what it did (for the figures).
import type { SimPeerSpec } from './cost.ts';

/** A request to a peer that left (its connection resets one round trip later). */
export class PeerGoneError extends Error {
  override name = 'PeerGoneError';
  readonly peerId: string;
  constructor(peerId: string) { super(`peer ${peerId} left`); this.peerId = peerId; }
}

/** The simulated volunteer: one compute job at a time (backward before forward, as node/job-queue.ts),
 *  a link with a FIFO each way. */
export class SimPeer {
  readonly spec: SimPeerSpec;
  left = false;
  joinedAtMs: number;
  firstMicroBatchMs: number | null = null;
  late: boolean;
  /** serving (a live replica) since, for utilization and the ideal */
  servingSinceMs: number | null = null;
  servingMs = 0;
  busyMs = 0;
  computeMs = 0;
  computeTokens = 0;
  upFreeMs = 0;
  downFreeMs = 0;
  running = false;
  readonly queue: Array<{ backward: boolean; ms: number; ok: () => void; fail: (e: Error) => void }> = [];
  readonly waiting = new Set<(e: Error) => void>();
  /** where in the heartbeat period its beats fall, in [0, 1) (deterministic in the peer's index) */
  get phase(): number { return (Number(this.spec.id.slice(1)) * 0.6180339887) % 1; }
  constructor(spec: SimPeerSpec, nowMs: number, late: boolean) { this.spec = spec; this.joinedAtMs = nowMs; this.late = late; }

  get id(): string { return this.spec.id; }
}

