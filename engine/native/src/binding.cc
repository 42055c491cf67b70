// N-API binding for swarmtune's CPU kernels: validates arguments, runs each op on a libuv worker thread, returns a Promise.
//
// Every op checks buffer types and lengths on the JS thread (a failing check rejects the promise; C++
// never aborts), keeps references to its typed arrays until the op completes, and runs the kernel in
// Napi::AsyncWorker::Execute so the event loop stays free. Kernels fan out on the engine's own pool.
#include <napi.h>

#include <cmath>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <thread>

#include "bench.h"
#include "gemm.h"
#include "ops.h"
#include "pool.h"

namespace {

class OpWorker : public Napi::AsyncWorker {
 public:
  OpWorker(Napi::Env env, std::string op, std::function<std::string()> fn, std::vector<Napi::ObjectReference> refs)
      : Napi::AsyncWorker(env, "swarmtune_native_op"),
        deferred_(Napi::Promise::Deferred::New(env)),
        op_(std::move(op)),
        fn_(std::move(fn)),
        refs_(std::move(refs)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      std::string status = fn_();
      if (!status.empty()) SetError(op_ + ": " + status);
    } catch (const std::bad_alloc&) {
      SetError(op_ + ": out of memory for scratch buffers");
    } catch (const std::exception& e) {
      SetError(op_ + ": " + e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::string op_;
  std::function<std::string()> fn_;
  std::vector<Napi::ObjectReference> refs_;  // keep the typed arrays alive until the kernel is done
};

// Reads and checks the arguments of one call; the first failure is kept and later reads return dummies.
class Args {
 public:
  Args(const Napi::CallbackInfo& info, const char* op) : info_(info), op_(op) {}
  bool ok() const { return err_.empty(); }
  const std::string& op() const { return op_; }
  void fail(const std::string& m) {
    if (err_.empty()) err_ = m;
  }
  int64_t dim(size_t i, const char* name) {
    if (!ok()) return 0;
    if (i >= info_.Length() || !info_[i].IsNumber()) {
      fail(std::string(name) + " must be a number");
      return 0;
    }
    double v = info_[i].As<Napi::Number>().DoubleValue();
    if (!(v >= 0) || v != std::floor(v) || v > 2147483647.0) {
      fail(std::string(name) + "=" + num(v) + " must be an integer in [0, 2^31)");
      return 0;
    }
    return (int64_t)v;
  }
  double number(size_t i, const char* name) {
    if (!ok()) return 0;
    if (i >= info_.Length() || !info_[i].IsNumber()) {
      fail(std::string(name) + " must be a number");
      return 0;
    }
    return info_[i].As<Napi::Number>().DoubleValue();
  }
  bool boolean(size_t i, const char* name) {
    if (!ok()) return false;
    if (i >= info_.Length() || !info_[i].IsBoolean()) {
      fail(std::string(name) + " must be a boolean");
      return false;
    }
    return info_[i].As<Napi::Boolean>().Value();
  }
  template <typename T>
  T* typed(size_t i, const char* name, napi_typedarray_type type, const char* type_name, double need,
           size_t* len_out = nullptr) {
    if (!ok()) return nullptr;
    if (i >= info_.Length()) {
      fail(std::string(name) + " must be a " + type_name);
      return nullptr;
    }
    return typed_value<T>(info_[i], name, type, type_name, need, len_out);
  }
  template <typename T>
  T* typed_value(Napi::Value v, const char* name, napi_typedarray_type type, const char* type_name, double need,
                 size_t* len_out = nullptr) {
    if (!ok()) return nullptr;
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type) {
      fail(std::string(name) + " must be a " + type_name);
      return nullptr;
    }
    auto arr = v.As<Napi::TypedArrayOf<T>>();
    size_t len = arr.ElementLength();
    if (need > 9007199254740992.0 || (double)len < need) {
      fail(std::string(name) + " has length " + std::to_string(len) + ", expected at least " + num(need));
      return nullptr;
    }
    if (len_out) *len_out = len;
    refs_.push_back(Napi::Persistent(arr.template As<Napi::Object>()));
    T* p = arr.Data();
    // a zero-length view may have no backing store; kernels never touch it when need == 0
    return p;
  }
  float* f32(size_t i, const char* name, double need, size_t* len = nullptr) {
    return typed<float>(i, name, napi_float32_array, "Float32Array", need, len);
  }
  int32_t* i32(size_t i, const char* name, double need) {
    return typed<int32_t>(i, name, napi_int32_array, "Int32Array", need);
  }
  uint8_t* u8(size_t i, const char* name, double need, size_t* len) {
    return typed<uint8_t>(i, name, napi_uint8_array, "Uint8Array", need, len);
  }
  // NF4 weight passed as (packed, absmax, rows, cols, blocksize) starting at argument i. absmax is a Float32Array
  // (one float per block) or bitsandbytes double quantization, an object
  // { codes: Uint8Array (one per block), nestedAbsmax: Float32Array, code: Float32Array(256), offset, nestedBlocksize }.
  NF4View nf4(size_t i) {
    NF4View w{};
    int64_t rows = dim(i + 2, "W.rows"), cols = dim(i + 3, "W.cols"), bs = dim(i + 4, "W.blocksize");
    if (!ok()) return w;
    if (bs < 32 || bs > 4096 || (bs & (bs - 1)) != 0) {
      fail("W.blocksize=" + std::to_string(bs) + " must be a power of two in 32..4096");
      return w;
    }
    double n = (double)rows * (double)cols;
    double blocks = std::ceil(n / (double)bs);
    size_t plen = 0;
    w.packed = u8(i, "W.packed", std::ceil(n / 2), &plen);
    w.packed_len = plen;
    if (ok() && i + 1 < info_.Length() && info_[i + 1].IsObject() && !info_[i + 1].IsTypedArray()) {
      w.absmax = nullptr;
      double_quant(info_[i + 1].As<Napi::Object>(), blocks, w);
    } else {
      w.absmax = f32(i + 1, "W.absmax", blocks);
    }
    w.rows = rows;
    w.cols = cols;
    int lg = 0;
    while ((1 << lg) < bs) lg++;
    w.log2_block = lg;
    return w;
  }
  // The double-quantized absmax object of an NF4 weight (see nf4), checked against the weight's block count.
  void double_quant(Napi::Object o, double blocks, NF4View& w) {
    Napi::Value nbs = o.Get("nestedBlocksize"), off = o.Get("offset");
    if (!nbs.IsNumber() || !off.IsNumber()) {
      fail("W.absmax must be a Float32Array or a double-quantized absmax {codes, nestedAbsmax, code, offset, nestedBlocksize}");
      return;
    }
    double nb = nbs.As<Napi::Number>().DoubleValue(), offset = off.As<Napi::Number>().DoubleValue();
    if (!(nb >= 64 && nb <= 4096) || nb != std::floor(nb) || ((int64_t)nb & ((int64_t)nb - 1)) != 0) {
      fail("W.absmax.nestedBlocksize=" + num(nb) + " must be a power of two in 64..4096");
      return;
    }
    if (!std::isfinite(offset) || (double)(float)offset != offset) {
      fail("W.absmax.offset=" + num(offset) + " must be a finite float32 value");
      return;
    }
    w.qabsmax = typed_value<uint8_t>(o.Get("codes"), "W.absmax.codes", napi_uint8_array, "Uint8Array", blocks);
    w.nested = typed_value<float>(o.Get("nestedAbsmax"), "W.absmax.nestedAbsmax", napi_float32_array, "Float32Array",
                                  std::ceil(blocks / nb));
    w.code = typed_value<float>(o.Get("code"), "W.absmax.code", napi_float32_array, "Float32Array", 256);
    w.offset = (float)offset;
    int lg = 0;
    while ((1LL << lg) < (int64_t)nb) lg++;
    w.log2_nested = lg;
  }
  Napi::Value submit(std::shared_ptr<ThreadPool> pool, std::function<std::string(ThreadPool&)> fn) {
    Napi::Env env = info_.Env();
    if (!ok()) return reject(err_);
    if (!pool) return reject("backend is disposed");
    auto* w = new OpWorker(env, op_, [pool, fn]() { return fn(*pool); }, std::move(refs_));
    Napi::Promise p = w->Promise();
    w->Queue();
    return p;
  }
  Napi::Value reject(const std::string& m) {
    Napi::Env env = info_.Env();
    auto d = Napi::Promise::Deferred::New(env);
    d.Reject(Napi::Error::New(env, op_ + ": " + m).Value());
    return d.Promise();
  }

 private:
  static std::string num(double v) {
    char buf[64];
    snprintf(buf, sizeof buf, "%.17g", v);
    return buf;
  }
  const Napi::CallbackInfo& info_;
  std::string op_;
  std::string err_;
  std::vector<Napi::ObjectReference> refs_;
};

class Engine : public Napi::ObjectWrap<Engine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeEngine",
                       {
                           InstanceMethod("gemm", &Engine::Gemm),
                           InstanceMethod("gemmNF4", &Engine::GemmNF4),
                           InstanceMethod("gemmNF4T", &Engine::GemmNF4T),
                           InstanceMethod("dequantNF4", &Engine::DequantNF4),
                           InstanceMethod("rmsnormForward", &Engine::RmsnormForward),
                           InstanceMethod("rmsnormBackward", &Engine::RmsnormBackward),
                           InstanceMethod("rope", &Engine::Rope),
                           InstanceMethod("attentionForward", &Engine::AttentionForward),
                           InstanceMethod("attentionBackward", &Engine::AttentionBackward),
                           InstanceMethod("swigluForward", &Engine::SwigluForward),
                           InstanceMethod("swigluBackward", &Engine::SwigluBackward),
                           InstanceMethod("gegluForward", &Engine::GegluForward),
                           InstanceMethod("gegluBackward", &Engine::GegluBackward),
                           InstanceMethod("softcapForward", &Engine::SoftcapForward),
                           InstanceMethod("softcapBackward", &Engine::SoftcapBackward),
                           InstanceMethod("embeddingForward", &Engine::EmbeddingForward),
                           InstanceMethod("crossEntropyChunkForward", &Engine::CeForward),
                           InstanceMethod("crossEntropyChunkBackward", &Engine::CeBackward),
                           InstanceMethod("dispose", &Engine::Dispose),
                           InstanceAccessor("threads", &Engine::Threads, nullptr),
                       });
  }

  explicit Engine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Engine>(info) {
    int threads = 1;
    if (info.Length() > 0 && info[0].IsNumber()) threads = info[0].As<Napi::Number>().Int32Value();
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
    try {
      pool_ = std::make_shared<ThreadPool>(threads);
    } catch (const std::exception& e) {  // thread creation failed: a JS error, never std::terminate
      Napi::Error::New(info.Env(), std::string("NativeEngine: cannot start ") + std::to_string(threads) +
                                       " worker threads: " + e.what())
          .ThrowAsJavaScriptException();
    }
  }

 private:
  Napi::Value Threads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), pool_ ? pool_->size() : 0); }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    pool_.reset();  // in-flight ops hold their own reference; the threads stop when the last one ends
    return info.Env().Undefined();
  }

  // gemm(transA, transB, M, N, K, alpha, A, B, beta, C)
  Napi::Value Gemm(const Napi::CallbackInfo& info) {
    Args a(info, "gemm");
    bool ta = a.boolean(0, "transA"), tb = a.boolean(1, "transB");
    int64_t M = a.dim(2, "M"), N = a.dim(3, "N"), K = a.dim(4, "K");
    float alpha = (float)a.number(5, "alpha");
    const float* A = a.f32(6, "A", (double)M * K);
    const float* B = a.f32(7, "B", (double)K * N);
    float beta = (float)a.number(8, "beta");
    float* C = a.f32(9, "C", (double)M * N);
    return a.submit(pool_, [=](ThreadPool& p) {
      gemm_f32(p, ta, tb, M, N, K, alpha, A, B, beta, C);
      return std::string();
    });
  }
  // gemmNF4(M, X, packed, absmax, rows, cols, blocksize, beta, Y)
  Napi::Value GemmNF4(const Napi::CallbackInfo& info) {
    Args a(info, "gemmNF4");
    int64_t M = a.dim(0, "M");
    NF4View W = a.nf4(2);
    const float* X = a.f32(1, "X", (double)M * W.cols);
    float beta = (float)a.number(7, "beta");
    float* Y = a.f32(8, "Y", (double)M * W.rows);
    return a.submit(pool_, [=](ThreadPool& p) {
      gemm_nf4(p, M, X, W, beta, Y);
      return std::string();
    });
  }
  // gemmNF4T(M, DY, packed, absmax, rows, cols, blocksize, beta, DX)
  Napi::Value GemmNF4T(const Napi::CallbackInfo& info) {
    Args a(info, "gemmNF4T");
    int64_t M = a.dim(0, "M");
    NF4View W = a.nf4(2);
    const float* DY = a.f32(1, "DY", (double)M * W.rows);
    float beta = (float)a.number(7, "beta");
    float* DX = a.f32(8, "DX", (double)M * W.cols);
    return a.submit(pool_, [=](ThreadPool& p) {
      gemm_nf4_t(p, M, DY, W, beta, DX);
      return std::string();
    });
  }
  // dequantNF4(packed, absmax, rows, cols, blocksize, out)
  Napi::Value DequantNF4(const Napi::CallbackInfo& info) {
    Args a(info, "dequantNF4");
    NF4View W = a.nf4(0);
    float* out = a.f32(5, "out", (double)W.rows * W.cols);
    return a.submit(pool_, [=](ThreadPool& p) {
      dequant_nf4(p, W, out);
      return std::string();
    });
  }
  // rmsnormForward(out, rstd, x, w, T, C, eps)
  Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
    Args a(info, "rmsnormForward");
    int64_t T = a.dim(4, "T"), C = a.dim(5, "C");
    float eps = (float)a.number(6, "eps");
    float* out = a.f32(0, "out", (double)T * C);
    float* rstd = a.f32(1, "rstd", (double)T);
    const float* x = a.f32(2, "x", (double)T * C);
    const float* w = a.f32(3, "w", (double)C);
    return a.submit(pool_, [=](ThreadPool& p) { return rmsnorm_forward(p, out, rstd, x, w, T, C, eps); });
  }
  // rmsnormBackward(dx, dw|null, dout, x, w, rstd, T, C)
  Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
    Args a(info, "rmsnormBackward");
    int64_t T = a.dim(6, "T"), C = a.dim(7, "C");
    float* dx = a.f32(0, "dx", (double)T * C);
    float* dw = nullptr;
    if (info.Length() > 1 && !info[1].IsNull() && !info[1].IsUndefined()) dw = a.f32(1, "dw", (double)C);
    const float* dout = a.f32(2, "dout", (double)T * C);
    const float* x = a.f32(3, "x", (double)T * C);
    const float* w = a.f32(4, "w", (double)C);
    const float* rstd = a.f32(5, "rstd", (double)T);
    return a.submit(pool_, [=](ThreadPool& p) { return rmsnorm_backward(p, dx, dw, dout, x, w, rstd, T, C); });
  }
  // rope(x, cos, sin, positions, T, nHeads, D, inverse)
  Napi::Value Rope(const Napi::CallbackInfo& info) {
    Args a(info, "rope");
    int64_t T = a.dim(4, "T"), H = a.dim(5, "nHeads"), D = a.dim(6, "D");
    bool inverse = a.boolean(7, "inverse");
    if (a.ok() && D % 2 != 0) a.fail("head dim D=" + std::to_string(D) + " must be even");
    float* x = a.f32(0, "x", (double)T * H * D);
    size_t lc = 0, ls = 0;
    const float* cs = a.f32(1, "cos", 0, &lc);
    const float* sn = a.f32(2, "sin", 0, &ls);
    if (a.ok() && lc != ls) a.fail("cos has length " + std::to_string(lc) + " but sin has " + std::to_string(ls));
    const int32_t* pos = a.i32(3, "positions", (double)T);
    int64_t max_pos = D > 0 ? (int64_t)lc / (D / 2) : 0;
    return a.submit(pool_, [=](ThreadPool& p) { return rope_apply(p, x, cs, sn, max_pos, pos, T, H, D, inverse); });
  }
  static void check_heads(Args& a, int64_t H, int64_t KV) {
    if (a.ok() && (KV == 0 || H % KV != 0))
      a.fail("H=" + std::to_string(H) + " must be a positive multiple of KV=" + std::to_string(KV));
  }
  // scale, softcap, window of attention (Gemma); the TS side fills in the defaults
  static void attention_opts(Args& a, size_t i, float& scale, float& softcap, int64_t& window) {
    scale = (float)a.number(i, "scale");
    softcap = (float)a.number(i + 1, "softcap");
    window = a.dim(i + 2, "window");
    if (a.ok() && !(scale > 0)) a.fail("scale must be > 0");
    if (a.ok() && !(softcap >= 0)) a.fail("softcap must be >= 0");
  }
  // attentionForward(out, lse, q, k, v, B, S, H, KV, D, scale, softcap, window)
  Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
    Args a(info, "attentionForward");
    int64_t B = a.dim(5, "B"), S = a.dim(6, "S"), H = a.dim(7, "H"), KV = a.dim(8, "KV"), D = a.dim(9, "D");
    float scale, softcap;
    int64_t window;
    attention_opts(a, 10, scale, softcap, window);
    check_heads(a, H, KV);
    double T = (double)B * S;
    float* out = a.f32(0, "out", T * H * D);
    float* lse = a.f32(1, "lse", (double)B * H * S);
    const float* q = a.f32(2, "q", T * H * D);
    const float* k = a.f32(3, "k", T * KV * D);
    const float* v = a.f32(4, "v", T * KV * D);
    return a.submit(pool_, [=](ThreadPool& p) {
      return attention_forward(p, out, lse, q, k, v, B, S, H, KV, D, scale, softcap, window);
    });
  }
  // attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D, scale, softcap, window)
  Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
    Args a(info, "attentionBackward");
    int64_t B = a.dim(9, "B"), S = a.dim(10, "S"), H = a.dim(11, "H"), KV = a.dim(12, "KV"), D = a.dim(13, "D");
    float scale, softcap;
    int64_t window;
    attention_opts(a, 14, scale, softcap, window);
    check_heads(a, H, KV);
    double T = (double)B * S;
    float* dq = a.f32(0, "dq", T * H * D);
    float* dk = a.f32(1, "dk", T * KV * D);
    float* dv = a.f32(2, "dv", T * KV * D);
    const float* dout = a.f32(3, "dout", T * H * D);
    const float* q = a.f32(4, "q", T * H * D);
    const float* k = a.f32(5, "k", T * KV * D);
    const float* v = a.f32(6, "v", T * KV * D);
    const float* out = a.f32(7, "out", T * H * D);
    const float* lse = a.f32(8, "lse", (double)B * H * S);
    return a.submit(pool_, [=](ThreadPool& p) {
      return attention_backward(p, dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D, scale, softcap, window);
    });
  }
  // swigluForward(out, gate, up, n)
  Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
    Args a(info, "swigluForward");
    int64_t n = a.dim(3, "n");
    float* out = a.f32(0, "out", (double)n);
    const float* g = a.f32(1, "gate", (double)n);
    const float* u = a.f32(2, "up", (double)n);
    return a.submit(pool_, [=](ThreadPool& p) { return swiglu_forward(p, out, g, u, n); });
  }
  // swigluBackward(dgate, dup, dout, gate, up, n)
  Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
    Args a(info, "swigluBackward");
    int64_t n = a.dim(5, "n");
    float* dg = a.f32(0, "dgate", (double)n);
    float* du = a.f32(1, "dup", (double)n);
    const float* d = a.f32(2, "dout", (double)n);
    const float* g = a.f32(3, "gate", (double)n);
    const float* u = a.f32(4, "up", (double)n);
    return a.submit(pool_, [=](ThreadPool& p) { return swiglu_backward(p, dg, du, d, g, u, n); });
  }
  // gegluForward(out, gate, up, n)
  Napi::Value GegluForward(const Napi::CallbackInfo& info) {
    Args a(info, "gegluForward");
    int64_t n = a.dim(3, "n");
    float* out = a.f32(0, "out", (double)n);
    const float* g = a.f32(1, "gate", (double)n);
    const float* u = a.f32(2, "up", (double)n);
    return a.submit(pool_, [=](ThreadPool& p) { return geglu_forward(p, out, g, u, n); });
  }
  // gegluBackward(dgate, dup, dout, gate, up, n)
  Napi::Value GegluBackward(const Napi::CallbackInfo& info) {
    Args a(info, "gegluBackward");
    int64_t n = a.dim(5, "n");
    float* dg = a.f32(0, "dgate", (double)n);
    float* du = a.f32(1, "dup", (double)n);
    const float* d = a.f32(2, "dout", (double)n);
    const float* g = a.f32(3, "gate", (double)n);
    const float* u = a.f32(4, "up", (double)n);
    return a.submit(pool_, [=](ThreadPool& p) { return geglu_backward(p, dg, du, d, g, u, n); });
  }
  // softcapForward(y, x, cap, n)
  Napi::Value SoftcapForward(const Napi::CallbackInfo& info) {
    Args a(info, "softcapForward");
    int64_t n = a.dim(3, "n");
    float cap = (float)a.number(2, "cap");
    float* y = a.f32(0, "y", (double)n);
    const float* x = a.f32(1, "x", (double)n);
    return a.submit(pool_, [=](ThreadPool& p) { return softcap_forward(p, y, x, cap, n); });
  }
  // softcapBackward(dx, dy, x, cap, n)
  Napi::Value SoftcapBackward(const Napi::CallbackInfo& info) {
    Args a(info, "softcapBackward");
    int64_t n = a.dim(4, "n");
    float cap = (float)a.number(3, "cap");
    float* dx = a.f32(0, "dx", (double)n);
    const float* dy = a.f32(1, "dy", (double)n);
    const float* x = a.f32(2, "x", (double)n);
    return a.submit(pool_, [=](ThreadPool& p) { return softcap_backward(p, dx, dy, x, cap, n); });
  }
  // embeddingForward(out, ids, table, T, C, V)
  Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
    Args a(info, "embeddingForward");
    int64_t T = a.dim(3, "T"), C = a.dim(4, "C"), V = a.dim(5, "V");
    float* out = a.f32(0, "out", (double)T * C);
    const int32_t* ids = a.i32(1, "ids", (double)T);
    const float* table = a.f32(2, "table", (double)V * C);
    return a.submit(pool_, [=](ThreadPool& p) { return embedding_forward(p, out, ids, table, T, C, V); });
  }
  // crossEntropyChunkForward(logits, labels, v0, T, Vc, m, s, picked)
  Napi::Value CeForward(const Napi::CallbackInfo& info) {
    Args a(info, "crossEntropyChunkForward");
    int64_t v0 = a.dim(2, "v0"), T = a.dim(3, "T"), Vc = a.dim(4, "Vc");
    const float* logits = a.f32(0, "logits", (double)T * Vc);
    const int32_t* labels = a.i32(1, "labels", (double)T);
    float* m = a.f32(5, "m", (double)T);
    float* s = a.f32(6, "s", (double)T);
    float* picked = a.f32(7, "picked", (double)T);
    return a.submit(pool_, [=](ThreadPool& p) { return ce_chunk_forward(p, logits, labels, v0, T, Vc, m, s, picked); });
  }
  // crossEntropyChunkBackward(logits, labels, v0, T, Vc, lse, scale)
  Napi::Value CeBackward(const Napi::CallbackInfo& info) {
    Args a(info, "crossEntropyChunkBackward");
    int64_t v0 = a.dim(2, "v0"), T = a.dim(3, "T"), Vc = a.dim(4, "Vc");
    float* logits = a.f32(0, "logits", (double)T * Vc);
    const int32_t* labels = a.i32(1, "labels", (double)T);
    const float* lse = a.f32(5, "lse", (double)T);
    const float* scale = a.f32(6, "scale", (double)T);
    return a.submit(pool_, [=](ThreadPool& p) { return ce_chunk_backward(p, logits, labels, v0, T, Vc, lse, scale); });
  }

  std::shared_ptr<ThreadPool> pool_;
};

Napi::Value HardwareThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), (double)std::thread::hardware_concurrency());
}
// fmaPeakGflops(threads, iters): synchronous (blocks the caller), for benchmarks only.
Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  int threads = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1;
  double iters = info.Length() > 1 && info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : 2e7;
  return Napi::Number::New(info.Env(), fma_peak_gflops(threads, (int64_t)iters));
}
Napi::Value KernelName(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), gemm_kernel_name()); }

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeEngine", Engine::Define(env));
  exports.Set("hardwareThreads", Napi::Function::New(env, HardwareThreads));
  exports.Set("fmaPeakGflops", Napi::Function::New(env, FmaPeak));
  exports.Set("kernelName", Napi::Function::New(env, KernelName));
  exports.Set("version", Napi::String::New(env, "1"));
  return exports;
}

}  // namespace

NODE_API_MODULE(swarmtune_native, Init)
