// Row/head-parallel CPU kernels for the non-GEMM ops of the Backend interface.
#pragma once
#include <cstdint>
#include <string>
#include "pool.h"

// Each returns "" on success or a message naming the offending value (data-dependent checks such as
// ids < V are done here, on the worker thread; size checks are done by the binding before queueing).
std::string rmsnorm_forward(ThreadPool& pool, float* out, float* rstd, const float* x, const float* w, int64_t T,
                            int64_t C, float eps);
std::string rmsnorm_backward(ThreadPool& pool, float* dx, float* dw, const float* dout, const float* x, const float* w,
                             const float* rstd, int64_t T, int64_t C);
std::string rope_apply(ThreadPool& pool, float* x, const float* cos, const float* sin, int64_t max_pos,
                       const int32_t* positions, int64_t T, int64_t H, int64_t D, bool inverse);
std::string attention_forward(ThreadPool& pool, float* out, float* lse, const float* q, const float* k, const float* v,
                              int64_t B, int64_t S, int64_t H, int64_t KV, int64_t D, float scale, float softcap,
                              int64_t window);
std::string attention_backward(ThreadPool& pool, float* dq, float* dk, float* dv, const float* dout, const float* q,
                               const float* k, const float* v, const float* out, const float* lse, int64_t B,
                               int64_t S, int64_t H, int64_t KV, int64_t D, float scale, float softcap,
                               int64_t window);
std::string swiglu_forward(ThreadPool& pool, float* out, const float* gate, const float* up, int64_t n);
std::string swiglu_backward(ThreadPool& pool, float* dgate, float* dup, const float* dout, const float* gate,
                            const float* up, int64_t n);
std::string geglu_forward(ThreadPool& pool, float* out, const float* gate, const float* up, int64_t n);
std::string geglu_backward(ThreadPool& pool, float* dgate, float* dup, const float* dout, const float* gate,
                           const float* up, int64_t n);
std::string softcap_forward(ThreadPool& pool, float* y, const float* x, float cap, int64_t n);
std::string softcap_backward(ThreadPool& pool, float* dx, const float* dy, const float* x, float cap, int64_t n);
std::string embedding_forward(ThreadPool& pool, float* out, const int32_t* ids, const float* table, int64_t T,
                              int64_t C, int64_t V);
std::string ce_chunk_forward(ThreadPool& pool, const float* logits, const int32_t* labels, int64_t v0, int64_t T,
                             int64_t Vc, float* m, float* s, float* picked);
std::string ce_chunk_backward(ThreadPool& pool, float* logits, const int32_t* labels, int64_t v0, int64_t T,
                              int64_t Vc, const float* lse, const float* scale);
