// N-API bindings of the resident NF4 weights (upload once, use by id, free) and of the NF4 benchmark.
#include "binding.h"

namespace stc_addon {
namespace {

// (ctx, packed, absmax, rows, cols, blocksize) -> Promise<{id}>: resolves to the weight id; bytes via nf4ResidentBytes.
// absmax: a Float32Array or the double-quantized object (Args::nf4absmax), host memory
Napi::Value Nf4Upload(const Napi::CallbackInfo& info) {
  Args a(info, "nf4Upload");
  stc_ctx* c = a.ctx(0);
  const uint8_t* P = a.u8(1);
  stc_nf4_absmax S{};
  if (a.ok && info[2].IsBigInt()) a.bad(2, "a Float32Array or a double-quantized absmax object (host memory)");
  else S = a.nf4absmax(2);
  int rows = a.i32(3), cols = a.i32(4), bs = a.i32(5);
  auto result = std::make_shared<double>(0);
  return a.run([=] {
    int64_t id = 0, bytes = 0;
    int s = stc_nf4_upload(c, P, &S, rows, cols, bs, &id, &bytes);
    *result = (double)id;
    return s;
  }, result);
}

// (ctx, id) -> Promise<void>: async so that freeing never waits for a running op on the JS thread
Napi::Value Nf4Free(const Napi::CallbackInfo& info) {
  Args a(info, "nf4Free");
  stc_ctx* c = a.ctx(0);
  int64_t id = a.id(1);
  a.worker = true;  // waits for queued kernels that may read the weight
  return a.run([=] { return stc_nf4_free(c, id); });
}

// (rows, cols, blocksize[, nestedBlocksize]): nestedBlocksize 0 or absent = float32 absmax
Napi::Value Nf4ResidentBytes(const Napi::CallbackInfo& info) {
  Args a(info, "nf4ResidentBytes");
  int rows = a.i32(0), cols = a.i32(1), bs = a.i32(2);
  int nbs = info.Length() > 3 && !info[3].IsUndefined() ? a.i32(3) : 0;
  if (!a.ok) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), (double)stc_nf4_resident_bytes(rows, cols, bs, nbs));
}

Napi::Value Nf4Stats(const Napi::CallbackInfo& info) {
  Args a(info, "nf4Stats");
  stc_ctx* ctx = a.ctx(0);
  if (!a.ok) return info.Env().Undefined();
  int64_t count = 0, bytes = 0;
  int s = stc_nf4_stats(ctx, &count, &bytes);
  if (s) return Throw(info.Env(), s, "nf4Stats");
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("count", (double)count);
  r.Set("bytes", (double)bytes);
  return r;
}

// (ctx, M, X|DY, id, beta, Y|DX)
Napi::Value GemmNF4ResidentCommon(const Napi::CallbackInfo& info, bool transposed) {
  Args a(info, transposed ? "gemmNF4TResident" : "gemmNF4Resident");
  stc_ctx* c = a.ctx(0);
  int M = a.i32(1);
  const float* X = a.f32(2);
  int64_t id = a.id(3);
  float beta = (float)a.num(4);
  float* Y = a.f32(5);
  if (transposed) return a.run([=] { return stc_gemm_nf4t_resident(c, M, X, id, beta, Y); });
  return a.run([=] { return stc_gemm_nf4_resident(c, M, X, id, beta, Y); });
}
Napi::Value GemmNF4Resident(const Napi::CallbackInfo& info) { return GemmNF4ResidentCommon(info, false); }
Napi::Value GemmNF4TResident(const Napi::CallbackInfo& info) { return GemmNF4ResidentCommon(info, true); }

Napi::Value DequantNF4Resident(const Napi::CallbackInfo& info) {
  Args a(info, "dequantNF4Resident");
  stc_ctx* c = a.ctx(0);
  int64_t id = a.id(1);
  float* out = a.f32(2);
  return a.run([=] { return stc_dequant_nf4_resident(c, id, out); });
}

// (ctx, M, rows, cols, blocksize, doubleQuant, iters, out Float64Array[3])
Napi::Value BenchNF4(const Napi::CallbackInfo& info) {
  Args a(info, "benchNF4");
  stc_ctx* c = a.ctx(0);
  int M = a.i32(1), rows = a.i32(2), cols = a.i32(3), bs = a.i32(4);
  int dq = a.flag(5), iters = a.i32(6);
  double* out = a.arr<double>(7, napi_float64_array, "a Float64Array");
  if (a.ok && info[7].As<Napi::TypedArray>().ElementLength() < 3) a.bad(7, "a Float64Array of at least 3 elements");
  return a.run([=] { return stc_bench_nf4(c, M, rows, cols, bs, dq, iters, out); });
}

}  // namespace

void RegisterWeights(Napi::Env env, Napi::Object exports) {
  const Binding bindings[] = {
      {"nf4Upload", Nf4Upload}, {"nf4Free", Nf4Free}, {"nf4ResidentBytes", Nf4ResidentBytes}, {"nf4Stats", Nf4Stats},
      {"gemmNF4Resident", GemmNF4Resident}, {"gemmNF4TResident", GemmNF4TResident},
      {"dequantNF4Resident", DequantNF4Resident}, {"benchNF4", BenchNF4},
  };
  Export(env, exports, bindings);
}

}  // namespace stc_addon
