// Placing volunteers after a coordinator restart: peers that kept their stage's state at the last
// committed step keep it (no transfer, exact optimizer moments); the others load the committed
// adapter, with the optimizer state fetched from a peer that kept it, or else the last checkpoint.
import type { StageRange } from './planner.ts';

/** What a rejoining volunteer says it kept (join.kept): its stage and the steps it can restore. */
export interface KeptOffer {
  runId: string;
  stageIndex: number;
  layerStart: number;
  layerEnd: number;
  states: Array<{ step: number; adapterSha256: string }>;
}

export interface ResumeInput {
  runId: string;
  /** the last committed step */
  step: number;
  stages: StageRange[];
  /** the planner's replicas for the joined peers (every stage non-empty) */
  planned: string[][];
  /** per stage: the adapter digest of the committed step (protocol/adapter-digest.ts) */
  stageDigests: string[];
  offers: Map<string, KeptOffer | undefined>;
  memoryOf: (peerId: string) => number;
  /** bytes each stage needs */
  need: number[];
}

export interface ResumePlacement {
  /** per stage, peer ids in peer-id order (the aggregation order) */
  replicas: string[][];
  /** peers that keep the stage state they hold, restored to the committed step → their stage */
  keep: Map<string, number>;
  /** peers admitted at the first step boundary, like late joiners, with the optimizer state of a
   *  peer that kept it (a stage with a keeper needs no checkpoint) */
  deferred: string[];
  /** stages no peer kept: the committed adapter with the last checkpoint's optimizer state */
  stagesWithoutState: number[];
  /** why offers were not used, for the log */
  notes: string[];
}

/** The stage this offer can keep at `step`, or a reason it cannot. */
function keeperStage(o: KeptOffer, peerId: string, x: ResumeInput): number | string {
  if (o.runId !== x.runId) return `peer ${peerId} kept state of another run (${o.runId})`;
  const st = x.stages[o.stageIndex];
  if (st === undefined || st.layerStart !== o.layerStart || st.layerEnd !== o.layerEnd) {
    return `peer ${peerId} kept stage ${o.stageIndex} layers [${o.layerStart}, ${o.layerEnd}), which is not a stage of this run`;
  }
  const at = o.states.find((s) => s.step === x.step);
  if (at === undefined) return `peer ${peerId} kept stage ${o.stageIndex} at step(s) ${o.states.map((s) => s.step).join(', ')}, not the committed step ${x.step}`;
  if (at.adapterSha256 !== x.stageDigests[o.stageIndex]) return `peer ${peerId} kept stage ${o.stageIndex} at step ${x.step} with an adapter that differs from the committed one`;
  if (x.memoryOf(peerId) < x.need[o.stageIndex]!) return `peer ${peerId} now offers too little memory for its kept stage ${o.stageIndex}`;
  return o.stageIndex;
}

export function placeResumed(x: ResumeInput): ResumePlacement {
  const S = x.stages.length;
  const notes: string[] = [];
  const keepOf = new Map<string, number>();
  const all = x.planned.flat();
  for (const id of all) {
    const o = x.offers.get(id);
    if (o === undefined) continue;
    const r = keeperStage(o, id, x);
    if (typeof r === 'number') keepOf.set(id, r);
    else notes.push(r);
  }
  const finish = (replicas: string[][], keep: Map<string, number>, deferred: string[]): ResumePlacement => {
    for (const r of replicas) r.sort();
    const kept = new Set(keep.values());
    return { replicas, keep, deferred, stagesWithoutState: x.stages.map((_, s) => s).filter((s) => !kept.has(s)), notes };
  };

  // A: every keeper on its own stage; a non-keeper stays on its planned stage when that stage has no
  // keeper (all its peers load the checkpoint), else waits for the first step boundary
  {
    const replicas: string[][] = x.stages.map(() => []);
    for (const [id, s] of keepOf) replicas[s]!.push(id);
    const deferred: string[] = [];
    x.planned.forEach((ids, t) => {
      for (const id of ids) {
        if (keepOf.has(id)) continue;
        if (replicas[t]!.some((p) => keepOf.has(p))) deferred.push(id);
        else replicas[t]!.push(id);
      }
    });
    // a stage left empty (its planned peers kept other stages) takes a deferred peer that fits it
    for (let s = 0; s < S; s++) {
      if (replicas[s]!.length > 0) continue;
      const i = deferred.findIndex((id) => x.memoryOf(id) >= x.need[s]!);
      if (i >= 0) replicas[s]!.push(deferred.splice(i, 1)[0]!);
    }
    if (replicas.every((r) => r.length > 0)) return finish(replicas, keepOf, deferred);
  }

  // B: the planner's placement; keepers keep only where the planner put them on their own stage
  const keep = new Map([...keepOf].filter(([id, s]) => x.planned[s]!.includes(id)));
  for (const [id, s] of keepOf) if (!keep.has(id)) notes.push(`peer ${id} kept stage ${s}, but the plan needs it on another stage`);
  const replicas: string[][] = x.planned.map(() => []);
  const deferred: string[] = [];
  x.planned.forEach((ids, t) => {
    const hasKeeper = ids.some((id) => keep.get(id) === t);
    for (const id of ids) {
      if (keep.has(id) || !hasKeeper) replicas[t]!.push(id);
      else deferred.push(id);
    }
  });
  return finish(replicas, keep, deferred);
}
