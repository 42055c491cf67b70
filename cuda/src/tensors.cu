// Device tensors: pool-backed device buffers the caller owns (stc_dev_alloc/stc_dev_free), copies in any
// direction, and the elementwise ops a device-resident stage needs besides the Backend ops (add, bias,
// LoRA dropout mask-scale). Every op entry point here, like the others, takes host or device pointers.
//
// stc_dev_alloc/stc_dev_free/stc_dev_check/stc_dev_stats take only the pool's and the tensor table's
// mutexes, never the context's op mutex: they run on the JS thread and must not wait for a running op.
// The zero fill is queued on the context stream, so it completes before any later op or copy.
#include "common.cuh"

namespace stc {

// y[i] = y[i] + x[i], one correctly rounded fp32 add (what JS's `y[i] += x[i]` stores into a Float32Array:
// a double sum of two floats rounded to float equals the float sum).
__global__ void add_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __fadd_rn(y[i], x[i]);
}

__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, int64_t total, int N) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __fadd_rn(y[i], bias[i % N]);
}

// Bit-for-bit what engine/backend.ts hostTensors computes in JS: x * scale is a float64 product (scale is
// a JS number, not a float), the accumulate is a float64 sum, and only the store rounds to float32.
// The _rn intrinsics forbid FMA contraction.
// out and x may be the same buffer (no __restrict__ on them).
__global__ void mask_scale_kernel(float* out, const float* x,
                                  const uint8_t* __restrict__ mask, double scale, int64_t n, int accumulate) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const bool keep = mask[i] != 0;
    if (accumulate) {
      if (keep) out[i] = __double2float_rn(__dadd_rn((double)out[i], __dmul_rn((double)x[i], scale)));
    } else {
      out[i] = keep ? __double2float_rn(__dmul_rn((double)x[i], scale)) : 0.0f;
    }
  }
}

__global__ void fault_kernel(float* p) { *p = 1.0f; }

}  // namespace stc

using namespace stc;

extern "C" {

int stc_dev_alloc(stc_ctx* ctx, int64_t bytes, void** out) {
  if (out) *out = nullptr;
  STC_TRY(enter(ctx));
  STC_REQUIRE(out != nullptr, "devAlloc: null output pointer");
  STC_REQUIRE(bytes >= 0, "devAlloc: negative size %lld bytes", (long long)bytes);
  const size_t b = bytes == 0 ? 16 : (size_t)bytes;
  void* p = nullptr;
  STC_TRY(ctx->pool.alloc(&p, b));
  const cudaError_t e = cudaMemsetAsync(p, 0, b, ctx->stream);
  if (e != cudaSuccess) {
    ctx->pool.release(p, b);
    return fail_cuda(e, "cudaMemsetAsync (zero-filling a device tensor)", __FILE__, __LINE__);
  }
  {
    std::lock_guard<std::mutex> l(ctx->tensors_mu);
    ctx->tensors[(uintptr_t)p] = b;
    ctx->tensor_bytes += (int64_t)b;
  }
  *out = p;
  return 0;
}

int stc_dev_free(stc_ctx* ctx, void* p, int64_t bytes) {
  STC_TRY(enter(ctx));
  size_t b = 0;
  {
    std::lock_guard<std::mutex> l(ctx->tensors_mu);
    auto it = ctx->tensors.find((uintptr_t)p);
    STC_REQUIRE(it != ctx->tensors.end(), "devFree: %p is not a live device tensor of this context (double free?)", p);
    b = it->second;
    STC_REQUIRE(bytes == (int64_t)b || (bytes == 0 && b == 16), "devFree: %p has %zu bytes, not %lld", p, b,
                (long long)bytes);
    ctx->tensors.erase(it);
    ctx->tensor_bytes -= (int64_t)b;
  }
  // Reuse is ordered after every use without waiting here: device-only ops return with their kernels
  // still queued, but every op, copy and zero fill runs on the one context stream, so whatever reuses this
  // buffer is queued after them. (The caller frees only once its ops on the tensor have returned.)
  ctx->pool.release(p, b);
  return 0;
}

int stc_dev_check(stc_ctx* ctx, const void* p, int64_t bytes) {
  STC_TRY(enter(ctx));
  STC_REQUIRE(bytes >= 0, "devCheck: negative size %lld", (long long)bytes);
  std::lock_guard<std::mutex> l(ctx->tensors_mu);
  const uintptr_t a = (uintptr_t)p;
  auto it = ctx->tensors.upper_bound(a);
  STC_REQUIRE(it != ctx->tensors.begin(), "device address %p is not inside a live device tensor of this context", p);
  --it;
  STC_REQUIRE(a >= it->first && a - it->first + (uint64_t)bytes <= it->second,
              "device range %p + %lld bytes is not inside a live device tensor of this context", p, (long long)bytes);
  return 0;
}

int stc_dev_stats(stc_ctx* ctx, int64_t* tensors, int64_t* tensor_bytes, int64_t* pool_in_use_bytes) {
  *tensors = 0;
  *tensor_bytes = 0;
  *pool_in_use_bytes = 0;
  STC_TRY(enter(ctx));
  {
    std::lock_guard<std::mutex> l(ctx->tensors_mu);
    *tensors = (int64_t)ctx->tensors.size();
    *tensor_bytes = ctx->tensor_bytes;
  }
  *pool_in_use_bytes = ctx->pool.in_use_bytes();
  return 0;
}

int stc_copy(stc_ctx* ctx, void* dst, const void* src, int64_t bytes) {
  STC_TRY(enter(ctx));
  STC_REQUIRE(bytes >= 0, "copy: negative size %lld", (long long)bytes);
  if (bytes == 0) return 0;
  STC_REQUIRE(dst && src, "copy: null %s pointer", dst ? "source" : "destination");
  const bool device_only = device_alias_ok(ctx, dst, 1) && device_alias_ok(ctx, src, 1);
  // A copy touching host memory waits for the queued device-only ops without holding the op mutex, then
  // copies and synchronizes (the host side is valid/consumed on return): the first host read after a
  // failed kernel reports that asynchronous failure here.
  if (!device_only) STC_TRY(drain(ctx));
  OP_ENTER();
  STC_CK(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDefault, ctx->stream));
  if (device_only) {
    ctx->op_launched = true;  // device to device: queued like a kernel
    return 0;
  }
  return sync_stream(ctx, "cudaStreamSynchronize (copy to or from host memory)");
}

int stc_debug_fault(stc_ctx* ctx, int kind) {
  OP_ENTER();
  STC_REQUIRE(kind == 1, "debugFault: unknown kind %d (1 = illegal address)", kind);
  // a kernel that stores through an address no allocation maps: a device-only op whose fault is reported
  // asynchronously, like a real out-of-bounds kernel
  fault_kernel<<<1, 1, 0, ctx->stream>>>(reinterpret_cast<float*>((uintptr_t)0x10));
  STC_LAUNCHED(ctx->stream);
  return 0;
}

int stc_add(stc_ctx* ctx, float* y, const float* x, int64_t n) {
  OP_ENTER();
  STC_REQUIRE(n >= 0, "add: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dY, dX;
  STC_TRY(dY.upload(ctx, y, b));
  STC_TRY(dX.upload(ctx, x, b));
  add_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dY.as<float>(), dX.as<float>(), n);
  STC_LAUNCHED(ctx->stream);
  return dY.download(y, b);
}

int stc_add_bias(stc_ctx* ctx, float* y, const float* bias, int T, int N) {
  OP_ENTER();
  STC_REQUIRE(T >= 0 && N >= 0, "addBias: bad T=%d N=%d", T, N);
  if (T == 0 || N == 0) return 0;
  const int64_t total = (int64_t)T * N;
  DevBuf dY, dB;
  STC_TRY(dY.upload(ctx, y, sizeof(float) * (size_t)total));
  STC_TRY(dB.upload(ctx, bias, sizeof(float) * (size_t)N));
  add_bias_kernel<<<grid1d(total), 256, 0, ctx->stream>>>(dY.as<float>(), dB.as<float>(), total, N);
  STC_LAUNCHED(ctx->stream);
  return dY.download(y, sizeof(float) * (size_t)total);
}

int stc_mask_scale(stc_ctx* ctx, float* out, const float* x, const uint8_t* mask, double scale, int64_t n,
                   int accumulate) {
  OP_ENTER();
  STC_REQUIRE(n >= 0, "maskScale: negative n=%lld", (long long)n);
  if (n == 0) return 0;
  const size_t b = sizeof(float) * (size_t)n;
  DevBuf dO, dX, dM;
  // out is read too when accumulating; x may be out itself (elementwise, in place is safe)
  if (accumulate) STC_TRY(dO.upload(ctx, out, b));
  else STC_TRY(dO.out(ctx, out, b));
  const float* xs = x;
  if (x != out) {
    STC_TRY(dX.upload(ctx, x, b));
    xs = dX.as<float>();
  } else {
    xs = dO.as<float>();
    if (!accumulate && !dO.aliases(out)) STC_CK(cudaMemcpyAsync(dO.ptr, out, b, cudaMemcpyDefault, ctx->stream));
  }
  STC_TRY(dM.upload_input(ctx, mask, (size_t)n, 1));
  mask_scale_kernel<<<grid1d(n), 256, 0, ctx->stream>>>(dO.as<float>(), xs, dM.as<uint8_t>(), scale, n,
                                                           accumulate ? 1 : 0);
  STC_LAUNCHED(ctx->stream);
  return dO.download(out, b);
}

}  // extern "C"
