// Emulator self-test (tests/cuda-emu.test.ts): kernels that show the emulator catches what it claims to — a
// missing barrier, a deadlock, faults, launch and shared-memory limits — and computes warp shuffles and WMMA
// exactly. Built like cuda/src (transform.ts + g++ + the runtime in *.cc); one case per process, since faults are
// sticky.
// Prints "<case> <result>" lines; the test checks them.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace nvcuda;

#define CK(x)                                                                     \
  do {                                                                            \
    cudaError_t e_ = (x);                                                         \
    if (e_ != cudaSuccess) { printf("error %d %s at %s\n", (int)e_, cudaGetErrorName(e_), #x); return 1; } \
  } while (0)

__global__ void warp_sums(float* out, const float* in) {
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  float all = v;
  for (int o = 16; o > 0; o >>= 1) all += __shfl_xor_sync(0xffffffffu, all, o);
  const unsigned gmask = 0xFu << (threadIdx.x & 28);  // groups of 4 lanes, as the attention kernels use
  float g = v;
  g += __shfl_xor_sync(gmask, g, 1);
  g += __shfl_xor_sync(gmask, g, 2);
  const float down = __shfl_down_sync(0xffffffffu, v, 1);
  out[3 * (blockIdx.x * blockDim.x + threadIdx.x) + 0] = all;
  out[3 * (blockIdx.x * blockDim.x + threadIdx.x) + 1] = g;
  out[3 * (blockIdx.x * blockDim.x + threadIdx.x) + 2] = down;
}

// reads a neighbour's shared slot; with_barrier = 0 forgets the __syncthreads between write and read
__global__ void neighbour(float* out, int with_barrier) {
  __shared__ float s[256];
  s[threadIdx.x] = (float)threadIdx.x;
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void deadlock(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 16) __syncthreads();  // the rest of the block never arrives...
  else v = __shfl_xor_sync(0xffffffffu, v, 1);  // ...and waits on lanes 0..15 here
  out[threadIdx.x] = v;
}

__global__ void write_at(float* p) { *p = 1.0f; }

__global__ void read_past(float* out, const float* in, int n) { out[0] = in[n + threadIdx.x]; }

__global__ void __launch_bounds__(128) bounded(float* out) { out[threadIdx.x] = 1.0f; }

__global__ void dyn_smem(float* out) {
  extern __shared__ float buf[];
  buf[threadIdx.x] = (float)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void bad_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x1u, 1.0f, 1); }

__global__ void wmma_tile(float* c, const __nv_bfloat16* a, const __nv_bfloat16* b) {
  __shared__ __align__(32) __nv_bfloat16 as[16 * 16], bs[16 * 16];
  __shared__ __align__(32) float cs[16 * 16];
  for (int i = threadIdx.x; i < 256; i += 32) { as[i] = a[i]; bs[i] = b[i]; }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, as, 16);
  wmma::load_matrix_sync(fb, bs, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(cs, acc, 16, wmma::mem_row_major);
  __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32) c[i] = cs[i];
}

__global__ void wmma_misaligned(float* c) {
  __shared__ __align__(32) float cs[16 * 16 + 8];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.0f);
  wmma::store_matrix_sync(cs + 4, acc, 16, wmma::mem_row_major);  // 16 bytes off a 32-byte boundary
  c[threadIdx.x] = cs[4 + threadIdx.x];
}

__global__ void add_one(float* p, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] += 1.0f;
}

static int run(const char* c) {
  float* d = nullptr;
  CK(cudaMalloc((void**)&d, 4096 * sizeof(float)));
  std::vector<float> h(4096);
  if (!strcmp(c, "shfl")) {
    std::vector<float> in(512);
    for (int i = 0; i < 512; i++) in[i] = (float)(i % 37) - 11.0f;
    float* din = nullptr;
    CK(cudaMalloc((void**)&din, 512 * sizeof(float)));
    CK(cudaMemcpy(din, in.data(), 512 * sizeof(float), cudaMemcpyHostToDevice));
    warp_sums<<<2, 256>>>(d, din);
    CK(cudaGetLastError());
    CK(cudaMemcpy(h.data(), d, 3 * 512 * sizeof(float), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int i = 0; i < 512; i++) {
      float all = 0, grp = 0;
      for (int j = i & ~31; j < (i & ~31) + 32; j++) all += in[j];
      for (int j = i & ~3; j < (i & ~3) + 4; j++) grp += in[j];
      const float down = (i & 31) == 31 ? in[i] : in[i + 1];
      if (h[3 * i] != all || h[3 * i + 1] != grp || h[3 * i + 2] != down) bad++;
    }
    printf("shfl %s\n", bad ? "wrong" : "ok");
  } else if (!strcmp(c, "race")) {
    for (int with = 0; with <= 1; with++) {
      neighbour<<<1, 256>>>(d, with);
      CK(cudaMemcpy(h.data(), d, 256 * sizeof(float), cudaMemcpyDeviceToHost));
      int nan = 0, right = 0;
      for (int i = 0; i < 256; i++) {
        nan += h[i] != h[i];
        right += h[i] == (float)((i + 1) % 256);
      }
      printf("race barrier=%d nan=%d right=%d\n", with, nan, right);
    }
  } else if (!strcmp(c, "deadlock")) {
    deadlock<<<1, 64>>>(d);
    const cudaError_t e = cudaDeviceSynchronize();
    printf("deadlock status=%d sticky=%d\n", (int)e, (int)cudaMalloc((void**)&d, 16));
  } else if (!strcmp(c, "fault")) {
    write_at<<<1, 1>>>(reinterpret_cast<float*>((uintptr_t)0x10));
    const cudaError_t launch = cudaGetLastError();
    const cudaError_t e = cudaDeviceSynchronize();
    printf("fault launch=%d sync=%d sticky=%d\n", (int)launch, (int)e, (int)cudaMalloc((void**)&d, 16));
  } else if (!strcmp(c, "oob")) {
    read_past<<<1, 32>>>(d, d, 4096);
    printf("oob sync=%d\n", (int)cudaDeviceSynchronize());
  } else if (!strcmp(c, "limits")) {
    bounded<<<1, 256>>>(d);
    const cudaError_t a = cudaDeviceSynchronize(), a2 = cudaGetLastError();
    bounded<<<1, 128>>>(d);
    const cudaError_t b = cudaDeviceSynchronize(), b2 = cudaGetLastError();
    add_one<<<1, 1025>>>(d, 4096);
    const cudaError_t big = cudaGetLastError();
    dyn_smem<<<1, 256, 64 << 10>>>(d);
    const cudaError_t dyn = cudaGetLastError();
    const cudaError_t attr = cudaFuncSetAttribute(dyn_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10);
    dyn_smem<<<1, 256, 64 << 10>>>(d);
    const cudaError_t dyn2 = cudaGetLastError();
    CK(cudaMemcpy(h.data(), d, 256 * sizeof(float), cudaMemcpyDeviceToHost));
    const cudaError_t attr_big = cudaFuncSetAttribute(dyn_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 240 << 10);
    printf("limits bounds=%d,%d ok=%d,%d threads=%d dyn=%d attr=%d dyn_opt_in=%d value=%g attr_over=%d\n", (int)a, (int)a2,
           (int)b, (int)b2, (int)big, (int)dyn, (int)attr, (int)dyn2, h[0], (int)attr_big);
  } else if (!strcmp(c, "mask")) {
    bad_mask<<<1, 32>>>(d);
    printf("mask sync=%d\n", (int)cudaDeviceSynchronize());
  } else if (!strcmp(c, "wmma")) {
    std::vector<__nv_bfloat16> a(256), b(256);
    for (int i = 0; i < 256; i++) {
      a[i] = __float2bfloat16_rn(sinf((float)i) * 3.0f);
      b[i] = __float2bfloat16_rn(cosf((float)i * 0.7f));
    }
    __nv_bfloat16 *da = nullptr, *db = nullptr;
    CK(cudaMalloc((void**)&da, 512));
    CK(cudaMalloc((void**)&db, 512));
    CK(cudaMemcpy(da, a.data(), 512, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b.data(), 512, cudaMemcpyHostToDevice));
    wmma_tile<<<1, 32>>>(d, da, db);
    CK(cudaMemcpy(h.data(), d, 256 * sizeof(float), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int m = 0; m < 16; m++)
      for (int n = 0; n < 16; n++) {
        double s = 0;  // bf16 products are exact and 16 of them sum exactly in double: compare within fp32 rounding
        for (int k = 0; k < 16; k++) s += (double)(float)a[m * 16 + k] * (double)(float)b[k * 16 + n];
        if (fabs(h[m * 16 + n] - s) > 1e-5 * (fabs(s) + 1)) bad++;
      }
    wmma_misaligned<<<1, 32>>>(d);
    printf("wmma %s misaligned=%d\n", bad ? "wrong" : "ok", (int)cudaDeviceSynchronize());
  } else if (!strcmp(c, "async")) {
    // queued work runs when the host waits: a pinned destination is not written before the stream is synchronized
    float* pin = nullptr;
    CK(cudaHostAlloc((void**)&pin, 4096 * sizeof(float), cudaHostAllocDefault));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaMemsetAsync(d, 0, 4096 * sizeof(float), st));
    add_one<<<4, 256, 0, st>>>(d, 4096);
    pin[0] = -5.0f;
    CK(cudaMemcpyAsync(pin, d, 4096 * sizeof(float), cudaMemcpyDeviceToHost, st));
    const float before = pin[0];
    CK(cudaStreamSynchronize(st));
    const float after = pin[0];
    // a pageable destination: the copy returns complete
    CK(cudaMemcpyAsync(h.data(), d, 4096 * sizeof(float), cudaMemcpyDeviceToHost, st));
    cudaPointerAttributes pa, ph, pd;
    CK(cudaPointerGetAttributes(&pa, pin));
    CK(cudaPointerGetAttributes(&ph, h.data()));
    CK(cudaPointerGetAttributes(&pd, d + 100));
    printf("async before=%g after=%g pageable=%g types=%d,%d,%d\n", before, after, h[4095], (int)pa.type, (int)ph.type,
           (int)pd.type);
  } else {
    printf("unknown case %s\n", c);
    return 2;
  }
  return 0;
}

int main(int argc, char** argv) { return argc < 2 ? 2 : run(argv[1]); }
