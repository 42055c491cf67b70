// What every part of the N-API binding shares: the context and optimizer handles, the library's errors as JS
// error objects, the argument reader and the two paths an op takes (Args::run: inline on the JS thread, or a libuv
// worker). The bindings themselves: addon.cc (module, devices, contexts), ops.cc, weights.cc, tensors.cc,
// optimizer.cc; each exports its functions with a Register* function declared at the end of this file.
#pragma once
#include <napi.h>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>
#include "../src/api.h"

namespace stc_addon {

struct CtxBox {
  stc_ctx* ctx = nullptr;
  // JS thread only
  double inline_ops = 0, inline_ns = 0, worker_ops = 0;
};
struct OptBox {
  stc_paged_opt* opt = nullptr;
};

// asynchronous: the failure is a fault of an earlier op's kernel seen now (stc_last_error_async)
inline Napi::Value MakeError(Napi::Env env, int status, const std::string& msg, const char* op, bool asynchronous = false) {
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
  // The quantization constants of an NF4 weight: a float32 absmax buffer (f32: a Float32Array or a device
  // address), or bitsandbytes double quantization as the engine holds it, an object {codes: Uint8Array,
  // nestedAbsmax: Float32Array, code: Float32Array, offset: number, nestedBlocksize: number} (host arrays; the
  // library checks the nested blocksize and the offset, the caller the array lengths).
  stc_nf4_absmax nf4absmax(size_t i) {
    stc_nf4_absmax a{};
    if (!ok) return a;
    Napi::Value v = info[i];
    if (v.IsBigInt() || v.IsTypedArray()) {
      a.absmax = f32(i);
      return a;
    }
    if (!v.IsObject()) {
      bad(i, "a Float32Array, a device address (BigInt) or a double-quantized absmax object");
      return a;
    }
    Napi::Object o = v.As<Napi::Object>();
    Napi::Value nbs = o.Get("nestedBlocksize"), off = o.Get("offset");
    a.qabsmax = prop<uint8_t>(i, o, "codes", napi_uint8_array, "a double-quantized absmax with codes: Uint8Array", true);
    a.nested_absmax = prop<float>(i, o, "nestedAbsmax", napi_float32_array, "a double-quantized absmax with nestedAbsmax: Float32Array");
    a.code = prop<float>(i, o, "code", napi_float32_array, "a double-quantized absmax with code: Float32Array");
    if (ok && (!nbs.IsNumber() || !off.IsNumber())) bad(i, "a double-quantized absmax with numeric offset and nestedBlocksize");
    if (!ok) return a;
    a.offset = (float)off.As<Napi::Number>().DoubleValue();
    a.nested_blocksize = (int)nbs.As<Napi::Number>().DoubleValue();
    return a;
  }
  // A typed-array property of an object argument (kept alive with the op like every typed array).
  template <class T>
  T* prop(size_t i, Napi::Object o, const char* key, napi_typedarray_type want, const char* name, bool input_only = false) {
    if (!ok) return nullptr;
    Napi::Value v = o.Get(key);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != want) {
      bad(i, name);
      return nullptr;
    }
    if (!input_only) host = true;
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    refs.push_back(Napi::Persistent(v.As<Napi::Object>()));
    return reinterpret_cast<T*>(static_cast<uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset());
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

inline Napi::Value Throw(Napi::Env env, int status, const char* op) {
  napi_throw(env, MakeError(env, status, stc_last_error(), op, stc_last_error_async() != 0));
  return env.Undefined();
}

// A binding as the module exports it.
struct Binding {
  const char* name;
  Napi::Value (*fn)(const Napi::CallbackInfo&);
};

template <size_t N>
void Export(Napi::Env env, Napi::Object exports, const Binding (&bindings)[N]) {
  for (const Binding& b : bindings) exports.Set(b.name, Napi::Function::New(env, b.fn, b.name));
}

void RegisterOps(Napi::Env env, Napi::Object exports);        // ops.cc: the Backend ops and their launch grids
void RegisterWeights(Napi::Env env, Napi::Object exports);    // weights.cc: resident NF4 weights, the NF4 benchmark
void RegisterTensors(Napi::Env env, Napi::Object exports);    // tensors.cc: device tensors, copies, elementwise ops
void RegisterOptimizer(Napi::Env env, Napi::Object exports);  // optimizer.cc: AdamW steps and the paged optimizer

}  // namespace stc_addon
