// Loading existing LoRA tensors (a PEFT adapter, a swarm checkpoint) into a stage's params by PEFT name.
import type { NamedTensor, Stage } from '../types.ts';

const LAYER_RE = /\.layers\.(\d+)\./;

/** Copy tensors into stage.params by PEFT name, in place (the stage reads .data at call time).
 *  Tensors of layers outside the stage are ignored, so a whole-model adapter loads into any shard.
 *  Throws when a stage param has no tensor, a tensor of the stage's layers matches no param
 *  (target_modules differ), or shapes differ. */
export function loadAdapterInto(stage: Stage, tensors: readonly NamedTensor[], source = 'adapter'): void {
  const byName = new Map<string, NamedTensor>();
  for (const t of tensors) {
    if (byName.has(t.name)) throw new Error(`${source}: duplicate tensor ${t.name}`);
    byName.set(t.name, t);
  }
  const paramNames = new Set(stage.params.map((p) => p.name));
  for (const t of tensors) {
    const m = LAYER_RE.exec(t.name);
    const layer = m ? Number(m[1]) : -1;
    if (layer >= stage.layerStart && layer < stage.layerEnd && !paramNames.has(t.name)) {
      throw new Error(`${source}: tensor ${t.name} has no matching LoRA param in this stage (different target_modules?)`);
    }
  }
  for (const p of stage.params) {
    const t = byName.get(p.name);
    if (!t) throw new Error(`${source}: missing tensor ${p.name}`);
    if (t.shape.length !== p.shape.length || t.shape.some((d, i) => d !== p.shape[i]) || t.data.length !== p.data.length) {
      throw new Error(`${source}: ${p.name} has shape [${t.shape.join(', ')}], expected [${p.shape.join(', ')}]`);
    }
    p.data.set(t.data);
  }
}
