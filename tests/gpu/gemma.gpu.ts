// GPU checks of Gemma's ops (GeGLU, soft-capping, attention with a scale, a logit soft-cap and a sliding window)
// against the float64 CPU reference, and a whole Gemma-2 / Gemma-3 stage on the device (activations resident)
// against the same stage on the reference. Run by scripts/gpu-check.sh and, on the CPU, by tests/cuda-emu.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RefBackend } from '../../engine/backends/ref.ts';
import { parseLlamaConfig } from '../../engine/formats/config.ts';
import { loadStage } from '../../engine/model/load.ts';
import { logits } from '../../engine/model/decode.ts';
import { randomWeightSource } from '../../engine/model/random-model.ts';
import { CudaArgumentError } from '../../cuda/index.ts';
import { assertClose, cuda, cudaFp32, maxAbs, randn, rng, skip } from './helpers.ts';

const ref = new RefBackend();

test('geglu and softcap (in place too) match the reference', { skip }, async () => {
  const r = rng(31);
  const n = 10007;
  const gate = randn(r, n, 4), up = randn(r, n), dout = randn(r, n);
  const out = new Float32Array(n), outR = new Float32Array(n);
  await cuda!.gegluForward(out, gate, up, n);
  await ref.gegluForward(outR, gate, up, n);
  assertClose('geglu', out, outR, { rtol: 1e-5, atol: 1e-6 });
  const dg = new Float32Array(n), du = new Float32Array(n), dgR = new Float32Array(n), duR = new Float32Array(n);
  await cuda!.gegluBackward(dg, du, dout, gate, up, n);
  await ref.gegluBackward(dgR, duR, dout, gate, up, n);
  assertClose('geglu dgate', dg, dgR, { rtol: 1e-5, atol: 1e-6 });
  assertClose('geglu dup', du, duR, { rtol: 1e-5, atol: 1e-6 });
  const x = randn(r, n, 40), y = Float32Array.from(x), yR = new Float32Array(n);
  await cuda!.softcapForward(y, y, 30, n);
  await ref.softcapForward(yR, x, 30, n);
  assertClose('softcap in place', y, yR, { rtol: 1e-6, atol: 1e-5 });
  const dx = Float32Array.from(dout), dxR = new Float32Array(n);
  await cuda!.softcapBackward(dx, dx, x, 30, n);
  await ref.softcapBackward(dxR, dout, x, 30, n);
  assertClose('softcap dx', dx, dxR, { rtol: 1e-5, atol: 1e-6 });
  await assert.rejects(cuda!.softcapForward(y, x, 0, n), (e: Error) => e instanceof CudaArgumentError && /cap must be > 0/.test(e.message));
});

test('attention with scale, soft-cap and sliding window matches the reference (windows across 32-row tiles)', { skip }, async () => {
  const r = rng(32);
  for (const [B, S, H, KV, D, opts] of [
    [2, 70, 4, 2, 16, { scale: 0.21, softcap: 2.0, window: 37 }],
    [1, 100, 2, 1, 64, { scale: 0.0625, window: 32 }],
    [1, 70, 2, 2, 40, { softcap: 1.0, window: 2 }],
    [2, 9, 4, 1, 256, { scale: 0.0625, softcap: 50, window: 4096 }],
  ] as const) {
    const T = B * S;
    const q = randn(r, T * H * D), k = randn(r, T * KV * D), v = randn(r, T * KV * D);
    const out = new Float32Array(T * H * D), lse = new Float32Array(B * H * S);
    const outR = new Float32Array(T * H * D), lseR = new Float32Array(B * H * S);
    await cuda!.attentionForward(out, lse, q, k, v, B, S, H, KV, D, opts);
    await ref.attentionForward(outR, lseR, q, k, v, B, S, H, KV, D, opts);
    const tag = `B${B} S${S} H${H} KV${KV} D${D} ${JSON.stringify(opts)}`;
    // the tolerances of ops.gpu.ts's attention test (fp32 exp/sum, mixed-sign gradient sums)
    assertClose(`attention out ${tag}`, out, outR, { rtol: 1e-4, atol: 1e-5 * maxAbs(v) });
    assertClose(`attention lse ${tag}`, lse, lseR, { rtol: 1e-5, atol: 1e-5 });
    const dout = randn(r, T * H * D);
    const dq = new Float32Array(T * H * D), dk = new Float32Array(T * KV * D), dv = new Float32Array(T * KV * D);
    const dqR = new Float32Array(T * H * D), dkR = new Float32Array(T * KV * D), dvR = new Float32Array(T * KV * D);
    await cuda!.attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D, opts);
    await ref.attentionBackward(dqR, dkR, dvR, dout, q, k, v, outR, lseR, B, S, H, KV, D, opts);
    assertClose(`attention dq ${tag}`, dq, dqR, { rtol: 1e-3, atol: 1e-4 * maxAbs(dqR) });
    assertClose(`attention dk ${tag}`, dk, dkR, { rtol: 1e-3, atol: 1e-4 * maxAbs(dkR) });
    assertClose(`attention dv ${tag}`, dv, dvR, { rtol: 1e-3, atol: 1e-4 * maxAbs(dvR) });
  }
});

test('a Gemma-2 and a Gemma-3 stage on the device (fp32 GEMM) match the reference stage: logits, loss, LoRA gradients', { skip }, async () => {
  const common = { hidden_size: 32, head_dim: 16, intermediate_size: 48, num_hidden_layers: 3, num_attention_heads: 4, rms_norm_eps: 1e-6,
    max_position_embeddings: 256, hidden_activation: 'gelu_pytorch_tanh', query_pre_attn_scalar: 24, sliding_window: 5, vocab_size: 61 };
  for (const json of [
    { ...common, model_type: 'gemma2', num_key_value_heads: 2, attn_logit_softcapping: 2.0, final_logit_softcapping: 5.0 },
    { ...common, model_type: 'gemma3_text', num_key_value_heads: 1, sliding_window_pattern: 2, rope_scaling: { rope_type: 'linear', factor: 8.0 } },
  ]) {
    const cfg = parseLlamaConfig(json);
    const src = randomWeightSource(cfg, 5);
    const lora = { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['q_proj', 'v_proj', 'o_proj', 'down_proj'] as const, useRslora: false, initLoraWeights: true as const };
    const B = 2, S = 12;
    const ids = Int32Array.from({ length: B * S }, (_, i) => (i * 7 + 3) % cfg.vocabSize);
    const labels = Int32Array.from({ length: B * S }, (_, i) => ((i + 1) % S === 0 ? -100 : ids[i + 1]));
    const res = [];
    for (const be of [ref, cudaFp32!]) {
      const st = await loadStage(src, be, { layerStart: 0, layerEnd: 3, lora: { ...lora, targetModules: [...lora.targetModules] }, lossChunk: 16 });
      const rr = rng(9);
      for (const p of st.params) p.data.set(randn(rr, p.data.length, 0.2));
      const lg = await logits(st, ids, B, S);
      const g = st.newGrads();
      const fw = await st.forward({ key: 'k', batch: B, seqLen: S, ids, labels });
      await st.backward('k', g, { lossScale: 1 / fw.tokens! });
      res.push({ lg, loss: fw.lossSum!, g });
      st.dispose();
    }
    const [want, got] = res;
    assertClose(`${cfg.modelType} logits`, got.lg, want.lg, { rtol: 1e-4, atol: 1e-4 * maxAbs(want.lg) });
    assert.ok(Math.abs(got.loss - want.loss) <= 1e-4 * want.loss, `${cfg.modelType} loss ${got.loss} vs ${want.loss}`);
    for (let p = 0; p < want.g.length; p++) assertClose(`${cfg.modelType} grad ${p}`, got.g[p], want.g[p], { rtol: 1e-3, atol: 1e-4 * maxAbs(want.g[p]) });
  }
});
