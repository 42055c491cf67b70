// swarmtune CUDA emulator runtime: streams are queues of work run in issue order when the host waits (stream,
// event or device synchronization, a copy into pageable memory, cudaFree), or at issue with
// SWARMTUNE_CUDA_EMU_SYNC=1; events mark a point in a stream. See emu_internal.h.
#include "emu_internal.h"

#include <chrono>
#include <deque>

namespace stc_emu {

struct Stream {
  unsigned flags = 0;
  std::mutex q_mu;
  std::deque<std::function<void()>> q;
};

namespace {

Stream g_null_stream;
std::mutex g_streams_mu;
std::vector<Stream*> g_streams;  // live streams (for cudaDeviceSynchronize / cudaFree)

struct Event {
  unsigned flags = 0;
  std::atomic<bool> done{true};
  Stream* stream = nullptr;
  std::chrono::steady_clock::time_point t;
  bool recorded = false;
};

}  // namespace

Stream* S(cudaStream_t st) { return st ? reinterpret_cast<Stream*>(st) : &g_null_stream; }

void flush_all() {
  std::lock_guard<std::recursive_mutex> dev(g_device);
  std::vector<Stream*> all;
  {
    std::lock_guard<std::mutex> l(g_streams_mu);
    all = g_streams;
  }
  flush(&g_null_stream);
  for (Stream* s : all) flush(s);
}

void flush(Stream* s) {
  std::lock_guard<std::recursive_mutex> dev(g_device);
  for (;;) {
    std::function<void()> f;
    {
      std::lock_guard<std::mutex> l(s->q_mu);
      if (s->q.empty()) return;
      f = std::move(s->q.front());
      s->q.pop_front();
    }
    f();
  }
}

void enqueue(Stream* s, std::function<void()> f) {
  {
    std::lock_guard<std::mutex> l(s->q_mu);
    s->q.push_back(std::move(f));
  }
  if (cfg().immediate) flush(s);
}

}  // namespace stc_emu

using namespace stc_emu;

// ---------------------------------------------------------------- runtime API
extern "C++" {

cudaError_t cudaDeviceSynchronize(void) {
  EMU_STICKY_CHECK();
  flush_all();
  EMU_STICKY_CHECK();
  return cudaSuccess;
}
cudaError_t cudaDeviceReset(void) { return cudaDeviceSynchronize(); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* st, unsigned int flags) {
  EMU_STICKY_CHECK();
  Stream* s = new Stream();
  s->flags = flags;
  std::lock_guard<std::mutex> l(g_streams_mu);
  g_streams.push_back(s);
  *st = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* st) { return cudaStreamCreateWithFlags(st, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t st) {
  if (!st) return ret(cudaErrorInvalidResourceHandle);
  Stream* s = S(st);
  flush(s);  // queued work still completes
  {
    std::lock_guard<std::mutex> l(g_streams_mu);
    for (size_t i = 0; i < g_streams.size(); i++)
      if (g_streams[i] == s) {
        g_streams.erase(g_streams.begin() + (long)i);
        break;
      }
  }
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t st) {
  EMU_STICKY_CHECK();
  flush(S(st));
  EMU_STICKY_CHECK();
  return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t st) { return cudaStreamSynchronize(st); }

cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t e, unsigned int) {
  EMU_STICKY_CHECK();
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev) return ret(cudaErrorInvalidResourceHandle);
  Stream* other = ev->stream;
  if (!other || other == S(st)) return cudaSuccess;
  enqueue(S(st), [other]() { flush(other); });
  return cudaSuccess;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t st, cudaHostFn_t fn, void* data) {
  EMU_STICKY_CHECK();
  enqueue(S(st), [fn, data]() { fn(data); });
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int flags) {
  EMU_STICKY_CHECK();
  Event* ev = new Event();
  ev->flags = flags;
  *e = reinterpret_cast<cudaEvent_t>(ev);
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return ret(cudaErrorInvalidResourceHandle);
  Event* ev = reinterpret_cast<Event*>(e);
  if (ev->stream && !ev->done.load()) flush(ev->stream);
  delete ev;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t st) {
  EMU_STICKY_CHECK();
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev) return ret(cudaErrorInvalidResourceHandle);
  ev->stream = S(st);
  ev->done = false;
  ev->recorded = true;
  enqueue(ev->stream, [ev]() {
    ev->t = std::chrono::steady_clock::now();
    ev->done = true;
  });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  EMU_STICKY_CHECK();
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev) return ret(cudaErrorInvalidResourceHandle);
  if (ev->stream && !ev->done.load()) flush(ev->stream);
  EMU_STICKY_CHECK();
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaEventSynchronize(e); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  EMU_STICKY_CHECK();
  Event* ea = reinterpret_cast<Event*>(a);
  Event* eb = reinterpret_cast<Event*>(b);
  if (!ea || !eb) return ret(cudaErrorInvalidResourceHandle);
  if ((ea->flags | eb->flags) & cudaEventDisableTiming) return ret(cudaErrorInvalidResourceHandle);
  if (!ea->recorded || !eb->recorded) return ret(cudaErrorInvalidResourceHandle);
  if (!ea->done.load() || !eb->done.load()) return ret(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(eb->t - ea->t).count();
  return cudaSuccess;
}

}  // extern "C++"
