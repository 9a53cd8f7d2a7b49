// The Python module memo._C: host pool, arena replay (CPU), and what this build contains.
// The ops themselves are registered with the dispatcher (torch.ops.memo.*) in token_copy.cpp.

#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "arena.h"
#include "host_pool.h"

namespace memo {
void init_copy_bindings(pybind11::module_& m);  // token_copy.cpp: copy plan, copy counters
}

#ifdef MEMO_WITH_CUDA
namespace memo {
void init_cuda_bindings(pybind11::module& m);  // cuda_ops.cpp
}
#endif

namespace {

namespace py = pybind11;

// The whole pool as a uint8 CPU tensor. The tensor holds a reference to the pool, so the
// memory outlives every view Python made of it.
at::Tensor pool_buffer(const std::shared_ptr<memo::HostPool>& pool) {
  auto keep = new std::shared_ptr<memo::HostPool>(pool);
  return torch::from_blob(
      pool->data(), {static_cast<int64_t>(pool->capacity())},
      [keep](void*) { delete keep; }, torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCPU));
}

py::dict pool_stats(const memo::HostPool& pool) {
  memo::HostPoolStats s = pool.stats();
  py::dict d;
  d["capacity_bytes"] = s.capacity_bytes;
  d["used_bytes"] = s.used_bytes;
  d["high_water_bytes"] = s.high_water_bytes;
  d["largest_free_bytes"] = s.largest_free_bytes;
  d["num_allocs"] = s.num_allocs;
  d["live_blocks"] = s.live_blocks;
  d["free_spans"] = s.free_spans;
  d["pinned"] = s.pinned;
  return d;
}

// Fallback of the CPU arena replay: the C heap (misses are rare and only counted).
struct HeapFallback {
  void* allocate(size_t size, int64_t) { return std::malloc(size); }
  void deallocate(void* ptr, size_t, int64_t) { std::free(ptr); }
};

// Stand-in for CUDA streams and events in the CPU arena (NOTE [ Stream-ordered arena frees ] in
// arena.h): a stream is an integer, an event is (stream, n) for the n-th event recorded on it,
// and it completes when the test says the stream got that far (complete()). Waits are logged.
struct StreamClock {
  std::map<int64_t, int64_t> recorded, completed;
  std::vector<std::tuple<int64_t, int64_t, int64_t>> waits;  // (waiting stream, stream, event n)
};

struct FakeStreamEvents {
  using Stream = int64_t;
  using Token = std::pair<int64_t, int64_t>;
  std::shared_ptr<StreamClock> clock = std::make_shared<StreamClock>();
  Token record(Stream s) { return {s, ++clock->recorded[s]}; }
  bool query(const Token& t) { return clock->completed[t.first] >= t.second; }
  void wait(Stream s, const Token& t) { clock->waits.emplace_back(s, t.first, t.second); }
  void release(const Token&) {}
};

using CpuReplay = memo::ArenaReplay<HeapFallback, FakeStreamEvents>;

// A CPU arena: owns `arena_bytes` of host memory and replays a plan over it. Addresses are
// returned as integers so tests can check placement without touching the memory. A slot with
// offset None is unplanned (NOTE [ Arena replay ] rule 1).
class CpuArena {
 public:
  using Plan = std::vector<std::vector<std::pair<std::optional<size_t>, size_t>>>;
  CpuArena(size_t arena_bytes, const Plan& plan, size_t alignment)
      : memory_(static_cast<uint8_t*>(std::malloc(arena_bytes == 0 ? 1 : arena_bytes))) {
    if (memory_ == nullptr) throw std::bad_alloc();
    std::vector<std::vector<memo::PlannedSlot>> phases;
    for (const auto& phase : plan) {
      phases.emplace_back();
      for (const auto& slot : phase) phases.back().push_back({slot.first.value_or(memo::kUnplanned), slot.second});
    }
    try {
      replay_ = std::make_unique<CpuReplay>(memory_, arena_bytes, std::move(phases), alignment, HeapFallback{},
                                            FakeStreamEvents{clock_});
    } catch (...) {
      std::free(memory_);
      throw;
    }
  }
  ~CpuArena() {
    replay_.reset();
    std::free(memory_);
  }
  CpuReplay& replay() { return *replay_; }
  StreamClock& clock() { return *clock_; }

 private:
  std::shared_ptr<StreamClock> clock_ = std::make_shared<StreamClock>();
  uint8_t* memory_;
  std::unique_ptr<CpuReplay> replay_;
};

py::dict arena_stats(const memo::ArenaStats& s) {
  py::dict d;
  d["requests"] = s.requests;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["conflicts"] = s.conflicts;
  d["skipped"] = s.skipped;
  d["unplanned"] = s.unplanned;
  d["outside"] = s.outside;
  d["hit_bytes"] = s.hit_bytes;
  d["miss_bytes"] = s.miss_bytes;
  d["fallback_bytes"] = s.fallback_bytes;
  d["stream_waits"] = s.stream_waits;
  d["live_arena_blocks"] = s.live_arena_blocks;
  d["live_fallback_blocks"] = s.live_fallback_blocks;
  d["live_arena_bytes"] = s.live_arena_bytes;
  d["peak_arena_bytes"] = s.peak_arena_bytes;
  return d;
}

// One plain memcpy of src into dst (both contiguous CPU tensors): the benchmark's baseline.
void plain_memcpy(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.device().is_cpu() && src.device().is_cpu(),
              "memo.ops: _memcpy: both tensors must be contiguous CPU tensors");
  TORCH_CHECK(dst.nbytes() == src.nbytes(), "memo.ops: _memcpy: ", dst.nbytes(), " B vs ", src.nbytes(), " B");
  py::gil_scoped_release no_gil;
  std::memcpy(dst.data_ptr(), src.data_ptr(), src.nbytes());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memo's C++ (and, where built, CUDA) ops; see memo/ops.py for the typed Python face";

  py::class_<memo::HostPool, std::shared_ptr<memo::HostPool>>(m, "HostPool")
      .def(py::init<size_t, bool>(), py::arg("capacity"), py::arg("pin"))
      .def("allocate", &memo::HostPool::allocate, py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def("free", &memo::HostPool::free, py::arg("offset"), py::call_guard<py::gil_scoped_release>())
      .def("block_size", &memo::HostPool::block_size, py::arg("offset"))
      .def("buffer", &pool_buffer)
      .def("stats", &pool_stats)
      .def_property_readonly("capacity", &memo::HostPool::capacity)
      .def_property_readonly("pinned", &memo::HostPool::pinned)
      .def_property_readonly("address", [](const memo::HostPool& p) { return reinterpret_cast<uintptr_t>(p.data()); })
      .def_readonly_static("alignment", &memo::HostPool::kAlignment);

  py::class_<CpuArena>(m, "ArenaReplay")
      .def(py::init<size_t, const CpuArena::Plan&, size_t>(), py::arg("arena_bytes"), py::arg("plan"),
           py::arg("alignment") = 512)
      .def("begin_phase", [](CpuArena& a, size_t p) { a.replay().begin_phase(p); }, py::arg("phase"))
      .def("end_phase", [](CpuArena& a) { a.replay().end_phase(); })
      .def("suspend", [](CpuArena& a) { a.replay().suspend(); })
      .def("resume", [](CpuArena& a) { a.replay().resume(); })
      .def("allocate", [](CpuArena& a, size_t size, int64_t stream) {
             return reinterpret_cast<uintptr_t>(a.replay().allocate(size, stream));
           }, py::arg("size"), py::arg("stream") = 0)
      .def("free", [](CpuArena& a, uintptr_t ptr, int64_t stream) {
             a.replay().deallocate(reinterpret_cast<void*>(ptr), stream);
           }, py::arg("address"), py::arg("stream") = 0)
      .def("owns", [](CpuArena& a, uintptr_t ptr) { return a.replay().owns(reinterpret_cast<void*>(ptr)); })
      .def("stats", [](CpuArena& a) { return arena_stats(a.replay().stats()); })
      .def("reset_stats", [](CpuArena& a) { a.replay().reset_stats(); })
      // The stream stand-in: events recorded on `stream` so far are complete.
      .def("complete", [](CpuArena& a, int64_t stream) { a.clock().completed[stream] = a.clock().recorded[stream]; },
           py::arg("stream"))
      .def("waits", [](CpuArena& a) { return a.clock().waits; })
      .def_property_readonly("pending_frees", [](CpuArena& a) { return a.replay().pending_frees(); })
      .def_property_readonly("base", [](CpuArena& a) { return reinterpret_cast<uintptr_t>(a.replay().base()); })
      .def_property_readonly("num_phases", [](CpuArena& a) { return a.replay().num_phases(); })
      .def_property_readonly("current_phase", [](CpuArena& a) { return a.replay().current_phase(); });

  m.def("_memcpy", &plain_memcpy, py::arg("dst"), py::arg("src"));
  memo::init_copy_bindings(m);

#ifdef MEMO_WITH_CUDA
  m.attr("has_cuda_part") = true;
  memo::init_cuda_bindings(m);
#else
  m.attr("has_cuda_part") = false;
#endif
}
