// The coordinator's idea of each stage's LoRA tensors (coordinator/adapter.ts expectedStageParams, against
// which adapter uploads are checked) is exactly what a volunteer's engine builds (engine/model/load.ts
// loadStage): names, order, shapes and the seeded lora_A, for every family, Phi-3's fused linears
// included. A difference refuses an honest volunteer's upload and bans it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RefBackend } from '../engine/backends/ref.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { expectedStageParams } from '../coordinator/adapter.ts';

const BASE = { vocab_size: 61, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000, max_position_embeddings: 256 };
const FAMILIES: Record<string, Record<string, unknown>> = {
  llama: { ...BASE, model_type: 'llama' },
  phi3: { ...BASE, model_type: 'phi3', tie_word_embeddings: false },
  gemma2: { ...BASE, model_type: 'gemma2', head_dim: 8, hidden_activation: 'gelu_pytorch_tanh', query_pre_attn_scalar: 8, sliding_window: 3 },
};
const TARGETS: Record<string, string[]> = {
  llama: ['q_proj,k_proj,o_proj,down_proj', 'all-linear'],
  phi3: ['qkv_proj,o_proj,gate_up_proj', 'down_proj,qkv_proj', 'all-linear'],
  gemma2: ['all-linear'],
};

for (const [family, hf] of Object.entries(FAMILIES)) {
  for (const target of TARGETS[family]!) {
    test(`${family}, target_modules ${target}: the coordinator expects the tensors the engine builds`, async () => {
      const cfg = parseLlamaConfig(hf);
      const weights = randomWeightSource(cfg, 1);
      const lora = loraConfigOf(resolveTrainConfig({ flags: { lora_r: 4, lora_alpha: 8, target_modules: target, device: 'ref' } }));
      for (const st of [{ layerStart: 0, layerEnd: 2 }, { layerStart: 2, layerEnd: 4 }]) {
        const stage = await loadStage(weights, new RefBackend(), { ...st, lora, seed: 7 });
        const want = expectedStageParams({ llama: cfg, lora, seed: 7 }, { ...st, isFirst: st.layerStart === 0, isLast: st.layerEnd === 4 } as never);
        assert.deepEqual(want.map((p) => [p.name, p.shape]), stage.params.map((p) => [p.name, p.shape]));
        for (let i = 0; i < want.length; i++) assert.deepEqual(want[i]!.data, stage.params[i]!.data, want[i]!.name);
      }
    });
  }
}
