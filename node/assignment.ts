// From an assignment to a stage host: fetch and verify the stage's shard blobs, load the stage, and
// bring it to the run's current step (adapter and optimizer state).
import path from 'node:path';
import type { Backend } from '../engine/backend.ts';
import { loadStage } from '../engine/model/load.ts';
import { loraTargets } from '../engine/model/lora.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import type { LoraConfig } from '../engine/types.ts';
import type { BlobStore } from '../protocol/blobs.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { decodeShardFile, openShardFile } from '../engine/formats/shard.ts';
import type { Assignment } from '../protocol/messages.ts';
import { SwarmError } from '../protocol/errors.ts';
import type { Logger } from '../protocol/log.ts';
import { BlobWeightSource } from './weights.ts';
import { StageHost } from './stage-host.ts';
import type { OptimizerFactory } from './optimizer.ts';
import type { TestAids } from './test-aids.ts';

export interface StageComponents {
  node: SwarmNode;
  blobs: BlobStore;
  backend: Backend;
  createOptimizer: OptimizerFactory;
}

export interface LoadOptions {
  dataDir: string;
  /** step snapshots up to this size stay in memory */
  snapshotResidentBytes: number;
  aids: TestAids;
  /** the stage host's logger (swarmtune:node:stage) */
  log?: Logger;
  /** aborts the blob fetches (the volunteer is leaving) */
  signal?: AbortSignal;
}

/** Shard float tensors this large or larger are streamed from their file at load (openShardFile): an
 *  embedding or lm_head of any real model, and of the embedded tiny model (960 × 128 × 4 = 480 KiB) too, so
 *  every swarm test loads through this path; norms and biases are read whole. */
const LAZY_FLOAT_BYTES = 256 << 10;

function loraOf(a: Assignment): LoraConfig {
  return {
    r: a.lora.r, loraAlpha: a.lora.loraAlpha, loraDropout: a.lora.loraDropout, targetModules: loraTargets(a.lora.targetModules),
    useRslora: a.lora.useRslora, initLoraWeights: a.lora.initLoraWeights === 'gaussian' ? 'gaussian' : true,
  };
}

/** Fetch, verify and decode the stage's shard blobs, load the stage, apply the run's current adapter
 *  and optimizer state. A failure leaves nothing loaded. */
export async function loadAssignedStage(a: Assignment, c: StageComponents, o: LoadOptions): Promise<StageHost> {
  const { node, blobs, backend } = c;
  const signal = o.signal;
  const config = parseLlamaConfig(JSON.parse(a.modelConfigJson), `run ${a.runId} model config`);
  // decoded from the verified file tensor by tensor: a shard blob over 2 GiB is never read into one buffer;
  // float tensors of LAZY_FLOAT_BYTES or more (embedding, lm_head) stay in the file and stream into the
  // stage (bf16 where exact), never whole in float32 beside their packed form
  const opened: Awaited<ReturnType<typeof openShardFile>>[] = [];
  let stage;
  try {
    for (const ref of a.blobs) opened.push(await openShardFile(await blobs.fetch(node, ref, { signal }), `shard ${ref.name}`, LAZY_FLOAT_BYTES));
    const source = new BlobWeightSource(config, opened.map((o) => o.tensors), opened.map((o) => o.lazy));
    stage = await loadStage(source, backend, {
      layerStart: a.layerStart, layerEnd: a.layerEnd, lora: loraOf(a), seed: a.seed, gradientCheckpointing: a.gradientCheckpointing,
    });
    source.clear();
  } finally {
    for (const o of opened) await o.close();
  }
  try {
    if (a.adapterBlob !== null) {
      const t = await decodeShardFile(await blobs.fetch(node, a.adapterBlob, { signal }), `adapter ${a.adapterBlob.name}`);
      for (const p of stage.params) {
        const x = t.float.get(p.name);
        if (x === undefined) throw new SwarmError(`adapter blob ${a.adapterBlob.name} lacks ${p.name}`);
        if (x.data.length !== p.data.length) throw new SwarmError(`adapter ${p.name}: ${x.data.length} elements, the stage expects ${p.data.length} [${p.shape}]`);
        p.data.set(x.data);
      }
    }
    const optimizer = await c.createOptimizer(a.optim, stage.params, {
      spillDir: path.join(o.dataDir, 'optimizer'),
      state: a.optimizerBlob !== null ? await blobs.get(node, a.optimizerBlob, { signal }) : null,
      backend,
    });
    const budget = a.optim.residentBytes > 0 ? a.optim.residentBytes : Infinity;
    return new StageHost(stage, a, optimizer, {
      dir: path.join(o.dataDir, 'restore'), residentBytes: Math.min(o.snapshotResidentBytes, budget), aids: o.aids, log: o.log,
    });
  } catch (e) {
    stage.dispose();
    throw e;
  }
}
