// Row-wise and elementwise ops: RMSNorm, RoPE, SwiGLU, embedding and chunked cross-entropy.
#include "common.cuh"
#include <cfloat>

namespace stc {

constexpr int ROW_THREADS = 256;

// Block-wide sum/max for 256 threads; every thread gets the result.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ float block_sum(float v, float* sh /* [32] */) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();  // sh may still be read from a previous reduction
  if (lane == 0) sh[w] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0f;
  return warp_sum(v);
}
__device__ float block_max(float v, float* sh) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? sh[lane] : -INFINITY;
  return warp_max(v);
}

// out (T, C), rstd (T), x (T, C), w (C); one block per row
__global__ void rmsnorm_forward_kernel(float* __restrict__ out, float* __restrict__ rstd, const float* __restrict__ x,
                                       const float* __restrict__ w, int C, float eps) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * C;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += xr[c] * xr[c];
  ss = block_sum(ss, sh);
  const float r = 1.0f / sqrtf(ss / (float)C + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int c = threadIdx.x; c < C; c += blockDim.x) out[row * C + c] = xr[c] * r * w[c];
}

// dx (T, C) assigned: dx = r*w*dy - x * r^3/C * sum(dy*w*x)
__global__ void rmsnorm_backward_dx_kernel(float* __restrict__ dx, const float* __restrict__ dout,
                                           const float* __restrict__ x, const float* __restrict__ w,
                                           const float* __restrict__ rstd, int C) {
  __shared__ float sh[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * C;
  const float* dr = dout + row * C;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) dot += dr[c] * w[c] * xr[c];
  dot = block_sum(dot, sh);
  const float k = r * r * r * dot / (float)C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) dx[row * C + c] = r * w[c] * dr[c] - xr[c] * k;
}

// dw (C) += sum_t dy[t,c] * x[t,c] * rstd[t]; 32 columns x 8 row lanes per block, deterministic order
__global__ void rmsnorm_backward_dw_kernel(float* __restrict__ dw, const float* __restrict__ dout,
                                           const float* __restrict__ x, const float* __restrict__ rstd, int T, int C) {
  __shared__ float part[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.0f;
  if (c < C)
    for (int t = threadIdx.y; t < T; t += 8) acc += dout[(int64_t)t * C + c] * x[(int64_t)t * C + c] * rstd[t];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += part[i][threadIdx.x];
    dw[c] += s;
  }
}

// x (T, nHeads, D) in place; cos/sin (maxPos, D/2). HF rotate-half: pairs (i, i + D/2).
__global__ void rope_kernel(float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                            const int32_t* __restrict__ positions, int T, int nHeads, int D, float sign) {
  const int half = D / 2;
  const int64_t total = (int64_t)T * nHeads * half;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int d = (int)(i % half);
    const int64_t th = i / half;  // t * nHeads + h
    const int t = (int)(th / nHeads);
    const int64_t pos = positions[t];
    const float c = cos_t[pos * half + d], s = sign * sin_t[pos * half + d];
    float* xh = x + th * D;
    const float x1 = xh[d], x2 = xh[d + half];
    xh[d] = x1 * c - x2 * s;
    xh[d + half] = x2 * c + x1 * s;
  }
}

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

__global__ void swiglu_forward_kernel(float* __restrict__ out, const float* __restrict__ gate,
                                      const float* __restrict__ up, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[i];
    out[i] = g * sigmoidf(g) * up[i];
  }
}

__global__ void swiglu_backward_kernel(float* __restrict__ dgate, float* __restrict__ dup,
                                       const float* __restrict__ dout, const float* __restrict__ gate,
                                       const float* __restrict__ up, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[i], sg = sigmoidf(g), dy = dout[i];
    dgate[i] = dy * up[i] * sg * (1.0f + g * (1.0f - sg));
    dup[i] = dy * g * sg;
  }
}

// Gemma's GeGLU: gelu_tanh(g) = 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) (torch gelu(approximate="tanh"))
constexpr float kGeluC = 0.7978845608028654f;

__global__ void geglu_forward_kernel(float* __restrict__ out, const float* __restrict__ gate,
                                     const float* __restrict__ up, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[i];
    // 0.5·(1 + tanh(u)) = σ(2u), without the cancellation of 1 + tanh(u) near −1
      const float u = kGeluC * (g + 0.044715f * g * g * g);
      out[i] = g * (1.0f / (1.0f + expf(-2.0f * u))) * up[i];
  }
}

__global__ void geglu_backward_kernel(float* __restrict__ dgate, float* __restrict__ dup,
                                      const float* __restrict__ dout, const float* __restrict__ gate,
                                      const float* __restrict__ up, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = gate[i], dy = dout[i];
    // with sp = σ(2u) = (1 + th)/2 and sn = σ(−2u) = (1 − th)/2: 1 − th² = 4·sp·sn, no cancellation near ±1
    const float u = kGeluC * (g + 0.044715f * g * g * g);
    const float sp = 1.0f / (1.0f + expf(-2.0f * u)), sn = 1.0f / (1.0f + expf(2.0f * u));
    const float dgelu = sp + 2.0f * g * sp * sn * kGeluC * (1.0f + 3.0f * 0.044715f * g * g);
    dgate[i] = dy * up[i] * dgelu;
    dup[i] = dy * g * sp;
  }
}

// y = cap·tanh(x/cap) (y may be x); dx = dy·(1 − tanh²(x/cap)) (dx may be x or dy)
__global__ void softcap_forward_kernel(float* y, const float* x, float cap, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = cap * tanhf(x[i] / cap);
}

__global__ void softcap_backward_kernel(float* dx, const float* dy, const float* x, float cap, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float t = tanhf(x[i] / cap);
    dx[i] = dy[i] * (1.0f - t * t);
  }
}

// out (T, C) = table[ids[t]]; ids were range-checked on the host
__global__ void embedding_kernel(float* __restrict__ out, const int32_t* __restrict__ ids,
                                 const float* __restrict__ table, int T, int C) {
  const int64_t total = (int64_t)T * C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / C, c = i % C;
    out[i] = table[(int64_t)ids[t] * C + c];
  }
}

// Online-softmax update for one vocabulary chunk; one block per row.
__global__ void ce_forward_kernel(const float* __restrict__ logits, const int32_t* __restrict__ labels, int v0,
                                  int Vc, float* __restrict__ m, float* __restrict__ s, float* __restrict__ picked) {
  __shared__ float sh[32];
  const int64_t t = blockIdx.x;
  const int label = labels[t];
  if (label < 0) return;  // whole block leaves together: no barrier is skipped by only part of it
  const float* row = logits + t * Vc;
  float cm = -INFINITY;
  for (int j = threadIdx.x; j < Vc; j += blockDim.x) cm = fmaxf(cm, row[j]);
  cm = block_max(cm, sh);
  const float mOld = m[t];
  const float mNew = fmaxf(mOld, cm);
  float cs = 0.0f;
  for (int j = threadIdx.x; j < Vc; j += blockDim.x) cs += expf(row[j] - mNew);
  cs = block_sum(cs, sh);
  if (threadIdx.x == 0) {
    const float sOld = s[t];
    // exp(-inf - finite) = 0 handles the initial state m = -inf, s = 0
    s[t] = (sOld == 0.0f ? 0.0f : sOld * expf(mOld - mNew)) + cs;
    m[t] = mNew;
    if (label >= v0 && label < v0 + Vc) picked[t] = row[label - v0];
  }
}

__global__ void ce_backward_kernel(float* __restrict__ logits, const int32_t* __restrict__ labels, int v0, int Vc,
                                   const float* __restrict__ lse, const float* __restrict__ scale) {
  const int64_t t = blockIdx.x;
  const int label = labels[t];
  float* row = logits + t * Vc;
  if (label < 0) {
    for (int j = threadIdx.x; j < Vc; j += blockDim.x) row[j] = 0.0f;
    return;
  }
  const float l = lse[t], sc = scale[t];
  for (int j = threadIdx.x; j < Vc; j += blockDim.x) {
    const float p = expf(row[j] - l);
    row[j] = sc * (p - (j + v0 == label ? 1.0f : 0.0f));
  }
}

}  // namespace stc

using namespace stc;

extern "C" {

int stc_rmsnorm_forward(stc_ctx* ctx, float* out, float* rstd, const float* x, const float* w, int T, int C, float eps) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && C > 0, "rmsnormForward: bad T=%d C=%d", T, C);
  if (T == 0) return 0;
  const size_t tc = sizeof(float) * (size_t)T * C;
  DevBuf dO, dR, dX, dW;
  STC_TRY(dX.upload(ctx, x, tc));
  STC_TRY(dW.upload(ctx, w, sizeof(float) * C));
  STC_TRY(dO.out(ctx, out, tc));
  STC_TRY(dR.out(ctx, rstd, sizeof(float) * T));
  rmsnorm_forward_kernel<<<T, ROW_THREADS, 0, ctx->stream>>>(dO.as<float>(), dR.as<float>(), dX.as<float>(),
                                                             dW.as<float>(), C, eps);
  STC_LAUNCHED(ctx->stream);
  STC_TRY(dO.download(out, tc));
  return dR.download(rstd, sizeof(float) * T);
}

int stc_rmsnorm_backward(stc_ctx* ctx, float* dx, float* dw, const float* dout, const float* x, const float* w,
                         const float* rstd, int T, int C) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && C > 0, "rmsnormBackward: bad T=%d C=%d", T, C);
  if (T == 0) return 0;
  const size_t tc = sizeof(float) * (size_t)T * C;
  DevBuf dDX, dDW, dDO, dX, dW, dR;
  STC_TRY(dDO.upload(ctx, dout, tc));
  STC_TRY(dX.upload(ctx, x, tc));
  STC_TRY(dW.upload(ctx, w, sizeof(float) * C));
  STC_TRY(dR.upload(ctx, rstd, sizeof(float) * T));
  STC_TRY(dDX.out(ctx, dx, tc));
  if (dw) STC_TRY(dDW.upload(ctx, dw, sizeof(float) * C));  // every buffer before any kernel (OOM retry is safe)
  rmsnorm_backward_dx_kernel<<<T, ROW_THREADS, 0, ctx->stream>>>(dDX.as<float>(), dDO.as<float>(), dX.as<float>(),
                                                                 dW.as<float>(), dR.as<float>(), C);
  STC_LAUNCHED(ctx->stream);
  if (dw) {
    rmsnorm_backward_dw_kernel<<<(C + 31) / 32, dim3(32, 8), 0, ctx->stream>>>(dDW.as<float>(), dDO.as<float>(),
                                                                               dX.as<float>(), dR.as<float>(), T, C);
    STC_LAUNCHED(ctx->stream);
    STC_TRY(dDW.download(dw, sizeof(float) * C));
  }
  return dDX.download(dx, tc);
}

int stc_rope(stc_ctx* ctx, float* x, const float* cos_t, const float* sin_t, int max_pos, const int32_t* positions,
             int T, int n_heads, int D, int inverse) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && n_heads > 0 && D > 0 && D % 2 == 0 && max_pos > 0,
              "rope: bad T=%d nHeads=%d D=%d (must be even) maxPos=%d", T, n_heads, D, max_pos);
  if (T == 0) return 0;
  const size_t xb = sizeof(float) * (size_t)T * n_heads * D, tb = sizeof(float) * (size_t)max_pos * (D / 2);
  DevBuf dX, dC, dS, dP;
  STC_TRY(dX.upload(ctx, x, xb));
  STC_TRY(dC.upload(ctx, cos_t, tb));
  STC_TRY(dS.upload(ctx, sin_t, tb));
  STC_TRY(dP.upload_input(ctx, positions, sizeof(int32_t) * T));
  rope_kernel<<<grid1d((int64_t)T * n_heads * (D / 2)), 256, 0, ctx->stream>>>(
      dX.as<float>(), dC.as<float>(), dS.as<float>(), dP.as<int32_t>(), T, n_heads, D, inverse ? -1.0f : 1.0f);
  STC_LAUNCHED(ctx->stream);
  return dX.download(x, xb);
}

int stc_swiglu_forward(stc_ctx* ctx, float* out, const float* gate, const float* up, int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0, "swigluForward: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dO, dG, dU;
  STC_TRY(dG.upload(ctx, gate, b));
  STC_TRY(dU.upload(ctx, up, b));
  STC_TRY(dO.out(ctx, out, b));
  swiglu_forward_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dO.as<float>(), dG.as<float>(), dU.as<float>(), n);
  STC_LAUNCHED(ctx->stream);
  return dO.download(out, b);
}

int stc_geglu_forward(stc_ctx* ctx, float* out, const float* gate, const float* up, int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0, "gegluForward: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dO, dG, dU;
  STC_TRY(dG.upload(ctx, gate, b));
  STC_TRY(dU.upload(ctx, up, b));
  STC_TRY(dO.out(ctx, out, b));
  geglu_forward_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dO.as<float>(), dG.as<float>(), dU.as<float>(), n);
  STC_LAUNCHED(ctx->stream);
  return dO.download(out, b);
}

int stc_geglu_backward(stc_ctx* ctx, float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                       int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0, "gegluBackward: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dDG, dDU, dDO, dG, dU;
  STC_TRY(dDO.upload(ctx, dout, b));
  STC_TRY(dG.upload(ctx, gate, b));
  STC_TRY(dU.upload(ctx, up, b));
  STC_TRY(dDG.out(ctx, dgate, b));
  STC_TRY(dDU.out(ctx, dup, b));
  geglu_backward_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dDG.as<float>(), dDU.as<float>(), dDO.as<float>(),
                                                           dG.as<float>(), dU.as<float>(), n);
  STC_LAUNCHED(ctx->stream);
  STC_TRY(dDG.download(dgate, b));
  return dDU.download(dup, b);
}

// in place where the caller passes the same buffer (device tensors) or the same host array
int stc_softcap_forward(stc_ctx* ctx, float* y, const float* x, float cap, int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0 && cap > 0, "softcapForward: bad n=%lld cap=%g", (long long)n, cap);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dY, dX;
  STC_TRY(dX.upload(ctx, x, b));
  float* yy = dX.as<float>();
  if (y != x) {
    STC_TRY(dY.out(ctx, y, b));
    yy = dY.as<float>();
  }
  softcap_forward_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(yy, dX.as<float>(), cap, n);
  STC_LAUNCHED(ctx->stream);
  return y != x ? dY.download(y, b) : dX.download(y, b);
}

int stc_softcap_backward(stc_ctx* ctx, float* dx, const float* dy, const float* x, float cap, int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0 && cap > 0, "softcapBackward: bad n=%lld cap=%g", (long long)n, cap);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dDX, dDY, dX;
  STC_TRY(dDY.upload(ctx, dy, b));
  STC_TRY(dX.upload(ctx, x, b));
  STC_TRY(dDX.out(ctx, dx, b));
  softcap_backward_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dDX.as<float>(), dDY.as<float>(), dX.as<float>(), cap, n);
  STC_LAUNCHED(ctx->stream);
  return dDX.download(dx, b);
}

int stc_swiglu_backward(stc_ctx* ctx, float* dgate, float* dup, const float* dout, const float* gate, const float* up,
                        int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0, "swigluBackward: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dDG, dDU, dDO, dG, dU;
  STC_TRY(dDO.upload(ctx, dout, b));
  STC_TRY(dG.upload(ctx, gate, b));
  STC_TRY(dU.upload(ctx, up, b));
  STC_TRY(dDG.out(ctx, dgate, b));
  STC_TRY(dDU.out(ctx, dup, b));
  swiglu_backward_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dDG.as<float>(), dDU.as<float>(), dDO.as<float>(),
                                                            dG.as<float>(), dU.as<float>(), n);
  STC_LAUNCHED(ctx->stream);
  STC_TRY(dDG.download(dgate, b));
  return dDU.download(dup, b);
}

int stc_embedding_forward(stc_ctx* ctx, float* out, const int32_t* ids, const float* table, int T, int C, int V) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && C > 0 && V > 0, "embeddingForward: bad T=%d C=%d V=%d", T, C, V);
  if (T == 0) return 0;
  for (int t = 0; t < T; t++)
    STC_REQUIRE(ids[t] >= 0 && ids[t] < V, "embeddingForward: ids[%d]=%d outside [0, %d)", t, ids[t], V);
  DevBuf dO, dI, dT;
  STC_TRY(dI.upload_input(ctx, ids, sizeof(int32_t) * T));
  STC_TRY(dT.upload(ctx, table, sizeof(float) * (size_t)V * C));
  STC_TRY(dO.out(ctx, out, sizeof(float) * (size_t)T * C));
  embedding_kernel<<<grid1d((int64_t)T * C), 256, 0, ctx->stream>>>(dO.as<float>(), dI.as<int32_t>(), dT.as<float>(),
                                                                   T, C);
  STC_LAUNCHED(ctx->stream);
  return dO.download(out, sizeof(float) * (size_t)T * C);
}

int stc_cross_entropy_chunk_forward(stc_ctx* ctx, const float* logits, const int32_t* labels, int v0, int T, int Vc,
                                    float* m, float* s, float* picked) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && Vc > 0 && v0 >= 0, "crossEntropyChunkForward: bad T=%d Vc=%d v0=%d", T, Vc, v0);
  if (T == 0) return 0;
  const size_t tb = sizeof(float) * T;
  DevBuf dL, dY, dM, dS, dP;
  STC_TRY(dL.upload(ctx, logits, sizeof(float) * (size_t)T * Vc));
  STC_TRY(dY.upload_input(ctx, labels, sizeof(int32_t) * T));
  STC_TRY(dM.upload(ctx, m, tb));
  STC_TRY(dS.upload(ctx, s, tb));
  STC_TRY(dP.upload(ctx, picked, tb));
  ce_forward_kernel<<<T, ROW_THREADS, 0, ctx->stream>>>(dL.as<float>(), dY.as<int32_t>(), v0, Vc, dM.as<float>(),
                                                        dS.as<float>(), dP.as<float>());
  STC_LAUNCHED(ctx->stream);
  STC_TRY(dM.download(m, tb));
  STC_TRY(dS.download(s, tb));
  return dP.download(picked, tb);
}

int stc_cross_entropy_chunk_backward(stc_ctx* ctx, float* logits, const int32_t* labels, int v0, int T, int Vc,
                                     const float* lse, const float* scale) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && Vc > 0 && v0 >= 0, "crossEntropyChunkBackward: bad T=%d Vc=%d v0=%d", T, Vc, v0);
  if (T == 0) return 0;
  const size_t lb = sizeof(float) * (size_t)T * Vc;
  DevBuf dL, dY, dLse, dSc;
  STC_TRY(dL.upload(ctx, logits, lb));
  STC_TRY(dY.upload_input(ctx, labels, sizeof(int32_t) * T));
  STC_TRY(dLse.upload(ctx, lse, sizeof(float) * T));
  STC_TRY(dSc.upload(ctx, scale, sizeof(float) * T));
  ce_backward_kernel<<<T, ROW_THREADS, 0, ctx->stream>>>(dL.as<float>(), dY.as<int32_t>(), v0, Vc, dLse.as<float>(),
                                                         dSc.as<float>());
  STC_LAUNCHED(ctx->stream);
  return dL.download(logits, lb);
}

}  // extern "C"
