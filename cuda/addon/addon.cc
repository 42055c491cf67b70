// N-API binding for libswarmtune_cuda.so: marshals typed arrays and device addresses (BigInt) and turns a
// nonzero library status into a rejected promise (cuda/index.ts makes it a CudaError). Float buffers of ops
// are a Float32Array or a device address; see Args::f32.
//
// Two paths (Args::run). An op whose buffers are all device addresses (host int32 ids/labels/positions and
// mask bytes allowed: the library copies those before it returns) runs INLINE on the JS thread: the library
// checks its launches and returns without waiting for the GPU, so the call takes microseconds, and the
// promise is returned already settled (rejected with the same error object on failure). Any op holding
// host float/state memory, and the ops that must wait for the device, run on a libuv worker (AsyncWorker)
// that first waits for the queued device work WITHOUT the context's op mutex (stc_sync), then runs the op
// under it: the mutex is then held only for the op's own work, so an inline launch never blocks behind a
// long download. Counters per context: opStats().
#include <napi.h>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>
#include "../src/api.h"

namespace {

struct CtxBox {
  stc_ctx* ctx = nullptr;
  // JS thread only
  double inline_ops = 0, inline_ns = 0, worker_ops = 0;
};
struct OptBox {
  stc_paged_opt* opt = nullptr;
};

// asynchronous: the failure is a fault of an earlier op's kernel seen now (stc_last_error_async)
Napi::Value MakeError(Napi::Env env, int status, const std::string& msg, const char* op, bool asynchronous = false) {
  Napi::Error err = Napi::Error::New(env, msg.empty() ? std::string(op) + " failed" : msg);
  err.Value().Set("cudaStatus", Napi::Number::New(env, status));
  err.Value().Set("op", Napi::String::New(env, op));
  err.Value().Set("asynchronous", Napi::Boolean::New(env, asynchronous));
  return err.Value();
}

class OpWorker : public Napi::AsyncWorker {
 public:
  // drain: the context whose queued device work is waited for (without its op mutex) before fn runs
  OpWorker(Napi::Env env, const char* op, std::function<int()> fn, std::vector<Napi::ObjectReference> refs,
           std::shared_ptr<double> result, stc_ctx* drain)
      : Napi::AsyncWorker(env, op), deferred_(Napi::Promise::Deferred::New(env)), op_(op), fn_(std::move(fn)),
        refs_(std::move(refs)), result_(std::move(result)), drain_(drain) {}
  void Execute() override {
    status_ = drain_ ? stc_sync(drain_) : 0;
    if (status_ == 0) status_ = fn_();
    if (status_ != 0) {  // thread-local: read on the thread that failed
      msg_ = stc_last_error();
      async_ = stc_last_error_async() != 0;
    }
  }
  void OnOK() override {
    if (status_ == 0) deferred_.Resolve(result_ ? Napi::Value(Napi::Number::New(Env(), *result_)) : Env().Undefined());
    else deferred_.Reject(MakeError(Env(), status_, msg_, op_, async_));
  }
  Napi::Promise Promise() const { return deferred_.Promise(); }

 private:
  Napi::Promise::Deferred deferred_;
  const char* op_;
  std::function<int()> fn_;
  std::vector<Napi::ObjectReference> refs_;  // keeps the typed arrays (and the context handle) alive while the worker runs
  std::shared_ptr<double> result_;           // when set, the promise resolves to this number
  stc_ctx* drain_ = nullptr;
  int status_ = 0;
  bool async_ = false;
  std::string msg_;
};

// Argument reader; the first failure throws a TypeError naming the op and argument position.
struct Args {
  const Napi::CallbackInfo& info;
  const char* op;
  std::vector<Napi::ObjectReference> refs;
  bool ok = true;
  bool host = false;    // a host float/state buffer (or a host output) is involved: the op runs on a worker
  bool worker = false;  // the op waits for the device (a free, a probe): a worker even without host buffers
  Args(const Napi::CallbackInfo& i, const char* o) : info(i), op(o) {}
  Napi::Env env() const { return info.Env(); }
  void bad(size_t i, const char* want) {
    if (ok) {
      std::string m = std::string(op) + ": argument " + std::to_string(i) + " must be " + want;
      Napi::TypeError::New(env(), m).ThrowAsJavaScriptException();
    }
    ok = false;
  }
  // A typed array. input_only: the op only reads it and the library has copied it when the call returns
  // (int32 ids/labels/positions, mask bytes, NF4 codes), so it does not keep the op off the inline path.
  template <class T>
  T* arr(size_t i, napi_typedarray_type want, const char* name, bool nullable = false, bool input_only = false) {
    if (!ok) return nullptr;  // once an exception is pending no further N-API call may be made
    Napi::Value v = info[i];
    if (nullable && (v.IsNull() || v.IsUndefined())) return nullptr;
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != want) {
      bad(i, name);
      return nullptr;
    }
    if (!input_only) host = true;
    Napi::TypedArray a = v.As<Napi::TypedArray>();
    refs.push_back(Napi::Persistent(v.As<Napi::Object>()));
    return reinterpret_cast<T*>(static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset());
  }
  // A float buffer: a Float32Array (host memory) or a device address as a BigInt, which must lie inside a
  // live device tensor of the op's context (parsed before it: every op takes the context first), so a
  // stale or made-up address is a TypeError here instead of a fault in a kernel.
  float* f32(size_t i, bool nullable = false) {
    if (!ok) return nullptr;
    Napi::Value v = info[i];
    if (v.IsBigInt()) return static_cast<float*>(dev(i, 0, "a Float32Array or a live device address (BigInt)"));
    return arr<float>(i, napi_float32_array, "a Float32Array or a device address (BigInt)", nullable);
  }
  // host memory only (the paged optimizer and resident-weight uploads copy with the CPU or need host arrays)
  float* f32h(size_t i) { return arr<float>(i, napi_float32_array, "a Float32Array"); }
  // A device address (BigInt) of at least `bytes` inside one live device tensor of ctx_.
  void* dev(size_t i, int64_t bytes, const char* want) {
    if (!ok) return nullptr;
    Napi::Value v = info[i];
    if (!v.IsBigInt()) {
      bad(i, want);
      return nullptr;
    }
    bool lossless = false;
    uint64_t a = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless || a == 0 || !ctx_ || stc_dev_check(ctx_, reinterpret_cast<const void*>((uintptr_t)a), bytes) != 0) {
      std::string w = std::string(want) + (ctx_ && lossless && a ? std::string(" (") + stc_last_error() + ")" : "");
      bad(i, w.c_str());
      return nullptr;
    }
    return reinterpret_cast<void*>((uintptr_t)a);
  }
  // Either side of a copy: a typed array holding at least `bytes` bytes, or a device address of a
  // live tensor with at least `bytes` bytes from it.
  void* mem(size_t i, int64_t bytes) {
    if (!ok) return nullptr;
    Napi::Value v = info[i];
    if (v.IsBigInt()) return dev(i, bytes, "a live device address (BigInt) with room for the copy");
    if (!v.IsTypedArray()) {
      bad(i, "a typed array or a device address (BigInt)");
      return nullptr;
    }
    Napi::TypedArray a = v.As<Napi::TypedArray>();
    if ((int64_t)a.ByteLength() < bytes) {
      bad(i, ("a typed array of at least " + std::to_string(bytes) + " bytes").c_str());
      return nullptr;
    }
    host = true;
    refs.push_back(Napi::Persistent(v.As<Napi::Object>()));
    return static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset();
  }
  int32_t* i32a(size_t i) { return arr<int32_t>(i, napi_int32_array, "an Int32Array", false, true); }
  // bytes the op writes or keeps using (optimizer state): host memory, worker path
  uint8_t* u8(size_t i) { return arr<uint8_t>(i, napi_uint8_array, "a Uint8Array"); }
  // bytes the op only reads (mask, NF4 codes)
  uint8_t* u8in(size_t i) { return arr<uint8_t>(i, napi_uint8_array, "a Uint8Array", false, true); }
  double num(size_t i) {
    if (!ok) return 0;
    if (!info[i].IsNumber()) {
      bad(i, "a number");
      return 0;
    }
    return info[i].As<Napi::Number>().DoubleValue();
  }
  int i32(size_t i) { return (int)num(i); }
  int64_t i64(size_t i) { return (int64_t)num(i); }
  bool flag(size_t i) {
    if (!ok) return false;
    if (!info[i].IsBoolean()) {
      bad(i, "a boolean");
      return false;
    }
    return info[i].As<Napi::Boolean>().Value();
  }
  stc_ctx* ctx_ = nullptr;  // the op's context once parsed (device addresses are checked against it)
  CtxBox* box_ = nullptr;
  stc_ctx* ctx(size_t i) {
    if (!ok) return nullptr;
    if (!info[i].IsExternal()) {
      bad(i, "a CUDA context");
      return nullptr;
    }
    box_ = info[i].As<Napi::External<CtxBox>>().Data();
    stc_ctx* c = box_->ctx;
    if (!c && ok) {
      Napi::Error::New(env(), std::string(op) + ": CUDA backend already disposed").ThrowAsJavaScriptException();
      ok = false;
      return nullptr;
    }
    // a context collected while its op is queued would be closed under the worker
    refs.push_back(Napi::Persistent(info[i].As<Napi::Object>()));
    ctx_ = c;
    return c;
  }
  stc_paged_opt* opt(size_t i) {
    if (!ok) return nullptr;
    if (!info[i].IsExternal()) {
      bad(i, "a paged optimizer");
      return nullptr;
    }
    stc_paged_opt* o = info[i].As<Napi::External<OptBox>>().Data()->opt;
    if (!o && ok) {
      Napi::Error::New(env(), std::string(op) + ": paged optimizer already destroyed").ThrowAsJavaScriptException();
      ok = false;
    }
    return o;
  }
  // Weight ids travel as numbers: integers below 2^53.
  int64_t id(size_t i) {
    double v = num(i);
    if (ok && !(v >= 1 && v <= 9007199254740991.0 && v == (double)(int64_t)v)) bad(i, "a resident weight id (a positive integer)");
    return ok ? (int64_t)v : 0;
  }
  Napi::Value run(std::function<int()> fn, std::shared_ptr<double> result = nullptr) {
    if (!ok) return env().Undefined();
    if (ctx_ && !host && !worker) {
      // Inline: every buffer is device memory, so the library only launches (its int32/mask inputs are
      // copied before it returns) and does not wait for the GPU. The op mutex it takes is held by a worker
      // only for that worker's own work (workers drain the queue before taking it).
      const auto t0 = std::chrono::steady_clock::now();
      const int st = fn();
      box_->inline_ns += (double)std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::steady_clock::now() - t0).count();
      box_->inline_ops++;
      Napi::Promise::Deferred d = Napi::Promise::Deferred::New(env());
      if (st == 0) d.Resolve(result ? Napi::Value(Napi::Number::New(env(), *result)) : env().Undefined());
      else d.Reject(MakeError(env(), st, stc_last_error(), op, stc_last_error_async() != 0));
      return d.Promise();
    }
    if (box_) box_->worker_ops++;
    auto* w = new OpWorker(env(), op, std::move(fn), std::move(refs), std::move(result), ctx_);
    Napi::Promise p = w->Promise();
    w->Queue();
    return p;
  }
};

stc_adamw_hparams Hp(Args& a, size_t i) {
  stc_adamw_hparams hp;
  hp.lr = (float)a.num(i);
  hp.beta1 = (float)a.num(i + 1);
  hp.beta2 = (float)a.num(i + 2);
  hp.eps = (float)a.num(i + 3);
  hp.weight_decay = (float)a.num(i + 4);
  hp.step = a.i32(i + 5);
  return hp;
}

Napi::Value Throw(Napi::Env env, int status, const char* op) {
  napi_throw(env, MakeError(env, status, stc_last_error(), op, stc_last_error_async() != 0));
  return env.Undefined();
}

Napi::Value Version(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), stc_version()); }

Napi::Value DeviceCount(const Napi::CallbackInfo& info) {
  int n = 0;
  int s = stc_device_count(&n);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("count", n);
  r.Set("reason", s ? Napi::Value(Napi::String::New(info.Env(), stc_last_error())) : info.Env().Null());
  return r;
}

Napi::Value DeviceInfo(const Napi::CallbackInfo& info) {
  Args a(info, "deviceInfo");
  int dev = a.i32(0);
  if (!a.ok) return info.Env().Undefined();
  stc_device_info d;
  int s = stc_device_info_get(dev, &d);
  if (s) return Throw(info.Env(), s, "deviceInfo");
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("name", d.name);
  r.Set("totalMemoryBytes", (double)d.total_memory_bytes);
  r.Set("freeMemoryBytes", (double)d.free_memory_bytes);
  r.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
  r.Set("smCount", d.sm_count);
  return r;
}

Napi::Value Open(const Napi::CallbackInfo& info) {
  Args a(info, "open");
  int dev = a.i32(0), prec = a.i32(1);
  if (!a.ok) return info.Env().Undefined();
  stc_ctx* ctx = nullptr;
  int s = stc_open(dev, prec, &ctx);
  if (s) return Throw(info.Env(), s, "open");
  auto* box = new CtxBox{ctx};
  // A context the JS side never closed is closed when its handle is collected.
  return Napi::External<CtxBox>::New(info.Env(), box, [](Napi::Env, CtxBox* b) {
    if (b->ctx) stc_close(b->ctx);
    delete b;
  });
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  if (info[0].IsExternal()) {
    CtxBox* b = info[0].As<Napi::External<CtxBox>>().Data();
    if (b->ctx) stc_close(b->ctx);
    b->ctx = nullptr;
  }
  return info.Env().Undefined();
}

Napi::Value MemoryStats(const Napi::CallbackInfo& info) {
  Args a(info, "memoryStats");
  stc_ctx* ctx = a.ctx(0);
  if (!a.ok) return info.Env().Undefined();
  int64_t pool = 0, peak = 0;
  stc_memory_stats(ctx, &pool, &peak);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("poolBytes", (double)pool);
  r.Set("peakPoolBytes", (double)peak);
  return r;
}

Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Args a(info, "gemm");
  stc_ctx* c = a.ctx(0);
  int tA = a.flag(1), tB = a.flag(2), M = a.i32(3), N = a.i32(4), K = a.i32(5);
  float alpha = (float)a.num(6);
  const float* A = a.f32(7);
  const float* B = a.f32(8);
  float beta = (float)a.num(9);
  float* C = a.f32(10);
  return a.run([=] { return stc_gemm(c, tA, tB, M, N, K, alpha, A, B, beta, C); });
}

// (ctx, M, X|DY, packed, absmax, rows, cols, blocksize, beta, Y|DX)
Napi::Value GemmNF4Common(const Napi::CallbackInfo& info, bool transposed) {
  Args a(info, transposed ? "gemmNF4T" : "gemmNF4");
  stc_ctx* c = a.ctx(0);
  int M = a.i32(1);
  const float* X = a.f32(2);
  const uint8_t* P = a.u8in(3);
  const float* S = a.f32(4);
  int rows = a.i32(5), cols = a.i32(6), bs = a.i32(7);
  float beta = (float)a.num(8);
  float* Y = a.f32(9);
  if (transposed) return a.run([=] { return stc_gemm_nf4t(c, M, X, P, S, rows, cols, bs, beta, Y); });
  return a.run([=] { return stc_gemm_nf4(c, M, X, P, S, rows, cols, bs, beta, Y); });
}
Napi::Value GemmNF4(const Napi::CallbackInfo& info) { return GemmNF4Common(info, false); }
Napi::Value GemmNF4T(const Napi::CallbackInfo& info) { return GemmNF4Common(info, true); }

Napi::Value DequantNF4(const Napi::CallbackInfo& info) {
  Args a(info, "dequantNF4");
  stc_ctx* c = a.ctx(0);
  const uint8_t* P = a.u8in(1);
  const float* S = a.f32(2);
  int rows = a.i32(3), cols = a.i32(4), bs = a.i32(5);
  float* out = a.f32(6);
  return a.run([=] { return stc_dequant_nf4(c, P, S, rows, cols, bs, out); });
}

// (ctx, packed, absmax, rows, cols, blocksize) -> Promise<{id}>: resolves to the weight id; bytes via nf4ResidentBytes
Napi::Value Nf4Upload(const Napi::CallbackInfo& info) {
  Args a(info, "nf4Upload");
  stc_ctx* c = a.ctx(0);
  const uint8_t* P = a.u8(1);
  const float* S = a.f32h(2);
  int rows = a.i32(3), cols = a.i32(4), bs = a.i32(5);
  auto result = std::make_shared<double>(0);
  return a.run([=] {
    int64_t id = 0, bytes = 0;
    int s = stc_nf4_upload(c, P, S, rows, cols, bs, &id, &bytes);
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

Napi::Value Nf4ResidentBytes(const Napi::CallbackInfo& info) {
  Args a(info, "nf4ResidentBytes");
  int rows = a.i32(0), cols = a.i32(1), bs = a.i32(2);
  if (!a.ok) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), (double)stc_nf4_resident_bytes(rows, cols, bs));
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

// (ctx, M, rows, cols, blocksize, iters, out Float64Array[3])
Napi::Value BenchNF4(const Napi::CallbackInfo& info) {
  Args a(info, "benchNF4");
  stc_ctx* c = a.ctx(0);
  int M = a.i32(1), rows = a.i32(2), cols = a.i32(3), bs = a.i32(4), iters = a.i32(5);
  double* out = a.arr<double>(6, napi_float64_array, "a Float64Array");
  if (a.ok && info[6].As<Napi::TypedArray>().ElementLength() < 3) a.bad(6, "a Float64Array of at least 3 elements");
  return a.run([=] { return stc_bench_nf4(c, M, rows, cols, bs, iters, out); });
}

Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
  Args a(info, "rmsnormForward");
  stc_ctx* c = a.ctx(0);
  float *out = a.f32(1), *rstd = a.f32(2);
  const float *x = a.f32(3), *w = a.f32(4);
  int T = a.i32(5), C = a.i32(6);
  float eps = (float)a.num(7);
  return a.run([=] { return stc_rmsnorm_forward(c, out, rstd, x, w, T, C, eps); });
}

Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
  Args a(info, "rmsnormBackward");
  stc_ctx* c = a.ctx(0);
  float* dx = a.f32(1);
  float* dw = a.f32(2, true);
  const float *dout = a.f32(3), *x = a.f32(4), *w = a.f32(5), *rstd = a.f32(6);
  int T = a.i32(7), C = a.i32(8);
  return a.run([=] { return stc_rmsnorm_backward(c, dx, dw, dout, x, w, rstd, T, C); });
}

Napi::Value Rope(const Napi::CallbackInfo& info) {
  Args a(info, "rope");
  stc_ctx* c = a.ctx(0);
  float* x = a.f32(1);
  const float *cs = a.f32(2), *sn = a.f32(3);
  int maxPos = a.i32(4);
  const int32_t* pos = a.i32a(5);
  int T = a.i32(6), nh = a.i32(7), D = a.i32(8);
  int inv = a.flag(9);
  return a.run([=] { return stc_rope(c, x, cs, sn, maxPos, pos, T, nh, D, inv); });
}

Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
  Args a(info, "attentionForward");
  stc_ctx* c = a.ctx(0);
  float *out = a.f32(1), *lse = a.f32(2);
  const float *q = a.f32(3), *k = a.f32(4), *v = a.f32(5);
  int B = a.i32(6), S = a.i32(7), H = a.i32(8), KV = a.i32(9), D = a.i32(10);
  return a.run([=] { return stc_attention_forward(c, out, lse, q, k, v, B, S, H, KV, D); });
}

Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  Args a(info, "attentionBackward");
  stc_ctx* c = a.ctx(0);
  float *dq = a.f32(1), *dk = a.f32(2), *dv = a.f32(3);
  const float *dout = a.f32(4), *q = a.f32(5), *k = a.f32(6), *v = a.f32(7), *out = a.f32(8), *lse = a.f32(9);
  int B = a.i32(10), S = a.i32(11), H = a.i32(12), KV = a.i32(13), D = a.i32(14);
  return a.run([=] { return stc_attention_backward(c, dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D); });
}

Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
  Args a(info, "swigluForward");
  stc_ctx* c = a.ctx(0);
  float* out = a.f32(1);
  const float *g = a.f32(2), *u = a.f32(3);
  int64_t n = a.i64(4);
  return a.run([=] { return stc_swiglu_forward(c, out, g, u, n); });
}

Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  Args a(info, "swigluBackward");
  stc_ctx* c = a.ctx(0);
  float *dg = a.f32(1), *du = a.f32(2);
  const float *dout = a.f32(3), *g = a.f32(4), *u = a.f32(5);
  int64_t n = a.i64(6);
  return a.run([=] { return stc_swiglu_backward(c, dg, du, dout, g, u, n); });
}

Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
  Args a(info, "embeddingForward");
  stc_ctx* c = a.ctx(0);
  float* out = a.f32(1);
  const int32_t* ids = a.i32a(2);
  const float* table = a.f32(3);
  int T = a.i32(4), C = a.i32(5), V = a.i32(6);
  return a.run([=] { return stc_embedding_forward(c, out, ids, table, T, C, V); });
}

Napi::Value CeForward(const Napi::CallbackInfo& info) {
  Args a(info, "crossEntropyChunkForward");
  stc_ctx* c = a.ctx(0);
  const float* logits = a.f32(1);
  const int32_t* labels = a.i32a(2);
  int v0 = a.i32(3), T = a.i32(4), Vc = a.i32(5);
  float *m = a.f32(6), *s = a.f32(7), *picked = a.f32(8);
  return a.run([=] { return stc_cross_entropy_chunk_forward(c, logits, labels, v0, T, Vc, m, s, picked); });
}

Napi::Value CeBackward(const Napi::CallbackInfo& info) {
  Args a(info, "crossEntropyChunkBackward");
  stc_ctx* c = a.ctx(0);
  float* logits = a.f32(1);
  const int32_t* labels = a.i32a(2);
  int v0 = a.i32(3), T = a.i32(4), Vc = a.i32(5);
  const float *lse = a.f32(6), *scale = a.f32(7);
  return a.run([=] { return stc_cross_entropy_chunk_backward(c, logits, labels, v0, T, Vc, lse, scale); });
}

// (ctx, p, g, m, v, n, lr, b1, b2, eps, wd, step)
Napi::Value AdamW32(const Napi::CallbackInfo& info) {
  Args a(info, "adamw32");
  stc_ctx* c = a.ctx(0);
  float* p = a.f32(1);
  const float* g = a.f32(2);
  float *m = a.f32(3), *v = a.f32(4);
  int64_t n = a.i64(5);
  stc_adamw_hparams hp = Hp(a, 6);
  return a.run([=] { return stc_adamw32(c, p, g, m, v, n, &hp); });
}

// (ctx, p, g, s1, s2, absmax1, absmax2, n, lr, b1, b2, eps, wd, step)
Napi::Value AdamW8bit(const Napi::CallbackInfo& info) {
  Args a(info, "adamw8bit");
  stc_ctx* c = a.ctx(0);
  float* p = a.f32(1);
  const float* g = a.f32(2);
  uint8_t *s1 = a.u8(3), *s2 = a.u8(4);
  float *a1 = a.f32(5), *a2 = a.f32(6);
  int64_t n = a.i64(7);
  stc_adamw_hparams hp = Hp(a, 8);
  return a.run([=] { return stc_adamw8bit(c, p, g, s1, s2, a1, a2, n, &hp); });
}

Napi::Value PagedSlotBytes(const Napi::CallbackInfo& info) {
  Args a(info, "pagedSlotBytes");
  int bits = a.i32(0);
  int64_t pe = a.i64(1);
  if (!a.ok) return info.Env().Undefined();
  return Napi::Number::New(info.Env(), (double)stc_paged_slot_bytes(bits, pe));
}

// (ctx, bits, pageElems, slots, deviceBudgetBytes) -> handle (sync: only allocates)
Napi::Value PagedCreate(const Napi::CallbackInfo& info) {
  Args a(info, "pagedCreate");
  stc_ctx* c = a.ctx(0);
  int bits = a.i32(1);
  int64_t pe = a.i64(2);
  int slots = a.i32(3);
  int64_t budget = a.i64(4);
  if (!a.ok) return info.Env().Undefined();
  stc_paged_opt* opt = nullptr;
  int s = stc_paged_create(c, bits, pe, slots, budget, &opt);
  if (s) return Throw(info.Env(), s, "pagedCreate");
  return Napi::External<OptBox>::New(info.Env(), new OptBox{opt}, [](Napi::Env, OptBox* b) {
    // Collected without destroy(): the context may already be closed, so only the box is freed.
    delete b;
  });
}

Napi::Value PagedAdd(const Napi::CallbackInfo& info) {
  Args a(info, "pagedAdd");
  stc_paged_opt* o = a.opt(0);
  int64_t n = a.i64(1);
  if (!a.ok) return info.Env().Undefined();
  int id = -1;
  int s = stc_paged_add(o, n, &id);
  if (s) return Throw(info.Env(), s, "pagedAdd");
  return Napi::Number::New(info.Env(), id);
}

// (opt, id, p, g, lr, b1, b2, eps, wd, step)
Napi::Value PagedStep(const Napi::CallbackInfo& info) {
  Args a(info, "pagedStep");
  stc_paged_opt* o = a.opt(0);
  int id = a.i32(1);
  float* p = a.f32h(2);  // the paged step copies p and g through pinned pages with memcpy: host only
  const float* g = a.f32h(3);
  stc_adamw_hparams hp = Hp(a, 4);
  return a.run([=] { return stc_paged_step(o, id, p, g, &hp); });
}

Napi::Value PagedStateInfo(const Napi::CallbackInfo& info) {
  Args a(info, "pagedStateInfo");
  stc_paged_opt* o = a.opt(0);
  int id = a.i32(1);
  if (!a.ok) return info.Env().Undefined();
  int is8 = 0;
  int64_t ab = 0, bb = 0;
  int s = stc_paged_state_info(o, id, &is8, &ab, &bb);
  if (s) return Throw(info.Env(), s, "pagedStateInfo");
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("is8bit", Napi::Boolean::New(info.Env(), is8 != 0));
  r.Set("aBytes", (double)ab);
  r.Set("bBytes", (double)bb);
  return r;
}

Napi::Value PagedStateRW(const Napi::CallbackInfo& info, bool write) {
  Args a(info, write ? "pagedStateWrite" : "pagedStateRead");
  stc_paged_opt* o = a.opt(0);
  int id = a.i32(1);
  uint8_t* A = a.u8(2);
  uint8_t* B = a.u8(3);
  if (!a.ok) return info.Env().Undefined();
  int s = write ? stc_paged_state_write(o, id, A, B) : stc_paged_state_read(o, id, A, B);
  if (s) return Throw(info.Env(), s, write ? "pagedStateWrite" : "pagedStateRead");
  return info.Env().Undefined();
}
Napi::Value PagedStateRead(const Napi::CallbackInfo& info) { return PagedStateRW(info, false); }
Napi::Value PagedStateWrite(const Napi::CallbackInfo& info) { return PagedStateRW(info, true); }

Napi::Value PagedStats(const Napi::CallbackInfo& info) {
  Args a(info, "pagedStats");
  stc_paged_opt* o = a.opt(0);
  if (!a.ok) return info.Env().Undefined();
  int64_t h = 0, d = 0;
  stc_paged_stats(o, &h, &d);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("hostPinnedBytes", (double)h);
  r.Set("deviceBytes", (double)d);
  return r;
}

Napi::Value PagedDestroy(const Napi::CallbackInfo& info) {
  if (info[0].IsExternal()) {
    OptBox* b = info[0].As<Napi::External<OptBox>>().Data();
    if (b->opt) stc_paged_destroy(b->opt);
    b->opt = nullptr;
  }
  return info.Env().Undefined();
}

// Probe runs ~100 ms of device work, so it is async too; results land in a shared holder.
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Args a(info, "probe");
  stc_ctx* c = a.ctx(0);
  double* out = a.arr<double>(1, napi_float64_array, "a Float64Array");
  if (a.ok && info[1].As<Napi::TypedArray>().ElementLength() < 2) a.bad(1, "a Float64Array of at least 2 elements");
  return a.run([=] { return stc_probe(c, &out[0], &out[1]); });
}

// (ctx, bytes) -> BigInt device address of a zero-filled tensor. Synchronous: takes the pool's lock, not the
// op mutex, so it never waits for a running op (the fill is queued on the context stream).
Napi::Value DevAlloc(const Napi::CallbackInfo& info) {
  Args a(info, "devAlloc");
  stc_ctx* c = a.ctx(0);
  double bytes = a.num(1);
  if (a.ok && !(bytes >= 0 && bytes <= 9007199254740991.0 && bytes == (double)(int64_t)bytes)) a.bad(1, "a byte count (a non-negative integer)");
  if (!a.ok) return info.Env().Undefined();
  void* p = nullptr;
  int s = stc_dev_alloc(c, (int64_t)bytes, &p);
  if (s) return Throw(info.Env(), s, "devAlloc");
  return Napi::BigInt::New(info.Env(), (uint64_t)(uintptr_t)p);
}

// (ctx, address BigInt, bytes) -> undefined; synchronous like devAlloc. A stale address is an error, not a free.
Napi::Value DevFree(const Napi::CallbackInfo& info) {
  Args a(info, "devFree");
  stc_ctx* c = a.ctx(0);
  bool lossless = false;
  uint64_t addr = 0;
  if (a.ok && !info[1].IsBigInt()) a.bad(1, "a device address (BigInt)");
  if (a.ok) addr = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  if (a.ok && !lossless) a.bad(1, "a device address (BigInt below 2^64)");
  int64_t bytes = a.i64(2);
  if (!a.ok) return info.Env().Undefined();
  int s = stc_dev_free(c, reinterpret_cast<void*>((uintptr_t)addr), bytes);
  if (s) return Throw(info.Env(), s, "devFree");
  return info.Env().Undefined();
}

Napi::Value DevStats(const Napi::CallbackInfo& info) {
  Args a(info, "devStats");
  stc_ctx* c = a.ctx(0);
  if (!a.ok) return info.Env().Undefined();
  int64_t n = 0, bytes = 0, inUse = 0;
  int s = stc_dev_stats(c, &n, &bytes, &inUse);
  if (s) return Throw(info.Env(), s, "devStats");
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("tensors", (double)n);
  r.Set("tensorBytes", (double)bytes);
  r.Set("poolInUseBytes", (double)inUse);
  return r;
}

// (ctx, dst, src, bytes): each side a typed array or a device address; both are range-checked here.
Napi::Value Copy(const Napi::CallbackInfo& info) {
  Args a(info, "copy");
  stc_ctx* c = a.ctx(0);
  double nb = a.num(3);
  if (a.ok && !(nb >= 0 && nb <= 9007199254740991.0 && nb == (double)(int64_t)nb)) a.bad(3, "a byte count (a non-negative integer)");
  int64_t bytes = a.ok ? (int64_t)nb : 0;
  void* dst = a.mem(1, bytes);
  const void* src = a.mem(2, bytes);
  return a.run([=] { return stc_copy(c, dst, src, bytes); });
}

Napi::Value Add(const Napi::CallbackInfo& info) {
  Args a(info, "add");
  stc_ctx* c = a.ctx(0);
  float* y = a.f32(1);
  const float* x = a.f32(2);
  int64_t n = a.i64(3);
  return a.run([=] { return stc_add(c, y, x, n); });
}

Napi::Value AddBias(const Napi::CallbackInfo& info) {
  Args a(info, "addBias");
  stc_ctx* c = a.ctx(0);
  float* y = a.f32(1);
  const float* bias = a.f32(2);
  int T = a.i32(3), N = a.i32(4);
  return a.run([=] { return stc_add_bias(c, y, bias, T, N); });
}

// (ctx, out, x, mask Uint8Array, scale, n, accumulate)
Napi::Value MaskScale(const Napi::CallbackInfo& info) {
  Args a(info, "maskScale");
  stc_ctx* c = a.ctx(0);
  float* out = a.f32(1);
  const float* x = a.f32(2);
  const uint8_t* mask = a.u8in(3);
  double scale = a.num(4);
  int64_t n = a.i64(5);
  int acc = a.flag(6);
  return a.run([=] { return stc_mask_scale(c, out, x, mask, scale, n, acc); });
}

// (ctx) -> per-context op counters: the addon's paths and the library's waits
Napi::Value OpStats(const Napi::CallbackInfo& info) {
  Args a(info, "opStats");
  stc_ctx* c = a.ctx(0);
  if (!a.ok) return info.Env().Undefined();
  int64_t s8[8];
  int s = stc_async_stats(c, s8);
  if (s) return Throw(info.Env(), s, "opStats");
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("inlineOps", a.box_->inline_ops);
  r.Set("inlineNs", a.box_->inline_ns);
  r.Set("workerOps", a.box_->worker_ops);
  r.Set("asyncOps", (double)s8[0]);
  r.Set("syncedOps", (double)s8[1]);
  r.Set("waits", (double)s8[2]);
  r.Set("waitNs", (double)s8[3]);
  r.Set("pendingOps", (double)s8[4]);
  r.Set("stickyStatus", (double)s8[5]);
  r.Set("syncEachOp", Napi::Boolean::New(info.Env(), s8[6] != 0));
  return r;
}

// (ctx, syncEachOp boolean) -> undefined
Napi::Value SetSync(const Napi::CallbackInfo& info) {
  Args a(info, "setSync");
  stc_ctx* c = a.ctx(0);
  bool on = a.flag(1);
  if (!a.ok) return info.Env().Undefined();
  int s = stc_set_sync(c, on ? 1 : 0);
  if (s) return Throw(info.Env(), s, "setSync");
  return info.Env().Undefined();
}

// (ctx) -> Promise<void>: settles once every op queued so far has completed (a worker waits for it)
Napi::Value Sync(const Napi::CallbackInfo& info) {
  Args a(info, "sync");
  a.ctx(0);
  a.worker = true;
  return a.run([=] { return 0; });  // the worker's drain is the wait
}

// (ctx, kind) -> Promise<void>: test hook, queues a faulting kernel (inline: a device-only op)
Napi::Value DebugFault(const Napi::CallbackInfo& info) {
  Args a(info, "debugFault");
  stc_ctx* c = a.ctx(0);
  int kind = a.i32(1);
  return a.run([=] { return stc_debug_fault(c, kind); });
}

Napi::Value GemmGrid(const Napi::CallbackInfo& info) {
  Args a(info, "gemmGrid");
  int M = a.i32(0), N = a.i32(1), tc = a.flag(2);
  if (!a.ok) return info.Env().Undefined();
  int gx, gy, th;
  stc_gemm_grid(M, N, tc, &gx, &gy, &th);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("gridX", gx);
  r.Set("gridY", gy);
  r.Set("threads", th);
  return r;
}

Napi::Value AttentionGrid(const Napi::CallbackInfo& info) {
  Args a(info, "attentionGrid");
  int B = a.i32(0), S = a.i32(1), H = a.i32(2), D = a.i32(3);
  if (!a.ok) return info.Env().Undefined();
  int gx, gy, gz, th, dpt;
  int s = stc_attention_grid(B, S, H, &gx, &gy, &gz, &th, D, &dpt);
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("gridX", gx);
  r.Set("gridY", gy);
  r.Set("gridZ", gz);
  r.Set("threads", th);
  r.Set("dimsPerThread", dpt);
  r.Set("supported", Napi::Boolean::New(info.Env(), s == 0));
  return r;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  struct Entry {
    const char* name;
    Napi::Value (*fn)(const Napi::CallbackInfo&);
  };
  const Entry entries[] = {
      {"version", Version}, {"deviceCount", DeviceCount}, {"deviceInfo", DeviceInfo}, {"open", Open},
      {"close", Close}, {"memoryStats", MemoryStats}, {"gemm", Gemm}, {"gemmNF4", GemmNF4}, {"gemmNF4T", GemmNF4T},
      {"dequantNF4", DequantNF4}, {"rmsnormForward", RmsnormForward}, {"rmsnormBackward", RmsnormBackward},
      {"rope", Rope}, {"attentionForward", AttentionForward}, {"attentionBackward", AttentionBackward},
      {"swigluForward", SwigluForward}, {"swigluBackward", SwigluBackward}, {"embeddingForward", EmbeddingForward},
      {"crossEntropyChunkForward", CeForward}, {"crossEntropyChunkBackward", CeBackward}, {"adamw32", AdamW32},
      {"adamw8bit", AdamW8bit}, {"pagedSlotBytes", PagedSlotBytes}, {"pagedCreate", PagedCreate},
      {"pagedAdd", PagedAdd}, {"pagedStep", PagedStep}, {"pagedStateInfo", PagedStateInfo},
      {"pagedStateRead", PagedStateRead}, {"pagedStateWrite", PagedStateWrite}, {"pagedStats", PagedStats},
      {"pagedDestroy", PagedDestroy}, {"probe", Probe}, {"gemmGrid", GemmGrid}, {"attentionGrid", AttentionGrid},
      {"nf4Upload", Nf4Upload}, {"nf4Free", Nf4Free}, {"nf4ResidentBytes", Nf4ResidentBytes}, {"nf4Stats", Nf4Stats},
      {"gemmNF4Resident", GemmNF4Resident}, {"gemmNF4TResident", GemmNF4TResident},
      {"dequantNF4Resident", DequantNF4Resident}, {"benchNF4", BenchNF4}, {"devAlloc", DevAlloc},
      {"devFree", DevFree}, {"devStats", DevStats}, {"copy", Copy}, {"add", Add}, {"addBias", AddBias},
      {"maskScale", MaskScale}, {"opStats", OpStats}, {"setSync", SetSync}, {"sync", Sync},
      {"debugFault", DebugFault},
  };
  for (const Entry& e : entries) exports.Set(e.name, Napi::Function::New(env, e.fn, e.name));
  return exports;
}

}  // namespace

NODE_API_MODULE(swarmtune_cuda, Init)
