// The coordinator as a referee: it loads a stage itself (the base weights it quantized, the adapter v_t
// it holds) and recomputes a stage call, so a 1-vs-1 disagreement between two replicas, or a stage
// with one replica, can still be settled (coordinator/verify.ts).
import os from 'node:os';
import type { Backend } from '../engine/backend.ts';
import { cpuDeviceName } from '../protocol/messages.ts';
import { loadStage } from '../engine/model/load.ts';
import type { LlamaConfig, LoraConfig, Stage, WeightSource } from '../engine/types.ts';
import { decodeFloat, decodeInt, encodeTensor } from '../protocol/tensor.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import type { AdapterState } from './adapter.ts';
import type { PeerRegistry } from './peers.ts';
import type { StageRange } from './planner.ts';
import { COORDINATOR, Verifier } from './verify.ts';
import type { DeviceOf, StageAnswer, StageCall } from './verify.ts';

export interface RefereeInit {
  weights: WeightSource;
  llama: LlamaConfig;
  lora: LoraConfig;
  seed: number;
  gradientCheckpointing: boolean;
  adapter: AdapterState;
  codec: FloatCodec;
  /** the compute backend, made on first use (null: the coordinator cannot referee) */
  backend: () => Promise<Backend | null>;
}

export class CoordinatorReferee {
  private readonly o: RefereeInit;
  /** the stages loaded so far, by layer range (a referee keeps what it loaded: re-planning is rare) */
  private readonly loaded = new Map<string, Promise<Stage>>();
  private backend: Promise<Backend | null> | null = null;
  /** one recomputation at a time: the coordinator has other work too */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(o: RefereeInit) {
    this.o = o;
  }

  private dev: DeviceOf | undefined;

  /** the referee's backend as verify.ts's tolerance sees it, named as a CPU volunteer names its own
   *  (undefined until available() found one) */
  get device(): DeviceOf | undefined { return this.dev; }

  /** whether a backend is available (resolves the backend on first call) */
  async available(): Promise<boolean> {
    this.backend ??= this.o.backend().catch(() => null);
    const b = await this.backend;
    if (b !== null) this.dev = { backend: 'cpu', deviceName: cpuDeviceName(b.name, os.cpus()[0]?.model ?? 'unknown') };
    return b !== null;
  }

  private async stage(st: StageRange): Promise<Stage> {
    const k = `${st.layerStart}:${st.layerEnd}`;
    let p = this.loaded.get(k);
    if (p === undefined) {
      p = (async () => {
        const backend = await this.backend;
        if (backend === null || backend === undefined) throw new Error('the coordinator has no compute backend to referee with');
        return loadStage(this.o.weights, backend, { ...st, lora: this.o.lora, seed: this.o.seed, gradientCheckpointing: this.o.gradientCheckpointing });
      })();
      this.loaded.set(k, p);
      p.catch(() => this.loaded.delete(k));
    }
    return p;
  }

  /** Recompute `call` on stage range `st` with the adapter the coordinator holds now (v_t: a check
   *  runs before the step's apply), rounding the outputs through the wire codec as a peer would. */
  recompute(st: StageRange, call: StageCall): Promise<StageAnswer> {
    const run = this.queue.then(() => this.run(st, call));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async run(st: StageRange, call: StageCall): Promise<StageAnswer> {
    if (!(await this.available())) throw new Error('the coordinator has no compute backend to referee with');
    const stage = await this.stage(st);
    const byName = new Map(this.o.adapter.stageSlice(st).map((t) => [t.name, t]));
    for (const p of stage.params) {
      const t = byName.get(p.name);
      if (t === undefined || t.data.length !== p.data.length) throw new Error(`the coordinator holds no adapter tensor ${p.name} of the right size`);
      p.data.set(t.data);
    }
    const T = call.batch * call.seqLen, C = this.o.llama.hiddenSize;
    const key = `referee:${call.step}:${call.mb}:${call.attempt}`;
    const input = {
      key, batch: call.batch, seqLen: call.seqLen, dropoutSeed: call.dropoutSeed,
      ids: call.ids !== undefined ? decodeInt(call.ids, 'referee ids', [T]) : undefined,
      hidden: call.hidden !== undefined ? decodeFloat(call.hidden, 'referee hidden', [T, C]) : undefined,
      labels: call.labels !== undefined ? decodeInt(call.labels, 'referee labels', [T]) : undefined,
    };
    const round = (x: Float32Array): Float32Array => decodeFloat(encodeTensor(x, [T, C], this.o.codec, 'referee'), 'referee');
    const out = await stage.forward(input, { train: true });
    const answer: StageAnswer = {};
    if (!stage.isLast && out.hidden !== undefined) answer.hidden = round(out.hidden);
    if (stage.isLast) answer.lossSum = out.lossSum ?? 0;
    if (stage.isFirst) {
      stage.release(key);
      return answer;
    }
    const { gradIn } = await stage.backward(key, stage.newGrads(), {
      gradOut: call.gradOut !== undefined ? decodeFloat(call.gradOut, 'referee gradOut', [T, C]) : undefined,
      lossScale: call.lossScale,
    });
    if (gradIn !== undefined) answer.gradIn = round(gradIn);
    return answer;
  }

  dispose(): void {
    for (const p of this.loaded.values()) void p.then((s) => s.dispose(), () => undefined);
    this.loaded.clear();
  }
}

export interface StageVerifierInit {
  fraction: number;
  /** the selection's key (coordinator/verify.ts isSelected) */
  secret: string;
  codec: FloatCodec;
  peers: PeerRegistry;
  stages: readonly StageRange[];
  /** null: only replicas recompute */
  referee: CoordinatorReferee | null;
  /** whether the referee has a backend (CoordinatorReferee.available(), resolved before the run) */
  refereeReady: boolean;
}

/** The run's verifier: the coordinator recomputes with its referee; a replica recomputes through the
 *  step's spot check (coordinator/spot-check.ts: a one-stage route whose neighbours are the
 *  coordinator), which passes that recomputation to each check. */
export function stageVerifier(o: StageVerifierInit): Verifier {
  const { peers } = o;
  return new Verifier({
    fraction: o.fraction, secret: o.secret, codec: o.codec,
    coordinatorCan: () => o.referee !== null && o.refereeReady,
    deviceOf: (where) => {
      if (where === COORDINATOR) return o.referee?.device;
      const c = peers.get(where)?.caps;
      return c !== undefined ? { backend: c.backend, deviceName: c.deviceName } : undefined;
    },
    recompute: async (where, s, call) => {
      if (where === COORDINATOR) return o.referee!.recompute(o.stages[s]!, call);
      throw new Error(`a replica (${where}) recomputes only through the step's spot check`);
    },
  });
}
