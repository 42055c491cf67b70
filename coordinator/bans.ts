// Bans with backoff: a banned peer is out of the run for a period that doubles with each ban of the
// same peer id (30 s, 60 s, 2 min, … capped at 1 h), then may rejoin as a late joiner.
import { SwarmError } from '../protocol/errors.ts';
import { BAN_BASE_MS, BAN_MAX_MS } from './constants.ts';

export interface BanRecord {
  /** bans of this peer id so far */
  count: number;
  /** when the current (latest) ban ends, ms since the epoch */
  untilMs: number;
  durationMs: number;
  reason: string;
}

/** A duration in words: "45 s", "2 min 5 s", "1 h 3 min". */
export function inWords(ms: number): string {
  const s = Math.max(0, Math.ceil(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60), rs = s % 60;
  if (m < 60) return rs > 0 ? `${m} min ${rs} s` : `${m} min`;
  const h = Math.floor(m / 60), rm = m % 60;
  return rm > 0 ? `${h} h ${rm} min` : `${h} h`;
}

export class BanList {
  private readonly records = new Map<string, BanRecord>();
  private readonly baseMs: number;
  private readonly maxMs: number;

  constructor(baseMs = BAN_BASE_MS, maxMs = BAN_MAX_MS) {
    if (!(baseMs > 0) || !(maxMs >= baseMs)) throw new SwarmError(`ban backoff needs 0 < base (${baseMs}) <= max (${maxMs})`);
    this.baseMs = baseMs;
    this.maxMs = maxMs;
  }

  /** Ban `peerId` now: the n-th ban lasts base·2^(n−1), capped. */
  ban(peerId: string, reason: string, nowMs = Date.now()): BanRecord {
    const count = (this.records.get(peerId)?.count ?? 0) + 1;
    const durationMs = Math.min(this.maxMs, this.baseMs * 2 ** Math.min(count - 1, 40));
    const r: BanRecord = { count, untilMs: nowMs + durationMs, durationMs, reason };
    this.records.set(peerId, r);
    return r;
  }

  get(peerId: string): BanRecord | undefined { return this.records.get(peerId); }

  /** Every record (for the run's LevelDB: bans outlive a coordinator restart). */
  entries(): Record<string, BanRecord> { return Object.fromEntries(this.records); }

  /** Take back records saved by entries(); a malformed one is an error naming the peer. */
  restore(saved: Record<string, BanRecord>): void {
    for (const [peerId, r] of Object.entries(saved)) {
      const ok = typeof r === 'object' && r !== null && Number.isInteger(r.count) && r.count >= 1 &&
        Number.isFinite(r.untilMs) && Number.isFinite(r.durationMs) && typeof r.reason === 'string';
      if (!ok) throw new SwarmError(`saved ban of peer ${peerId} is malformed: ${JSON.stringify(r).slice(0, 200)}`);
      this.records.set(peerId, { count: r.count, untilMs: r.untilMs, durationMs: r.durationMs, reason: r.reason });
    }
  }

  /** ms left of the peer's current ban, 0 when it is not banned (or its ban ended) */
  remainingMs(peerId: string, nowMs = Date.now()): number {
    const r = this.records.get(peerId);
    return r === undefined ? 0 : Math.max(0, r.untilMs - nowMs);
  }

  /** The reason a join of this peer is refused now, in words, or null when it may join. */
  refusal(peerId: string, nowMs = Date.now()): string | null {
    const r = this.records.get(peerId);
    const left = this.remainingMs(peerId, nowMs);
    if (r === undefined || left === 0) return null;
    return `this peer is banned from the run for another ${inWords(left)} (ban ${r.count}, ${inWords(r.durationMs)}: ${r.reason}); ` +
      'it may join again when the ban ends, and a further ban lasts twice as long';
  }
}
