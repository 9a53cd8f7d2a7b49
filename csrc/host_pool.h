// One host allocation carved into aligned blocks, reused every step.
//
// Plain C++ (no torch, no CUDA): page-locking goes through PinHooks, which the CUDA part of
// the extension installs (csrc/cuda_ops.cpp -> csrc/cuda/host_memory.cu). Without them the pool
// is plain aligned memory. See NOTE [ Host pool invariants ] in host_pool.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace memo {

// Page-locking of an existing host range (cudaHostRegister / cudaHostUnregister). Each returns
// an empty string on success, the CUDA error text otherwise.
struct PinHooks {
  std::string (*pin)(void* ptr, size_t nbytes) = nullptr;
  std::string (*unpin)(void* ptr) = nullptr;
};

// Set once by the CUDA part at load time; `pin` is null in a CPU-only build.
PinHooks& pin_hooks();

struct HostPoolStats {
  size_t capacity_bytes;
  size_t used_bytes;
  size_t high_water_bytes;
  size_t largest_free_bytes;
  size_t num_allocs;      // allocations served since construction
  size_t live_blocks;
  size_t free_spans;
  bool pinned;
};

class HostPool {
 public:
  static constexpr size_t kAlignment = 256;        // block rounding, as the CUDA caching allocator
  static constexpr size_t kBaseAlignment = 4096;   // the arena itself starts on a page

  // capacity: bytes (rounded up to kAlignment). pin: page-lock through pin_hooks(); throws if
  // asked to pin without hooks or if registration fails.
  HostPool(size_t capacity, bool pin);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  // Returns the offset of a block of align(max(nbytes, 1)) bytes; throws std::runtime_error
  // ("memo.swap: host pool cannot serve ...") with the numbers when no free span is large enough.
  size_t allocate(size_t nbytes);
  // Returns a block by its offset; throws on an offset that is not a live block (a bug in the caller).
  void free(size_t offset);
  // Size of the live block at `offset` (0 if none).
  size_t block_size(size_t offset) const;

  uint8_t* data() const { return base_; }
  size_t capacity() const { return capacity_; }
  bool pinned() const { return pinned_; }
  HostPoolStats stats() const;

  static size_t align(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

 private:
  size_t largest_free_locked() const;

  uint8_t* base_ = nullptr;
  size_t capacity_ = 0;
  bool pinned_ = false;
  std::map<size_t, size_t> free_;   // offset -> size, sorted, never two adjacent spans
  std::map<size_t, size_t> live_;   // offset -> size
  size_t used_ = 0;
  size_t high_water_ = 0;
  size_t num_allocs_ = 0;
  mutable std::mutex mu_;
};

}  // namespace memo
