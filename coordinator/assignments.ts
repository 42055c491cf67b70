// What a peer is told when it is given a stage: the run's settings, the stage's blobs, its adapter slice and optimizer state.
import type { LoraConfig } from '../engine/types.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { encodeShard } from '../engine/formats/shard.ts';
import type { Assignment, BlobRef } from '../protocol/messages.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { isPublicIp4 } from '../protocol/nat.ts';
import type { AdapterState } from './adapter.ts';
import type { PeerRegistry } from './peers.ts';
import type { StageRange } from './planner.ts';
import type { ShardBlobs } from './shards.ts';
import type { StageStates } from './stage-states.ts';
import type { RunStatus } from './status.ts';

/** volunteer relays named in one assignment */
const MAX_VOLUNTEER_RELAYS = 2;

export interface AssignmentsInit {
  runId: string;
  modelConfigJson: string;
  lora: LoraConfig;
  train: TrainConfig;
  wireCodec: FloatCodec;
  totalSteps: number;
  allowPeers: Set<string> | null;
  peers: PeerRegistry;
  shards: ShardBlobs;
  adapter: AdapterState;
  states: StageStates;
  status: RunStatus;
}

export interface AssignOptions {
  /** the stage's optimizer state for this peer (default: the resumed checkpoint's, if any) */
  optimizerState?: Uint8Array | null;
  /** the peer keeps the stage state it offered, restored to this step, whose adapter digest this is */
  keep?: string;
}

export class Assignments {
  private readonly o: AssignmentsInit;

  constructor(o: AssignmentsInit) {
    this.o = o;
  }

  /** NAT traversal: the volunteer relays (join --relay) a peer also reserves on, in join order, at most
   *  MAX_VOLUNTEER_RELAYS, each by its direct addresses (its circuit ones are of no use for a reservation). Only
   *  relays the plan put on a stage: heartbeats, which carry their member lists, go to those (a rejected one
   *  leaves). */
  private relaysFor(peerId: string): { relays?: string[] } {
    const { peers } = this.o;
    const staged = new Set(peers.allReplicas().flat());
    const relays = peers.all().filter((p) => p.relay === true && p.peerId !== peerId && staged.has(p.peerId) && !peers.gone(p.peerId)).slice(0, MAX_VOLUNTEER_RELAYS)
      .flatMap((p) => {
        const direct = p.addrs.map(String).filter((a) => !a.includes('/p2p-circuit'));
        return (direct.some(isPublicIp4) ? direct.filter(isPublicIp4) : direct).slice(0, 1);
      });
    return relays.length > 0 ? { relays } : {};
  }

  async forStage(peerId: string, stages: readonly StageRange[], s: number, a: AssignOptions = {}): Promise<Assignment> {
    const { peers, lora } = this.o;
    const st = stages[s]!;
    const t = this.o.train;
    const step = this.o.status.step;
    // peers that already serve this stage's blobs go first: a joiner fetches chunks from all of them (and
    // the coordinator) at once, so a late joiner does not load the coordinator alone
    const holders = peers.replicasOf(s).filter((id) => id !== peerId && peers.get(id)?.ready === true && !['dead', 'banned'].includes(peers.get(id)?.health ?? 'dead'))
      .flatMap((id) => peers.addrs(id).map((x) => x.toString()));
    const blobs = this.o.shards.stageBlobs(st, holders);
    // the stage's slice of the current adapter (init adapter or resumed step), as a blob
    let adapterBlob: BlobRef | null = null;
    const mine = a.keep !== undefined ? [] : this.o.adapter.stageSlice(st);
    if (mine.length > 0) {
      const bytes = encodeShard({ nf4: new Map(), float: new Map(mine.map((x) => [x.name, { shape: x.shape, data: x.data }])) });
      adapterBlob = await this.o.shards.put(`adapter.stage${s}.step${step}`, bytes);
    }
    const state = a.optimizerState !== undefined ? a.optimizerState : this.o.states.resumed(s);
    return {
      runId: this.o.runId, peerId, stageIndex: s, numStages: stages.length,
      layerStart: st.layerStart, layerEnd: st.layerEnd,
      modelConfigJson: this.o.modelConfigJson,
      lora: {
        r: lora.r, loraAlpha: lora.loraAlpha, loraDropout: lora.loraDropout,
        targetModules: [...lora.targetModules], useRslora: lora.useRslora,
        initLoraWeights: lora.initLoraWeights === 'gaussian' ? 'gaussian' : 'kaiming',
      },
      optim: {
        optim: t.optim, adamBeta1: t.adam_beta1, adamBeta2: t.adam_beta2, adamEpsilon: t.adam_epsilon,
        weightDecay: t.weight_decay, residentBytes: t.optim_resident_bytes ?? 0,
      },
      seed: t.seed, gradientCheckpointing: t.gradient_checkpointing, wireCodec: this.o.wireCodec,
      blobs, adapterBlob,
      optimizerBlob: a.keep !== undefined || state === null ? null : await this.o.shards.put(`optimizer.stage${s}.step${step}`, state),
      step, totalSteps: this.o.totalSteps,
      ...(a.keep !== undefined ? { keep: { adapterSha256: a.keep } } : {}),
      ...(this.o.allowPeers !== null ? { allowPeers: [...this.o.allowPeers] } : {}),
      ...this.relaysFor(peerId),
    };
  }
}
