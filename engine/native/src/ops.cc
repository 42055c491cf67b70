// Row/head-parallel CPU kernels: rmsnorm, rope, causal GQA attention (online softmax), swiglu, embedding, chunked CE.
#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "simd.h"

namespace {

// Splits [0, n) into about 4 tasks per thread (dynamic scheduling evens out stragglers), at least
// min_grain items per task so tiny ops stay on one thread.
template <typename F>
void parallel_rows(ThreadPool& pool, int64_t n, int64_t min_grain, F fn) {
  if (n <= 0) return;
  int64_t tasks = std::min<int64_t>(pool.size() * 4, (n + min_grain - 1) / min_grain);
  if (tasks < 1) tasks = 1;
  pool.run(tasks, [&](int64_t t) {
    int64_t a = n * t / tasks, b = n * (t + 1) / tasks;
    fn(a, b);
  });
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

std::string rmsnorm_forward(ThreadPool& pool, float* out, float* rstd, const float* x, const float* w, int64_t T,
                            int64_t C, float eps) {
  parallel_rows(pool, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) {
      const float* xr = x + t * C;
      float r = (float)(1.0 / std::sqrt((double)simd::dot(xr, xr, C) / (double)C + (double)eps));
      float* o = out + t * C;
      for (int64_t c = 0; c < C; c++) o[c] = xr[c] * r * w[c];
      rstd[t] = r;
    }
  });
  return "";
}

std::string rmsnorm_backward(ThreadPool& pool, float* dx, float* dw, const float* dout, const float* x, const float* w,
                             const float* rstd, int64_t T, int64_t C) {
  // dw is a reduction over rows: each fixed-size row block sums into its own buffer and the blocks are
  // merged in order, so results are bitwise the same for every thread count (replicas on machines with
  // different core counts must agree).
  int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  int64_t tasks = std::max<int64_t>(1, (T + grain - 1) / grain);
  std::vector<float> partial(dw ? (size_t)(tasks * C) : 0, 0.0f);
  pool.run(tasks, [&](int64_t task) {
    int64_t a = task * grain, b = std::min(T, a + grain);
    std::vector<float> gw((size_t)C);
    for (int64_t t = a; t < b; t++) {
      const float* xr = x + t * C;
      const float* g = dout + t * C;
      float r = rstd[t];
      for (int64_t c = 0; c < C; c++) gw[c] = g[c] * w[c];
      // y_c = w_c x_c r ⇒ dx_j = r w_j g_j − (r³ x_j / C) Σ_c g_c w_c x_c
      float k = r * r * r * simd::dot(gw.data(), xr, C) / (float)C;
      float* d = dx + t * C;
      for (int64_t c = 0; c < C; c++) d[c] = r * gw[c] - k * xr[c];
      if (dw) {
        float* p = partial.data() + task * C;
        for (int64_t c = 0; c < C; c++) p[c] += g[c] * xr[c] * r;
      }
    }
  });
  if (dw)
    for (int64_t task = 0; task < tasks; task++)
      for (int64_t c = 0; c < C; c++) dw[c] += partial[task * C + c];
  return "";
}

std::string rope_apply(ThreadPool& pool, float* x, const float* cos, const float* sin, int64_t max_pos,
                       const int32_t* positions, int64_t T, int64_t H, int64_t D, bool inverse) {
  for (int64_t t = 0; t < T; t++)
    if (positions[t] < 0 || positions[t] >= max_pos)
      return "positions[" + std::to_string(t) + "]=" + std::to_string(positions[t]) + " outside the cos/sin table of " +
             std::to_string(max_pos) + " rows";
  const int64_t half = D / 2;
  const float sign = inverse ? -1.0f : 1.0f;  // inverse = rotation by −θ (the transpose)
  parallel_rows(pool, T, std::max<int64_t>(1, 8192 / std::max<int64_t>(H * D, 1)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) {
      const float* c = cos + (int64_t)positions[t] * half;
      const float* s = sin + (int64_t)positions[t] * half;
      for (int64_t h = 0; h < H; h++) {
        float* xr = x + (t * H + h) * D;
        for (int64_t i = 0; i < half; i++) {
          float x1 = xr[i], x2 = xr[i + half], si = sign * s[i];
          xr[i] = x1 * c[i] - x2 * si;
          xr[i + half] = x2 * c[i] + x1 * si;
        }
      }
    }
  });
  return "";
}

// Causal attention, flash-style blocks: one task per (b, h, block of Bq query rows) in forward and
// per (b, kv head) in backward. Scores of a query block against its visible keys are computed with the
// packed GEMM (single-threaded inside a task), so memory is O(Bq·S) per task, never O(S²) per batch.
namespace {
constexpr int64_t kAttnBlock = 64;

ThreadPool& serial_pool() {
  static ThreadPool p(1);  // size 1: run() executes inline, no threads, safe to share
  return p;
}

// dst[r, :] = src rows r0..r0+n of head `head` in a [T, heads, D] tensor (sequence b)
void gather_rows(float* dst, const float* src, int64_t b, int64_t S, int64_t heads, int64_t head, int64_t D,
                 int64_t r0, int64_t n, float mul = 1.0f) {
  for (int64_t r = 0; r < n; r++) {
    const float* s = src + ((b * S + r0 + r) * heads + head) * D;
    float* d = dst + r * D;
    if (mul == 1.0f)
      std::memcpy(d, s, D * sizeof(float));
    else
      for (int64_t x = 0; x < D; x++) d[x] = s[x] * mul;
  }
}
}  // namespace

// Gemma variants: `scale` multiplies q·k (Llama: 1/sqrt(D)); softcap > 0 caps the scores to softcap·tanh(s/softcap)
// (Gemma-2); window > 0 limits query i to keys (i − window, i] (sliding-window layers).
std::string attention_forward(ThreadPool& pool, float* out, float* lse, const float* q, const float* k, const float* v,
                              int64_t B, int64_t S, int64_t H, int64_t KV, int64_t D, float scale, float softcap,
                              int64_t window) {
  const int64_t group = H / KV;
  const int64_t nblk = (S + kAttnBlock - 1) / kAttnBlock;
  pool.run(B * H * nblk, [&](int64_t task) {
    // biggest blocks first so the dynamic schedule ends evenly
    int64_t blk = nblk - 1 - task % nblk, bh = task / nblk;
    int64_t b = bh / H, h = bh % H, kvh = h / group;
    int64_t i0 = blk * kAttnBlock, bq = std::min(kAttnBlock, S - i0), nk = i0 + bq;  // keys [0, nk) visible
    std::vector<float> qc((size_t)(bq * D)), kc((size_t)(nk * D)), vc((size_t)(nk * D)), sc((size_t)(bq * nk)),
        oc((size_t)(bq * D));
    gather_rows(qc.data(), q, b, S, H, h, D, i0, bq, scale);
    gather_rows(kc.data(), k, b, S, KV, kvh, D, 0, nk);
    gather_rows(vc.data(), v, b, S, KV, kvh, D, 0, nk);
    gemm_f32(serial_pool(), false, true, bq, nk, D, 1.0f, qc.data(), kc.data(), 0.0f, sc.data());
    for (int64_t r = 0; r < bq; r++) {
      float* row = sc.data() + r * nk;
      int64_t n = i0 + r + 1;  // causal: keys 0..i
      int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;  // sliding window: keys lo..i
      if (softcap > 0)
        for (int64_t j = lo; j < n; j++) row[j] = softcap * std::tanh(row[j] / softcap);
      float mx = simd::max_of(row + lo, n - lo);
      double sum = simd::exp_sub_sum(row + lo, row + lo, mx, n - lo);
      float inv = (float)(1.0 / sum);
      for (int64_t j = 0; j < lo; j++) row[j] = 0.0f;
      for (int64_t j = lo; j < n; j++) row[j] *= inv;
      for (int64_t j = n; j < nk; j++) row[j] = 0.0f;
      lse[(b * H + h) * S + i0 + r] = mx + (float)std::log(sum);
    }
    gemm_f32(serial_pool(), false, false, bq, D, nk, 1.0f, sc.data(), vc.data(), 0.0f, oc.data());
    for (int64_t r = 0; r < bq; r++) std::memcpy(out + ((b * S + i0 + r) * H + h) * D, oc.data() + r * D, D * sizeof(float));
  });
  return "";
}

// One task per (b, kv head): it owns dk/dv of that head, so the query heads of its group accumulate
// there without races; dq rows are written exactly once.
std::string attention_backward(ThreadPool& pool, float* dq, float* dk, float* dv, const float* dout, const float* q,
                               const float* k, const float* v, const float* out, const float* lse, int64_t B,
                               int64_t S, int64_t H, int64_t KV, int64_t D, float scale, float softcap,
                               int64_t window) {
  const int64_t group = H / KV;
  pool.run(B * KV, [&](int64_t task) {
    int64_t b = task / KV, kvh = task % KV;
    std::vector<float> kc((size_t)(S * D)), vc((size_t)(S * D)), dkc((size_t)(S * D), 0.0f), dvc((size_t)(S * D), 0.0f);
    std::vector<float> qc((size_t)(kAttnBlock * D)), gc((size_t)(kAttnBlock * D)), dqc((size_t)(kAttnBlock * D));
    std::vector<float> p((size_t)(kAttnBlock * S)), dp((size_t)(kAttnBlock * S)), di((size_t)kAttnBlock);
    std::vector<float> fac(softcap > 0 ? (size_t)S : 0);  // the cap's derivative 1 − tanh² of one row
    gather_rows(kc.data(), k, b, S, KV, kvh, D, 0, S);
    gather_rows(vc.data(), v, b, S, KV, kvh, D, 0, S);
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
      for (int64_t i0 = 0; i0 < S; i0 += kAttnBlock) {
        int64_t bq = std::min(kAttnBlock, S - i0), nk = i0 + bq;
        gather_rows(qc.data(), q, b, S, H, h, D, i0, bq, scale);
        gather_rows(gc.data(), dout, b, S, H, h, D, i0, bq);
        // D_i = Σ_j P_ij dP_ij = dout_i · out_i
        for (int64_t r = 0; r < bq; r++) {
          int64_t o = ((b * S + i0 + r) * H + h) * D;
          di[r] = simd::dot(dout + o, out + o, D);
        }
        gemm_f32(serial_pool(), false, true, bq, nk, D, 1.0f, qc.data(), kc.data(), 0.0f, p.data());    // scores
        gemm_f32(serial_pool(), false, true, bq, nk, D, 1.0f, gc.data(), vc.data(), 0.0f, dp.data());   // dP
        for (int64_t r = 0; r < bq; r++) {
          float* pr = p.data() + r * nk;
          float* dpr = dp.data() + r * nk;
          int64_t n = i0 + r + 1;
          int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;
          if (softcap > 0)
            for (int64_t j = lo; j < n; j++) {
              float t = std::tanh(pr[j] / softcap);
              pr[j] = softcap * t;
              fac[j] = 1.0f - t * t;
            }
          simd::exp_sub_sum(pr + lo, pr + lo, lse[(b * H + h) * S + i0 + r], n - lo);  // P from the saved lse
          if (softcap > 0)
            for (int64_t j = lo; j < n; j++) dpr[j] = pr[j] * (dpr[j] - di[r]) * fac[j] * scale;  // dS
          else
            for (int64_t j = lo; j < n; j++) dpr[j] = pr[j] * (dpr[j] - di[r]) * scale;
          for (int64_t j = 0; j < lo; j++) pr[j] = dpr[j] = 0.0f;
          for (int64_t j = n; j < nk; j++) pr[j] = dpr[j] = 0.0f;
        }
        // dS carries the scale (dS = P∘(dP − D)·scale): dQ = dS·K and dK = dSᵀ·Q = dSᵀ·qc / scale (qc is scale·Q)
        gemm_f32(serial_pool(), false, false, bq, D, nk, 1.0f, dp.data(), kc.data(), 0.0f, dqc.data());  // dQ
        gemm_f32(serial_pool(), true, false, nk, D, bq, 1.0f / scale, dp.data(), qc.data(), 1.0f, dkc.data());
        gemm_f32(serial_pool(), true, false, nk, D, bq, 1.0f, p.data(), gc.data(), 1.0f, dvc.data());
        for (int64_t r = 0; r < bq; r++)
          std::memcpy(dq + ((b * S + i0 + r) * H + h) * D, dqc.data() + r * D, D * sizeof(float));
      }
    }
    for (int64_t j = 0; j < S; j++) {
      std::memcpy(dk + ((b * S + j) * KV + kvh) * D, dkc.data() + j * D, D * sizeof(float));
      std::memcpy(dv + ((b * S + j) * KV + kvh) * D, dvc.data() + j * D, D * sizeof(float));
    }
  });
  return "";
}

std::string swiglu_forward(ThreadPool& pool, float* out, const float* gate, const float* up, int64_t n) {
  parallel_rows(pool, n, 32768, [&](int64_t a, int64_t b) {
    int64_t i = a;
#ifdef __AVX512F__
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= b; i += 16) {
      __m512 g = _mm512_loadu_ps(gate + i);
      __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sg), _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < b; i++) out[i] = gate[i] * sigmoidf(gate[i]) * up[i];
  });
  return "";
}

std::string swiglu_backward(ThreadPool& pool, float* dgate, float* dup, const float* dout, const float* gate,
                            const float* up, int64_t n) {
  // d silu/dg = σ(g)(1 + g(1 − σ(g)))
  parallel_rows(pool, n, 32768, [&](int64_t a, int64_t b) {
    int64_t i = a;
#ifdef __AVX512F__
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= b; i += 16) {
      __m512 g = _mm512_loadu_ps(gate + i), d = _mm512_loadu_ps(dout + i);
      __m512 sg = _mm512_div_ps(one, _mm512_add_ps(one, simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      __m512 dsilu = _mm512_mul_ps(sg, _mm512_fmadd_ps(g, _mm512_sub_ps(one, sg), one));
      _mm512_storeu_ps(dgate + i, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_loadu_ps(up + i)), dsilu));
      _mm512_storeu_ps(dup + i, _mm512_mul_ps(d, _mm512_mul_ps(g, sg)));
    }
#endif
    for (; i < b; i++) {
      float g = gate[i], sg = sigmoidf(g), d = dout[i];
      dgate[i] = d * up[i] * sg * (1.0f + g * (1.0f - sg));
      dup[i] = d * g * sg;
    }
  });
  return "";
}

namespace {
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi), torch gelu(approximate="tanh")
}

std::string geglu_forward(ThreadPool& pool, float* out, const float* gate, const float* up, int64_t n) {
  parallel_rows(pool, n, 32768, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) {
      float g = gate[i];
      // 0.5·(1 + tanh(u)) = σ(2u), without the cancellation of 1 + tanh(u) near −1
      const float u = kGeluC * (g + 0.044715f * g * g * g);
      out[i] = g * (1.0f / (1.0f + std::exp(-2.0f * u))) * up[i];
    }
  });
  return "";
}

std::string geglu_backward(ThreadPool& pool, float* dgate, float* dup, const float* dout, const float* gate,
                           const float* up, int64_t n) {
  // d/dg 0.5·g·(1 + th) = 0.5·(1 + th) + 0.5·g·(1 − th²)·c·(1 + 3·0.044715·g²)
  parallel_rows(pool, n, 32768, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) {
      float g = gate[i], d = dout[i];
      // with sp = σ(2u) = (1 + th)/2 and sn = σ(−2u) = (1 − th)/2: 1 − th² = 4·sp·sn, no cancellation near ±1
      float u = kGeluC * (g + 0.044715f * g * g * g);
      float sp = 1.0f / (1.0f + std::exp(-2.0f * u)), sn = 1.0f / (1.0f + std::exp(2.0f * u));
      float dgelu = sp + 2.0f * g * sp * sn * kGeluC * (1.0f + 3.0f * 0.044715f * g * g);
      dgate[i] = d * up[i] * dgelu;
      dup[i] = d * g * sp;
    }
  });
  return "";
}

std::string softcap_forward(ThreadPool& pool, float* y, const float* x, float cap, int64_t n) {
  if (!(cap > 0)) return "cap must be > 0";
  parallel_rows(pool, n, 32768, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) y[i] = cap * std::tanh(x[i] / cap);
  });
  return "";
}

std::string softcap_backward(ThreadPool& pool, float* dx, const float* dy, const float* x, float cap, int64_t n) {
  if (!(cap > 0)) return "cap must be > 0";
  parallel_rows(pool, n, 32768, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) {
      float t = std::tanh(x[i] / cap);
      dx[i] = dy[i] * (1.0f - t * t);
    }
  });
  return "";
}

std::string embedding_forward(ThreadPool& pool, float* out, const int32_t* ids, const float* table, int64_t T,
                              int64_t C, int64_t V) {
  for (int64_t t = 0; t < T; t++)
    if (ids[t] < 0 || ids[t] >= V)
      return "ids[" + std::to_string(t) + "]=" + std::to_string(ids[t]) + " outside vocabulary [0, " +
             std::to_string(V) + ")";
  parallel_rows(pool, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) std::memcpy(out + t * C, table + (int64_t)ids[t] * C, C * sizeof(float));
  });
  return "";
}

std::string ce_chunk_forward(ThreadPool& pool, const float* logits, const int32_t* labels, int64_t v0, int64_t T,
                             int64_t Vc, float* m, float* s, float* picked) {
  parallel_rows(pool, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(Vc, 1)), [&](int64_t a, int64_t b) {
    std::vector<float> e((size_t)Vc);
    for (int64_t t = a; t < b; t++) {
      const int32_t label = labels[t];
      if (label < 0) continue;
      const float* l = logits + t * Vc;
      float m_new = std::max(m[t], simd::max_of(l, Vc));
      // rescale the running sum to the new max (first chunk: m = −∞, s = 0)
      double sum = s[t] == 0.0f ? 0.0 : (double)s[t] * std::exp((double)m[t] - (double)m_new);
      sum += simd::exp_sub_sum(e.data(), l, m_new, Vc);
      m[t] = m_new;
      s[t] = (float)sum;
      if (label >= v0 && label < v0 + Vc) picked[t] = l[label - v0];
    }
  });
  return "";
}

std::string ce_chunk_backward(ThreadPool& pool, float* logits, const int32_t* labels, int64_t v0, int64_t T,
                              int64_t Vc, const float* lse, const float* scale) {
  parallel_rows(pool, T, std::max<int64_t>(1, 32768 / std::max<int64_t>(Vc, 1)), [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; t++) {
      float* l = logits + t * Vc;
      const int32_t label = labels[t];
      if (label < 0) {
        std::memset(l, 0, Vc * sizeof(float));
        continue;
      }
      simd::exp_sub_sum(l, l, lse[t], Vc);
      const float sc = scale[t];
      for (int64_t j = 0; j < Vc; j++) l[j] *= sc;
      if (label >= v0 && label < v0 + Vc) l[label - v0] -= sc;
    }
  });
  return "";
}
