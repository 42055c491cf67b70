// N-API bindings of the Backend ops (GEMM, NF4 GEMM and dequantization with per-call weight uploads, RMSNorm,
// RoPE, attention, SwiGLU, embedding, chunked cross-entropy) and of the GEMM and attention launch grids.
#include "binding.h"

namespace stc_addon {
namespace {

Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Args a(info, "gemm");
  stc_ctx* c = a.ctx(0);
  int tA = a.flag(1), tB = a.flag(2), M = a.i32(3), N = a.i32(4), K = a.i32(5);
  float alpha = (float)a.num(6);
  const float* A = a.f32(7);
  const float* B = a.f32(8);
  float beta = (float)a.num(9);
  float* C = a.f32(10);
  return a.run([=] { return stc_gemm(c, tA, tB, M, N, K, alpha, A, B, beta, C); });
}

// (ctx, M, X|DY, packed, absmax, rows, cols, blocksize, beta, Y|DX); absmax: Float32Array, device address, or the
// double-quantized object (Args::nf4absmax)
Napi::Value GemmNF4Common(const Napi::CallbackInfo& info, bool transposed) {
  Args a(info, transposed ? "gemmNF4T" : "gemmNF4");
  stc_ctx* c = a.ctx(0);
  int M = a.i32(1);
  const float* X = a.f32(2);
  const uint8_t* P = a.u8in(3);
  stc_nf4_absmax S = a.nf4absmax(4);
  int rows = a.i32(5), cols = a.i32(6), bs = a.i32(7);
  float beta = (float)a.num(8);
  float* Y = a.f32(9);
  if (transposed) return a.run([=] { return stc_gemm_nf4t(c, M, X, P, &S, rows, cols, bs, beta, Y); });
  return a.run([=] { return stc_gemm_nf4(c, M, X, P, &S, rows, cols, bs, beta, Y); });
}
Napi::Value GemmNF4(const Napi::CallbackInfo& info) { return GemmNF4Common(info, false); }
Napi::Value GemmNF4T(const Napi::CallbackInfo& info) { return GemmNF4Common(info, true); }

Napi::Value DequantNF4(const Napi::CallbackInfo& info) {
  Args a(info, "dequantNF4");
  stc_ctx* c = a.ctx(0);
  const uint8_t* P = a.u8in(1);
  stc_nf4_absmax S = a.nf4absmax(2);
  int rows = a.i32(3), cols = a.i32(4), bs = a.i32(5);
  float* out = a.f32(6);
  return a.run([=] { return stc_dequant_nf4(c, P, &S, rows, cols, bs, out); });
}

Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
  Args a(info, "rmsnormForward");
  stc_ctx* c = a.ctx(0);
  float *out = a.f32(1), *rstd = a.f32(2);
  const float *x = a.f32(3), *w = a.f32(4);
  int T = a.i32(5), C = a.i32(6);
  float eps = (float)a.num(7);
  return a.run([=] { return stc_rmsnorm_forward(c, out, rstd, x, w, T, C, eps); });
}

Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
  Args a(info, "rmsnormBackward");
  stc_ctx* c = a.ctx(0);
  float* dx = a.f32(1);
  float* dw = a.f32(2, true);
  const float *dout = a.f32(3), *x = a.f32(4), *w = a.f32(5), *rstd = a.f32(6);
  int T = a.i32(7), C = a.i32(8);
  return a.run([=] { return stc_rmsnorm_backward(c, dx, dw, dout, x, w, rstd, T, C); });
}

Napi::Value Rope(const Napi::CallbackInfo& info) {
  Args a(info, "rope");
  stc_ctx* c = a.ctx(0);
  float* x = a.f32(1);
  const float *cs = a.f32(2), *sn = a.f32(3);
  int maxPos = a.i32(4);
  const int32_t* pos = a.i32a(5);
  int T = a.i32(6), nh = a.i32(7), D = a.i32(8);
  int inv = a.flag(9);
  return a.run([=] { return stc_rope(c, x, cs, sn, maxPos, pos, T, nh, D, inv); });
}

Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
  Args a(info, "attentionForward");
  stc_ctx* c = a.ctx(0);
  float *out = a.f32(1), *lse = a.f32(2);
  const float *q = a.f32(3), *k = a.f32(4), *v = a.f32(5);
  int B = a.i32(6), S = a.i32(7), H = a.i32(8), KV = a.i32(9), D = a.i32(10);
  float scale = (float)a.num(11), softcap = (float)a.num(12);
  int window = a.i32(13);
  return a.run([=] { return stc_attention_forward(c, out, lse, q, k, v, B, S, H, KV, D, scale, softcap, window); });
}

Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  Args a(info, "attentionBackward");
  stc_ctx* c = a.ctx(0);
  float *dq = a.f32(1), *dk = a.f32(2), *dv = a.f32(3);
  const float *dout = a.f32(4), *q = a.f32(5), *k = a.f32(6), *v = a.f32(7), *out = a.f32(8), *lse = a.f32(9);
  int B = a.i32(10), S = a.i32(11), H = a.i32(12), KV = a.i32(13), D = a.i32(14);
  float scale = (float)a.num(15), softcap = (float)a.num(16);
  int window = a.i32(17);
  return a.run([=] {
    return stc_attention_backward(c, dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D, scale, softcap, window);
  });
}

Napi::Value GegluForward(const Napi::CallbackInfo& info) {
  Args a(info, "gegluForward");
  stc_ctx* c = a.ctx(0);
  float* out = a.f32(1);
  const float *g = a.f32(2), *u = a.f32(3);
  int64_t n = a.i64(4);
  return a.run([=] { return stc_geglu_forward(c, out, g, u, n); });
}

Napi::Value GegluBackward(const Napi::CallbackInfo& info) {
  Args a(info, "gegluBackward");
  stc_ctx* c = a.ctx(0);
  float *dg = a.f32(1), *du = a.f32(2);
  const float *dout = a.f32(3), *g = a.f32(4), *u = a.f32(5);
  int64_t n = a.i64(6);
  return a.run([=] { return stc_geglu_backward(c, dg, du, dout, g, u, n); });
}

Napi::Value SoftcapForward(const Napi::CallbackInfo& info) {
  Args a(info, "softcapForward");
  stc_ctx* c = a.ctx(0);
  float* y = a.f32(1);
  const float* x = a.f32(2);
  float cap = (float)a.num(3);
  int64_t n = a.i64(4);
  return a.run([=] { return stc_softcap_forward(c, y, x, cap, n); });
}

Napi::Value SoftcapBackward(const Napi::CallbackInfo& info) {
  Args a(info, "softcapBackward");
  stc_ctx* c = a.ctx(0);
  float* dx = a.f32(1);
  const float *dy = a.f32(2), *x = a.f32(3);
  float cap = (float)a.num(4);
  int64_t n = a.i64(5);
  return a.run([=] { return stc_softcap_backward(c, dx, dy, x, cap, n); });
}

Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
  Args a(info, "swigluForward");
  stc_ctx* c = a.ctx(0);
  float* out = a.f32(1);
  const float *g = a.f32(2), *u = a.f32(3);
  int64_t n = a.i64(4);
  return a.run([=] { return stc_swiglu_forward(c, out, g, u, n); });
}

Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  Args a(info, "swigluBackward");
  stc_ctx* c = a.ctx(0);
  float *dg = a.f32(1), *du = a.f32(2);
  const float *dout = a.f32(3), *g = a.f32(4), *u = a.f32(5);
  int64_t n = a.i64(6);
  return a.run([=] { return stc_swiglu_backward(c, dg, du, dout, g, u, n); });
}

Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
  Args a(info, "embeddingForward");
  stc_ctx* c = a.ctx(0);
  float* out = a.f32(1);
  const int32_t* ids = a.i32a(2);
  const float* table = a.f32(3);
  int T = a.i32(4), C = a.i32(5), V = a.i32(6);
  return a.run([=] { return stc_embedding_forward(c, out, ids, table, T, C, V); });
}

Napi::Value CeForward(const Napi::CallbackInfo& info) {
  Args a(info, "crossEntropyChunkForward");
  stc_ctx* c = a.ctx(0);
  const float* logits = a.f32(1);
  const int32_t* labels = a.i32a(2);
  int v0 = a.i32(3), T = a.i32(4), Vc = a.i32(5);
  float *m = a.f32(6), *s = a.f32(7), *picked = a.f32(8);
  return a.run([=] { return stc_cross_entropy_chunk_forward(c, logits, labels, v0, T, Vc, m, s, picked); });
}

Napi::Value CeBackward(const Napi::CallbackInfo& info) {
  Args a(info, "crossEntropyChunkBackward");
  stc_ctx* c = a.ctx(0);
  float* logits = a.f32(1);
  const int32_t* labels = a.i32a(2);
  int v0 = a.i32(3), T = a.i32(4), Vc = a.i32(5);
  const float *lse = a.f32(6), *scale = a.f32(7);
  return a.run([=] { return stc_cross_entropy_chunk_backward(c, logits, labels, v0, T, Vc, lse, scale); });
}

Napi::Value GemmGrid(const Napi::CallbackInfo& info) {
  Args a(info, "gemmGrid");
  int M = a.i32(0), N = a.i32(1), tc = a.flag(2);
  if (!a.ok) return info.Env().Undefined();
  int gx, gy, th;
  stc_gemm_grid(M, N, tc, &gx, &gy, &th);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("gridX", gx);
  r.Set("gridY", gy);
  r.Set("threads", th);
  return r;
}

Napi::Value AttentionGrid(const Napi::CallbackInfo& info) {
  Args a(info, "attentionGrid");
  int B = a.i32(0), S = a.i32(1), H = a.i32(2), D = a.i32(3);
  if (!a.ok) return info.Env().Undefined();
  int gx, gy, gz, th, dpt;
  int s = stc_attention_grid(B, S, H, &gx, &gy, &gz, &th, D, &dpt);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("gridX", gx);
  r.Set("gridY", gy);
  r.Set("gridZ", gz);
  r.Set("threads", th);
  r.Set("dimsPerThread", dpt);
  r.Set("supported", Napi::Boolean::New(info.Env(), s == 0));
  return r;
}

}  // namespace

void RegisterOps(Napi::Env env, Napi::Object exports) {
  const Binding bindings[] = {
      {"gemm", Gemm}, {"gemmNF4", GemmNF4}, {"gemmNF4T", GemmNF4T}, {"dequantNF4", DequantNF4},
      {"rmsnormForward", RmsnormForward}, {"rmsnormBackward", RmsnormBackward}, {"rope", Rope},
      {"attentionForward", AttentionForward}, {"attentionBackward", AttentionBackward},
      {"swigluForward", SwigluForward}, {"swigluBackward", SwigluBackward}, {"gegluForward", GegluForward},
      {"gegluBackward", GegluBackward}, {"softcapForward", SoftcapForward}, {"softcapBackward", SoftcapBackward}, {"embeddingForward", EmbeddingForward},
      {"crossEntropyChunkForward", CeForward}, {"crossEntropyChunkBackward", CeBackward}, {"gemmGrid", GemmGrid},
      {"attentionGrid", AttentionGrid},
  };
  Export(env, exports, bindings);
}

}  // namespace stc_addon
