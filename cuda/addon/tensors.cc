// N-API bindings of the device tensors: allocation from the context's pool, copies in any direction and the
// elementwise ops a device-resident stage needs besides the Backend ops.
#include "binding.h"

namespace stc_addon {
namespace {

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

}  // namespace

void RegisterTensors(Napi::Env env, Napi::Object exports) {
  const Binding bindings[] = {
      {"devAlloc", DevAlloc}, {"devFree", DevFree}, {"devStats", DevStats}, {"copy", Copy}, {"add", Add},
      {"addBias", AddBias}, {"maskScale", MaskScale},
  };
  Export(env, exports, bindings);
}

}  // namespace stc_addon
