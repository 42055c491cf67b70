// C ABI of libswarmtune_cuda.so: every Backend op, plus device tensors, optimizers, paging and the probe.
//
// Every function returns 0 on success or a nonzero status (a cudaError_t value, or one of the
// STC_E_* codes below); the message for the last failure on the calling thread is stc_last_error().
// Nothing here exits or aborts. Buffers are plain row-major arrays. Every float buffer of an op may be
// host memory or device memory of the context's device (stc_dev_alloc, or any cudaMalloc'd pointer):
// device pointers are used in place, host ones are staged through the context's caching pool. Int32
// inputs (ids, labels, positions) and the NF4 packed codes must be host pointers. The paged optimizer
// (stc_paged_*) takes host pointers only.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define STC_API __attribute__((visibility("default")))

enum {
  STC_OK = 0,
  STC_E_INVALID = 10001,     // bad argument (dimension, unsupported head dim, ...)
  STC_E_NO_DEVICE = 10002,   // no driver / no GPU / bad device index
  STC_E_BUDGET = 10003,      // a paged-optimizer device budget too small for one page
  STC_E_HOST_ALLOC = 10004,  // pinned host allocation failed
};

typedef struct stc_ctx stc_ctx;
typedef struct stc_paged_opt stc_paged_opt;

typedef struct stc_device_info {
  char name[256];
  int64_t total_memory_bytes;
  int64_t free_memory_bytes;
  int cc_major;
  int cc_minor;
  int sm_count;
} stc_device_info;

typedef struct stc_adamw_hparams {
  float lr, beta1, beta2, eps, weight_decay;
  int32_t step;  // 1-based optimizer step t (bias corrections use beta^t)
} stc_adamw_hparams;

STC_API const char* stc_last_error(void);
/** 1 when the last failure on this thread was an asynchronous failure of an earlier op (a kernel of a
 *  device-only op that returned without waiting faulted, and this call is the first to see it), or a
 *  report that the context is unusable after such a failure (sticky error); 0 otherwise */
STC_API int stc_last_error_async(void);
STC_API const char* stc_version(void);
/** number of CUDA devices; fails with the driver's reason when none can be used */
STC_API int stc_device_count(int* count);
STC_API int stc_device_info_get(int device, stc_device_info* out);

/** precision: 0 = bf16 tensor cores (sm_80+, fp32 SIMT below), 1 = fp32 SIMT everywhere */
STC_API int stc_open(int device, int gemm_precision, stc_ctx** out);
STC_API void stc_close(stc_ctx* ctx);
/** Synchronization. An op whose float buffers are all device memory (nothing staged from the host) checks
 *  its launches and returns without waiting: its kernels are queued on the context's stream, which orders
 *  every later op, copy and pool reuse. An op that stages host memory synchronizes before returning, as
 *  does stc_copy to or from host memory (after waiting for the queued ops without the op mutex), so a
 *  fault in a queued kernel is reported there, flagged by stc_last_error_async.
 *  sync_each_op = 1 makes every launch wait, to find a faulting op (cuda/native.ts sets it for SWARMTUNE_CUDA_SYNC=1). */
STC_API int stc_set_sync(stc_ctx* ctx, int sync_each_op);
/** waits until every op queued so far has completed, without holding the context's op mutex meanwhile */
STC_API int stc_sync(stc_ctx* ctx);
/** out8: [0] device-only ops queued without waiting (total), [1] ops that synchronized, [2] host waits,
 *  [3] nanoseconds spent in them, [4] ops queued and not yet known complete, [5] the sticky error (0 none),
 *  [6] sync_each_op, [7] 0 */
STC_API int stc_async_stats(stc_ctx* ctx, int64_t* out8);
/** test hook: kind 1 queues a kernel that stores to an unmapped address (an asynchronous, sticky fault
 *  that poisons the process's CUDA context) */
STC_API int stc_debug_fault(stc_ctx* ctx, int kind);
/** bytes the context's pool holds right now and at most since open */
STC_API int stc_memory_stats(stc_ctx* ctx, int64_t* pool_bytes, int64_t* peak_bytes);

STC_API int stc_gemm(stc_ctx* ctx, int transA, int transB, int M, int N, int K, float alpha,
                     const float* A, const float* B, float beta, float* C);

/** The quantization constants of an NF4 weight of n = rows * cols elements in ceil(n / blocksize) blocks:
 *  float32 absmax per block, or bitsandbytes double quantization when absmax is NULL, where block b's absmax
 *  is code[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset (a float32 product, then a float32 sum:
 *  never fused, as bitsandbytes computes it). The arrays follow the same host/device rules as the packed codes
 *  (qabsmax) and the float buffers (absmax, nested_absmax, code). */
typedef struct stc_nf4_absmax {
  const float* absmax;         /* ceil(n / blocksize) floats, or NULL for double quantization */
  const uint8_t* qabsmax;      /* double quantization: one code per block */
  const float* nested_absmax;  /* double quantization: ceil(blocks / nested_blocksize) floats */
  const float* code;           /* double quantization: the 256-entry map the codes index */
  float offset;                /* double quantization: added after the product */
  int nested_blocksize;        /* double quantization: a power of two in 64..4096 (bitsandbytes: 256) */
} stc_nf4_absmax;

STC_API int stc_gemm_nf4(stc_ctx* ctx, int M, const float* X, const uint8_t* packed, const stc_nf4_absmax* absmax,
                         int rows, int cols, int blocksize, float beta, float* Y);
STC_API int stc_gemm_nf4t(stc_ctx* ctx, int M, const float* DY, const uint8_t* packed, const stc_nf4_absmax* absmax,
                          int rows, int cols, int blocksize, float beta, float* DX);
STC_API int stc_dequant_nf4(stc_ctx* ctx, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows, int cols,
                            int blocksize, float* out);

/** Device-resident NF4 weights. stc_nf4_upload copies a weight to device memory once (its own
 *  cudaMalloc, outside the op pool) and returns an id; the *_resident ops then read it there instead
 *  of uploading it on every call. The caller owns the lifetime: stc_nf4_free releases it, and
 *  stc_close releases whatever is left. Ids are never reused: a freed or unknown id fails with
 *  STC_E_INVALID. The library does not watch the host copy: callers must only cache frozen weights. */
STC_API int stc_nf4_upload(stc_ctx* ctx, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows, int cols,
                           int blocksize, int64_t* weight_id, int64_t* device_bytes);
STC_API int stc_nf4_free(stc_ctx* ctx, int64_t weight_id);
/** device bytes an NF4 weight of this geometry takes when resident: the packed codes, then (each at a 256-byte
 *  boundary) float32 absmax, or for nested_blocksize > 0 (double quantization) the 8-bit codes, the nested
 *  absmax and the 256-entry map; -1 for an invalid geometry */
STC_API int64_t stc_nf4_resident_bytes(int rows, int cols, int blocksize, int nested_blocksize);
/** resident weights held by the context: how many and their device bytes */
STC_API int stc_nf4_stats(stc_ctx* ctx, int64_t* count, int64_t* bytes);
STC_API int stc_gemm_nf4_resident(stc_ctx* ctx, int M, const float* X, int64_t weight_id, float beta, float* Y);
STC_API int stc_gemm_nf4t_resident(stc_ctx* ctx, int M, const float* DY, int64_t weight_id, float beta, float* DX);
STC_API int stc_dequant_nf4_resident(stc_ctx* ctx, int64_t weight_id, float* out);

STC_API int stc_rmsnorm_forward(stc_ctx* ctx, float* out, float* rstd, const float* x, const float* w,
                                int T, int C, float eps);
STC_API int stc_rmsnorm_backward(stc_ctx* ctx, float* dx, float* dw /* nullable */, const float* dout,
                                 const float* x, const float* w, const float* rstd, int T, int C);
STC_API int stc_rope(stc_ctx* ctx, float* x, const float* cos_t, const float* sin_t, int max_pos,
                     const int32_t* positions, int T, int n_heads, int D, int inverse);
STC_API int stc_attention_forward(stc_ctx* ctx, float* out, float* lse, const float* q, const float* k,
                                  const float* v, int B, int S, int H, int KV, int D, float scale, float softcap,
                                  int window);
STC_API int stc_attention_backward(stc_ctx* ctx, float* dq, float* dk, float* dv, const float* dout,
                                   const float* q, const float* k, const float* v, const float* out,
                                   const float* lse, int B, int S, int H, int KV, int D, float scale,
                                   float softcap, int window);
STC_API int stc_geglu_forward(stc_ctx* ctx, float* out, const float* gate, const float* up, int64_t n);
STC_API int stc_geglu_backward(stc_ctx* ctx, float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t n);
STC_API int stc_softcap_forward(stc_ctx* ctx, float* y, const float* x, float cap, int64_t n);
STC_API int stc_softcap_backward(stc_ctx* ctx, float* dx, const float* dy, const float* x, float cap, int64_t n);
STC_API int stc_swiglu_forward(stc_ctx* ctx, float* out, const float* gate, const float* up, int64_t n);
STC_API int stc_swiglu_backward(stc_ctx* ctx, float* dgate, float* dup, const float* dout, const float* gate,
                                const float* up, int64_t n);
STC_API int stc_embedding_forward(stc_ctx* ctx, float* out, const int32_t* ids, const float* table, int T,
                                  int C, int V);
STC_API int stc_cross_entropy_chunk_forward(stc_ctx* ctx, const float* logits, const int32_t* labels, int v0,
                                            int T, int Vc, float* m, float* s, float* picked);
STC_API int stc_cross_entropy_chunk_backward(stc_ctx* ctx, float* logits, const int32_t* labels, int v0, int T,
                                             int Vc, const float* lse, const float* scale);

/** Device tensors. stc_dev_alloc gives a zero-filled device buffer from the context's pool (the fill
 *  is queued on the context stream, so it precedes every later op); stc_dev_free returns it (bytes as
 *  allocated; a pointer that is not a live tensor fails with STC_E_INVALID, so a double free is
 *  reported, not performed). The caller frees a tensor only after its ops have completed. These two,
 *  stc_dev_check and stc_dev_stats do not wait for a running op; stc_close frees what is left. */
STC_API int stc_dev_alloc(stc_ctx* ctx, int64_t bytes, void** p);
STC_API int stc_dev_free(stc_ctx* ctx, void* p, int64_t bytes);
/** 0 when [p, p + bytes) lies inside one live device tensor of this context, else STC_E_INVALID */
STC_API int stc_dev_check(stc_ctx* ctx, const void* p, int64_t bytes);
/** live device tensors and their bytes; bytes of the pool handed out right now (tensors + running ops) */
STC_API int stc_dev_stats(stc_ctx* ctx, int64_t* tensors, int64_t* tensor_bytes, int64_t* pool_in_use_bytes);
/** copies bytes between host and/or device memory in any direction (cudaMemcpyDefault); synchronizes
 *  unless both sides are device memory of the context */
STC_API int stc_copy(stc_ctx* ctx, void* dst, const void* src, int64_t bytes);
/** y[i] += x[i] for i < n (fp32, correctly rounded) */
STC_API int stc_add(stc_ctx* ctx, float* y, const float* x, int64_t n);
/** y[t*N + j] += bias[j] for t < T, j < N */
STC_API int stc_add_bias(stc_ctx* ctx, float* y, const float* bias, int T, int N);
/** accumulate = 0: out[i] = mask[i] ? x[i] * scale : 0; accumulate = 1: out[i] += mask[i] ? x[i] * scale : 0.
 *  Exactly engine/backend.ts hostTensors' JS arithmetic: float64 product and sum, one rounding to float32
 *  at the store. mask is n bytes (host or device); x may be out. */
STC_API int stc_mask_scale(stc_ctx* ctx, float* out, const float* x, const uint8_t* mask, double scale, int64_t n,
                           int accumulate);

/** bitsandbytes 32-bit AdamW (state m, v updated in place) */
STC_API int stc_adamw32(stc_ctx* ctx, float* p, const float* g, float* m, float* v, int64_t n,
                        const stc_adamw_hparams* hp);
/** bitsandbytes 8-bit blockwise AdamW (blocksize 256, dynamic maps) */
STC_API int stc_adamw8bit(stc_ctx* ctx, float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1,
                          float* absmax2, int64_t n, const stc_adamw_hparams* hp);

/** Paged AdamW: state in pinned host pages of page_elems elements (multiple of 256), streamed
 *  through `slots` device staging slots; slots * stc_paged_slot_bytes must fit device_budget_bytes. */
STC_API int64_t stc_paged_slot_bytes(int bits, int64_t page_elems);
STC_API int stc_paged_create(stc_ctx* ctx, int bits, int64_t page_elems, int slots, int64_t device_budget_bytes,
                             stc_paged_opt** out);
/** registers a tensor of n elements; states start at zero. 8-bit mode keeps fp32 state for
 *  n < 4096 (bitsandbytes min_8bit_size). */
STC_API int stc_paged_add(stc_paged_opt* opt, int64_t n, int* tensor_id);
STC_API int stc_paged_step(stc_paged_opt* opt, int tensor_id, float* p, const float* g,
                           const stc_adamw_hparams* hp);
/** copy the state out / in (checkpointing). 32-bit: a=m, b=v as float; 8-bit: a=s1|s2 bytes
 *  (2n), b=absmax1|absmax2 floats. *is8bit tells which layout the tensor uses. */
STC_API int stc_paged_state_info(stc_paged_opt* opt, int tensor_id, int* is8bit, int64_t* a_bytes, int64_t* b_bytes);
STC_API int stc_paged_state_read(stc_paged_opt* opt, int tensor_id, void* a, void* b);
STC_API int stc_paged_state_write(stc_paged_opt* opt, int tensor_id, const void* a, const void* b);
STC_API int stc_paged_stats(stc_paged_opt* opt, int64_t* host_pinned_bytes, int64_t* device_bytes);
STC_API void stc_paged_destroy(stc_paged_opt* opt);

/** short measurements: bf16 tensor-core GEMM TFLOP/s (fp32 SIMT below sm_80) and device copy GB/s */
STC_API int stc_probe(stc_ctx* ctx, double* gemm_tflops, double* bandwidth_gbs);

/** NF4 kernels timed on device-resident data (no host transfers): a random weight [rows, cols] is
 *  built on the device, with float32 absmax or (double_quant = 1) double-quantized constants;
 *  out[0] = dequantization GB/s (packed + constants read, fp32 written), out[1] = dequantization seconds per
 *  call, out[2] = fused NF4 GEMM (X[M,cols]·Wᵀ) TFLOP/s. */
STC_API int stc_bench_nf4(stc_ctx* ctx, int M, int rows, int cols, int blocksize, int double_quant, int iters,
                          double* out3);

/** Pure launch math exposed for host-side tests (no device needed). */
STC_API int stc_gemm_grid(int M, int N, int use_tensor_cores, int* grid_x, int* grid_y, int* threads);
STC_API int stc_attention_grid(int B, int S, int H, int* grid_x, int* grid_y, int* grid_z, int* threads,
                               int D, int* dims_per_thread);

#ifdef __cplusplus
}
#endif
