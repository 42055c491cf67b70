// N-API bindings of the optimizer: 32-bit and 8-bit AdamW steps on host arrays and the paged optimizer (state in
// pinned host pages streamed through device slots).
#include "binding.h"

namespace stc_addon {
namespace {

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

}  // namespace

void RegisterOptimizer(Napi::Env env, Napi::Object exports) {
  const Binding bindings[] = {
      {"adamw32", AdamW32}, {"adamw8bit", AdamW8bit}, {"pagedSlotBytes", PagedSlotBytes}, {"pagedCreate", PagedCreate},
      {"pagedAdd", PagedAdd}, {"pagedStep", PagedStep}, {"pagedStateInfo", PagedStateInfo},
      {"pagedStateRead", PagedStateRead}, {"pagedStateWrite", PagedStateWrite}, {"pagedStats", PagedStats},
      {"pagedDestroy", PagedDestroy},
  };
  Export(env, exports, bindings);
}

}  // namespace stc_addon
