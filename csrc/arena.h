// Replay allocator for a planned arena: plain C++17, header-only, shared by the CPU build
// (tested through memo._C.ArenaReplay) and the CUDA pluggable-allocator entry points
// (csrc/cuda/arena_alloc.cu). No torch, no CUDA.
//
// NOTE [ Arena replay ]
// 1. A plan is a list of phases (a layer's forward, its backward, ...); phase p lists, for the
//    k-th allocation request of that phase, its planned (offset, size) in the arena.
// 2. begin_phase(p) restarts the request counter at 0. Requests then count up whether they hit
//    or miss, so one unexpected request shifts nothing but itself.
// 3. Request k is a hit when k is within the plan, its size equals the planned size, and the
//    planned span [offset, offset + size) overlaps no arena block still live. A hit returns
//    base + offset.
// 4. Anything else is a miss: the request goes to the fallback allocator and is counted
//    (misses, and conflicts for the overlap case). The arena never hands out overlapping
//    memory, whatever the plan or the order of frees.
// 5. A request of 0 bytes returns nullptr without touching either allocator; it still takes
//    its index, and is a hit when the plan says 0 bytes.
// 6. free(ptr) releases an arena span or returns the pointer to the fallback allocator; frees
//    may come in any order and across phases.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace memo {

struct PlannedSlot {
  size_t offset;
  size_t size;
};

struct ArenaStats {
  size_t requests = 0;
  size_t hits = 0;
  size_t misses = 0;      // includes conflicts
  size_t conflicts = 0;   // planned span still occupied (rule 3)
  size_t hit_bytes = 0;
  size_t miss_bytes = 0;
  size_t live_arena_blocks = 0;
  size_t live_fallback_blocks = 0;
};

// Fallback: any type with `void* allocate(size_t)` and `void deallocate(void*, size_t)`.
template <typename Fallback>
class ArenaReplay {
 public:
  ArenaReplay(uint8_t* base, size_t arena_bytes, std::vector<std::vector<PlannedSlot>> phases,
              Fallback fallback)
      : base_(base), arena_bytes_(arena_bytes), phases_(std::move(phases)), fallback_(std::move(fallback)) {
    for (size_t p = 0; p < phases_.size(); ++p) {
      for (size_t k = 0; k < phases_[p].size(); ++k) {
        const PlannedSlot& s = phases_[p][k];
        if (s.offset > arena_bytes_ || s.size > arena_bytes_ - s.offset) {
          std::ostringstream msg;
          msg << "memo.arena: phase " << p << " request " << k << " is planned at [" << s.offset << ", "
              << s.offset + s.size << ") outside the " << arena_bytes_
              << " B arena; re-plan, or give the arena the plan's peak bytes";
          throw std::invalid_argument(msg.str());
        }
      }
    }
  }

  // Starts phase p (rule 2).
  void begin_phase(size_t p) {
    std::lock_guard<std::mutex> lock(mu_);
    if (p >= phases_.size()) {
      std::ostringstream msg;
      msg << "memo.arena: phase " << p << " does not exist, the plan has " << phases_.size()
          << " phases; pass a phase index below " << phases_.size();
      throw std::out_of_range(msg.str());
    }
    phase_ = static_cast<long>(p);
    next_ = 0;
  }

  // Ends the current phase: further requests miss until the next begin_phase.
  void end_phase() {
    std::lock_guard<std::mutex> lock(mu_);
    phase_ = -1;
    next_ = 0;
  }

  void* allocate(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.requests;
    size_t k = next_++;
    if (size == 0) {  // rule 5
      bool planned = phase_ >= 0 && k < phases_[phase_].size() && phases_[phase_][k].size == 0;
      ++(planned ? stats_.hits : stats_.misses);
      return nullptr;
    }
    if (phase_ >= 0 && k < phases_[phase_].size()) {
      const PlannedSlot& slot = phases_[phase_][k];
      if (slot.size == size) {
        if (!overlaps_live(slot.offset, size)) {  // rule 3
          uint8_t* ptr = base_ + slot.offset;
          live_arena_.emplace(slot.offset, size);
          ++stats_.hits;
          stats_.hit_bytes += size;
          return ptr;
        }
        ++stats_.conflicts;
      }
    }
    ++stats_.misses;  // rule 4
    stats_.miss_bytes += size;
    void* ptr = fallback_.allocate(size);
    if (ptr != nullptr) fallback_size_[ptr] = size;
    return ptr;
  }

  void deallocate(void* ptr) {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto fb = fallback_size_.find(ptr);
    if (fb != fallback_size_.end()) {
      size_t size = fb->second;
      fallback_size_.erase(fb);
      fallback_.deallocate(ptr, size);
      return;
    }
    auto live = owns(ptr) ? live_arena_.find(static_cast<uint8_t*>(ptr) - base_) : live_arena_.end();
    if (live == live_arena_.end()) {
      std::ostringstream msg;
      msg << "memo.arena: free of a pointer this allocator never handed out (or freed twice); "
          << "this is a bug in memo or in the caller";
      throw std::logic_error(msg.str());
    }
    live_arena_.erase(live);  // rule 6
  }

  bool owns(const void* ptr) const {
    auto p = static_cast<const uint8_t*>(ptr);
    return p >= base_ && p < base_ + arena_bytes_;
  }

  ArenaStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    ArenaStats s = stats_;
    s.live_arena_blocks = live_arena_.size();
    s.live_fallback_blocks = fallback_size_.size();
    return s;
  }

  void reset_stats() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_ = ArenaStats{};
  }

  size_t num_phases() const { return phases_.size(); }
  size_t arena_bytes() const { return arena_bytes_; }
  uint8_t* base() const { return base_; }
  long current_phase() const {
    std::lock_guard<std::mutex> lock(mu_);
    return phase_;
  }

 private:
  // Does [offset, offset + size) intersect a live arena span? Live spans never overlap each
  // other, so only the nearest span starting before `offset + size` can.
  bool overlaps_live(size_t offset, size_t size) const {
    auto it = live_arena_.lower_bound(offset + size);
    if (it == live_arena_.begin()) return false;
    --it;
    return it->first + it->second > offset;
  }

  uint8_t* base_;
  size_t arena_bytes_;
  std::vector<std::vector<PlannedSlot>> phases_;
  Fallback fallback_;
  long phase_ = -1;
  size_t next_ = 0;
  std::map<size_t, size_t> live_arena_;                  // offset -> size, handed out by the arena
  std::unordered_map<void*, size_t> fallback_size_;      // pointers handed out by the fallback
  ArenaStats stats_;
  mutable std::mutex mu_;
};

}  // namespace memo
