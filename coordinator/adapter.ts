// The authoritative adapter v_t: the run's LoRA tensors by name, each stage's parameter order, and its shard-format bytes.
import type { LlamaConfig, LoraConfig, NamedTensor } from '../engine/types.ts';
import { encodeShard } from '../engine/formats/shard.ts';
import { initLoraA, linearShape, loraParamName, orderedTargets } from '../engine/model/lora.ts';
import { linearModules, resolveTargets } from '../engine/model/arch.ts';
import { decodeFloat } from '../protocol/tensor.ts';
import { SwarmError } from '../protocol/errors.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import type { Multiaddr } from '../protocol/net.ts';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { StageRange } from './planner.ts';

/** An upload (adapter or optimizer state) that is not exactly the uploader's stage's own: foreign or
 *  missing tensor names, a wrong shape, non-finite values, or not what the replicas agreed on. The
 *  uploader is banned (coordinator/peers.ts) and nothing of the upload is kept. */
export class BadUploadError extends SwarmError {
  override name = 'BadUploadError';
}

/** What the coordinator knows of the run's LoRA layout: enough to name and shape every stage's tensors,
 *  and to compute a seeded initial adapter itself. */
export interface AdapterLayout { llama: LlamaConfig; lora: LoraConfig; seed: number }

/** Stage `st`'s LoRA tensors in stage param order (layer, canonical module, A then B), as the engine
 *  builds them (engine/model/load.ts): the seeded PEFT init (A from the seed, B zero). */
export function expectedStageParams(layout: AdapterLayout, st: StageRange): NamedTensor[] {
  const { llama, lora, seed } = layout;
  const out: NamedTensor[] = [];
  // the family's linears in the order loadStage walks them (Phi-3: its fused qkv_proj, gate_up_proj)
  const targets = new Set(resolveTargets(llama, orderedTargets(lora)));
  const modules = linearModules(llama).filter((m) => targets.has(m));
  for (let l = st.layerStart; l < st.layerEnd; l++) {
    for (const m of modules) {
      const [o, inF] = linearShape(llama, m);
      const A: NamedTensor = { name: loraParamName(l, m, 'A'), shape: [lora.r, inF], data: new Float32Array(lora.r * inF) };
      initLoraA(A.data, lora.r, inF, lora.initLoraWeights, seed, l, m);
      out.push(A, { name: loraParamName(l, m, 'B'), shape: [o, lora.r], data: new Float32Array(o * lora.r) });
    }
  }
  return out;
}

export class AdapterState {
  private readonly tensors: Map<string, NamedTensor>;
  private readonly layout: AdapterLayout | null;
  /** per stage: its LoRA tensor names in stage param order (learned from the first upload) */
  private stageParamNames: string[][] = [];
  /** the plan's stages (what an upload is checked against) */
  private stages: readonly StageRange[] = [];

  /** `initial`: the init adapter or the resumed step's, by PEFT name (empty: learned from the peers,
   *  checked against `layout`) */
  constructor(initial: Map<string, NamedTensor> | null, layout: AdapterLayout | null = null) {
    this.tensors = initial ?? new Map();
    this.layout = layout;
  }

  /** A new plan: every stage's parameter order is learned again from its first upload. */
  resetStages(stages: readonly StageRange[]): void {
    this.stages = stages;
    this.stageParamNames = stages.map(() => []);
  }

  /** Stage s's tensor names and shapes in stage order, as the layout defines them (null without a
   *  layout: then the names must lie in the stage's layers and match the shapes already held). */
  private expected(s: number): Array<{ name: string; shape: number[] }> | null {
    const st = this.stages[s];
    if (st === undefined || this.layout === null) return null;
    return expectedStageParams(this.layout, st).map(({ name, shape }) => ({ name, shape }));
  }

  /** The digest stage s's replicas must hold before any update: the adapter it holds for the stage,
   *  else the seeded init the layout defines (null when neither is known). */
  initialDigest(s: number): string | null {
    const st = this.stages[s];
    if (st === undefined) return null;
    const held = this.stageSlice(st);
    if (held.length > 0) return adapterDigest(held);
    return this.layout !== null ? adapterDigest(expectedStageParams(this.layout, st)) : null;
  }

  /** this stage's slice of the current adapter */
  stageSlice(st: StageRange): NamedTensor[] {
    return [...this.tensors.values()].filter((t) => {
      const m = /\.layers\.(\d+)\./.exec(t.name);
      return m !== null && Number(m[1]) >= st.layerStart && Number(m[1]) < st.layerEnd;
    });
  }

  /** what a peer that kept this stage must hold (protocol/adapter-digest.ts) */
  stageDigest(st: StageRange): string {
    return adapterDigest(this.stageSlice(st));
  }

  /** the shape of stage s's i-th parameter, once known */
  shapeOf(s: number, i: number): number[] | undefined {
    const name = this.stageParamNames[s]?.[i];
    return name !== undefined ? this.tensors.get(name)?.shape : undefined;
  }

  /** stage s's parameter names in stage order */
  namesOf(s: number): readonly string[] { return this.stageParamNames[s]!; }

  /** Take stage s's tensors from one of its replicas. All or nothing: a transfer cut short, or an
   *  upload refused, leaves the stage's previous adapter whole. Only the stage's own tensor names, in
   *  stage order, with exact shapes and finite values are taken, and with `digest` (what the replicas
   *  agreed on after their apply) only tensors that hash to it; anything else is a BadUploadError. */
  async upload(client: StagePeerClient, peerId: string, addrs: Multiaddr[], s: number, opts: { signal?: AbortSignal; digest?: string } = {}): Promise<void> {
    const page = await client.adapter(addrs, opts);
    const got = this.checkUpload(page, peerId, s);
    if (opts.digest !== undefined) {
      const d = adapterDigest(got);
      if (d !== opts.digest) throw new BadUploadError(`the stage ${s} adapter from ${peerId} hashes to ${d.slice(0, 16)}…, not to ${opts.digest.slice(0, 16)}… that its replicas reported after the update`);
    }
    for (const x of got) this.tensors.set(x.name, x);
    this.stageParamNames[s] = got.map((x) => x.name);
  }

  /** Stage s's upload decoded, or a BadUploadError naming the first thing wrong. */
  private checkUpload(page: ReadonlyArray<{ name: string; tensor: { shape: number[] } & Parameters<typeof decodeFloat>[0] }>, peerId: string, s: number): NamedTensor[] {
    const st = this.stages[s];
    const from = `the stage ${s} adapter upload from ${peerId}`;
    if (st === undefined) throw new BadUploadError(`${from}: the plan has no stage ${s}`);
    const expected = this.expected(s);
    if (expected !== null && page.length !== expected.length) throw new BadUploadError(`${from}: ${page.length} tensors, stage ${s} (layers [${st.layerStart}, ${st.layerEnd})) has ${expected.length}`);
    const seen = new Set<string>();
    return page.map(({ name, tensor }, i) => {
      const m = /\.layers\.(\d+)\./.exec(name);
      if (m === null || Number(m[1]) < st.layerStart || Number(m[1]) >= st.layerEnd) {
        throw new BadUploadError(`${from}: tensor ${name} is not one of stage ${s}'s (layers [${st.layerStart}, ${st.layerEnd}))`);
      }
      if (seen.has(name)) throw new BadUploadError(`${from}: tensor ${name} twice`);
      seen.add(name);
      const want = expected?.[i];
      if (want !== undefined && want.name !== name) throw new BadUploadError(`${from}: tensor ${i} is ${name}, stage ${s}'s tensor ${i} is ${want.name}`);
      const shape = want?.shape ?? this.tensors.get(name)?.shape;
      try {
        return { name, shape: shape ?? tensor.shape, data: decodeFloat(tensor, `adapter ${name} from ${peerId}`, shape) };
      } catch (e) {
        throw new BadUploadError(`${from}: ${(e as Error).message}`);
      }
    });
  }

  /** The full adapter in stage order. */
  ordered(): NamedTensor[] {
    const names = this.stageParamNames.flat();
    const known = names.length > 0 ? names : [...this.tensors.keys()];
    return known.map((n) => this.tensors.get(n)!).filter((x) => x !== undefined);
  }

  /** The full adapter in stage order, as shard-format bytes. */
  bytes(): Uint8Array {
    const float = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const t of this.ordered()) float.set(t.name, { shape: t.shape, data: t.data });
    return encodeShard({ nf4: new Map(), float });
  }
}
