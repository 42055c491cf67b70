// Admission: who may join, fetch blobs and pull, and the joined peers waiting to be planned or placed.
import { AuthError } from '../protocol/errors.ts';
import type { JoinRequest, JoinResponse } from '../protocol/messages.ts';
import { parseMultiaddr } from '../protocol/net.ts';
import type { PeerRegistry } from './peers.ts';
import type { RunStatus } from './status.ts';

/** A joined peer whose join request is answered when it is placed (or refused). */
export interface PendingJoin { peerId: string; resolve: (r: JoinResponse) => void }

export interface AccessRules {
  token: string | null;
  /** private runs: peer ids admitted (with the token too, when both are set); null = no allowlist */
  allowPeers: Set<string> | null;
}

/** A private run (join token and/or peer-id allowlist) admits only peers that satisfy both of
 *  what is set: to join, fetch blobs or pull (unless pulls are public). */
export function authorize(rules: AccessRules, peerId: string, token: string | undefined, what: string): void {
  if (rules.token !== null && token !== rules.token) {
    throw new AuthError(what === 'join' ? 'this run is private: a valid --token is required to join' : `${what}: this run is private: a valid --token is required`);
  }
  if (rules.allowPeers !== null && !rules.allowPeers.has(peerId)) throw new AuthError(`${what}: this run is private: peer ${peerId} is not on its allowlist`);
}

export interface AdmissionInit {
  access: AccessRules;
  minPeers: number;
  peers: PeerRegistry;
  status: RunStatus;
  /** true once the stages are planned: later joiners wait for a step boundary */
  planned: () => boolean;
  /** minPeers have joined before the plan: plan the stages over them */
  onQuorum: (joined: PendingJoin[]) => void;
}

export class Admission {
  private readonly o: AdmissionInit;
  private pending: PendingJoin[] = [];
  /** peers that joined after planning, placed at a step boundary */
  private late: PendingJoin[] = [];

  constructor(o: AdmissionInit) {
    this.o = o;
  }

  async onJoin(req: JoinRequest, peerId: string): Promise<JoinResponse> {
    const { peers, status } = this.o;
    authorize(this.o.access, peerId, req.token ?? undefined, 'join');
    if (status.state === 'finished' || status.state === 'failed') return { status: 'rejected', reason: `the run is ${status.state}`, assignment: null };
    const refusal = peers.refusal(peerId);
    if (refusal !== null) {
      status.note(`refused a join of banned peer ${peerId}: ${refusal}`);
      return { status: 'rejected', reason: refusal, assignment: null };
    }
    const addrs = req.listenAddrs.map((a) => parseMultiaddr(a.includes('/p2p/') ? a : `${a}/p2p/${peerId}`));
    peers.join(peerId, req.capabilities, addrs, req.kept, this.o.planned());
    // a volunteer relay (join --relay) is sent the member list with its next heartbeat, also after a restart
    Object.assign(peers.get(peerId)!, { relay: req.relay === true, membersSent: undefined });
    if (this.o.planned()) {
      // a late joiner: placed at the next step boundary where throughput is lowest
      status.event('join', `late peer ${peerId} joined: ${req.capabilities.deviceName}, ${(req.capabilities.memoryBytes / 2 ** 30).toFixed(2)} GiB offered; placing it at the next step boundary`);
      return new Promise<JoinResponse>((resolve) => { this.late.push({ peerId, resolve }); });
    }
    status.event('join', `peer ${peerId} joined: ${req.capabilities.deviceName}, ${(req.capabilities.memoryBytes / 2 ** 30).toFixed(2)} GiB offered, ${req.capabilities.gemmGflops.toFixed(1)} GFLOP/s`);
    const answer = new Promise<JoinResponse>((resolve) => {
      this.pending = this.pending.filter((p) => p.peerId !== peerId);
      this.pending.push({ peerId, resolve });
    });
    status.emit({ event: 'peer_joined', peer_id: peerId, peers: this.pending.length, min_peers: this.o.minPeers });
    if (this.pending.length >= this.o.minPeers) {
      const joined = this.pending;
      this.pending = [];
      this.o.onQuorum(joined);
    }
    return answer;
  }

  /** A planned peer that waits for the first step boundary (after a restart: its stage was kept by another). */
  defer(j: PendingJoin): void { this.late.push(j); }

  /** Every late joiner, in join order; the queue is empty afterwards. */
  takeLate(): PendingJoin[] {
    const late = this.late;
    this.late = [];
    return late;
  }

  /** The first late joiner that `fits`, out of the queue; null when none does. */
  takeLateWhere(fits: (peerId: string) => boolean): PendingJoin | null {
    const i = this.late.findIndex((j) => fits(j.peerId));
    return i >= 0 ? this.late.splice(i, 1)[0]! : null;
  }

  isWaiting(peerId: string): boolean { return this.late.some((j) => j.peerId === peerId); }

  /** Answer every waiting joiner with a refusal (the run finished, the coordinator stops). */
  rejectAll(reason: string, which: 'all' | 'late' = 'all'): void {
    const waiting = which === 'all' ? [...this.pending, ...this.late] : this.late;
    for (const j of waiting) j.resolve({ status: 'rejected', reason, assignment: null });
    if (which === 'all') this.pending = [];
    this.late = [];
  }
}
