// Message schemas of every stream (request and response), as validators plus their TypeScript types.
import { arr, bool, bytes, int, nullable, num, obj, oneOf, opt, str } from './schema.ts';
import type { Validator } from './schema.ts';
import { FLOAT_CODECS, wireTensor } from './tensor.ts';
import { CHUNK_BYTES, MAX_STRING_LENGTH } from './constants.ts';

const I32 = 2 ** 31 - 1;
const SAFE = Number.MAX_SAFE_INTEGER;
const peerIdStr = str({ max: 128, pattern: /^[1-9A-HJ-NP-Za-km-z]+$/ });
const sha256Hex = str({ max: 64, pattern: /^[0-9a-f]{64}$/ });
const multiaddrStr = str({ max: 512, pattern: /^\// });
const runIdStr = str({ max: 64, pattern: /^[0-9a-zA-Z_-]+$/ });
const bigString = str({ max: 4 * 1024 * 1024 });
const moduleName = str({ max: 64, pattern: /^[A-Za-z0-9_.]+$/ });

// ---- join: volunteer → coordinator; answered when the volunteer has an assignment (or never will)

export const capabilities = obj({
  backend: oneOf(['cpu', 'cuda'] as const),
  deviceName: str({ max: 256 }),
  /** memory the volunteer offers for its stage (its --max-memory, or device memory) */
  memoryBytes: int(0, SAFE),
  memoryTotalBytes: int(0, SAFE),
  memoryFreeBytes: int(0, SAFE),
  hostMemoryBytes: int(0, SAFE),
  cores: int(1, 4096),
  /** measured with a short backend.gemm */
  gemmGflops: num({ min: 0, max: 1e7 }),
  computeCapability: nullable(str({ max: 16 })),
  memoryBandwidthGBs: nullable(num({ min: 0, max: 1e6 })),
  softwareVersion: str({ max: 64 }),
});
export type Capabilities = ReturnType<typeof capabilities>;

/** A CPU volunteer's deviceName: its backend (native `cpu` or the float64 `ref`) and CPU model, so
 *  spot checks compare bit for bit only between the same CPU backend on the same CPU
 *  (coordinator/verify.ts); the coordinator names its own referee the same way. */
export function cpuDeviceName(backendName: string, cpuModel: string): string {
  return `${backendName === 'ref' ? 'ref' : 'cpu'}: ${cpuModel}`.slice(0, 256);
}

export const joinRequest = obj({
  token: nullable(str({ max: 256 })),
  capabilities,
  /** addresses other peers can fetch blobs from */
  listenAddrs: arr(multiaddrStr, 32),
  /** NAT traversal: this peer is publicly reachable and serves circuit relay v2 to the run's members
   *  (`join --nat --relay`); the coordinator names it in NAT'd peers' assignments (`relays`) */
  relay: opt(bool),
  /** the run this peer was part of before a restart, so it can resume its stage */
  previousRunId: nullable(runIdStr),
  /** the stage state this peer kept after losing its coordinator: the steps it can restore (its
   *  current step and the one before its last optimizer update) with each one's adapter digest
   *  (protocol/adapter-digest.ts), so a restarted coordinator can resume it at the committed step */
  kept: opt(obj({
    runId: runIdStr,
    stageIndex: int(0, 4096),
    layerStart: int(0, 100_000),
    layerEnd: int(1, 100_000),
    states: arr(obj({ step: int(0, I32), adapterSha256: sha256Hex }), 2),
  })),
});
export type JoinRequest = ReturnType<typeof joinRequest>;

export const blobRef = obj({
  name: str({ max: 256 }),
  sha256: sha256Hex,
  sizeBytes: int(0, SAFE),
  /** multiaddrs (with /p2p/ id) of peers that serve this blob: peers already serving it first, the coordinator last */
  providers: arr(multiaddrStr, 64),
  /** the chunk size the publisher cut the blob into (absent: CHUNK_BYTES); every chunk is fetched,
   *  checked and served by this size */
  chunkBytes: opt(int(1024, CHUNK_BYTES)),
  /** sha256 of each chunk (the last one shorter), so a fetcher checks every chunk as it arrives and
   *  knows which provider sent a bad one (absent: only the whole blob's sha256 is checked) */
  chunkSha256: opt(arr(sha256Hex, 1 << 16)),
});
export type BlobRef = ReturnType<typeof blobRef>;

export const loraSpec = obj({
  r: int(1, 4096),
  loraAlpha: num({ min: 0 }),
  loraDropout: num({ min: 0, max: 1 }),
  /** module names: their shape is checked here, their meaning by the engine where the LoRA config is used
   *  (engine/model/lora.ts loraTargets), so the list of targets is written once, in engine/ */
  targetModules: arr(moduleName, 7),
  useRslora: bool,
  initLoraWeights: oneOf(['kaiming', 'gaussian'] as const),
});
export type LoraSpec = ReturnType<typeof loraSpec>;

export const optimSpec = obj({
  /** an optimizer name, checked by the engine that builds the optimizer (engine/optimizer.ts optimName) */
  optim: str({ max: 64, pattern: /^[a-z0-9_]+$/ }),
  adamBeta1: num({ min: 0, max: 1 }),
  adamBeta2: num({ min: 0, max: 1 }),
  adamEpsilon: num({ min: 0 }),
  weightDecay: num({ min: 0 }),
  /** resident budget for paged optimizer state on the volunteer (bytes; 0 = unlimited) */
  residentBytes: int(0, SAFE),
});
export type OptimSpec = ReturnType<typeof optimSpec>;

export const assignment = obj({
  runId: runIdStr,
  peerId: peerIdStr,
  stageIndex: int(0, 4096),
  numStages: int(1, 4096),
  layerStart: int(0, 100_000),
  layerEnd: int(1, 100_000),
  /** the HF config.json text of the base model */
  modelConfigJson: bigString,
  lora: loraSpec,
  optim: optimSpec,
  seed: int(0, I32),
  gradientCheckpointing: bool,
  wireCodec: oneOf(FLOAT_CODECS),
  /** frozen shard weights for this stage */
  blobs: arr(blobRef, 4096),
  /** the stage's current LoRA tensors (safetensors bytes), absent for a fresh init from the seed */
  adapterBlob: nullable(blobRef),
  /** optimizer state of this stage at `step` (restart/reassignment), absent at step 0 */
  optimizerBlob: nullable(blobRef),
  /** optimizer steps already committed */
  step: int(0, I32),
  totalSteps: int(0, I32),
  /** present when the peer keeps the stage state it offered in `join.kept`, restored to `step`
   *  (rolled back if it applied a later update); its adapter must then hash to adapterSha256 */
  keep: opt(obj({ adapterSha256: sha256Hex })),
  /** private runs with a peer-id allowlist: who may fetch this peer's blobs (besides token holders) */
  allowPeers: opt(arr(peerIdStr, 4096)),
  /** NAT traversal: relays of volunteers (`join --relay`, with /p2p/) this peer also takes a reservation on,
   *  first one that accepts; the coordinator's relay stays the fallback */
  relays: opt(arr(multiaddrStr, 8)),
});
export type Assignment = ReturnType<typeof assignment>;

export const joinResponse = obj({
  status: oneOf(['assigned', 'rejected'] as const),
  /** human-readable reason when rejected (too little memory, bad token, run finished) */
  reason: nullable(str({ max: MAX_STRING_LENGTH })),
  assignment: nullable(assignment),
});
export type JoinResponse = ReturnType<typeof joinResponse>;

// ---- weights: anyone (a private run: token holders and allowlisted peers) → a peer holding the blob

export const weightsRequest = obj({
  /** the run's join token, where the run is private */
  token: opt(str({ max: 256 })),
  sha256: sha256Hex,
  offset: int(0, SAFE),
  length: int(1, CHUNK_BYTES),
});
export type WeightsRequest = ReturnType<typeof weightsRequest>;
export const weightsResponse = obj({
  sizeBytes: int(0, SAFE),
  bytes: bytes(CHUNK_BYTES),
});
export type WeightsResponse = ReturnType<typeof weightsResponse>;

// ---- microbatch: coordinator → every stage peer of a route, one micro-batch attempt (control only:
// activations and their gradients go stage to stage over hop streams, see protocol/hop.ts)

const mbKey = {
  runId: runIdStr,
  step: int(0, I32),
  mb: int(0, I32),
  attempt: int(0, I32),
};

export const microBatchRequest = obj({
  ...mbKey,
  stageIndex: int(0, 4096),
  /** one peer id per stage: the route this attempt takes; the only peers this stage accepts the
   *  attempt's activation (route[s-1]) and activation gradient (route[s+1]) from, and sends to */
  route: arr(peerIdStr, 4096),
  batch: int(1, 1 << 20),
  seqLen: int(1, 1 << 20),
  /** token ids, i32 [B·S] (stage 0 only) */
  ids: opt(wireTensor),
  /** labels, i32 [B·S] (last stage only) */
  labels: opt(wireTensor),
  /** packing: i32 lengths of the examples in the one row (B = 1), summing to S; every stage (attention stays
   *  inside each example, positions restart) */
  segments: opt(wireTensor),
  /** 1 / (label tokens of the step) (last stage only: it starts backward right after its forward) */
  lossScale: opt(num()),
  dropoutSeed: int(0, I32),
  /** false: a forward only (evaluation; nothing kept, no gradient flows back) */
  train: bool,
  /** how long this stage waits for a hop input per compute job it waits on (the activation from
   *  stage s-1 waits on s jobs, the gradient from s+1 on 2·(S-1-s) after this stage sent its own) */
  jobTimeoutMs: int(1, I32),
  /** where this stage sends its activation (route[s+1]'s addresses, /p2p/ id included) and its
   *  activation gradient (route[s-1]'s); the sender checks that Noise authenticated that id */
  nextAddrs: opt(arr(multiaddrStr, 32)),
  prevAddrs: opt(arr(multiaddrStr, 32)),
  /** a referee attempt (the coordinator checks a reported tensor itself): this stage sends its output
   *  of this kind to the coordinator instead of its route neighbour */
  referee: opt(oneOf(['act', 'grad'] as const)),
  /** the micro-batch has trained positions (label tokens and a positive loss scale): its activation
   *  gradients must not be near zero (the screen's lower bound); absent: no lower bound on them */
  trained: opt(bool),
  /** one key per row (B): the step plan's example index of the row's sample, the same on every
   *  visit; present in a run with a delta wire codec (aq4, aq2), whose hops code against each
   *  sample's reference (protocol/codecs/delta-cache.ts); absent (or a packed row): every row cold */
  samples: opt(arr(int(0, I32), 1 << 20)),
});
export type MicroBatchRequest = ReturnType<typeof microBatchRequest>;
export const microBatchResponse = obj({
  /** last stage: the summed token losses and label tokens of the micro-batch */
  lossSum: opt(num()),
  tokens: opt(int(0, I32)),
  /** RMS of the activation (from stage s-1) and activation gradient (from s+1) this stage accepted */
  actRms: opt(num({ min: 0 })),
  gradRms: opt(num({ min: 0 })),
  /** sha256 of the float32 bytes (as decoded) of the activation and activation gradient this stage
   *  received, and of those it sent (each as its receiver decodes them): the digests a spot check
   *  holds a recalled tensor to (docs/security.md) */
  actSha256: opt(sha256Hex),
  gradSha256: opt(sha256Hex),
  sentActSha256: opt(sha256Hex),
  sentGradSha256: opt(sha256Hex),
  /** the attempt failed at this stage because of another peer: a tensor it refused (bad-tensor), a
   *  hop that broke (hop) or never came (timeout) */
  failure: opt(obj({
    peerId: peerIdStr,
    kind: oneOf(['bad-tensor', 'hop', 'timeout'] as const),
    message: str({ max: MAX_STRING_LENGTH }),
  })),
});
export type MicroBatchResponse = ReturnType<typeof microBatchResponse>;

// ---- hop: stage peer → stage peer (or → the coordinator as referee), one tensor per stream:
// header, then chunks as the receiver grants credit, then the receiver's verdict

export const hopHeader = obj({
  ...mbKey,
  /** an activation (to stage s+1) or an activation gradient (to stage s-1) */
  kind: oneOf(['act', 'grad'] as const),
  /** [B·S, C]; the receiver requires exactly the shape it expects */
  shape: arr(int(1, 2 ** 31 - 1), 2),
  codec: oneOf(FLOAT_CODECS),
  /** a delta codec's reference digest (DeltaCache.lookup) when the sender holds references for some
   *  rows; the receiver answers its first credit with cold: true when its own digest differs */
  ref: opt(bytes(8)),
});
export type HopHeader = ReturnType<typeof hopHeader>;
/** elements [offset, offset + tensor's length) of the flattened tensor, in order */
export const hopChunk = obj({ offset: int(0, SAFE), tensor: wireTensor });
export type HopChunk = ReturnType<typeof hopChunk>;
/** receiver → sender: more credit (chunks it may send), or the verdict once every chunk is in */
export const hopReply = obj({
  credit: opt(int(1, 1 << 16)), ok: opt(bool),
  /** with the first credit: the receiver lacks the references the header's digest names; send every row cold */
  cold: opt(bool),
});
export type HopReply = ReturnType<typeof hopReply>;

export const commitRequest = obj({
  ...mbKey,
  /** true: fold this attempt's LoRA gradient into the step sum; false: discard it */
  commit: bool,
});
export type CommitRequest = ReturnType<typeof commitRequest>;

// ---- recall: coordinator → stage peer, for a spot check: send the activation (kind act) or
// activation gradient (grad) this stage received in attempt (step, mb, attempt) to the coordinator,
// by a hop with the same key in f32; answered once the coordinator accepted it
export const recallRequest = obj({ ...mbKey, kind: oneOf(['act', 'grad'] as const) });
export type RecallRequest = ReturnType<typeof recallRequest>;
export const recallResponse = obj({ sha256: sha256Hex });
export type RecallResponse = ReturnType<typeof recallResponse>;
export const ackResponse = obj({ ok: bool });
export type AckResponse = ReturnType<typeof ackResponse>;

// ---- aggregate: coordinator ↔ stage peer at the end of a step

export const aggregateRequest = obj({
  runId: runIdStr,
  step: int(0, I32),
  /** collect: send the step's summed gradient for params [from, from+count) (to the coordinator, or
   *  to a replica of the same stage that this peer's `reduce` of the step names);
   *  apply: take the final (normalized, clipped) gradient for those params and, on the last page,
   *  run the optimizer step with `lr` (the heavy tail, kept for a replica placed during apply);
   *  reduce: sum the step gradients of `replicas` (this peer among them) in their order, pulling the
   *  others' by `collect` from them, and answer the float64 sums of squares (the light tail);
   *  step: clip the reduced gradient by `clipScale` (when `clip`) and run the optimizer step with `lr` */
  phase: oneOf(['collect', 'apply', 'reduce', 'step'] as const),
  from: int(0, 1 << 20),
  count: int(0, 1 << 20),
  grads: opt(arr(wireTensor, 1 << 16)),
  lr: opt(num({ min: 0 })),
  last: opt(bool),
  /** reduce: the stage's replicas for this step in peer-id order, each with its addresses (/p2p/ id
   *  included); the only peers this peer pulls from and serves its step gradient to */
  replicas: opt(arr(obj({ peerId: peerIdStr, addrs: arr(multiaddrStr, 32) }), 4096)),
  /** step: the clip coefficient min(1, max_norm / (norm + 1e-6)) the coordinator computed from every
   *  stage's sum of squares; `clip` false (max_grad_norm 0): no clipping */
  clipScale: opt(num({ min: 0 })),
  clip: opt(bool),
});
export type AggregateRequest = ReturnType<typeof aggregateRequest>;
export const aggregateResponse = obj({
  /** total number of params of the stage */
  total: int(0, 1 << 20),
  grads: opt(arr(wireTensor, 1 << 16)),
  /** number of committed micro-batches folded in (collect, reduce: this peer's own) */
  microBatches: opt(int(0, I32)),
  /** reduce: Σ g² (float64) of the reduced gradient, and of this peer's own step gradient (for the
   *  coordinator's gradient screen); `ownFinite` false: its own step gradient is not finite */
  sumSq: opt(num({ min: 0 })),
  ownSumSq: opt(num({ min: 0 })),
  ownFinite: opt(bool),
  /** reduce: Σ g² of each replica's step gradient as this peer used it (its own, and what each
   *  partner sent it), in the request's replica order: the gradient screen judges what partners received */
  partsSumSq: opt(arr(num({ min: 0 }), 4096)),
  /** reduce: pulling a partner's step gradient failed; `bad`: what it sent was misshapen or non-finite */
  failed: opt(obj({ peerId: peerIdStr, message: str({ max: MAX_STRING_LENGTH }), bad: bool })),
  /** the last apply page: after its optimizer step, the digest of the stage's LoRA tensors
   *  (protocol/adapter-digest.ts) and the sha256 of its optimizer state bytes, which every replica of
   *  the stage must share */
  adapterSha256: opt(sha256Hex),
  optimizerSha256: opt(sha256Hex),
});
export type AggregateResponse = ReturnType<typeof aggregateResponse>;

// ---- adapter: coordinator → stage peer (upload its shard's LoRA tensors), and anyone → coordinator (pull)

export const adapterRequest = obj({
  runId: opt(runIdStr),
  /** the run's join token, for pulls from a private run */
  token: opt(str({ max: 256 })),
  /** a committed step to pull (coordinator only); absent = latest */
  step: opt(int(0, I32)),
  from: int(0, 1 << 20),
  count: int(1, 1 << 16),
});
export type AdapterRequest = ReturnType<typeof adapterRequest>;
export const namedWireTensor = obj({ name: str({ max: 256 }), tensor: wireTensor });
export const adapterResponse = obj({
  step: int(0, I32),
  total: int(0, 1 << 20),
  /** JSON {"lora": LoraConfig, "baseModel": string} for writing a PEFT dir (coordinator pulls only) */
  adapterSpecJson: nullable(bigString),
  tensors: arr(namedWireTensor, 1 << 16),
});
export type AdapterResponse = ReturnType<typeof adapterResponse>;

// ---- status: anyone → coordinator

/** How a volunteer's connection to another peer goes (protocol/nat.ts): dialed directly, upgraded from a
 *  relayed one by DCUtR, or through a circuit relay. */
export const hopPath = obj({
  peerId: peerIdStr,
  path: oneOf(['direct', 'hole-punched', 'relayed'] as const),
  /** relayed: the peer id of the relay the connection goes through (the coordinator or a volunteer relay) */
  via: opt(peerIdStr),
});
export type HopPath = ReturnType<typeof hopPath>;
/** at most this many peers' paths in one report (a stage peer talks to its route neighbours) */
export const MAX_HOP_PATHS = 256;

export const peerStatus = obj({
  peerId: peerIdStr,
  stageIndex: nullable(int(0, 4096)),
  layerStart: nullable(int(0, 100_000)),
  layerEnd: nullable(int(0, 100_000)),
  device: str({ max: 256 }),
  memoryBytes: int(0, SAFE),
  gemmGflops: num({ min: 0 }),
  /** measured tokens/s through this peer's stage */
  tokensPerSecond: num({ min: 0 }),
  /** micro-batches this peer has committed in the run */
  microBatches: int(0, SAFE),
  health: oneOf(['ok', 'slow', 'dead', 'banned', 'spare'] as const),
  lastSeenMs: int(0, SAFE),
  /** failed micro-batch attempts at this peer (each was retried) */
  retries: opt(int(0, SAFE)),
  /** compute requests to this peer that timed out */
  timeouts: opt(int(0, SAFE)),
  /** times this peer was banned; the current ban's remaining ms (0 when not banned) and reason */
  bans: opt(int(0, SAFE)),
  banRemainingMs: opt(int(0, SAFE)),
  banReason: opt(nullable(str({ max: MAX_STRING_LENGTH }))),
  /** times this peer was placed on a stage after the plan (late join, lost stage, rebalance) */
  reassignments: opt(int(0, SAFE)),
  /** NAT traversal on: 'relay' when the peer holds a reservation on the coordinator's relay (behind a NAT) */
  reachability: opt(oneOf(['public', 'relay'] as const)),
  /** the path of this peer's connection to each peer it exchanges hops with, from its last heartbeat */
  hopPaths: opt(arr(hopPath, MAX_HOP_PATHS)),
});
export type PeerStatus = ReturnType<typeof peerStatus>;

export const statusRequest = obj({});
export const statusResponse = obj({
  runId: runIdStr,
  state: oneOf(['waiting', 'training', 'finished', 'failed'] as const),
  step: int(0, I32),
  totalSteps: int(0, I32),
  loss: nullable(num()),
  lr: nullable(num()),
  tokensPerSecond: nullable(num({ min: 0 })),
  numStages: int(0, 4096),
  peers: arr(peerStatus, 4096),
  committedSteps: arr(int(0, I32), 1 << 20),
  retries: int(0, SAFE),
  reassignments: int(0, SAFE),
  /** bans so far (a peer banned twice counts twice) */
  bans: opt(int(0, SAFE)),
  /** why the run is not making progress right now, e.g. a stage with no peer (null: it is) */
  waitingFor: opt(nullable(str({ max: MAX_STRING_LENGTH }))),
  /** the run's stored training config and content hashes, one line (what reproduces it) */
  runConfig: opt(str({ max: 4 * MAX_STRING_LENGTH })),
});
export type StatusResponse = ReturnType<typeof statusResponse>;

// ---- heartbeat: coordinator → peer

export const heartbeatRequest = obj({
  runId: runIdStr, step: int(0, I32), sentAtMs: int(0, SAFE),
  /** to a volunteer relay (`join --relay`), when the run's members changed since it last answered: the admitted,
   *  unbanned peers, the only ones its relay serves; a higher version replaces a lower one */
  members: opt(obj({ version: int(0, SAFE), peers: arr(peerIdStr, 4096) })),
  /** the coordinator's heartbeat period now (it grows with the peer count, coordinator/decide.ts
   *  heartbeatPeriodMs): the volunteer waits that much longer before it calls the coordinator lost */
  periodMs: opt(int(0, SAFE)),
});
export type HeartbeatRequest = ReturnType<typeof heartbeatRequest>;
export const heartbeatResponse = obj({
  runId: nullable(runIdStr),
  /** the stage is loaded and serving (false while it still fetches weights) */
  ready: bool,
  /** optimizer steps applied on this peer */
  step: int(0, I32),
  tokensPerSecond: num({ min: 0 }),
  inflight: int(0, I32),
  busy: bool,
  memoryRssBytes: int(0, SAFE),
  /** NAT traversal on: the path of each open connection to another peer (the coordinator's excluded) */
  hopPaths: opt(arr(hopPath, MAX_HOP_PATHS)),
  /** NAT traversal on, once this peer holds a reservation on a volunteer relay: its addresses for routes
   *  (that relay's circuit address first, the coordinator's last), replacing those it joined with */
  listenAddrs: opt(arr(multiaddrStr, 32)),
});
export type HeartbeatResponse = ReturnType<typeof heartbeatResponse>;

// ---- finish: coordinator → peer, the run is over (or the peer is released)

export const finishRequest = obj({
  runId: runIdStr,
  reason: str({ max: MAX_STRING_LENGTH }),
  /** present: the peer is released from its stage, not from the run; it joins again after this many
   *  ms (0: at once, to be placed on another stage; a ban: when the ban ends) */
  rejoinAfterMs: opt(int(0, I32)),
});
export type FinishRequest = ReturnType<typeof finishRequest>;

// ---- optimizer: coordinator → stage peer, a chunk of the stage's optimizer state after `step` steps
// (checkpoints every save_steps; the bytes are the trainer optimizer's own state format)

export const optimizerRequest = obj({
  runId: runIdStr,
  step: int(0, I32),
  offset: int(0, SAFE),
  length: int(1, CHUNK_BYTES),
});
export type OptimizerRequest = ReturnType<typeof optimizerRequest>;

/** Error frame, sent instead of a response when a request fails. */
export const errorFrame = obj({ error: obj({ name: str({ max: 64 }), message: str({ max: MAX_STRING_LENGTH }) }) });

export const SCHEMAS = {
  join: { req: joinRequest, res: joinResponse },
  weights: { req: weightsRequest, res: weightsResponse },
  microbatch: { req: microBatchRequest, res: microBatchResponse },
  commit: { req: commitRequest, res: ackResponse },
  recall: { req: recallRequest, res: recallResponse },
  aggregate: { req: aggregateRequest, res: aggregateResponse },
  adapter: { req: adapterRequest, res: adapterResponse },
  status: { req: statusRequest, res: statusResponse },
  heartbeat: { req: heartbeatRequest, res: heartbeatResponse },
  finish: { req: finishRequest, res: ackResponse },
  optimizer: { req: optimizerRequest, res: weightsResponse },
} as const satisfies Record<string, { req: Validator<unknown>; res: Validator<unknown> }>;
export type Schemas = typeof SCHEMAS;
export type Req<P extends keyof Schemas> = ReturnType<Schemas[P]['req']>;
export type Res<P extends keyof Schemas> = ReturnType<Schemas[P]['res']>;
