// Causal GQA attention, flash-attention style: K/V (or Q/dO) tiles stream through shared memory and
// the softmax is computed online, so memory stays linear in sequence length. fp32 SIMT arithmetic.
//
// Gemma: `scale` multiplies q·k (Llama 1/sqrt(D)), softcap > 0 caps the scores to softcap·tanh(s/softcap) before the
// softmax, window > 0 limits query i to keys (i − window, i].
//
// Layout: 4 lanes cooperate on one row; lane r of a group owns head dims d = 4*i + r (interleaved
// so the 8 groups of a warp read shared memory as 4 distinct broadcast addresses, no bank conflicts).
#include "common.cuh"

namespace stc {

constexpr int AT_ROWS = 32;            // query (or key) rows per block
constexpr int AT_THREADS = AT_ROWS * 4;
constexpr int AT_BC = 32;              // rows per streamed tile

// the soft-capped score, and 1 − tanh² (the cap's derivative) in *fac
__device__ __forceinline__ float capped(float sd, float softcap, float* fac) {
  if (softcap > 0.0f) {
    const float t = tanhf(sd / softcap);
    *fac = 1.0f - t * t;
    return softcap * t;
  }
  *fac = 1.0f;
  return sd;
}

// key j visible from query i: causal and inside the window
__device__ __forceinline__ bool visible(int i, int j, int window) { return j <= i && (window <= 0 || j > i - window); }

__device__ __forceinline__ float group4_sum(float v, unsigned mask) {
  v += __shfl_xor_sync(mask, v, 1);
  v += __shfl_xor_sync(mask, v, 2);
  return v;
}

// out (T,H,D), lse (B,H,S); q (T,H,D); k, v (T,KV,D); T = B*S
template <int DPT>
__global__ void __launch_bounds__(AT_THREADS)
attn_fwd_kernel(float* __restrict__ out, float* __restrict__ lse, const float* __restrict__ q,
                const float* __restrict__ k, const float* __restrict__ v, int S, int H, int KV, int D, float scale,
                float softcap, int window) {
  constexpr int DP = 4 * DPT;
  extern __shared__ float smem[];
  float* Ks = smem;            // (BC, DP)
  float* Vs = smem + AT_BC * DP;
  const int tid = threadIdx.x, r = tid & 3, row = tid >> 2;
  const int b = blockIdx.z, h = blockIdx.y, kvh = h / (H / KV);
  const int s0 = blockIdx.x * AT_ROWS, sq = s0 + row;
  const bool valid = sq < S;
  const unsigned gmask = 0xFu << (tid & 28);
  const int64_t qoff = (((int64_t)b * S + sq) * H + h) * D;
  float qr[DPT], o[DPT];
#pragma unroll
  for (int i = 0; i < DPT; i++) {
    const int d = 4 * i + r;
    qr[i] = (valid && d < D) ? q[qoff + d] * scale : 0.0f;
    o[i] = 0.0f;
  }
  float mrow = -INFINITY, l = 0.0f;
  const int kv_end = min(S, s0 + AT_ROWS);
  for (int j0 = 0; j0 < kv_end; j0 += AT_BC) {
    for (int e = tid; e < AT_BC * DP; e += AT_THREADS) {
      const int jj = e / DP, d = e % DP, j = j0 + jj;
      float kk = 0.0f, vv = 0.0f;
      if (j < S && d < D) {
        const int64_t off = (((int64_t)b * S + j) * KV + kvh) * D + d;
        kk = k[off];
        vv = v[off];
      }
      Ks[e] = kk;
      Vs[e] = vv;
    }
    __syncthreads();
    const int jmax = valid ? min(AT_BC, sq - j0 + 1) : 0;  // causal: keys j0 .. sq
    if (jmax > 0) {
      float sc[AT_BC];
      float tmax = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < AT_BC; jj++) {
        const float* kr = Ks + jj * DP;
        float sd = 0.0f;
#pragma unroll
        for (int i = 0; i < DPT; i++) sd = fmaf(qr[i], kr[4 * i + r], sd);
        sd = group4_sum(sd, gmask);
        float fac;
        sc[jj] = jj < jmax && visible(sq, j0 + jj, window) ? capped(sd, softcap, &fac) : -INFINITY;
        tmax = fmaxf(tmax, sc[jj]);
      }
      const float mnew = fmaxf(mrow, tmax);
      if (mnew > -INFINITY) {  // else every key of this tile lies before the row's window
        const float corr = expf(mrow - mnew);  // 0 on the first tile (mrow = -inf)
        l *= corr;
#pragma unroll
        for (int i = 0; i < DPT; i++) o[i] *= corr;
#pragma unroll
        for (int jj = 0; jj < AT_BC; jj++) {
          const float p = expf(sc[jj] - mnew);
          l += p;
          const float* vr = Vs + jj * DP;
#pragma unroll
          for (int i = 0; i < DPT; i++) o[i] = fmaf(p, vr[4 * i + r], o[i]);
        }
        mrow = mnew;
      }
    }
    __syncthreads();
  }
  if (valid) {
    const float inv = 1.0f / l;
#pragma unroll
    for (int i = 0; i < DPT; i++) {
      const int d = 4 * i + r;
      if (d < D) out[qoff + d] = o[i] * inv;
    }
    if (r == 0) lse[((int64_t)b * H + h) * S + sq] = mrow + logf(l);
  }
}

// delta (B,H,S) = rowsum(dout * out)
__global__ void attn_bwd_delta_kernel(float* __restrict__ delta, const float* __restrict__ dout,
                                      const float* __restrict__ out, int B, int S, int H, int D) {
  const int64_t rows = (int64_t)B * S * H;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t tok = i / H;  // b*S + s
    const int h = (int)(i % H);
    const int64_t b = tok / S, s = tok % S;
    const float* a = dout + i * D;
    const float* c = out + i * D;
    float acc = 0.0f;
    for (int d = 0; d < D; d++) acc = fmaf(a[d], c[d], acc);
    delta[(b * H + h) * S + s] = acc;
  }
}

// dq (T,H,D) assigned. Rows = queries; streams K/V tiles.
template <int DPT>
__global__ void __launch_bounds__(AT_THREADS)
attn_bwd_dq_kernel(float* __restrict__ dq, const float* __restrict__ dout, const float* __restrict__ q,
                   const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
                   const float* __restrict__ delta, int S, int H, int KV, int D, float scale, float softcap,
                   int window) {
  constexpr int DP = 4 * DPT;
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = smem + AT_BC * DP;
  const int tid = threadIdx.x, r = tid & 3, row = tid >> 2;
  const int b = blockIdx.z, h = blockIdx.y, kvh = h / (H / KV);
  const int s0 = blockIdx.x * AT_ROWS, sq = s0 + row;
  const bool valid = sq < S;
  const unsigned gmask = 0xFu << (tid & 28);
  const int64_t qoff = (((int64_t)b * S + sq) * H + h) * D;
  float qr[DPT], dor[DPT], acc[DPT];
#pragma unroll
  for (int i = 0; i < DPT; i++) {
    const int d = 4 * i + r;
    const bool in = valid && d < D;
    qr[i] = in ? q[qoff + d] * scale : 0.0f;
    dor[i] = in ? dout[qoff + d] : 0.0f;
    acc[i] = 0.0f;
  }
  const int64_t li = ((int64_t)b * H + h) * S + sq;
  const float lse_i = valid ? lse[li] : 0.0f, delta_i = valid ? delta[li] : 0.0f;
  const int kv_end = min(S, s0 + AT_ROWS);
  for (int j0 = 0; j0 < kv_end; j0 += AT_BC) {
    for (int e = tid; e < AT_BC * DP; e += AT_THREADS) {
      const int jj = e / DP, d = e % DP, j = j0 + jj;
      float kk = 0.0f, vv = 0.0f;
      if (j < S && d < D) {
        const int64_t off = (((int64_t)b * S + j) * KV + kvh) * D + d;
        kk = k[off];
        vv = v[off];
      }
      Ks[e] = kk;
      Vs[e] = vv;
    }
    __syncthreads();
    const int jmax = valid ? min(AT_BC, sq - j0 + 1) : 0;
    if (jmax > 0) {
#pragma unroll 4
      for (int jj = 0; jj < AT_BC; jj++) {
        const float* kr = Ks + jj * DP;
        const float* vr = Vs + jj * DP;
        float sd = 0.0f, dp = 0.0f;
#pragma unroll
        for (int i = 0; i < DPT; i++) {
          sd = fmaf(qr[i], kr[4 * i + r], sd);
          dp = fmaf(dor[i], vr[4 * i + r], dp);
        }
        sd = group4_sum(sd, gmask);
        dp = group4_sum(dp, gmask);
        float fac;
        const float sc = capped(sd, softcap, &fac);
        const float p = jj < jmax && visible(sq, j0 + jj, window) ? expf(sc - lse_i) : 0.0f;
        const float ds = p * (dp - delta_i) * fac;
#pragma unroll
        for (int i = 0; i < DPT; i++) acc[i] = fmaf(ds, kr[4 * i + r], acc[i]);
      }
    }
    __syncthreads();
  }
  if (valid) {
#pragma unroll
    for (int i = 0; i < DPT; i++) {
      const int d = 4 * i + r;
      if (d < D) dq[qoff + d] = acc[i] * scale;
    }
  }
}

// dk, dv (T,KV,D) assigned. Rows = keys of one kv head; streams the Q/dO tiles of every query head
// in its group, so each dk/dv row has exactly one writer (deterministic, no atomics). OPT: soft-cap or
// sliding window in use (Gemma); without them the plain causal kernel keeps its registers (head dim 128
// on sm_86/sm_89 spilled 28 bytes once the options were evaluated at run time).
template <int DPT, bool OPT>
__global__ void __launch_bounds__(AT_THREADS)
attn_bwd_dkdv_kernel(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,
                     const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                     const float* __restrict__ lse, const float* __restrict__ delta, int S, int H, int KV, int D,
                     float scale, float softcap, int window) {
  constexpr int DP = 4 * DPT;
  extern __shared__ float smem[];
  float* Qs = smem;             // (BC, DP), pre-scaled
  float* Os = smem + AT_BC * DP;  // dO tile
  __shared__ float lse_s[AT_BC], delta_s[AT_BC];
  const int tid = threadIdx.x, r = tid & 3, row = tid >> 2;
  const int b = blockIdx.z, kvh = blockIdx.y, group = H / KV;
  const int j0 = blockIdx.x * AT_ROWS, sj = j0 + row;
  const bool valid = sj < S;
  const unsigned gmask = 0xFu << (tid & 28);
  const int64_t koff = (((int64_t)b * S + sj) * KV + kvh) * D;
  float kr[DPT], vr[DPT], dka[DPT], dva[DPT];
#pragma unroll
  for (int i = 0; i < DPT; i++) {
    const int d = 4 * i + r;
    const bool in = valid && d < D;
    kr[i] = in ? k[koff + d] : 0.0f;
    vr[i] = in ? v[koff + d] : 0.0f;
    dka[i] = 0.0f;
    dva[i] = 0.0f;
  }
  for (int hh = 0; hh < group; hh++) {
    const int h = kvh * group + hh;
    for (int i0 = j0; i0 < S; i0 += AT_BC) {  // queries before j0 never see these keys
      for (int e = tid; e < AT_BC * DP; e += AT_THREADS) {
        const int ii = e / DP, d = e % DP, i = i0 + ii;
        float qq = 0.0f, oo = 0.0f;
        if (i < S && d < D) {
          const int64_t off = (((int64_t)b * S + i) * H + h) * D + d;
          qq = q[off] * scale;
          oo = dout[off];
        }
        Qs[e] = qq;
        Os[e] = oo;
      }
      if (tid < AT_BC) {
        const int i = i0 + tid;
        const int64_t li = ((int64_t)b * H + h) * S + i;
        lse_s[tid] = i < S ? lse[li] : 0.0f;
        delta_s[tid] = i < S ? delta[li] : 0.0f;
      }
      __syncthreads();
      if (valid) {
        const int imin = sj - i0;  // causal: queries i >= sj
        const int iend = min(AT_BC, S - i0);
#pragma unroll 4
        for (int ii = 0; ii < AT_BC; ii++) {
          const float* qrow = Qs + ii * DP;
          const float* orow = Os + ii * DP;
          float sd = 0.0f, dp = 0.0f;
#pragma unroll
          for (int i = 0; i < DPT; i++) {
            sd = fmaf(qrow[4 * i + r], kr[i], sd);
            dp = fmaf(orow[4 * i + r], vr[i], dp);
          }
          sd = group4_sum(sd, gmask);
          dp = group4_sum(dp, gmask);
          const bool live = ii >= imin && ii < iend && (!OPT || visible(i0 + ii, sj, window));
          float fac = 1.0f;
          const float sc = OPT ? capped(sd, softcap, &fac) : sd;
          const float p = live ? expf(sc - lse_s[ii]) : 0.0f;
          const float ds = p * (dp - delta_s[ii]) * fac;
#pragma unroll
          for (int i = 0; i < DPT; i++) {
            dva[i] = fmaf(p, orow[4 * i + r], dva[i]);
            dka[i] = fmaf(ds, qrow[4 * i + r], dka[i]);  // q already carries one factor of scale
          }
        }
      }
      __syncthreads();
    }
  }
  if (valid) {
#pragma unroll
    for (int i = 0; i < DPT; i++) {
      const int d = 4 * i + r;
      if (d < D) {
        dk[koff + d] = dka[i];
        dv[koff + d] = dva[i];
      }
    }
  }
}

static int dims_per_thread(int D) {
  if (D <= 32) return 8;
  if (D <= 64) return 16;
  if (D <= 128) return 32;
  if (D <= 256) return 64;
  return -1;
}

template <class Kern>
static int prepare_smem(Kern kern, size_t bytes) {
  if (bytes > 48 * 1024) STC_CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  return 0;
}

template <int DPT>
static int attn_forward_dev(stc_ctx* ctx, float* out, float* lse, const float* q, const float* k, const float* v,
                            int B, int S, int H, int KV, int D, float scale, float softcap, int window) {
  const size_t smem = sizeof(float) * 2 * AT_BC * 4 * DPT;
  STC_TRY(prepare_smem(attn_fwd_kernel<DPT>, smem));
  dim3 grid((S + AT_ROWS - 1) / AT_ROWS, H, B);
  attn_fwd_kernel<DPT><<<grid, AT_THREADS, smem, ctx->stream>>>(out, lse, q, k, v, S, H, KV, D, scale, softcap, window);
  STC_LAUNCHED(ctx->stream);
  return 0;
}

template <int DPT>
static int attn_backward_dev(stc_ctx* ctx, float* dq, float* dk, float* dv, const float* dout, const float* q,
                             const float* k, const float* v, const float* lse, const float* delta, int B, int S,
                             int H, int KV, int D, float scale, float softcap, int window) {
  const size_t smem = sizeof(float) * 2 * AT_BC * 4 * DPT;
  STC_TRY(prepare_smem(attn_bwd_dq_kernel<DPT>, smem));
  STC_TRY(prepare_smem(attn_bwd_dkdv_kernel<DPT, false>, smem));
  STC_TRY(prepare_smem(attn_bwd_dkdv_kernel<DPT, true>, smem));
  const int tiles = (S + AT_ROWS - 1) / AT_ROWS;
  attn_bwd_dq_kernel<DPT><<<dim3(tiles, H, B), AT_THREADS, smem, ctx->stream>>>(dq, dout, q, k, v, lse, delta, S, H,
                                                                                KV, D, scale, softcap, window);
  STC_LAUNCHED(ctx->stream);
  if (softcap > 0.0f || window > 0)
    attn_bwd_dkdv_kernel<DPT, true><<<dim3(tiles, KV, B), AT_THREADS, smem, ctx->stream>>>(dk, dv, dout, q, k, v, lse,
                                                                                        delta, S, H, KV, D, scale, softcap, window);
  else
    attn_bwd_dkdv_kernel<DPT, false><<<dim3(tiles, KV, B), AT_THREADS, smem, ctx->stream>>>(dk, dv, dout, q, k, v, lse,
                                                                                         delta, S, H, KV, D, scale, 0.0f, 0);
  STC_LAUNCHED(ctx->stream);
  return 0;
}

static int check_attn_args(const char* op, int B, int S, int H, int KV, int D) {
  STC_REQUIRE(B >= 0 && S >= 0 && H > 0 && KV > 0 && D > 0, "%s: bad B=%d S=%d H=%d KV=%d D=%d", op, B, S, H, KV, D);
  STC_REQUIRE(H % KV == 0, "%s: H=%d is not a multiple of KV=%d", op, H, KV);
  STC_REQUIRE(dims_per_thread(D) > 0, "%s: head dim D=%d unsupported (max 256)", op, D);
  STC_REQUIRE(H <= 65535 && KV <= 65535 && B <= 65535, "%s: B=%d H=%d exceed the grid limit 65535", op, B, H);
  return 0;
}

}  // namespace stc

using namespace stc;

extern "C" {

int stc_attention_grid(int B, int S, int H, int* grid_x, int* grid_y, int* grid_z, int* threads, int D,
                       int* dims_per_thread_out) {
  *grid_x = (S + AT_ROWS - 1) / AT_ROWS;
  *grid_y = H;
  *grid_z = B;
  *threads = AT_THREADS;
  *dims_per_thread_out = dims_per_thread(D);
  return *dims_per_thread_out > 0 ? 0 : STC_E_INVALID;
}

int stc_attention_forward(stc_ctx* ctx, float* out, float* lse, const float* q, const float* k, const float* v, int B,
                          int S, int H, int KV, int D, float scale, float softcap, int window) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_TRY(check_attn_args("attentionForward", B, S, H, KV, D));
  STC_REQUIRE(scale > 0 && softcap >= 0 && window >= 0, "attentionForward: bad scale=%g softcap=%g window=%d", scale, softcap, window);
  if (B == 0 || S == 0) return 0;
  const int64_t T = (int64_t)B * S;
  const size_t qb = sizeof(float) * (size_t)T * H * D, kb = sizeof(float) * (size_t)T * KV * D;
  const size_t lb = sizeof(float) * (size_t)B * H * S;
  DevBuf dO, dL, dQ, dK, dV;
  STC_TRY(dQ.upload(ctx, q, qb));
  STC_TRY(dK.upload(ctx, k, kb));
  STC_TRY(dV.upload(ctx, v, kb));
  STC_TRY(dO.out(ctx, out, qb));
  STC_TRY(dL.out(ctx, lse, lb));
  float *o = dO.as<float>(), *l = dL.as<float>();
  const float *qq = dQ.as<float>(), *kk = dK.as<float>(), *vv = dV.as<float>();
  switch (dims_per_thread(D)) {
    case 8: STC_TRY(attn_forward_dev<8>(ctx, o, l, qq, kk, vv, B, S, H, KV, D, scale, softcap, window)); break;
    case 16: STC_TRY(attn_forward_dev<16>(ctx, o, l, qq, kk, vv, B, S, H, KV, D, scale, softcap, window)); break;
    case 32: STC_TRY(attn_forward_dev<32>(ctx, o, l, qq, kk, vv, B, S, H, KV, D, scale, softcap, window)); break;
    default: STC_TRY(attn_forward_dev<64>(ctx, o, l, qq, kk, vv, B, S, H, KV, D, scale, softcap, window)); break;
  }
  STC_TRY(dO.download(out, qb));
  return dL.download(lse, lb);
}

int stc_attention_backward(stc_ctx* ctx, float* dq, float* dk, float* dv, const float* dout, const float* q,
                           const float* k, const float* v, const float* out, const float* lse, int B, int S, int H,
                           int KV, int D, float scale, float softcap, int window) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_TRY(check_attn_args("attentionBackward", B, S, H, KV, D));
  STC_REQUIRE(scale > 0 && softcap >= 0 && window >= 0, "attentionBackward: bad scale=%g softcap=%g window=%d", scale, softcap, window);
  if (B == 0 || S == 0) return 0;
  const int64_t T = (int64_t)B * S;
  const size_t qb = sizeof(float) * (size_t)T * H * D, kb = sizeof(float) * (size_t)T * KV * D;
  const size_t lb = sizeof(float) * (size_t)B * H * S;
  DevBuf dDQ, dDK, dDV, dDO, dQ, dK, dV, dO, dL, dDelta;
  STC_TRY(dDO.upload(ctx, dout, qb));
  STC_TRY(dQ.upload(ctx, q, qb));
  STC_TRY(dK.upload(ctx, k, kb));
  STC_TRY(dV.upload(ctx, v, kb));
  STC_TRY(dO.upload(ctx, out, qb));
  STC_TRY(dL.upload(ctx, lse, lb));
  STC_TRY(dDQ.out(ctx, dq, qb));
  STC_TRY(dDK.out(ctx, dk, kb));
  STC_TRY(dDV.out(ctx, dv, kb));
  STC_TRY(dDelta.alloc(ctx, lb));
  const int64_t rows = T * H;
  attn_bwd_delta_kernel<<<blocks_for(rows, 256) > 65535u ? 65535u : blocks_for(rows, 256), 256, 0, ctx->stream>>>(
      dDelta.as<float>(), dDO.as<float>(), dO.as<float>(), B, S, H, D);
  STC_LAUNCHED(ctx->stream);
  float *gq = dDQ.as<float>(), *gk = dDK.as<float>(), *gv = dDV.as<float>();
  const float *go = dDO.as<float>(), *qq = dQ.as<float>(), *kk = dK.as<float>(), *vv = dV.as<float>();
  const float *ll = dL.as<float>(), *de = dDelta.as<float>();
  switch (dims_per_thread(D)) {
    case 8: STC_TRY(attn_backward_dev<8>(ctx, gq, gk, gv, go, qq, kk, vv, ll, de, B, S, H, KV, D, scale, softcap, window)); break;
    case 16: STC_TRY(attn_backward_dev<16>(ctx, gq, gk, gv, go, qq, kk, vv, ll, de, B, S, H, KV, D, scale, softcap, window)); break;
    case 32: STC_TRY(attn_backward_dev<32>(ctx, gq, gk, gv, go, qq, kk, vv, ll, de, B, S, H, KV, D, scale, softcap, window)); break;
    default: STC_TRY(attn_backward_dev<64>(ctx, gq, gk, gv, go, qq, kk, vv, ll, de, B, S, H, KV, D, scale, softcap, window)); break;
  }
  STC_TRY(dDQ.download(dq, qb));
  STC_TRY(dDK.download(dk, kb));
  return dDV.download(dv, kb);
}

}  // extern "C"
