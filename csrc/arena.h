// Replay allocator for a planned arena: plain C++17, header-only, shared by the CPU build
// (tested through memo._C.ArenaReplay) and the CUDA pluggable-allocator entry points
// (csrc/cuda/arena_alloc.cu). No torch, no CUDA: streams and events come in through a policy.
//
// NOTE [ Arena replay ]
// 1. A plan is a list of phases (a layer's forward, its backward, ...); phase p lists, for the
//    k-th allocation request of that phase, its planned (offset, size) in the arena, or
//    kUnplanned: a request the plan knows of but leaves to the fallback (a tensor that outlives
//    the phase, a kind the planner does not place; see memo/planner/planfile.py).
// 2. begin_phase(p) restarts the request counter at 0. A request is matched against the next
//    kLookahead slots from the counter: the first slot whose size equals the request (rounded,
//    rule 3) takes it and the counter moves past that slot, skipping the ones before it (a
//    planned tensor the run did not allocate, or allocated at another size). A request no slot
//    in the window matches is an insertion (a library workspace, a wrapped scalar, a parameter
//    gradient): it goes to the fallback and leaves the counter where it was, so it shifts
//    nothing. memo also suspends the phase around its own off-plan allocations (rule 7).
// 3. Request k is a hit when its slot is planned, the request rounded up to the arena's
//    alignment (512 B, as PyTorch's allocator rounds) equals the planned size, and the
//    planned span [offset, offset + size) overlaps no arena block still live. A hit returns
//    base + offset.
// 4. Anything else goes to the fallback allocator and is counted: a miss (wrong size, past the
//    plan's end, or a conflict: the planned span still occupied), unplanned (rule 1) or
//    outside (no phase, or suspended). The arena never hands out overlapping memory, whatever
//    the plan or the order of frees.
// 5. A request of 0 bytes returns nullptr without touching either allocator or the counter.
// 6. free(ptr, stream) releases an arena span or returns the pointer to the fallback; frees
//    may come in any order and across phases.
// 7. suspend() / resume() nest; while suspended, requests go to the fallback without taking
//    an index, so memo's own buffers for another layer (a prefetch) do not shift this phase.
//
// NOTE [ Stream-ordered arena frees ]
// 1. A block is freed on the stream it was allocated on (PyTorch passes that stream); work
//    already queued on that stream may still use it. The free records an event on that
//    stream (Events::record) and the span stays "pending" until the event completes.
// 2. A hit on the same stream reuses a pending span at once: the stream runs in order.
// 3. A hit on another stream over a pending span whose event has not completed makes the
//    requesting stream wait for that event (Events::wait, a device-side wait: the host never
//    blocks) and counts a stream wait. The plan fixed the offset, so refusing the span would
//    only turn a planned request into a fallback; the wait enforces the order the plan
//    assumed (the free came first) at the cost of a dependency the program implied anyway.
// 4. Completed events are released (Events::release) when a request next touches their span
//    or when the pending list grows past a mark: kPrunePending, then twice what a sweep left.
//    The host runs ahead of the device (a whole forward, hundreds of frees), so a sweep at
//    every free past a fixed size would query every pending event each time; doubling keeps
//    it to O(1) queries per free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
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

// Offset of a slot the plan leaves to the fallback (NOTE [ Arena replay ] rule 1).
constexpr size_t kUnplanned = std::numeric_limits<size_t>::max();

struct ArenaStats {
  size_t requests = 0;
  size_t hits = 0;
  size_t misses = 0;      // requests in a phase that went to the fallback: insertions and conflicts
  size_t skipped = 0;     // slots passed over by rule 2
  size_t conflicts = 0;   // planned span still occupied (rule 3)
  size_t unplanned = 0;   // rule 1: known to the plan, left to the fallback
  size_t outside = 0;     // rule 4: no phase, or suspended (rule 7)
  size_t hit_bytes = 0;
  size_t miss_bytes = 0;
  size_t fallback_bytes = 0;  // everything the fallback served: misses, unplanned, outside
  size_t stream_waits = 0;    // NOTE [ Stream-ordered arena frees ] rule 3
  size_t live_arena_blocks = 0;
  size_t live_fallback_blocks = 0;
  size_t live_arena_bytes = 0;
  size_t peak_arena_bytes = 0;  // highest end (offset + size) of any block handed out
};

// Fallback: `void* allocate(size_t, Stream)`, `void deallocate(void*, size_t, Stream)`.
// Events (NOTE [ Stream-ordered arena frees ]): types `Stream` and `Token`, `Token record(Stream)`,
// `bool query(const Token&)`, `void wait(Stream, const Token&)`, `void release(const Token&)`.
template <typename Fallback, typename Events>
class ArenaReplay {
 public:
  using Stream = typename Events::Stream;
  using Token = typename Events::Token;
  static constexpr size_t kPrunePending = 64;
  static constexpr size_t kLookahead = 8;

  ArenaReplay(uint8_t* base, size_t arena_bytes, std::vector<std::vector<PlannedSlot>> phases, size_t alignment,
              Fallback fallback, Events events)
      : base_(base), arena_bytes_(arena_bytes), alignment_(alignment), phases_(std::move(phases)),
        fallback_(std::move(fallback)), events_(std::move(events)) {
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0) {
      std::ostringstream msg;
      msg << "memo.arena: alignment " << alignment_ << " is not a power of two; pass 512 (PyTorch's rounding)";
      throw std::invalid_argument(msg.str());
    }
    for (size_t p = 0; p < phases_.size(); ++p) {
      for (size_t k = 0; k < phases_[p].size(); ++k) {
        const PlannedSlot& s = phases_[p][k];
        if (s.offset == kUnplanned) continue;
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

  ~ArenaReplay() {
    for (const Pending& p : pending_) events_.release(p.token);
  }

  ArenaReplay(const ArenaReplay&) = delete;
  ArenaReplay& operator=(const ArenaReplay&) = delete;

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

  // Ends the current phase: further requests are outside until the next begin_phase.
  void end_phase() {
    std::lock_guard<std::mutex> lock(mu_);
    phase_ = -1;
    next_ = 0;
  }

  // Rule 7.
  void suspend() {
    std::lock_guard<std::mutex> lock(mu_);
    ++suspended_;
  }
  void resume() {
    std::lock_guard<std::mutex> lock(mu_);
    if (suspended_ == 0) throw std::logic_error("memo.arena: resume() without suspend(); this is a bug in memo");
    --suspended_;
  }

  void* allocate(size_t size, Stream stream) {
    std::lock_guard<std::mutex> lock(mu_);
    if (size == 0) return nullptr;  // rule 5
    ++stats_.requests;
    if (phase_ < 0 || suspended_ > 0) {
      ++stats_.outside;
      return fallback_allocate(size, stream);
    }
    const std::vector<PlannedSlot>& plan = phases_[phase_];
    const size_t rounded = round_up(size);
    size_t k = next_;
    const size_t end = next_ + kLookahead < plan.size() ? next_ + kLookahead : plan.size();
    while (k < end && plan[k].size != rounded) ++k;  // rule 2
    if (k == end) {                                   // an insertion
      ++stats_.misses;
      stats_.miss_bytes += size;
      return fallback_allocate(size, stream);
    }
    stats_.skipped += k - next_;
    next_ = k + 1;
    const PlannedSlot& slot = plan[k];
    if (slot.offset == kUnplanned) {
      ++stats_.unplanned;
      return fallback_allocate(size, stream);
    }
    if (!overlaps_live(slot.offset, slot.size)) {  // rule 3
      order_after_pending_frees(slot.offset, slot.size, stream);
      live_arena_.emplace(slot.offset, slot.size);
      live_arena_bytes_ += slot.size;
      ++stats_.hits;
      stats_.hit_bytes += slot.size;
      if (slot.offset + slot.size > stats_.peak_arena_bytes) stats_.peak_arena_bytes = slot.offset + slot.size;
      return base_ + slot.offset;
    }
    ++stats_.conflicts;
    ++stats_.misses;  // rule 4
    stats_.miss_bytes += size;
    return fallback_allocate(size, stream);
  }

  void deallocate(void* ptr, Stream stream) {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto fb = fallback_size_.find(ptr);
    if (fb != fallback_size_.end()) {
      size_t size = fb->second;
      fallback_size_.erase(fb);
      fallback_.deallocate(ptr, size, stream);
      return;
    }
    auto live = owns(ptr) ? live_arena_.find(static_cast<uint8_t*>(ptr) - base_) : live_arena_.end();
    if (live == live_arena_.end()) {
      throw std::logic_error(
          "memo.arena: free of a pointer this allocator never handed out (or freed twice); this is a bug in memo "
          "or in the caller");
    }
    // NOTE [ Stream-ordered arena frees ] rule 1.
    pending_.push_back(Pending{live->first, live->second, stream, events_.record(stream)});
    live_arena_bytes_ -= live->second;
    live_arena_.erase(live);  // rule 6
    if (pending_.size() > prune_at_) {  // rule 4
      prune(0, arena_bytes_);
      prune_at_ = 2 * pending_.size() > kPrunePending ? 2 * pending_.size() : kPrunePending;
    }
  }

  // Did this replay hand `ptr` out (arena or fallback) and is it still live?
  bool handed_out(void* ptr) const {
    std::lock_guard<std::mutex> lock(mu_);
    return fallback_size_.count(ptr) != 0 ||
           (owns(ptr) && live_arena_.count(static_cast<size_t>(static_cast<uint8_t*>(ptr) - base_)) != 0);
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
    s.live_arena_bytes = live_arena_bytes_;
    return s;
  }

  void reset_stats() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_ = ArenaStats{};
  }

  size_t num_phases() const { return phases_.size(); }
  size_t arena_bytes() const { return arena_bytes_; }
  size_t alignment() const { return alignment_; }
  uint8_t* base() const { return base_; }
  long current_phase() const {
    std::lock_guard<std::mutex> lock(mu_);
    return phase_;
  }
  size_t pending_frees() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_.size();
  }

 private:
  struct Pending {
    size_t offset;
    size_t size;
    Stream stream;
    Token token;
  };

  size_t round_up(size_t size) const { return (size + alignment_ - 1) & ~(alignment_ - 1); }

  void* fallback_allocate(size_t size, Stream stream) {
    stats_.fallback_bytes += size;
    void* ptr = fallback_.allocate(size, stream);
    if (ptr != nullptr) fallback_size_[ptr] = size;
    return ptr;
  }

  // Does [offset, offset + size) intersect a live arena span? Live spans never overlap each
  // other, so only the nearest span starting before `offset + size` can.
  bool overlaps_live(size_t offset, size_t size) const {
    auto it = live_arena_.lower_bound(offset + size);
    if (it == live_arena_.begin()) return false;
    --it;
    return it->first + it->second > offset;
  }

  static bool overlap(const Pending& p, size_t offset, size_t size) {
    return p.offset < offset + size && offset < p.offset + p.size;
  }

  // Drops pending frees over [offset, offset + size) whose event completed (rule 4).
  void prune(size_t offset, size_t size) {
    size_t kept = 0;
    for (size_t i = 0; i < pending_.size(); ++i) {
      Pending& p = pending_[i];
      if (overlap(p, offset, size) && events_.query(p.token)) {
        events_.release(p.token);
        continue;
      }
      if (kept != i) pending_[kept] = std::move(p);
      ++kept;
    }
    pending_.resize(kept);
  }

  // NOTE [ Stream-ordered arena frees ] rules 2 and 3. A span stays pending after a wait, since
  // a third stream may come next.
  void order_after_pending_frees(size_t offset, size_t size, Stream stream) {
    prune(offset, size);
    bool waited = false;
    for (const Pending& p : pending_) {
      if (overlap(p, offset, size) && !(p.stream == stream)) {
        events_.wait(stream, p.token);
        waited = true;
      }
    }
    if (waited) ++stats_.stream_waits;
  }

  uint8_t* base_;
  size_t arena_bytes_;
  size_t alignment_;
  std::vector<std::vector<PlannedSlot>> phases_;
  Fallback fallback_;
  Events events_;
  long phase_ = -1;
  size_t next_ = 0;
  size_t suspended_ = 0;
  size_t prune_at_ = kPrunePending;  // NOTE [ Stream-ordered arena frees ] rule 4
  size_t live_arena_bytes_ = 0;
  std::map<size_t, size_t> live_arena_;                  // offset -> size, handed out by the arena
  std::unordered_map<void*, size_t> fallback_size_;      // pointers handed out by the fallback
  std::vector<Pending> pending_;                         // freed spans whose stream may still use them
  ArenaStats stats_;
  mutable std::mutex mu_;
};

}  // namespace memo
