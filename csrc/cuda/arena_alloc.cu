// The planned arena as PyTorch's CUDA allocator (torch.cuda.memory.CUDAPluggableAllocator
// installed with change_current_allocator; see NOTE [ Planned memory at run time ] in
// memo/planned_memory.py for why process-wide and not a MemPool). One cudaMalloc per device
// arena; requests replayed against the plan by csrc/arena.h; everything else (no arena on
// that device, misses, unplanned, outside a phase) served by stream-ordered cudaMallocAsync on
// the requesting stream, from the device's default memory pool set to keep what it frees.
// Life cycle per device: memo_arena_configure once (no arena there yet), then phases, then
// memo_arena_release once all arena blocks are freed. alloc/free are thread-safe (the replay
// holds a mutex); configure/release are not concurrent with alloc/free on that device.
//
// NOTE [ Pluggable allocator contract ]
// What PyTorch's CUDAPluggableAllocator (torch/csrc/cuda/CUDAPluggableAllocator.cpp) does and
// does not do around memo_arena_alloc / memo_arena_free, and what this file does about it:
// 1. alloc gets the current device and its current stream. It does not check the result: a
//    nullptr becomes a tensor's data pointer. So a failed fallback allocation throws (PyTorch
//    turns the exception into a RuntimeError at the allocating call) instead of returning
//    nullptr, which would surface later as an illegal memory access.
// 2. free gets the device and stream of the *allocation* (recorded by PyTorch at alloc), on
//    whatever thread and current device the last reference dies. The null (legacy default)
//    stream means the current device's, and CUDA events must be recorded on their own device,
//    so every CUDA call here runs under DeviceScope(device).
// 3. record_stream is a no-op (Python's CUDAPluggableAllocator cannot set record_stream_fn).
//    A block used on a second stream must have its free ordered after that use by the program
//    (memo's engine does: NOTE [ Swap stream ordering ] rule 2 in memo/swap/engine.py).
// 4. free may run inside a destructor (noexcept): it never throws, also not at process exit
//    when the CUDA runtime is already unloading; if no event can be recorded it synchronizes
//    the stream instead, so a span is never reused early.
// 5. Every CUDA error this file handles itself is cleared (cudaGetLastError), as PyTorch's own
//    allocators do: PyTorch checks cudaGetLastError after its kernel launches, and a stale
//    cudaErrorNotReady from an event query would fail an unrelated kernel.

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "../arena.h"
#include "kernels.h"

namespace {

constexpr int kMaxDevices = 64;

// NOTE [ Pluggable allocator contract ] rule 5: a CUDA call whose error this file handles.
cudaError_t handled(cudaError_t err) {
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

// Rule 2: `device` current for the scope (host calls only; nothing when it already is).
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    if (handled(cudaGetDevice(&previous_)) == cudaSuccess && previous_ != device_) {
      switched_ = handled(cudaSetDevice(device_)) == cudaSuccess;
    }
  }
  ~DeviceScope() {
    if (switched_) handled(cudaSetDevice(previous_));
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int device_;
  int previous_ = -1;
  bool switched_ = false;
};

// Misses and unplanned requests: CUDA's stream-ordered allocator. The first use on a device
// raises its pool's release threshold so freed memory is cached, not returned at every sync
// (what PyTorch's backend:cudaMallocAsync does).
struct StreamOrderedFallback {
  static void keep_freed_memory(int device) {
    static std::once_flag once[kMaxDevices];
    if (device < 0 || device >= kMaxDevices) return;
    std::call_once(once[device], [device] {
      cudaMemPool_t pool;
      if (handled(cudaDeviceGetDefaultMemPool(&pool, device)) == cudaSuccess) {
        uint64_t keep = UINT64_MAX;
        handled(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
      }
    });
  }
  // Rule 1: throws rather than return nullptr.
  void* allocate(size_t size, cudaStream_t stream) {
    void* ptr = nullptr;
    const cudaError_t err = handled(cudaMallocAsync(&ptr, size, stream));
    if (err != cudaSuccess) {
      int device = -1;
      handled(cudaGetDevice(&device));
      throw std::runtime_error("memo.arena: cudaMallocAsync of " + std::to_string(size) + " B on device " +
                               std::to_string(device) + " failed (" + cudaGetErrorString(err) +
                               "); the fallback pool is out of memory: lower the sequence length or swap ratio, "
                               "or re-plan for less memory");
    }
    return ptr;
  }
  void deallocate(void* ptr, size_t /*size*/, cudaStream_t stream) { handled(cudaFreeAsync(ptr, stream)); }
};

// NOTE [ Stream-ordered arena frees ] with CUDA events, recycled through a free list. Every
// call comes under the replay's mutex, so the list needs no lock of its own, and under a
// DeviceScope of the arena's device (NOTE [ Pluggable allocator contract ] rule 2). A null
// token stands for a free whose stream was synchronized instead (rule 4): complete at once.
struct CudaEvents {
  using Stream = cudaStream_t;
  using Token = cudaEvent_t;
  std::shared_ptr<std::vector<cudaEvent_t>> spare = std::make_shared<std::vector<cudaEvent_t>>();

  Token record(Stream s) {
    cudaEvent_t ev = nullptr;
    if (!spare->empty()) {
      ev = spare->back();
      spare->pop_back();
    } else if (handled(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming)) != cudaSuccess) {
      ev = nullptr;
    }
    if (ev != nullptr && handled(cudaEventRecord(ev, s)) == cudaSuccess) return ev;
    if (ev != nullptr) spare->push_back(ev);
    handled(cudaStreamSynchronize(s));  // rule 4: no event, so the span is free once the host returns
    return nullptr;
  }
  bool query(const Token& t) {
    if (t == nullptr) return true;
    const cudaError_t err = cudaEventQuery(t);
    if (err != cudaSuccess) handled(err);  // cudaErrorNotReady too (rule 5)
    return err == cudaSuccess;
  }
  void wait(Stream s, const Token& t) {
    if (t != nullptr) handled(cudaStreamWaitEvent(s, t, 0));
  }
  void release(const Token& t) {
    if (t != nullptr) spare->push_back(t);
  }
  ~CudaEvents() = default;
};

using Replay = memo::ArenaReplay<StreamOrderedFallback, CudaEvents>;

struct DeviceArena {
  std::unique_ptr<Replay> replay;
  std::shared_ptr<std::vector<cudaEvent_t>> events;
  void* memory = nullptr;
};

// Never destroyed: tensors may be freed during process exit after this library's static
// destructors ran (NOTE [ Pluggable allocator contract ] rule 4); PyTorch leaks its allocator
// for the same reason.
DeviceArena* const arenas = new DeviceArena[kMaxDevices];

Replay* replay_of(int device) {
  return device >= 0 && device < kMaxDevices ? arenas[device].replay.get() : nullptr;
}

}  // namespace

extern "C" {

// NOTE [ Pluggable allocator contract ] rule 1: throws when the fallback cannot allocate.
void* memo_arena_alloc(size_t size, int device, cudaStream_t stream) {
  if (size == 0) return nullptr;  // NOTE [ Arena replay ] rule 5
  DeviceScope scope(device);
  StreamOrderedFallback::keep_freed_memory(device);
  Replay* r = replay_of(device);
  return r != nullptr ? r->allocate(size, stream) : StreamOrderedFallback{}.allocate(size, stream);
}

// Rules 2 and 4: on the allocation's device, never throws.
void memo_arena_free(void* ptr, size_t size, int device, cudaStream_t stream) {
  if (ptr == nullptr) return;
  try {
    DeviceScope scope(device);
    Replay* r = replay_of(device);
    if (r != nullptr && r->handed_out(ptr)) {
      r->deallocate(ptr, stream);
    } else {  // memory handed out before this device's arena existed: plain stream-ordered memory
      StreamOrderedFallback{}.deallocate(ptr, size, stream);
    }
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "memo.arena: freeing %p (%zu B) on device %d failed: %s\n", ptr, size, device, ex.what());
  }
}

int memo_arena_configure(size_t arena_bytes, const size_t* offsets, const size_t* sizes,
                         const size_t* phase_lengths, size_t num_phases, size_t alignment, int device, char* err,
                         size_t err_len) {
  if (device < 0 || device >= kMaxDevices) {
    std::snprintf(err, err_len, "memo.arena: device %d is out of range [0, %d)", device, kMaxDevices);
    return static_cast<int>(cudaErrorInvalidDevice);
  }
  DeviceArena& a = arenas[device];
  if (a.replay) {
    std::snprintf(err, err_len, "memo.arena: device %d already has an arena; call memo_arena_release first", device);
    return static_cast<int>(cudaErrorInvalidValue);
  }
  std::vector<std::vector<memo::PlannedSlot>> phases(num_phases);
  size_t k = 0;
  for (size_t p = 0; p < num_phases; ++p) {
    for (size_t i = 0; i < phase_lengths[p]; ++i, ++k) phases[p].push_back({offsets[k], sizes[k]});
  }
  void* memory = nullptr;
  cudaError_t e;
  {
    DeviceScope scope(device);
    e = handled(cudaMalloc(&memory, arena_bytes == 0 ? 1 : arena_bytes));
  }
  if (e != cudaSuccess) {
    std::snprintf(err, err_len, "memo.arena: cudaMalloc of the %zu B arena failed (%s); re-plan for less memory",
                  arena_bytes, cudaGetErrorString(e));
    return static_cast<int>(e);
  }
  try {
    CudaEvents events;
    a.events = events.spare;
    a.replay = std::make_unique<Replay>(static_cast<uint8_t*>(memory), arena_bytes, std::move(phases), alignment,
                                        StreamOrderedFallback{}, std::move(events));
  } catch (const std::exception& ex) {
    handled(cudaFree(memory));
    std::snprintf(err, err_len, "%s", ex.what());
    return static_cast<int>(cudaErrorInvalidValue);
  }
  a.memory = memory;
  return static_cast<int>(cudaSuccess);
}

int memo_arena_begin_phase(int device, size_t phase) {
  Replay* r = replay_of(device);
  if (r == nullptr || phase >= r->num_phases()) return static_cast<int>(cudaErrorInvalidValue);
  r->begin_phase(phase);
  return static_cast<int>(cudaSuccess);
}

void memo_arena_end_phase(int device) {
  if (Replay* r = replay_of(device)) r->end_phase();
}

void memo_arena_suspend(int device) {
  if (Replay* r = replay_of(device)) r->suspend();
}

void memo_arena_resume(int device) {
  if (Replay* r = replay_of(device)) r->resume();
}

size_t memo_arena_stats(int device, size_t* out, size_t n) {
  Replay* r = replay_of(device);
  if (r == nullptr) return 0;
  memo::ArenaStats s = r->stats();
  const size_t v[] = {s.requests,       s.hits,         s.misses,
                      s.conflicts,      s.unplanned,    s.outside,
                      s.hit_bytes,      s.miss_bytes,   s.fallback_bytes,
                      s.stream_waits,   s.live_arena_blocks, s.live_fallback_blocks,
                      s.live_arena_bytes, s.peak_arena_bytes, r->arena_bytes()};
  size_t m = sizeof(v) / sizeof(v[0]) < n ? sizeof(v) / sizeof(v[0]) : n;
  for (size_t i = 0; i < m; ++i) out[i] = v[i];
  return m;
}

int memo_arena_fallback_memory(int device, size_t* out) {
  cudaMemPool_t pool;
  cudaError_t e = handled(cudaDeviceGetDefaultMemPool(&pool, device));
  const cudaMemPoolAttr attrs[4] = {cudaMemPoolAttrReservedMemCurrent, cudaMemPoolAttrReservedMemHigh,
                                    cudaMemPoolAttrUsedMemCurrent, cudaMemPoolAttrUsedMemHigh};
  for (int i = 0; i < 4 && e == cudaSuccess; ++i) {
    uint64_t value = 0;
    e = handled(cudaMemPoolGetAttribute(pool, attrs[i], &value));
    out[i] = static_cast<size_t>(value);
  }
  return static_cast<int>(e);
}

void memo_arena_release(int device) {
  if (replay_of(device) == nullptr) return;
  DeviceArena& a = arenas[device];
  DeviceScope scope(device);
  handled(cudaDeviceSynchronize());  // no kernel may still use arena memory, no event still pending
  a.replay.reset();
  for (cudaEvent_t ev : *a.events) handled(cudaEventDestroy(ev));
  a.events.reset();
  handled(cudaFree(a.memory));
  a.memory = nullptr;
}

}  // extern "C"
