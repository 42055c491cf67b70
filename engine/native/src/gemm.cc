// Packed float32 GEMM (BLIS loop nest, register-blocked micro-kernel) with NF4 dequantization fused into B packing.
//
// Loop nest per thread slab: jc (NC columns) → pc (KC depth; pack B panel) → ic (MC rows; pack A block)
// → jr (NR) → ir (MR) → micro-kernel. Threads split the output into disjoint column slabs (or row slabs
// when N is narrow); each packs its own panels, so no barriers are needed and packing the shared
// operand twice costs O(1/slab width) of the arithmetic. Each output element is always summed in the
// same k order, so results do not depend on the thread count. Shapes where packing would cost as much
// as the arithmetic skip it: M < 4 streams B once (gemm_small_m); full tiles read a row-major A (or any
// A of a one-sliver-wide slab) in place; a slab of few rows reads a row-major float32 B in place; and
// few rows times a big transposed float32 B is computed as Cᵀ = B·op(A)ᵀ.
#include "gemm.h"

#include "simd.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

alignas(64) const float kNF4Lut[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

namespace {

// Two register tiles per ISA: the wide one for ordinary outputs and a narrow one (one vector wide,
// twice as tall) for N ≤ one vector, the LoRA rank-r outputs, which would waste half of every FMA.
#if defined(__AVX512F__)
#define SWARMTUNE_VL 16  // a macro, not constexpr: the preprocessor selects the SIMD kernel body
constexpr int VL = SWARMTUNE_VL;
#ifndef SWARMTUNE_GEMM_MR
#define SWARMTUNE_GEMM_MR 6
#endif
constexpr int MR_WIDE = SWARMTUNE_GEMM_MR, NR_WIDE = 32;  // 6: 12 zmm accumulators hide 4-cycle FMA latency
constexpr int MR_NARROW = 12, NR_NARROW = 16;
const char* kKernelName = "avx512 6x32 (+12x16 for N<=16)";
#elif defined(__AVX2__)
#define SWARMTUNE_VL 8
constexpr int VL = SWARMTUNE_VL;
constexpr int MR_WIDE = 6, NR_WIDE = 16;  // 12 ymm accumulators, the classic Haswell shape
constexpr int MR_NARROW = 12, NR_NARROW = 8;
const char* kKernelName = "avx2 6x16 (+12x8 for N<=8)";
#else
#define SWARMTUNE_VL 1
constexpr int VL = SWARMTUNE_VL;
constexpr int MR_WIDE = 4, NR_WIDE = 4;
constexpr int MR_NARROW = 4, NR_NARROW = 4;
const char* kKernelName = "scalar 4x4";
#endif
// KC·NR·4 bytes of B micro-panel stay in L1 (32 KiB) across the ir loop; MC·KC·4 of A stay in L2.
// Overridable at build time (-DSWARMTUNE_GEMM_KC=...) for tuning experiments.
#ifndef SWARMTUNE_GEMM_KC
#define SWARMTUNE_GEMM_KC 256
#endif
#ifndef SWARMTUNE_GEMM_MC
#define SWARMTUNE_GEMM_MC 96
#endif
#ifndef SWARMTUNE_GEMM_NC
#define SWARMTUNE_GEMM_NC 3072
#endif
constexpr int64_t KC = SWARMTUNE_GEMM_KC, MC = SWARMTUNE_GEMM_MC, NC = SWARMTUNE_GEMM_NC;
static_assert(MC % 12 == 0, "MC must be a multiple of both tile heights");

// One SIMD register of floats. Explicit intrinsics: with GCC's generic vector types the compiler
// re-vectorized the tiles into half-width registers and spilled accumulators (AVX2 build: ~8 GFLOP/s).
#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__)
struct Vec {
  using T = __m256;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
#endif

// acc[MR][NR] += a(MR×kc) · b(kc×NR); then C = alpha·acc + beta·C on the valid mr×nr corner (beta = 0
// never reads C). DIRECT reads A unpacked as a[i·rs + k·cs] (full MR-row tiles only); otherwise a is
// the packed sliver. B rows are ldb apart: NR for a packed sliver, N when read in place from [K,N].
template <int MR, int NR, bool DIRECT = false>
void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b, float* __restrict c,
                  int64_t ldc, int mr, int nr, float alpha, float beta, int64_t rs = 1, int64_t cs = MR,
                  int64_t ldb = NR) {
#if SWARMTUNE_VL > 1
  constexpr int NV = NR / VL;
  typename Vec::T acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) acc[i][v] = Vec::zero();
  for (int64_t k = 0; k < kc; k++) {
    typename Vec::T bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) bv[v] = Vec::load(b + v * VL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
      typename Vec::T ai = Vec::set1(DIRECT ? a[i * rs] : a[i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) acc[i][v] = Vec::fma(ai, bv[v], acc[i][v]);
    }
    a += DIRECT ? cs : MR;
    b += ldb;
  }
  const typename Vec::T va = Vec::set1(alpha), vb = Vec::set1(beta);
  if (mr == MR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) {
        float* cp = c + i * ldc + v * VL;
        typename Vec::T r = Vec::mul(va, acc[i][v]);
        if (beta != 0.0f) r = Vec::fma(vb, Vec::load(cp), r);
        Vec::store(cp, r);
      }
    return;
  }
  alignas(64) float tile[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int v = 0; v < NV; v++) Vec::store(&tile[i][v * VL], acc[i][v]);
#else
  float tile[MR][NR] = {};
  for (int64_t k = 0; k < kc; k++) {
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) tile[i][j] += (DIRECT ? a[i * rs] : a[i]) * b[j];
    a += DIRECT ? cs : MR;
    b += ldb;
  }
#endif
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < nr; j++) {
      float* cp = c + i * ldc + j;
      *cp = beta == 0.0f ? alpha * tile[i][j] : alpha * tile[i][j] + beta * *cp;
    }
}

// Thread-local, 64-byte aligned scratch that only grows.
struct Scratch {
  float* p = nullptr;
  size_t n = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t count) {
    if (count > n) {
      std::free(p);
      size_t bytes = ((count * sizeof(float)) + 63) & ~size_t(63);
      p = (float*)std::aligned_alloc(64, bytes);
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
      n = count;
    }
    return p;
  }
};
thread_local Scratch tl_a, tl_b, tl_row;

// Where op(B)[k][n] comes from.
struct BSrc {
  const float* f32 = nullptr;  // float32 B: stored [K,N], or [N,K] when trans
  const NF4View* nf4 = nullptr;
  bool trans = false;          // NF4: trans ⇒ op(B)[k][n] = W[n][k] (x·Wᵀ); else W[k][n]
  int64_t N = 0, K = 0;
};

// d[k·NR + j0 + r] = rows[r][k] for r < 8, k < kc: eight k-contiguous rows written as eight sliver
// columns. 8×8 register transposes turn the stride-NR scalar scatter into contiguous 8-float stores.
template <int NR>
void transpose8_into_sliver(float* d, const float* const rows[8], int64_t kc, int j0) {
  int64_t k = 0;
#if defined(__AVX2__)
  for (; k + 8 <= kc; k += 8) {
    __m256 r0 = _mm256_loadu_ps(rows[0] + k), r1 = _mm256_loadu_ps(rows[1] + k);
    __m256 r2 = _mm256_loadu_ps(rows[2] + k), r3 = _mm256_loadu_ps(rows[3] + k);
    __m256 r4 = _mm256_loadu_ps(rows[4] + k), r5 = _mm256_loadu_ps(rows[5] + k);
    __m256 r6 = _mm256_loadu_ps(rows[6] + k), r7 = _mm256_loadu_ps(rows[7] + k);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    float* o = d + k * NR + j0;
    _mm256_storeu_ps(o + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(o + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(o + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(o + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(o + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(o + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(o + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(o + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
#endif
  for (; k < kc; k++)
    for (int r = 0; r < 8; r++) d[k * NR + j0 + r] = rows[r][k];
}

// Pack op(B)[pc:pc+kc, jc:jc+nc] into NR-wide slivers: dst[s][k][j], zero padded to NR.
template <int NR>
void pack_b(float* dst, const BSrc& B, int64_t pc, int64_t kc, int64_t jc, int64_t nc) {
  for (int64_t s = 0; s < nc; s += NR) {
    int nr = (int)std::min<int64_t>(NR, nc - s);
    float* d = dst + s * kc;
    int64_t n0 = jc + s;
    if (B.f32 && !B.trans) {
      for (int64_t k = 0; k < kc; k++) {
        const float* src = B.f32 + (pc + k) * B.N + n0;
        float* row = d + k * NR;
        std::memcpy(row, src, nr * sizeof(float));
        for (int j = nr; j < NR; j++) row[j] = 0.0f;
      }
    } else if (B.f32) {
      int j = 0;
      for (; j + 8 <= nr; j += 8) {
        const float* rows[8];
        for (int r = 0; r < 8; r++) rows[r] = B.f32 + (n0 + j + r) * B.K + pc;
        transpose8_into_sliver<NR>(d, rows, kc, j);
      }
      for (; j < nr; j++) {
        const float* src = B.f32 + (n0 + j) * B.K + pc;
        for (int64_t k = 0; k < kc; k++) d[k * NR + j] = src[k];
      }
      for (int j = nr; j < NR; j++)
        for (int64_t k = 0; k < kc; k++) d[k * NR + j] = 0.0f;
    } else if (B.trans) {
      // x·Wᵀ: sliver column j is W row n0+j, contiguous nibbles: decode the row run, then scatter.
      float* run = tl_row.get((size_t)(8 * kc));
      int j = 0;
      for (; j + 8 <= nr; j += 8) {
        const float* rows[8];
        for (int r = 0; r < 8; r++) {
          nf4_decode_run(run + r * kc, *B.nf4, (size_t)((n0 + j + r) * B.nf4->cols + pc), kc);
          rows[r] = run + r * kc;
        }
        transpose8_into_sliver<NR>(d, rows, kc, j);
      }
      for (; j < nr; j++) {
        nf4_decode_run(run, *B.nf4, (size_t)((n0 + j) * B.nf4->cols + pc), kc);
        for (int64_t k = 0; k < kc; k++) d[k * NR + j] = run[k];
      }
      for (int j = nr; j < NR; j++)
        for (int64_t k = 0; k < kc; k++) d[k * NR + j] = 0.0f;
    } else {
      // dY·W: each sliver row is a contiguous run of W row pc+k: decode straight into the panel.
      for (int64_t k = 0; k < kc; k++) {
        float* row = d + k * NR;
        nf4_decode_run(row, *B.nf4, (size_t)((pc + k) * B.nf4->cols + n0), nr);
        for (int j = nr; j < NR; j++) row[j] = 0.0f;
      }
    }
  }
}

// Pack op(A)[ic:ic+mc, pc:pc+kc] into MR-tall slivers: dst[s][k][i], zero padded to MR.
template <int MR>
void pack_a(float* dst, const float* A, bool transA, int64_t M, int64_t K, int64_t ic, int64_t mc, int64_t pc,
            int64_t kc) {
  for (int64_t s = 0; s < mc; s += MR) {
    int mr = (int)std::min<int64_t>(MR, mc - s);
    float* d = dst + s * kc;
    if (transA) {
      for (int64_t k = 0; k < kc; k++) {
        const float* src = A + (pc + k) * M + ic + s;
        for (int i = 0; i < mr; i++) d[k * MR + i] = src[i];
        for (int i = mr; i < MR; i++) d[k * MR + i] = 0.0f;
      }
    } else {
      for (int i = 0; i < mr; i++) {
        const float* src = A + (ic + s + i) * K + pc;
        for (int64_t k = 0; k < kc; k++) d[k * MR + i] = src[k];
      }
      for (int i = mr; i < MR; i++)
        for (int64_t k = 0; k < kc; k++) d[k * MR + i] = 0.0f;
    }
  }
}

// One thread's slab C[m0:m1, n0:n1].
template <int MR, int NR>
void gemm_slab(bool transA, int64_t M, int64_t K, float alpha, const float* A, const BSrc& B, float beta, float* C,
               int64_t ldc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  float* bp = tl_b.get((size_t)KC * (size_t)((std::min<int64_t>(NC, n1 - n0) + NR - 1) / NR * NR));
  float* ap = tl_a.get((size_t)KC * (size_t)((std::min<int64_t>(MC, m1 - m0) + MR - 1) / MR * MR));
  // A is read in place when packing it would not pay: a one-sliver-wide slab uses each A element in
  // one tile only, and a row-major A's MR row streams prefetch as well as a packed sliver (measured
  // 2-7% faster single-threaded); a transposed A is packed (k-strided reads measured ~2% slower).
  // few output rows: each B element feeds at most m1 − m0 FMAs, so packing B would dominate; a float32
  // [K,N] B is already k-major, so full-width tiles read it in place (A is then packed: it is small)
  const bool direct_b = B.f32 && !B.trans && m1 - m0 <= 4 * MR && n1 - n0 > NR;
  const bool direct_a = !direct_b && (n1 - n0 <= NR || !transA);
  for (int64_t jc = n0; jc < n1; jc += NC) {
    int64_t nc = std::min<int64_t>(NC, n1 - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      int64_t kc = std::min<int64_t>(KC, K - pc);
      float b_eff = pc == 0 ? beta : 1.0f;  // later depth blocks accumulate onto the first
      if (!direct_b) pack_b<NR>(bp, B, pc, kc, jc, nc);
      for (int64_t ic = m0; ic < m1; ic += MC) {
        int64_t mc = std::min<int64_t>(MC, m1 - ic);
        if (direct_a) {
          // full MR-row tiles read A in place; only the ragged last rows are packed (once per block)
          bool edge_packed = false;
          for (int64_t jr = 0; jr < nc; jr += NR) {
            int nr = (int)std::min<int64_t>(NR, nc - jr);
            for (int64_t ir = 0; ir < mc; ir += MR) {
              int mr = (int)std::min<int64_t>(MR, mc - ir);
              float* cp = C + (ic + ir) * ldc + jc + jr;
              if (mr == MR) {
                const float* a0 = transA ? A + pc * M + ic + ir : A + (ic + ir) * K + pc;
                micro_kernel<MR, NR, true>(kc, a0, bp + jr * kc, cp, ldc, mr, nr, alpha, b_eff, transA ? 1 : K,
                                           transA ? M : 1);
              } else {
                if (!edge_packed) pack_a<MR>(ap, A, transA, M, K, ic + ir, mr, pc, kc);
                edge_packed = true;
                micro_kernel<MR, NR>(kc, ap, bp + jr * kc, cp, ldc, mr, nr, alpha, b_eff);
              }
            }
          }
          continue;
        }
        pack_a<MR>(ap, A, transA, M, K, ic, mc, pc, kc);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          int nr = (int)std::min<int64_t>(NR, nc - jr);
          if (direct_b) {
            const float* b0 = B.f32 + pc * B.N + jc + jr;
            if (nr < NR) pack_b<NR>(bp, B, pc, kc, jc + jr, nr);  // ragged edge: pad a packed copy
            for (int64_t ir = 0; ir < mc; ir += MR) {
              int mr = (int)std::min<int64_t>(MR, mc - ir);
              float* cp = C + (ic + ir) * ldc + jc + jr;
              if (nr == NR)
                micro_kernel<MR, NR>(kc, ap + ir * kc, b0, cp, ldc, mr, nr, alpha, b_eff, 1, MR, B.N);
              else
                micro_kernel<MR, NR>(kc, ap + ir * kc, bp, cp, ldc, mr, nr, alpha, b_eff);
            }
            continue;
          }
          for (int64_t ir = 0; ir < mc; ir += MR) {
            int mr = (int)std::min<int64_t>(MR, mc - ir);
            micro_kernel<MR, NR>(kc, ap + ir * kc, bp + jr * kc, C + (ic + ir) * ldc + jc + jr, ldc, mr, nr, alpha, b_eff);
          }
        }
      }
    }
  }
}

// Few rows of output (decode steps, M=1 generation): packing B would cost as much as the arithmetic,
// so stream B once, straight from its storage (NF4 rows decoded into a small per-thread run).
constexpr int64_t kSmallM = 4;

void gemm_small_m(ThreadPool& pool, bool transA, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                  const BSrc& B, float beta, float* C) {
  std::vector<float> a((size_t)(M * K));  // op(A) rows, contiguous
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < K; k++) a[m * K + k] = transA ? A[k * M + m] : A[m * K + k];
  auto store = [&](int64_t m, int64_t n, float acc) {
    float* c = C + m * N + n;
    *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
  };
  const bool rows_over_k = B.trans;  // op(B) column n is a contiguous run of K values
  const int64_t chunk = rows_over_k ? 16 : 512;
  const int64_t tasks = (N + chunk - 1) / chunk;
  pool.run(tasks, [&](int64_t t) {
    int64_t n0 = t * chunk, n1 = std::min(N, n0 + chunk);
    if (rows_over_k) {
      float* run = B.nf4 ? tl_row.get((size_t)K) : nullptr;
      for (int64_t n = n0; n < n1; n++) {
        const float* col = B.f32 ? B.f32 + n * K : run;
        if (B.nf4) nf4_decode_run(run, *B.nf4, (size_t)(n * B.nf4->cols), K);
        for (int64_t m = 0; m < M; m++) store(m, n, simd::dot(a.data() + m * K, col, K));
      }
    } else {
      const int64_t nc = n1 - n0;
      float* acc = tl_a.get((size_t)(M * nc));
      float* run = B.nf4 ? tl_row.get((size_t)nc) : nullptr;
      std::fill(acc, acc + M * nc, 0.0f);
      for (int64_t k = 0; k < K; k++) {
        const float* row = B.f32 ? B.f32 + k * N + n0 : run;
        if (B.nf4) nf4_decode_run(run, *B.nf4, (size_t)(k * B.nf4->cols + n0), nc);
        for (int64_t m = 0; m < M; m++) simd::axpy(acc + m * nc, a[m * K + k], row, nc);
      }
      for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) store(m, n, acc[m * nc + (n - n0)]);
    }
  });
}

template <int MR, int NR>
void gemm_parallel(ThreadPool& pool, bool transA, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   const BSrc& B, float beta, float* C) {
  int T = pool.size();
  double flops = 2.0 * (double)M * (double)N * (double)K;
  if (flops < 2e5) T = 1;  // below ~0.1 ms of work the fork-join costs more than it saves
  int64_t nblocks = (N + NR - 1) / NR, mblocks = (M + MR - 1) / MR;
  bool split_n = nblocks >= 2 * T || nblocks >= mblocks;
  int64_t units = split_n ? nblocks : mblocks;
  int tasks = (int)std::min<int64_t>(T, units);
  pool.run(tasks, [&](int64_t t) {
    int64_t u0 = units * t / tasks, u1 = units * (t + 1) / tasks;
    if (split_n)
      gemm_slab<MR, NR>(transA, M, K, alpha, A, B, beta, C, N, 0, M, u0 * NR, std::min(N, u1 * NR));
    else
      gemm_slab<MR, NR>(transA, M, K, alpha, A, B, beta, C, N, u0 * MR, std::min(M, u1 * MR), 0, N);
  });
}


void gemm_driver(ThreadPool& pool, bool transA, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 const BSrc& B, float beta, float* C) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    // no products: C = beta·C, with beta = 0 clearing even NaN
    for (int64_t i = 0; i < M * N; i++) C[i] = beta == 0.0f ? 0.0f : beta * C[i];
    return;
  }
  if (M < kSmallM) {
    gemm_small_m(pool, transA, M, N, K, alpha, A, B, beta, C);
    return;
  }
  if (B.f32 && B.trans && M <= NR_NARROW && N >= 4 * NR_WIDE) {
    // few rows times a big [N,K] weight (batched decode): packing B would dominate, and B is not
    // k-major so it cannot be read in place as B. Compute Cᵀ = B·op(A)ᵀ instead, where B is the
    // A operand (streamed in place) and the small op(A)ᵀ is packed, then transpose into C.
    std::vector<float> ct((size_t)(N * M));
    BSrc at;
    at.f32 = A;
    at.trans = !transA;  // op(A)ᵀ[k][i] = op(A)[i][k]: A stored [M,K] reads as a transposed [K,M]
    at.N = M;
    at.K = K;
    gemm_parallel<MR_NARROW, NR_NARROW>(pool, false, N, M, K, 1.0f, B.f32, at, 0.0f, ct.data());
    for (int64_t i = 0; i < M; i++)
      for (int64_t j = 0; j < N; j++) {
        float* c = C + i * N + j;
        *c = beta == 0.0f ? alpha * ct[j * M + i] : alpha * ct[j * M + i] + beta * *c;
      }
    return;
  }
  if (N <= NR_NARROW)
    gemm_parallel<MR_NARROW, NR_NARROW>(pool, transA, M, N, K, alpha, A, B, beta, C);
  else
    gemm_parallel<MR_WIDE, NR_WIDE>(pool, transA, M, N, K, alpha, A, B, beta, C);
}

}  // namespace

const char* gemm_kernel_name() { return kKernelName; }

void nf4_decode_run(float* out, const NF4View& W, size_t f, int64_t n) {
  const uint8_t* packed = W.packed;
  const int sh = W.log2_block;
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 lut = _mm512_load_ps(kNF4Lut);
  // the byte-duplicated nibble stream puts a high nibble at even positions; an odd start shifts by one
  const __m512i sh_even = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i sh_odd = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (; i + 16 <= n && ((f + i) >> 1) + 16 <= W.packed_len; i += 16) {
    size_t g = f + i;
    __m128i bytes = _mm_loadu_si128((const __m128i*)(packed + (g >> 1)));
    __m128i lo = _mm_unpacklo_epi8(bytes, bytes);
    __m128i nib8 = (g & 1) ? _mm_alignr_epi8(_mm_unpackhi_epi8(bytes, bytes), lo, 1) : lo;
    __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(nib8), (g & 1) ? sh_odd : sh_even), low4);
    __m512 w = _mm512_permutexvar_ps(codes, lut);
    size_t b0 = g >> sh, b1 = (g + 15) >> sh;
    __m512 am = _mm512_set1_ps(nf4_block_absmax(W, b0));
    if (b1 != b0) {  // blocks are ≥ 32 elements, so a 16-run spans at most two
      int split = (int)((b1 << sh) - g);
      am = _mm512_mask_mov_ps(am, (__mmask16)(0xFFFFu << split), _mm512_set1_ps(nf4_block_absmax(W, b1)));
    }
    _mm512_storeu_ps(out + i, _mm512_mul_ps(w, am));
  }
#endif
  // scalar tail (and the whole run without AVX-512BW): one absmax per block, not per element
  size_t block = ~size_t(0);
  float am = 0.0f;
  for (; i < n; i++) {
    size_t g = f + i;
    if ((g >> sh) != block) {
      block = g >> sh;
      am = nf4_block_absmax(W, block);
    }
    uint8_t b = packed[g >> 1];
    out[i] = kNF4Lut[(g & 1) ? (b & 15) : (b >> 4)] * am;
  }
}

void gemm_f32(ThreadPool& pool, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, const float* B, float beta, float* C) {
  BSrc src;
  src.f32 = B;
  src.trans = transB;
  src.N = N;
  src.K = K;
  gemm_driver(pool, transA, M, N, K, alpha, A, src, beta, C);
}

void gemm_nf4(ThreadPool& pool, int64_t M, const float* X, const NF4View& W, float beta, float* Y) {
  BSrc src;
  src.nf4 = &W;
  src.trans = true;
  src.N = W.rows;
  src.K = W.cols;
  gemm_driver(pool, false, M, W.rows, W.cols, 1.0f, X, src, beta, Y);
}

void gemm_nf4_t(ThreadPool& pool, int64_t M, const float* DY, const NF4View& W, float beta, float* DX) {
  BSrc src;
  src.nf4 = &W;
  src.trans = false;
  src.N = W.cols;
  src.K = W.rows;
  gemm_driver(pool, false, M, W.cols, W.rows, 1.0f, DY, src, beta, DX);
}

void dequant_nf4(ThreadPool& pool, const NF4View& W, float* out) {
  int64_t n = W.rows * W.cols;
  const int64_t chunk = 1 << 16;
  pool.run((n + chunk - 1) / chunk, [&](int64_t t) {
    int64_t a = t * chunk, b = std::min(n, a + chunk);
    nf4_decode_run(out + a, W, (size_t)a, b - a);
  });
}
