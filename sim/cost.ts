// The simulator's cost model: FLOPs of a stage's training pass, the bytes a stage holds and ships, and the
// peers drawn from a scenario (device, link, round trip, NAT) with a seeded generator.
import { LORA_TARGETS } from '../engine/types.ts';
import type { LlamaConfig } from '../engine/types.ts';
import { linearShape } from '../engine/model/lora.ts';
import { loraParamCount, stageMemoryBytes } from '../engine/train/plan.ts';
import type { DeviceClass, Scenario } from './scenario.ts';

/** mulberry32: a small seeded generator, so a scenario and a seed give one run */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Training FLOPs per token of one decoder layer with gradient checkpointing and a frozen base:
 *  forward, the checkpoint's recompute and the input-gradient backward are 2·N each for the linears
 *  (no weight gradient for frozen weights; LoRA terms < 1%); causal attention scores and values cost
 *  2·seq·heads·headDim per token forward, twice that backward, and the recompute once more. */
export function layerTrainFlopsPerToken(cfg: LlamaConfig, seqLen: number): number {
  let linear = 0;
  for (const t of LORA_TARGETS) { const [o, i] = linearShape(cfg, t); linear += o * i; }
  const attnFwd = 2 * seqLen * cfg.numAttentionHeads * cfg.headDim;
  return 6 * linear + 4 * attnFwd;
}

/** The LM head and loss: forward, backward into the hidden state (no recompute) */
export function headTrainFlopsPerToken(cfg: LlamaConfig): number {
  return 4 * cfg.vocabSize * cfg.hiddenSize;
}

/** Share of the training FLOPs in forward (the rest: recompute + backward). */
export const FORWARD_SHARE = 1 / 3;

export type NatClass = 'public' | 'cone' | 'strict';

export interface SimPeerSpec {
  id: string;
  cls: DeviceClass;
  memoryBytes: number;
  /** achieved training FLOP/s */
  flops: number;
  /** link, bytes per second each way */
  bytesPerSecond: number;
  rttMs: number;
  nat: NatClass;
}

/** The i-th peer of a scenario (deterministic in seed and i). */
export function drawPeer(sc: Scenario, r: () => number, i: number): SimPeerSpec {
  const u = r();
  let acc = 0;
  let cls = sc.peers.classes[sc.peers.classes.length - 1]!;
  for (const k of sc.peers.classes) { acc += k.share; if (u < acc) { cls = k; break; } }
  const [lo, hi] = sc.peers.linkMbit;
  const mbit = lo * Math.pow(hi / lo, r());
  const [rlo, rhi] = sc.peers.rttMs;
  const rtt = rlo + (rhi - rlo) * r();
  const nat: NatClass = r() < sc.peers.natShare ? (r() < sc.peers.coneShare ? 'cone' : 'strict') : 'public';
  return {
    id: `p${String(i).padStart(5, '0')}`, cls, memoryBytes: Math.floor(cls.memoryGiB * 2 ** 30),
    flops: cls.peakTflops * 1e12 * cls.efficiency, bytesPerSecond: mbit * 1e6 / 8, rttMs: rtt, nat,
  };
}

/** Whether a hop between two peers goes direct, hole-punched, or relayed (through the coordinator's link).
 *  A public receiver or sender can be dialled (the other dials out); two cone NATs punch a hole; a
 *  strict NAT on either side of a NATed pair needs the relay. */
export function hopPath(a: NatClass, b: NatClass): 'direct' | 'punched' | 'relayed' {
  if (a === 'public' || b === 'public') return 'direct';
  if (a === 'cone' && b === 'cone') return 'punched';
  return 'relayed';
}

export interface StageCosts {
  /** training FLOPs of one micro-batch on this stage, forward and backward (incl. recompute) */
  forwardFlops: number;
  backwardFlops: number;
  /** LoRA parameters (gradient, adapter: ×4 bytes) */
  loraParams: number;
  /** the stage's shard bytes a joiner downloads: NF4 codes + constants, embeddings, head */
  shardBytes: number;
  /** optimizer state bytes of the stage (AdamW 32-bit: 2 × 4 bytes per LoRA parameter) */
  optimizerBytes: number;
}

export function stageCosts(sc: Scenario, layerStart: number, layerEnd: number): StageCosts {
  const cfg = sc.model;
  const T = sc.microBatch * sc.seqLen;
  const L = cfg.numHiddenLayers;
  const lora = { r: sc.loraR, targetModules: LORA_TARGETS };
  let flops = (layerEnd - layerStart) * layerTrainFlopsPerToken(cfg, sc.seqLen) * T;
  if (layerEnd === L) flops += headTrainFlopsPerToken(cfg) * T;
  const m = stageMemoryBytes(cfg, { layerStart, layerEnd, lora, microBatch: sc.microBatch, seqLen: sc.seqLen, optim: 'adamw_torch', floatBytes: 2 });
  const loraParams = loraParamCount(cfg, lora, layerStart, layerEnd);
  return {
    forwardFlops: flops * FORWARD_SHARE, backwardFlops: flops * (1 - FORWARD_SHARE), loraParams,
    shardBytes: m.nf4WeightsBytes + m.quantConstantsBytes + m.embeddingsBytes + m.lmHeadBytes,
    optimizerBytes: 8 * loraParams,
  };
}

/** Bytes of one hop (an activation or its gradient) of a micro-batch. */
export function hopBytes(sc: Scenario): number {
  return sc.microBatch * sc.seqLen * sc.model.hiddenSize * sc.wireBytesPerElement;
}
