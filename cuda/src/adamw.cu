// bitsandbytes-semantics AdamW (32-bit and 8-bit blockwise, facts §3) and the paged optimizer that
// streams host-pinned state pages through a bounded set of device staging slots.
#include "common.cuh"
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

namespace stc {

constexpr int Q_BLOCK = 256;        // BLOCKSIZE_2STATE since bitsandbytes 0.44
constexpr int64_t MIN_8BIT = 4096;  // min_8bit_size: smaller tensors keep fp32 state

struct QMaps {
  float q1[256];  // signed dynamic map (state1)
  float q2[256];  // unsigned dynamic map (state2)
};

// create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for i in 0..6, midpoints of
// linspace(0.1, 1, n_i) scaled by 10^(i-6) (and negated when signed), plus 0 and 1, sorted.
// Computed in double and rounded once; bitsandbytes builds it in float32, so entries may differ by 1 ulp.
static void dynamic_map(bool is_signed, float* out) {
  std::vector<double> data;
  for (int i = 0; i < 7; i++) {
    const int n = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
    const double scale = std::pow(10.0, -6 + i);
    for (int k = 0; k + 1 < n; k++) {
      const double b0 = 0.1 + 0.9 * k / (n - 1), b1 = 0.1 + 0.9 * (k + 1) / (n - 1);
      const double mean = (b0 + b1) / 2.0;
      data.push_back(scale * mean);
      if (is_signed) data.push_back(-scale * mean);
    }
  }
  data.push_back(0.0);
  data.push_back(1.0);
  std::sort(data.begin(), data.end());
  for (int i = 0; i < 256; i++) out[i] = (float)data[i];
}

static const QMaps& qmaps() {
  static QMaps maps = [] {
    QMaps m;
    dynamic_map(true, m.q1);
    dynamic_map(false, m.q2);
    return m;
  }();
  return maps;
}

// Nearest code in a sorted 256-entry table; a value exactly on a midpoint takes the lower code.
__device__ __forceinline__ int quantize_nearest(const float* code, float x) {
  if (!(x > code[0])) return 0;
  if (x >= code[255]) return 255;
  int lo = 0, hi = 255;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (code[mid] <= x) lo = mid;
    else hi = mid;
  }
  return x > 0.5f * (code[lo] + code[hi]) ? hi : lo;
}

__global__ void adamw32_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                               float* __restrict__ v, int64_t n, float lr, float b1, float b2, float eps, float wd,
                               float step_size, float eps_c2) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float gi = g[i];
    // a non-finite gradient leaves p, m and v untouched (as engine/train/optim.ts's bnb32 update does)
    if (!isfinite(gi)) continue;
    const float mi = m[i] * b1 + (1.0f - b1) * gi;
    const float vi = v[i] * b2 + (1.0f - b2) * gi * gi;
    float pi = p[i] + step_size * (mi / (sqrtf(vi) + eps_c2));
    if (wd > 0.0f) pi *= 1.0f - lr * wd;  // bitsandbytes decays after the Adam step
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
  }
}

// One block per 256-element quantization block, one element per thread.
__global__ void __launch_bounds__(Q_BLOCK)
adamw8bit_kernel(float* __restrict__ p, const float* __restrict__ g, uint8_t* __restrict__ s1,
                 uint8_t* __restrict__ s2, float* __restrict__ absmax1, float* __restrict__ absmax2, int64_t n,
                 float lr, float b1, float b2, float wd, float step_size, float eps_c2, QMaps maps) {
  __shared__ float q1[256], q2[256];
  __shared__ float red1[Q_BLOCK / 32], red2[Q_BLOCK / 32];
  const int tid = threadIdx.x;
  q1[tid] = maps.q1[tid];
  q2[tid] = maps.q2[tid];
  __syncthreads();
  const int64_t blk = blockIdx.x, i = blk * Q_BLOCK + tid;
  const bool valid = i < n;
  float mi = 0.0f, vi = 0.0f, gi = 0.0f;
  bool finite = false;
  if (valid) {
    gi = g[i];
    finite = isfinite(gi);
    if (finite) {
      vi = q2[s2[i]] * absmax2[blk] * b2 + (1.0f - b2) * gi * gi;
      mi = q1[s1[i]] * absmax1[blk] * b1 + (1.0f - b1) * gi;
    }  // non-finite gradient: both states reset to 0 and p left unchanged
  }
  float a1 = fabsf(mi), a2 = fabsf(vi);
  for (int o = 16; o > 0; o >>= 1) {
    a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, o));
    a2 = fmaxf(a2, __shfl_xor_sync(0xffffffffu, a2, o));
  }
  if ((tid & 31) == 0) {
    red1[tid >> 5] = a1;
    red2[tid >> 5] = a2;
  }
  __syncthreads();
  a1 = 0.0f;
  a2 = 0.0f;
  for (int w = 0; w < Q_BLOCK / 32; w++) {
    a1 = fmaxf(a1, red1[w]);
    a2 = fmaxf(a2, red2[w]);
  }
  if (!valid) return;
  if (finite) {
    float pi = p[i] + step_size * (mi / (sqrtf(vi) + eps_c2));
    if (wd > 0.0f) pi *= 1.0f - lr * wd;
    p[i] = pi;
  }
  // bitsandbytes normalizes by multiplying with the reciprocal of the new absmax (not by dividing:
  // the two can differ by an ulp and flip a code); an all-zero block stores the code of 0
  const float inv1 = a1 > 0.0f ? 1.0f / a1 : 0.0f, inv2 = a2 > 0.0f ? 1.0f / a2 : 0.0f;
  int c1 = quantize_nearest(q1, mi * inv1);
  // keep state1's sign through quantization (a small negative must not round to +0)
  if (signbit(q1[c1]) != signbit(mi)) c1 += mi > 0.0f ? 1 : -1;
  const int c2 = quantize_nearest(q2, vi * inv2);
  s1[i] = (uint8_t)c1;
  s2[i] = (uint8_t)c2;
  if (tid == 0) {
    absmax1[blk] = a1;
    absmax2[blk] = a2;
  }
}

static void bias_terms(const stc_adamw_hparams& hp, float* step_size, float* eps_c2) {
  const double c1 = 1.0 - std::pow((double)hp.beta1, hp.step);
  const double c2 = std::sqrt(1.0 - std::pow((double)hp.beta2, hp.step));
  *step_size = (float)(-hp.lr * c2 / c1);
  *eps_c2 = (float)(hp.eps * c2);
}

static int check_hp(const stc_adamw_hparams* hp) {
  STC_REQUIRE(hp && hp->step >= 1, "adamw: step must be >= 1 (got %d)", hp ? hp->step : -1);
  STC_REQUIRE(hp->beta1 >= 0.0f && hp->beta1 < 1.0f && hp->beta2 >= 0.0f && hp->beta2 < 1.0f,
              "adamw: betas must be in [0, 1) (got %g, %g)", hp->beta1, hp->beta2);
  return 0;
}

int adamw32_dev(stc_ctx*, cudaStream_t st, float* p, const float* g, float* m, float* v, int64_t n,
                const stc_adamw_hparams& hp) {
  float step_size, eps_c2;
  bias_terms(hp, &step_size, &eps_c2);
  unsigned blocks = blocks_for(n, 256);
  if (blocks > 65535u) blocks = 65535u;
  adamw32_kernel<<<blocks, 256, 0, st>>>(p, g, m, v, n, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay,
                                         step_size, eps_c2);
  STC_CK(cudaGetLastError());
  return 0;
}

int adamw8bit_dev(stc_ctx*, cudaStream_t st, float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1,
                  float* absmax2, int64_t n, const stc_adamw_hparams& hp) {
  float step_size, eps_c2;
  bias_terms(hp, &step_size, &eps_c2);
  const int64_t blocks = (n + Q_BLOCK - 1) / Q_BLOCK;
  STC_REQUIRE(blocks <= 2147483647LL, "adamw8bit: %lld elements exceed one launch", (long long)n);
  adamw8bit_kernel<<<(unsigned)blocks, Q_BLOCK, 0, st>>>(p, g, s1, s2, absmax1, absmax2, n, hp.lr, hp.beta1,
                                                         hp.beta2, hp.weight_decay, step_size, eps_c2, qmaps());
  STC_CK(cudaGetLastError());
  return 0;
}

struct PagedTensor {
  int64_t n = 0;
  bool is8 = false;
  void* state = nullptr;  // pinned: 32-bit m|v (8n bytes); 8-bit s1|s2 (2n) then absmax1|absmax2 (8*nb)
  int64_t bytes = 0;
  int64_t nblocks() const { return (n + Q_BLOCK - 1) / Q_BLOCK; }
};

}  // namespace stc

using namespace stc;

struct stc_paged_opt {
  struct Slot {
    cudaStream_t st = nullptr;
    void* dev = nullptr;      // device staging: p | g | state
    float* pin_pg = nullptr;  // pinned staging for the page's p | g
    float* pending_dst = nullptr;
    int64_t pending_len = 0;
  };
  stc_ctx* ctx = nullptr;
  int bits = 32;
  int64_t page_elems = 0;
  int64_t slot_bytes = 0;
  std::vector<Slot> slots;
  std::vector<PagedTensor> tensors;
  int64_t host_bytes = 0;
  // Its own mutex, not the context's op mutex: a step streams pages through the optimizer's own slots
  // and streams (no pool memory, nothing on the context stream), so it never blocks the context's ops.
  std::mutex mu;
};

static int paged_flush(stc_paged_opt::Slot& s) {
  STC_CK(cudaStreamSynchronize(s.st));
  if (s.pending_len) memcpy(s.pending_dst, s.pin_pg, sizeof(float) * (size_t)s.pending_len);
  s.pending_len = 0;
  return 0;
}

extern "C" {

int stc_adamw32(stc_ctx* ctx, float* p, const float* g, float* m, float* v, int64_t n, const stc_adamw_hparams* hp) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_TRY(check_hp(hp));
  STC_REQUIRE(n >= 0, "adamw32: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dP, dG, dM, dV;
  STC_TRY(dP.upload(ctx, p, b));
  STC_TRY(dG.upload(ctx, g, b));
  STC_TRY(dM.upload(ctx, m, b));
  STC_TRY(dV.upload(ctx, v, b));
  STC_TRY(adamw32_dev(ctx, ctx->stream, dP.as<float>(), dG.as<float>(), dM.as<float>(), dV.as<float>(), n, *hp));
  STC_LAUNCHED(ctx->stream);
  STC_TRY(dP.download(p, b));
  STC_TRY(dM.download(m, b));
  return dV.download(v, b);
}

int stc_adamw8bit(stc_ctx* ctx, float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                  int64_t n, const stc_adamw_hparams* hp) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_TRY(check_hp(hp));
  STC_REQUIRE(n >= 0, "adamw8bit: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n, ab = sizeof(float) * (size_t)((n + Q_BLOCK - 1) / Q_BLOCK);
  DevBuf dP, dG, dS1, dS2, dA1, dA2;
  STC_TRY(dP.upload(ctx, p, b));
  STC_TRY(dG.upload(ctx, g, b));
  STC_TRY(dS1.upload(ctx, s1, (size_t)n));
  STC_TRY(dS2.upload(ctx, s2, (size_t)n));
  STC_TRY(dA1.upload(ctx, absmax1, ab));
  STC_TRY(dA2.upload(ctx, absmax2, ab));
  STC_TRY(adamw8bit_dev(ctx, ctx->stream, dP.as<float>(), dG.as<float>(), dS1.as<uint8_t>(), dS2.as<uint8_t>(),
                        dA1.as<float>(), dA2.as<float>(), n, *hp));
  STC_LAUNCHED(ctx->stream);
  STC_TRY(dP.download(p, b));
  STC_TRY(dS1.download(s1, (size_t)n));
  STC_TRY(dS2.download(s2, (size_t)n));
  STC_TRY(dA1.download(absmax1, ab));
  return dA2.download(absmax2, ab);
}

int64_t stc_paged_slot_bytes(int bits, int64_t page_elems) {
  if (page_elems <= 0 || page_elems % Q_BLOCK != 0 || (bits != 8 && bits != 32)) return -1;
  const int64_t pg = 8 * page_elems;  // p and g
  if (bits == 32) return pg + 8 * page_elems;
  // 8-bit pages, or a whole small (< 4096 elements) tensor that keeps fp32 state
  const int64_t q = 2 * page_elems + 8 * (page_elems / Q_BLOCK);
  const int64_t small = 8 * std::min<int64_t>(page_elems, MIN_8BIT - 1);
  return pg + std::max(q, small);
}

int stc_paged_create(stc_ctx* ctx, int bits, int64_t page_elems, int slots, int64_t device_budget_bytes,
                     stc_paged_opt** out) {
  *out = nullptr;
  std::lock_guard<std::mutex> lock(ctx->mu);
  STC_TRY(enter(ctx));
  STC_REQUIRE(bits == 8 || bits == 32, "paged optimizer: bits must be 8 or 32 (got %d)", bits);
  STC_REQUIRE(page_elems >= Q_BLOCK && page_elems % Q_BLOCK == 0,
              "paged optimizer: pageElems=%lld must be a positive multiple of %d", (long long)page_elems, Q_BLOCK);
  STC_REQUIRE(slots >= 1 && slots <= 8, "paged optimizer: slots=%d must be in 1..8", slots);
  const int64_t sb = stc_paged_slot_bytes(bits, page_elems);
  if (sb * slots > device_budget_bytes) {
    set_error("paged optimizer: %d slot(s) of %lld bytes exceed the device budget of %lld bytes", slots,
              (long long)sb, (long long)device_budget_bytes);
    return STC_E_BUDGET;
  }
  auto* opt = new (std::nothrow) stc_paged_opt();
  if (!opt) {
    set_error("paged optimizer: out of host memory");
    return STC_E_HOST_ALLOC;
  }
  opt->ctx = ctx;
  opt->bits = bits;
  opt->page_elems = page_elems;
  opt->slot_bytes = sb;
  opt->slots.resize(slots);
  for (auto& s : opt->slots) {
    cudaError_t e = cudaStreamCreateWithFlags(&s.st, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaMalloc(&s.dev, (size_t)sb);
    if (e == cudaSuccess) e = cudaHostAlloc((void**)&s.pin_pg, sizeof(float) * 2 * (size_t)page_elems, cudaHostAllocDefault);
    if (e != cudaSuccess) {
      cudaGetLastError();
      set_error("paged optimizer: allocating a staging slot of %lld device bytes failed: %s", (long long)sb,
                cudaGetErrorString(e));
      for (auto& t : opt->slots) {
        if (t.dev) cudaFree(t.dev);
        if (t.pin_pg) cudaFreeHost(t.pin_pg);
        if (t.st) cudaStreamDestroy(t.st);
      }
      delete opt;
      return (int)e;
    }
    opt->host_bytes += sizeof(float) * 2 * page_elems;
  }
  *out = opt;
  return 0;
}

int stc_paged_add(stc_paged_opt* opt, int64_t n, int* tensor_id) {
  std::lock_guard<std::mutex> lock(opt->mu);
  STC_TRY(enter(opt->ctx));
  STC_REQUIRE(n > 0, "paged optimizer: tensor size must be positive (got %lld)", (long long)n);
  PagedTensor t;
  t.n = n;
  t.is8 = opt->bits == 8 && n >= MIN_8BIT;
  t.bytes = t.is8 ? 2 * n + 8 * t.nblocks() : 8 * n;
  cudaError_t e = cudaHostAlloc(&t.state, (size_t)t.bytes, cudaHostAllocDefault);
  if (e != cudaSuccess) {
    cudaGetLastError();
    set_error("paged optimizer: pinning %lld bytes of host memory for optimizer state failed: %s",
              (long long)t.bytes, cudaGetErrorString(e));
    return STC_E_HOST_ALLOC;
  }
  // bitsandbytes starts from all-zero bytes: codes 0 scaled by absmax 0 decode to 0
  memset(t.state, 0, (size_t)t.bytes);
  opt->tensors.push_back(t);
  opt->host_bytes += t.bytes;
  *tensor_id = (int)opt->tensors.size() - 1;
  return 0;
}

static int paged_step_pages(stc_paged_opt* opt, int tensor_id, float* p, const float* g, const stc_adamw_hparams* hp) {
  const PagedTensor& t = opt->tensors[tensor_id];
  const int64_t pe = opt->page_elems, pages = (t.n + pe - 1) / pe;
  const int ns = (int)opt->slots.size();
  for (int64_t pg = 0; pg < pages; pg++) {
    auto& s = opt->slots[pg % ns];
    STC_TRY(paged_flush(s));  // the slot's previous page is done: hand its parameters back
    const int64_t off = pg * pe, len = std::min(pe, t.n - off);
    memcpy(s.pin_pg, p + off, sizeof(float) * (size_t)len);
    memcpy(s.pin_pg + pe, g + off, sizeof(float) * (size_t)len);
    float* dp = (float*)s.dev;
    float* dg = dp + pe;
    uint8_t* dstate = (uint8_t*)(dg + pe);
    STC_CK(cudaMemcpyAsync(dp, s.pin_pg, sizeof(float) * len, cudaMemcpyHostToDevice, s.st));
    STC_CK(cudaMemcpyAsync(dg, s.pin_pg + pe, sizeof(float) * len, cudaMemcpyHostToDevice, s.st));
    if (t.is8) {
      uint8_t* hs1 = (uint8_t*)t.state + off;
      uint8_t* hs2 = (uint8_t*)t.state + t.n + off;
      float* ha1 = (float*)((uint8_t*)t.state + 2 * t.n) + off / Q_BLOCK;
      float* ha2 = ha1 + t.nblocks();
      const int64_t nb = (len + Q_BLOCK - 1) / Q_BLOCK;
      uint8_t* ds1 = dstate;
      uint8_t* ds2 = ds1 + pe;
      float* da1 = (float*)(ds2 + pe);
      float* da2 = da1 + pe / Q_BLOCK;
      STC_CK(cudaMemcpyAsync(ds1, hs1, len, cudaMemcpyHostToDevice, s.st));
      STC_CK(cudaMemcpyAsync(ds2, hs2, len, cudaMemcpyHostToDevice, s.st));
      STC_CK(cudaMemcpyAsync(da1, ha1, sizeof(float) * nb, cudaMemcpyHostToDevice, s.st));
      STC_CK(cudaMemcpyAsync(da2, ha2, sizeof(float) * nb, cudaMemcpyHostToDevice, s.st));
      STC_TRY(adamw8bit_dev(opt->ctx, s.st, dp, dg, ds1, ds2, da1, da2, len, *hp));
      STC_CK(cudaMemcpyAsync(hs1, ds1, len, cudaMemcpyDeviceToHost, s.st));
      STC_CK(cudaMemcpyAsync(hs2, ds2, len, cudaMemcpyDeviceToHost, s.st));
      STC_CK(cudaMemcpyAsync(ha1, da1, sizeof(float) * nb, cudaMemcpyDeviceToHost, s.st));
      STC_CK(cudaMemcpyAsync(ha2, da2, sizeof(float) * nb, cudaMemcpyDeviceToHost, s.st));
    } else {
      float* hm = (float*)t.state + off;
      float* hv = (float*)t.state + t.n + off;
      float* dm = (float*)dstate;
      float* dv = dm + std::min(pe, t.n);  // a small tensor in 8-bit mode has a narrower fp32 slot layout
      STC_CK(cudaMemcpyAsync(dm, hm, sizeof(float) * len, cudaMemcpyHostToDevice, s.st));
      STC_CK(cudaMemcpyAsync(dv, hv, sizeof(float) * len, cudaMemcpyHostToDevice, s.st));
      STC_TRY(adamw32_dev(opt->ctx, s.st, dp, dg, dm, dv, len, *hp));
      STC_CK(cudaMemcpyAsync(hm, dm, sizeof(float) * len, cudaMemcpyDeviceToHost, s.st));
      STC_CK(cudaMemcpyAsync(hv, dv, sizeof(float) * len, cudaMemcpyDeviceToHost, s.st));
    }
    STC_CK(cudaMemcpyAsync(s.pin_pg, dp, sizeof(float) * len, cudaMemcpyDeviceToHost, s.st));
    s.pending_dst = p + off;
    s.pending_len = len;
  }
  for (auto& s : opt->slots) STC_TRY(paged_flush(s));
  return 0;
}

int stc_paged_step(stc_paged_opt* opt, int tensor_id, float* p, const float* g, const stc_adamw_hparams* hp) {
  std::lock_guard<std::mutex> lock(opt->mu);
  STC_TRY(enter(opt->ctx));
  STC_TRY(check_hp(hp));
  STC_REQUIRE(tensor_id >= 0 && tensor_id < (int)opt->tensors.size(), "paged optimizer: unknown tensor id %d",
              tensor_id);
  const int st = paged_step_pages(opt, tensor_id, p, g, hp);
  if (st != 0) {
    // A failed step must not leave a slot pointing at this call's p: the caller may free it, and the
    // next step would copy into it. Drain every slot now, while p is still valid: pages whose work
    // completed hand their parameters back (their state was already updated), the rest are dropped.
    for (auto& s : opt->slots) {
      if (cudaStreamSynchronize(s.st) == cudaSuccess && s.pending_len)
        memcpy(s.pending_dst, s.pin_pg, sizeof(float) * (size_t)s.pending_len);
      s.pending_len = 0;
      s.pending_dst = nullptr;
    }
    cudaGetLastError();
  }
  return st;
}

int stc_paged_state_info(stc_paged_opt* opt, int tensor_id, int* is8bit, int64_t* a_bytes, int64_t* b_bytes) {
  std::lock_guard<std::mutex> lock(opt->mu);
  STC_REQUIRE(tensor_id >= 0 && tensor_id < (int)opt->tensors.size(), "paged optimizer: unknown tensor id %d",
              tensor_id);
  const PagedTensor& t = opt->tensors[tensor_id];
  *is8bit = t.is8 ? 1 : 0;
  *a_bytes = t.is8 ? 2 * t.n : 4 * t.n;
  *b_bytes = t.is8 ? 8 * t.nblocks() : 4 * t.n;
  return 0;
}

int stc_paged_state_read(stc_paged_opt* opt, int tensor_id, void* a, void* b) {
  int is8;
  int64_t ab, bb;
  STC_TRY(stc_paged_state_info(opt, tensor_id, &is8, &ab, &bb));
  std::lock_guard<std::mutex> lock(opt->mu);
  const PagedTensor& t = opt->tensors[tensor_id];
  memcpy(a, t.state, (size_t)ab);
  memcpy(b, (uint8_t*)t.state + ab, (size_t)bb);
  return 0;
}

int stc_paged_state_write(stc_paged_opt* opt, int tensor_id, const void* a, const void* b) {
  int is8;
  int64_t ab, bb;
  STC_TRY(stc_paged_state_info(opt, tensor_id, &is8, &ab, &bb));
  std::lock_guard<std::mutex> lock(opt->mu);
  const PagedTensor& t = opt->tensors[tensor_id];
  memcpy(t.state, a, (size_t)ab);
  memcpy((uint8_t*)t.state + ab, b, (size_t)bb);
  return 0;
}

int stc_paged_stats(stc_paged_opt* opt, int64_t* host_pinned_bytes, int64_t* device_bytes) {
  std::lock_guard<std::mutex> lock(opt->mu);
  *host_pinned_bytes = opt->host_bytes;
  *device_bytes = opt->slot_bytes * (int64_t)opt->slots.size();
  return 0;
}

void stc_paged_destroy(stc_paged_opt* opt) {
  if (!opt) return;
  {
    std::lock_guard<std::mutex> lock(opt->mu);
    cudaSetDevice(opt->ctx->device);
    for (auto& s : opt->slots) {
      cudaStreamSynchronize(s.st);
      cudaFree(s.dev);
      cudaFreeHost(s.pin_pg);
      cudaStreamDestroy(s.st);
    }
    for (auto& t : opt->tensors) cudaFreeHost(t.state);
  }
  delete opt;
}

}  // extern "C"
