// The authoritative adapter v_t: the run's LoRA tensors by name, each stage's parameter order, and its shard-format bytes.
import type { NamedTensor } from '../engine/types.ts';
import { encodeShard } from '../engine/formats/shard.ts';
import { decodeFloat } from '../protocol/tensor.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import type { Multiaddr } from '../protocol/net.ts';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { StageRange } from './planner.ts';

export class AdapterState {
  private readonly tensors: Map<string, NamedTensor>;
  /** per stage: its LoRA tensor names in stage param order (learned from the first upload) */
  private stageParamNames: string[][] = [];

  /** `initial`: the init adapter or the resumed step's, by PEFT name (empty: learned from the peers) */
  constructor(initial: Map<string, NamedTensor> | null) {
    this.tensors = initial ?? new Map();
  }

  /** A new plan: every stage's parameter order is learned again from its first upload. */
  resetStages(numStages: number): void {
    this.stageParamNames = Array.from({ length: numStages }, () => []);
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

  /** Take stage s's tensors from one of its replicas. All or nothing: a transfer cut short leaves the
   *  stage's previous adapter whole. */
  async upload(client: StagePeerClient, peerId: string, addrs: Multiaddr[], s: number, opts: { signal?: AbortSignal } = {}): Promise<void> {
    const page = await client.adapter(addrs, opts);
    const got = page.map(({ name, tensor }) => ({ name, shape: tensor.shape, data: decodeFloat(tensor, `adapter ${name} from ${peerId}`) }));
    for (const x of got) this.tensors.set(x.name, x);
    this.stageParamNames[s] = got.map((x) => x.name);
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
