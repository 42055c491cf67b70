// Shared by the model-family tests (model-families, model-phi3, model-families-gemma): random inputs, the
// relative error, and the finite-difference check of a stage's LoRA and input gradients against a float64
// reference loss written from the Hugging Face modeling equations (tests/hf-reference*.ts).
import assert from 'node:assert/strict';
import { RefBackend } from '../engine/backends/ref.ts';
import { loadStage } from '../engine/model/load.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { Rng } from '../engine/model/rng.ts';
import type { LlamaConfig, LoraConfig, NamedTensor, Stage, WeightSource } from '../engine/types.ts';
import { hfLossSum } from './hf-reference.ts';

export function randomize(stage: Stage, seed: number, scale = 0.3): void {
  const rng = new Rng(seed);
  for (const p of stage.params) rng.fillNormal(p.data, 0, scale);
}
export const randomIds = (n: number, V: number, seed: number) => { const r = new Rng(seed); return Int32Array.from({ length: n }, () => r.nextU32() % V); };
export function shifted(ids: Int32Array, B: number, S: number): Int32Array {
  const labels = new Int32Array(B * S).fill(-100);
  for (let b = 0; b < B; b++) for (let s = 0; s + 1 < S; s++) labels[b * S + s] = ids[b * S + s + 1];
  return labels;
}
export function maxRel(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let d = 0, scale = 0;
  for (let i = 0; i < want.length; i++) { d = Math.max(d, Math.abs(got[i] - want[i])); scale = Math.max(scale, Math.abs(want[i])); }
  return d / Math.max(1, scale);
}

/** The reference's logits for `input` with the LoRA tensors `params` (scaling alpha / r). */
export type ReferenceLogits = (src: WeightSource, input: { ids?: Int32Array; hidden?: Float64Array; fromLayer?: number; B: number; S: number },
  adapter: { params: NamedTensor[]; scaling: number }) => Promise<Float64Array>;

/** A 2-layer model: the whole model's LoRA gradients and the tail stage's (layer 1) LoRA and input gradients
 *  against central finite differences of the reference loss, `probes` random elements per tensor. The reference
 *  loss is float64 throughout, so a small step is accurate: truncation O(eps²) ~1e-8, rounding ~1e-16/eps; what
 *  remains is the engine's float32 activations (~1e-6 relative), hence 1e-4 + 0.5%. More than half the checked
 *  gradients must be non-negligible, so the check cannot pass on zeros. Returns the stages (the caller disposes
 *  them) and the whole model's LoRA gradients. */
export async function checkStageGradients(cfg: LlamaConfig, lora: LoraConfig, reference: ReferenceLogits, o: { S: number; probes: number }): Promise<{ whole: Stage; tail: Stage; grads: Float32Array[] }> {
  const ref = new RefBackend();
  const src = randomWeightSource(cfg, 21);
  const whole = await loadStage(src, ref, { layerStart: 0, layerEnd: 2, lora, lossChunk: 4 });
  const tail = await loadStage(src, ref, { layerStart: 1, layerEnd: 2, lora, lossChunk: 4 });
  randomize(whole, 8);
  randomize(tail, 9);
  const B = 2, S = o.S, lossScale = 0.5;
  const ids = randomIds(B * S, cfg.vocabSize, 1);
  const labels = shifted(ids, B, S);
  const grads = whole.newGrads();
  await whole.forward({ key: 'k', batch: B, seqLen: S, ids, labels });
  await whole.backward('k', grads, { lossScale });
  const hidden = new Rng(4).fillNormal(new Float32Array(B * S * cfg.hiddenSize), 0, 1);
  const tgrads = tail.newGrads();
  await tail.forward({ key: 'k', batch: B, seqLen: S, hidden, labels });
  const { gradIn } = await tail.backward('k', tgrads, { lossScale });
  const eps = 1e-4;
  const loss = async (params: Stage['params'], input: { ids?: Int32Array; hidden?: Float64Array; fromLayer?: number }) =>
    hfLossSum(await reference(src, { ...input, B, S }, { params, scaling: lora.loraAlpha / lora.r }), labels, cfg.vocabSize) * lossScale;
  let checked = 0, nonzero = 0;
  const fd = async (what: string, buf: Float64Array | Float32Array, analytic: ArrayLike<number>, f: () => Promise<number>) => {
    const rng = new Rng(what.length, buf.length);
    for (let n = 0; n < o.probes; n++) {
      const i = rng.nextU32() % buf.length;
      const old = buf[i];
      buf[i] = old + eps; const lp = await f();
      buf[i] = old - eps; const lm = await f();
      buf[i] = old;
      const g = (lp - lm) / (2 * eps);
      checked++;
      if (Math.abs(g) > 1e-3) nonzero++;
      assert.ok(Math.abs(g - analytic[i]) <= 1e-4 + 5e-3 * Math.abs(g), `${what}[${i}]: finite difference ${g} vs analytic ${analytic[i]}`);
    }
  };
  // float64 copies of the LoRA tensors, so the perturbation is exact
  const f64 = (st: Stage) => st.params.map((p) => ({ ...p, data: Float64Array.from(p.data) as unknown as Float32Array }));
  const wp = f64(whole), tp = f64(tail);
  for (let p = 0; p < wp.length; p++) await fd(wp[p].name, wp[p].data, grads[p], () => loss(wp, { ids }));
  const h64 = Float64Array.from(hidden);
  for (let p = 0; p < tp.length; p++) await fd(`tail ${tp[p].name}`, tp[p].data, tgrads[p], () => loss(tp, { hidden: h64, fromLayer: 1 }));
  await fd('gradIn', h64, gradIn!, () => loss(tp, { hidden: h64, fromLayer: 1 }));
  assert.ok(nonzero > checked / 2, `only ${nonzero} of ${checked} checked gradients were non-negligible`);
  return { whole, tail, grads };
}
