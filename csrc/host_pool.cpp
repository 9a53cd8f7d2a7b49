#include "host_pool.h"

#include <cstdlib>
#include <iterator>
#include <new>
#include <sstream>
#include <stdexcept>

// NOTE [ Host pool invariants ]
// 1. The pool owns exactly one allocation of `capacity` bytes, made in the constructor and
//    released in the destructor (after unpinning); blocks are offsets into it.
// 2. Every block offset and size is a multiple of kAlignment; the base is page-aligned.
// 3. free_ and live_ together tile [0, capacity) exactly: no two spans overlap, and no two
//    free spans touch (free() coalesces with both neighbours).
// 4. Allocation is first fit by address, so a step that repeats the same request sequence gets
//    the same offsets every time.
// 5. used_ is the sum of live block sizes; high_water_ its maximum since construction.

namespace memo {

PinHooks& pin_hooks() {
  static PinHooks hooks;
  return hooks;
}

HostPool::HostPool(size_t capacity, bool pin) {
  if (capacity == 0) throw std::invalid_argument("memo.swap: host pool capacity must be > 0 bytes");
  capacity_ = align(capacity);
  size_t rounded = (capacity_ + kBaseAlignment - 1) / kBaseAlignment * kBaseAlignment;
  base_ = static_cast<uint8_t*>(std::aligned_alloc(kBaseAlignment, rounded));
  if (base_ == nullptr) {
    std::ostringstream msg;
    msg << "memo.swap: could not reserve a host pool of " << capacity_
        << " B; lower MemoConfig(host_memory_budget=...)";
    throw std::runtime_error(msg.str());
  }
  if (pin) {
    if (pin_hooks().pin == nullptr) {
      std::free(base_);
      throw std::runtime_error(
          "memo.swap: pinned host pool requested but memo._C was built without its CUDA part; "
          "rebuild with a CUDA torch and nvcc, or pass pin=False");
    }
    std::string err = pin_hooks().pin(base_, rounded);
    if (!err.empty()) {
      std::free(base_);
      std::ostringstream msg;
      msg << "memo.swap: cudaHostRegister of " << rounded << " B failed (" << err
          << "); lower MemoConfig(host_memory_budget=...) or raise the locked-memory limit (ulimit -l)";
      throw std::runtime_error(msg.str());
    }
    pinned_ = true;
  }
  free_.emplace(0, capacity_);
}

HostPool::~HostPool() {
  if (pinned_ && pin_hooks().unpin != nullptr) pin_hooks().unpin(base_);  // nothing to do on failure
  std::free(base_);
}

size_t HostPool::largest_free_locked() const {
  size_t largest = 0;
  for (const auto& span : free_) largest = span.second > largest ? span.second : largest;
  return largest;
}

size_t HostPool::allocate(size_t nbytes) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t size = align(nbytes == 0 ? 1 : nbytes);
  for (auto it = free_.begin(); it != free_.end(); ++it) {  // first fit, rule 4
    if (it->second < size) continue;
    size_t offset = it->first, rest = it->second - size;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + size, rest);
    live_.emplace(offset, size);
    used_ += size;
    if (used_ > high_water_) high_water_ = used_;
    ++num_allocs_;
    return offset;
  }
  std::ostringstream msg;
  msg << "memo.swap: host pool cannot serve " << nbytes << " B: " << used_ << " of " << capacity_
      << " B in use, largest free block " << largest_free_locked()
      << " B; raise MemoConfig(host_memory_budget=...) or lower swap_ratio";
  throw std::runtime_error(msg.str());
}

void HostPool::free(size_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  auto live = live_.find(offset);
  if (live == live_.end()) {
    std::ostringstream msg;
    msg << "memo.swap: free of offset " << offset << ", which is not a live block of this host pool "
        << "(double free; a bug in memo)";
    throw std::logic_error(msg.str());
  }
  size_t size = live->second;
  live_.erase(live);
  used_ -= size;
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && next->first == offset + size) {  // merge with the next span, rule 3
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {  // merge with the previous span
      prev->second += size;
      return;
    }
  }
  free_.emplace(offset, size);
}

size_t HostPool::block_size(size_t offset) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(offset);
  return it == live_.end() ? 0 : it->second;
}

HostPoolStats HostPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return HostPoolStats{capacity_, used_, high_water_, largest_free_locked(), num_allocs_,
                       live_.size(), free_.size(), pinned_};
}

}  // namespace memo
