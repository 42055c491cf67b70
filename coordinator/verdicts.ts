// The ban decision as one function: evidence about peers in, a verdict out. The data plane, the
// screens, the verifier and the apply step report what they saw; only judge() decides whom to ban,
// so a peer is never banned on another peer's word alone.
//
// What counts as proof:
// - what the coordinator checked itself (it decoded the tensor, it read the upload): direct evidence;
// - several computations of the same thing that disagree: the minority loses to a strict majority,
//   and every result unlike a trusted recompute (the coordinator's own) loses to it;
// - an accusation by a receiving peer is no proof: it asks for a confirmation (the accused's input
//   re-run on another replica), and the confirmation is judged as a disagreement. A wrong accusation
//   counts against the accuser (a strike), never against the sender.
import { ERROR_STREAK_BAN } from './constants.ts';

/** Who lost a verdict, and the evidence in words (the `peer_banned` event names it). */
export interface Ban { peerId: string; evidence: EvidenceKind; reason: string }

export type EvidenceKind = 'bad-tensor' | 'bad-upload' | 'error-answers' | 'disagreement' | 'accusation';

/** One computation's result in a disagreement: results in the same `value` class agree (how results
 *  are compared, bit for bit or within a tolerance, is the reporter's business). */
export interface Result { peerId: string; value: string }

export type Evidence =
  /** the coordinator itself found this peer's tensor (activation, gradient) non-finite, misshapen or
   *  outside the run's bounds */
  | { kind: 'bad-tensor'; peerId: string; what: string }
  /** the coordinator itself found this peer's upload (adapter, optimizer state) wrong */
  | { kind: 'bad-upload'; peerId: string; what: string }
  /** the peer, still up, answered `streak` requests in a row with an error (no success between) */
  | { kind: 'error-answers'; peerId: string; streak: number; last: string }
  /** several computations of one thing; `reference`: the class of a trusted recompute (the
   *  coordinator's), when there is one */
  | { kind: 'disagreement'; what: string; results: readonly Result[]; reference?: string }
  /** a receiving peer says the tensor `accused` sent it was bad */
  | { kind: 'accusation'; accuser: string; accused: string; what: string }
  /** the confirmation of an accusation: the accused's result and independent re-runs of its input */
  | { kind: 'confirmation'; accuser: string; accused: Result; reruns: readonly Result[]; reference?: string; what: string };

export type Verdict =
  /** nothing to ban; `strikes` count against these peers (a wrong accusation) */
  | { kind: 'clear'; strikes: string[] }
  /** `strikes`: as for clear (a wrong accusation whose re-runs disagreed among themselves) */
  | { kind: 'ban'; bans: Ban[]; strikes?: string[] }
  /** not yet judged: re-run the suspect's input on another replica (none of `exclude`), then judge
   *  the confirmation */
  | { kind: 'confirm'; suspect: string; exclude: string[]; what: string }
  /** a disagreement without a strict majority or a trusted reference: nobody can be blamed, and none
   *  of these results may count */
  | { kind: 'unresolved'; peers: string[]; what: string };

export interface JudgeLimits {
  /** error answers in a row (no success between) that ban a peer */
  errorStreakBan: number;
}

export { ERROR_STREAK_BAN };

const DEFAULT_LIMITS: JudgeLimits = { errorStreakBan: ERROR_STREAK_BAN };

/** The class most results share, if more than half of them do. */
function majority(results: readonly Result[]): string | null {
  const count = new Map<string, number>();
  for (const r of results) count.set(r.value, (count.get(r.value) ?? 0) + 1);
  for (const [v, n] of count) if (2 * n > results.length) return v;
  return null;
}

function losers(results: readonly Result[], winner: string, what: string, how: string): Ban[] {
  return results.filter((r) => r.value !== winner).map((r) => ({ peerId: r.peerId, evidence: 'disagreement' as const, reason: `${what}: its result differs from ${how}` }));
}

/** Judge a disagreement: all agree → clear; a trusted reference → everyone unlike it loses; else a
 *  strict majority (at least two results agreeing against one) → the others lose; else unresolved. */
function judgeDisagreement(what: string, results: readonly Result[], reference: string | undefined): Verdict {
  if (reference !== undefined) {
    const bans = losers(results, reference, what, "the coordinator's own recomputation");
    return bans.length > 0 ? { kind: 'ban', bans } : { kind: 'clear', strikes: [] };
  }
  const classes = new Set(results.map((r) => r.value));
  if (classes.size <= 1) return { kind: 'clear', strikes: [] };
  const m = majority(results);
  if (m === null) return { kind: 'unresolved', peers: results.map((r) => r.peerId), what };
  const agree = results.filter((r) => r.value === m).length;
  return { kind: 'ban', bans: losers(results, m, what, `${agree} of ${results.length} replicas that agree`) };
}

/** The one ban decision. Pure: the same evidence always gives the same verdict. */
export function judge(e: Evidence, limits: JudgeLimits = DEFAULT_LIMITS): Verdict {
  switch (e.kind) {
    case 'bad-tensor':
      return { kind: 'ban', bans: [{ peerId: e.peerId, evidence: 'bad-tensor', reason: `it sent a bad tensor: ${e.what}` }] };
    case 'bad-upload':
      return { kind: 'ban', bans: [{ peerId: e.peerId, evidence: 'bad-upload', reason: `its upload was refused: ${e.what}` }] };
    case 'error-answers':
      if (e.streak < limits.errorStreakBan) return { kind: 'clear', strikes: [] };
      return { kind: 'ban', bans: [{ peerId: e.peerId, evidence: 'error-answers', reason: `it answered ${e.streak} requests in a row with an error, staying up (last: ${e.last})` }] };
    case 'disagreement':
      return judgeDisagreement(e.what, e.results, e.reference);
    case 'accusation':
      // the accuser's word alone bans nobody
      return { kind: 'confirm', suspect: e.accused, exclude: [e.accused, e.accuser], what: e.what };
    case 'confirmation': {
      if (e.reruns.some((r) => r.peerId === e.accused.peerId || r.peerId === e.accuser)) {
        throw new RangeError(`confirmation of ${e.what}: a re-run must come from neither the accused nor the accuser`);
      }
      const v = judgeDisagreement(e.what, [e.accused, ...e.reruns], e.reference);
      if (v.kind === 'clear') return { kind: 'clear', strikes: [e.accuser] };
      if (v.kind === 'ban') {
        // the accused won against a re-run that lost: the accusation was wrong
        if (!v.bans.some((b) => b.peerId === e.accused.peerId)) return { kind: 'ban', bans: v.bans, strikes: [e.accuser] };
        // the accused lost: the accusation was right
        return { kind: 'ban', bans: v.bans.map((b) => (b.peerId === e.accused.peerId ? { ...b, evidence: 'accusation' as const, reason: `${e.what}: accused by ${e.accuser}, confirmed: its result differs from independent re-runs` } : b)) };
      }
      return v;
    }
  }
}

/** What one replica reported after applying a step's update (absent fields: it did not report). */
export interface DigestReport { peerId: string; adapterSha256?: string; optimizerSha256?: string }

/** The replicas of one stage after one apply: they must hold identical LoRA weights and optimizer
 *  state. The verdict over their digests (a strict majority wins; 1 vs 1 is unresolved) and the
 *  digests the winners share (null when unresolved, or when the winners reported none). */
export function judgeDigests(what: string, reports: readonly DigestReport[]): { verdict: Verdict; agreed: { adapterSha256: string; optimizerSha256: string } | null } {
  const key = (r: DigestReport): string => `${r.adapterSha256 ?? '-'}/${r.optimizerSha256 ?? '-'}`;
  const verdict = judge({ kind: 'disagreement', what, results: reports.map((r) => ({ peerId: r.peerId, value: key(r) })) });
  if (verdict.kind === 'unresolved' || verdict.kind === 'confirm') return { verdict, agreed: null };
  const banned = new Set(verdict.kind === 'ban' ? verdict.bans.map((b) => b.peerId) : []);
  const w = reports.find((r) => !banned.has(r.peerId));
  const agreed = w?.adapterSha256 !== undefined && w.optimizerSha256 !== undefined ? { adapterSha256: w.adapterSha256, optimizerSha256: w.optimizerSha256 } : null;
  return { verdict, agreed };
}
