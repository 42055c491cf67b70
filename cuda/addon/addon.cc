// N-API binding for libswarmtune_cuda.so: marshals typed arrays and device addresses (BigInt) and turns a
// nonzero library status into a rejected promise (cuda/native.ts declares the module's shape, cuda/errors.ts makes
// the rejection a CudaError). Float buffers of ops are a Float32Array or a device address; see Args::f32
// (binding.h). This file is the module: devices, contexts, the probe and the per-context op counters; the ops,
// resident weights, device tensors and the optimizer are bound in ops.cc, weights.cc, tensors.cc and optimizer.cc.
//
// Two paths (Args::run). An op whose buffers are all device addresses (host int32 ids/labels/positions and
// mask bytes allowed: the library copies those before it returns) runs INLINE on the JS thread: the library
// checks its launches and returns without waiting for the GPU, so the call takes microseconds, and the
// promise is returned already settled (rejected with the same error object on failure). Any op holding
// host float/state memory, and the ops that must wait for the device, run on a libuv worker (AsyncWorker)
// that first waits for the queued device work WITHOUT the context's op mutex (stc_sync), then runs the op
// under it: the mutex is then held only for the op's own work, so an inline launch never blocks behind a
// long download. Counters per context: opStats().
#include "binding.h"

namespace stc_addon {
namespace {

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

// Probe runs ~100 ms of device work, so it is async too; results land in a shared holder.
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Args a(info, "probe");
  stc_ctx* c = a.ctx(0);
  double* out = a.arr<double>(1, napi_float64_array, "a Float64Array");
  if (a.ok && info[1].As<Napi::TypedArray>().ElementLength() < 2) a.bad(1, "a Float64Array of at least 2 elements");
  return a.run([=] { return stc_probe(c, &out[0], &out[1]); });
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

}  // namespace
}  // namespace stc_addon

namespace {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  using namespace stc_addon;
  const Binding context[] = {
      {"version", Version}, {"deviceCount", DeviceCount}, {"deviceInfo", DeviceInfo}, {"open", Open},
      {"close", Close}, {"memoryStats", MemoryStats}, {"probe", Probe}, {"opStats", OpStats}, {"setSync", SetSync},
      {"sync", Sync}, {"debugFault", DebugFault},
  };
  Export(env, exports, context);
  RegisterOps(env, exports);
  RegisterWeights(env, exports);
  RegisterTensors(env, exports);
  RegisterOptimizer(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(swarmtune_cuda, Init)
