// The planned arena as a PyTorch pluggable allocator (CUDAPluggableAllocator): one cudaMalloc
// per device-arena, requests replayed against the plan by csrc/arena.h, misses served by
// stream-ordered cudaMallocAsync on the requesting stream.
// Life cycle: memo_arena_configure once (no allocation in flight through this allocator), then
// phases, then memo_arena_release once all arena blocks are freed; alloc/free themselves are
// thread-safe (the replay holds a mutex), configure/release are not concurrent with them.

#include <cstdio>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#include "../arena.h"
#include "kernels.h"

namespace {

thread_local cudaStream_t tls_stream = nullptr;  // the stream of the request being served

struct StreamOrderedFallback {
  void* allocate(size_t size) {
    void* ptr = nullptr;
    return cudaMallocAsync(&ptr, size, tls_stream) == cudaSuccess ? ptr : nullptr;
  }
  void deallocate(void* ptr, size_t /*size*/) { cudaFreeAsync(ptr, tls_stream); }
};

using Replay = memo::ArenaReplay<StreamOrderedFallback>;

struct GlobalArena {
  std::mutex mu;
  std::unique_ptr<Replay> replay;
  void* memory = nullptr;
  int device = -1;
};

GlobalArena& global() {
  static GlobalArena g;
  return g;
}

}  // namespace

extern "C" {

void* memo_arena_alloc(size_t size, int device, cudaStream_t stream) {
  GlobalArena& g = global();
  tls_stream = stream;
  if (!g.replay || device != g.device) {  // no plan, or another device: plain stream-ordered memory
    return StreamOrderedFallback{}.allocate(size);
  }
  return g.replay->allocate(size);
}

void memo_arena_free(void* ptr, size_t size, int device, cudaStream_t stream) {
  GlobalArena& g = global();
  tls_stream = stream;
  if (!g.replay || device != g.device) {
    StreamOrderedFallback{}.deallocate(ptr, size);
    return;
  }
  g.replay->deallocate(ptr);  // a pointer it never saw is a bug: the exception ends the process
}

int memo_arena_configure(size_t arena_bytes, const size_t* offsets, const size_t* sizes,
                         const size_t* phase_lengths, size_t num_phases, int device, char* err, size_t err_len) {
  GlobalArena& g = global();
  std::lock_guard<std::mutex> lock(g.mu);
  if (g.replay) {
    std::snprintf(err, err_len, "memo.arena: an arena is already configured; call memo_arena_release first");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  std::vector<std::vector<memo::PlannedSlot>> phases(num_phases);
  size_t k = 0;
  for (size_t p = 0; p < num_phases; ++p) {
    for (size_t i = 0; i < phase_lengths[p]; ++i, ++k) phases[p].push_back({offsets[k], sizes[k]});
  }
  cudaError_t e = cudaSetDevice(device);
  void* memory = nullptr;
  if (e == cudaSuccess) e = cudaMalloc(&memory, arena_bytes);
  if (e != cudaSuccess) {
    std::snprintf(err, err_len, "memo.arena: cudaMalloc of the %zu B arena failed (%s); re-plan for less memory",
                  arena_bytes, cudaGetErrorString(e));
    return static_cast<int>(e);
  }
  try {
    g.replay = std::make_unique<Replay>(static_cast<uint8_t*>(memory), arena_bytes, std::move(phases),
                                        StreamOrderedFallback{});
  } catch (const std::exception& ex) {
    cudaFree(memory);
    std::snprintf(err, err_len, "%s", ex.what());
    return static_cast<int>(cudaErrorInvalidValue);
  }
  g.memory = memory;
  g.device = device;
  return static_cast<int>(cudaSuccess);
}

int memo_arena_begin_phase(size_t phase) {
  GlobalArena& g = global();
  if (!g.replay || phase >= g.replay->num_phases()) return static_cast<int>(cudaErrorInvalidValue);
  g.replay->begin_phase(phase);
  return static_cast<int>(cudaSuccess);
}

void memo_arena_end_phase(void) {
  GlobalArena& g = global();
  if (g.replay) g.replay->end_phase();
}

int memo_arena_stats(size_t* out) {
  GlobalArena& g = global();
  if (!g.replay) return 0;
  memo::ArenaStats s = g.replay->stats();
  out[0] = s.requests;
  out[1] = s.hits;
  out[2] = s.misses;
  out[3] = s.conflicts;
  out[4] = s.hit_bytes;
  out[5] = s.miss_bytes;
  return 1;
}

void memo_arena_release(void) {
  GlobalArena& g = global();
  std::lock_guard<std::mutex> lock(g.mu);
  if (!g.replay) return;
  cudaDeviceSynchronize();  // no kernel may still use arena memory
  g.replay.reset();
  cudaFree(g.memory);
  g.memory = nullptr;
  g.device = -1;
}

}  // extern "C"
