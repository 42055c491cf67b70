// `swarmtune merge`: merged-model logits equal base+adapter logits; the dir is a loadable HF model.
// Uses the embedded tiny model (4 layers, hidden 128) and 8 tokens, so the float64 reference forward is ~1 s.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import type { LoraConfig, NamedTensor, WeightSource } from '../engine/types.ts';
import { LORA_TARGETS } from '../engine/types.ts';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { writeAdapter } from '../engine/formats/peft.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { loadStage } from '../engine/model/load.ts';
import { logits } from '../engine/model/decode.ts';
import { loadAdapterInto } from '../engine/model/adapter.ts';
import { referenceLogits } from '../engine/model/reference.ts';
import { loraScaling } from '../engine/model/lora.ts';
import { Rng } from '../engine/model/rng.ts';
import { mergeAdapter } from '../engine/tasks/merge.ts';

/** Exact float weights behind the WeightSource NF4 interface: blocksize 1, code 15 (= +1.0) or 0 (= -1.0)
 *  and absmax = |w|, so the reference forward (which only knows NF4) sees the merged float32 weight unchanged. */
function exactSource(src: WeightSource): WeightSource {
  return {
    config: src.config,
    has: (n) => src.has(n),
    getFloat: (n) => src.getFloat(n),
    async getNF4(n): Promise<NF4Weight> {
      const w = await src.getFloat(n);
      const shape = n.includes('mlp.down_proj') ? [src.config.hiddenSize, src.config.intermediateSize]
        : n.includes('mlp.') ? [src.config.intermediateSize, src.config.hiddenSize]
          : n.includes('k_proj') || n.includes('v_proj') ? [src.config.numKeyValueHeads * src.config.headDim, src.config.hiddenSize]
            : [src.config.hiddenSize, src.config.hiddenSize];
      const packed = new Uint8Array(Math.ceil(w.length / 2));
      const absmax = new Float32Array(w.length);
      for (let i = 0; i < w.length; i++) {
        absmax[i] = Math.abs(w[i]);
        const code = w[i] < 0 ? 0 : 15;
        packed[i >> 1] |= (i & 1) === 0 ? code << 4 : code;
      }
      return { packed, absmax, rows: shape[0], cols: shape[1], blocksize: 1 };
    },
  };
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): { diff: number; scale: number } {
  let diff = 0, scale = 0;
  for (let i = 0; i < a.length; i++) {
    diff = Math.max(diff, Math.abs(a[i] - b[i]));
    scale = Math.max(scale, Math.abs(b[i]));
  }
  return { diff, scale };
}

test('merged model logits equal base + adapter logits; output is a loadable HF dir', async () => {
  const root = mkdtempSync(join(tmpdir(), 'swarmtune-merge-'));
  try {
    const modelDir = await ensureTinyModel(join(root, 'tiny'));
    const md = await openModelDir(modelDir);
    const backend = new RefBackend();
    const lora: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true };
    const stage = await loadStage(md.weights, backend, { layerStart: 0, layerEnd: md.config.numHiddenLayers, lora, seed: 3 });
    // a trained adapter has B != 0; random B of a size that visibly moves the logits
    const rng = new Rng(99);
    const tensors: NamedTensor[] = stage.params.map((p) => ({ name: p.name, shape: [...p.shape], data: rng.fillNormal(new Float32Array(p.data.length), 0, 0.05) }));
    await writeAdapter(join(root, 'adapter'), { lora, baseModel: modelDir, tensors });
    loadAdapterInto(stage, tensors);

    const files = await mergeAdapter({ model: modelDir, adapter: join(root, 'adapter'), out: join(root, 'merged'), dtype: 'f32', backend });
    for (const f of ['model.safetensors', 'config.json', 'tokenizer.json', 'tokenizer_config.json']) assert.ok(files.includes(f) && existsSync(join(root, 'merged', f)), f);
    const cfgJson = JSON.parse(readFileSync(join(root, 'merged', 'config.json'), 'utf8'));
    assert.equal(cfgJson.torch_dtype, 'float32');
    assert.equal(cfgJson.quantization_config, undefined);

    const merged = await openModelDir(join(root, 'merged'));
    assert.ok(merged.tokenizer, 'tokenizer files are copied');
    const S = 8;
    const ids = Int32Array.from({ length: S }, (_, i) => (i * 37 + 5) % md.config.vocabSize);
    const stageLogits = await logits(stage, ids, 1, S);
    const refBaseAdapter = await referenceLogits(md.weights, ids, 1, S, { params: tensors, scaling: loraScaling(lora) });
    const refMerged = await referenceLogits(exactSource(merged.weights), ids, 1, S);
    const refBase = await referenceLogits(md.weights, ids, 1, S);
    const moved = maxAbsDiff(refBase, refBaseAdapter);
    assert.ok(moved.diff > 0.05 * moved.scale, `the adapter must change the logits (moved ${moved.diff})`);
    // merged weights are rounded to float32 once: differences stay ~1e-6 of the logit scale
    const m = maxAbsDiff(refMerged, refBaseAdapter);
    assert.ok(m.diff < 1e-4 * m.scale, `merged vs base+adapter: ${m.diff} (scale ${m.scale})`);
    const s = maxAbsDiff(stageLogits, refMerged);
    assert.ok(s.diff < 1e-3 * s.scale, `stage(base+adapter) vs merged: ${s.diff} (scale ${s.scale})`);
    await merged.close();

    await mergeAdapter({ model: modelDir, adapter: join(root, 'adapter'), out: join(root, 'merged-bf16'), backend });
    const f = await SafetensorsFile.open(join(root, 'merged-bf16', 'model.safetensors'));
    assert.equal(f.info('model.layers.0.self_attn.q_proj.weight').dtype, 'BF16');
    assert.equal(f.metadata?.format, 'pt');
    await f.close();
    await assert.rejects(mergeAdapter({ model: modelDir, adapter: join(root, 'adapter'), out: modelDir, backend }), /base model dir/);
    stage.dispose();
    await md.close();
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});
