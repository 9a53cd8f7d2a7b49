// The planned arena as PyTorch's CUDA allocator (torch.cuda.memory.CUDAPluggableAllocator
// installed with change_current_allocator; see NOTE [ Planned memory at run time ] in
// memo/planned_memory.py for why process-wide and not a MemPool). One cudaMalloc per device
// arena; requests replayed against the plan by csrc/arena.h; everything else (no arena on
// that device, misses, unplanned, outside a phase) served by stream-ordered cudaMallocAsync on
// the requesting stream, from the device's default memory pool set to keep what it frees.
// Life cycle per device: memo_arena_configure once (no arena there yet), then phases, then
// memo_arena_release once all arena blocks are freed. alloc/free are thread-safe (the replay
// holds a mutex); configure/release are not concurrent with alloc/free on that device.

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#include "../arena.h"
#include "kernels.h"

namespace {

constexpr int kMaxDevices = 64;

// Misses and unplanned requests: CUDA's stream-ordered allocator. The first use on a device
// raises its pool's release threshold so freed memory is cached, not returned at every sync
// (what PyTorch's backend:cudaMallocAsync does).
struct StreamOrderedFallback {
  static void keep_freed_memory(int device) {
    static std::once_flag once[kMaxDevices];
    if (device < 0 || device >= kMaxDevices) return;
    std::call_once(once[device], [device] {
      cudaMemPool_t pool;
      if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
        uint64_t keep = UINT64_MAX;
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      }
    });
  }
  void* allocate(size_t size, cudaStream_t stream) {
    void* ptr = nullptr;
    return cudaMallocAsync(&ptr, size, stream) == cudaSuccess ? ptr : nullptr;
  }
  void deallocate(void* ptr, size_t /*size*/, cudaStream_t stream) { cudaFreeAsync(ptr, stream); }
};

// NOTE [ Stream-ordered arena frees ] with CUDA events, recycled through a free list. Every
// call comes under the replay's mutex, so the list needs no lock of its own.
struct CudaEvents {
  using Stream = cudaStream_t;
  using Token = cudaEvent_t;
  std::shared_ptr<std::vector<cudaEvent_t>> spare = std::make_shared<std::vector<cudaEvent_t>>();

  Token record(Stream s) {
    cudaEvent_t ev = nullptr;
    if (!spare->empty()) {
      ev = spare->back();
      spare->pop_back();
    } else if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess) {
      throw std::runtime_error("memo.arena: cudaEventCreate failed while freeing an arena block");
    }
    cudaEventRecord(ev, s);
    return ev;
  }
  bool query(const Token& t) { return cudaEventQuery(t) == cudaSuccess; }
  void wait(Stream s, const Token& t) { cudaStreamWaitEvent(s, t, 0); }
  void release(const Token& t) { spare->push_back(t); }
  ~CudaEvents() = default;
};

using Replay = memo::ArenaReplay<StreamOrderedFallback, CudaEvents>;

struct DeviceArena {
  std::unique_ptr<Replay> replay;
  std::shared_ptr<std::vector<cudaEvent_t>> events;
  void* memory = nullptr;
};

DeviceArena arenas[kMaxDevices];

Replay* replay_of(int device) {
  return device >= 0 && device < kMaxDevices ? arenas[device].replay.get() : nullptr;
}

}  // namespace

extern "C" {

void* memo_arena_alloc(size_t size, int device, cudaStream_t stream) {
  StreamOrderedFallback::keep_freed_memory(device);
  Replay* r = replay_of(device);
  return r != nullptr ? r->allocate(size, stream) : StreamOrderedFallback{}.allocate(size, stream);
}

void memo_arena_free(void* ptr, size_t size, int device, cudaStream_t stream) {
  Replay* r = replay_of(device);
  if (r != nullptr && r->handed_out(ptr)) {
    r->deallocate(ptr, stream);
  } else {  // memory handed out before this device's arena existed: plain stream-ordered memory
    StreamOrderedFallback{}.deallocate(ptr, size, stream);
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
  int previous = 0;
  cudaGetDevice(&previous);
  cudaError_t e = cudaSetDevice(device);
  void* memory = nullptr;
  if (e == cudaSuccess) e = cudaMalloc(&memory, arena_bytes == 0 ? 1 : arena_bytes);
  cudaSetDevice(previous);
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
    cudaFree(memory);
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
  cudaError_t e = cudaDeviceGetDefaultMemPool(&pool, device);
  const cudaMemPoolAttr attrs[4] = {cudaMemPoolAttrReservedMemCurrent, cudaMemPoolAttrReservedMemHigh,
                                    cudaMemPoolAttrUsedMemCurrent, cudaMemPoolAttrUsedMemHigh};
  for (int i = 0; i < 4 && e == cudaSuccess; ++i) {
    uint64_t value = 0;
    e = cudaMemPoolGetAttribute(pool, attrs[i], &value);
    out[i] = static_cast<size_t>(value);
  }
  return static_cast<int>(e);
}

void memo_arena_release(int device) {
  if (replay_of(device) == nullptr) return;
  DeviceArena& a = arenas[device];
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaDeviceSynchronize();  // no kernel may still use arena memory, no event still pending
  a.replay.reset();
  for (cudaEvent_t ev : *a.events) cudaEventDestroy(ev);
  a.events.reset();
  cudaFree(a.memory);
  a.memory = nullptr;
  cudaSetDevice(previous);
}

}  // extern "C"
