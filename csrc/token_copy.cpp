// Token-slice pack and unpack: op schemas (TORCH_LIBRARY) and their CPU implementations.
// The CUDA implementations are in cuda_ops.cpp (binding) and cuda/token_copy.cu (kernels).

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "checks.h"
#include "layout.h"
#include "token_copy.h"

namespace memo {
namespace {

std::array<std::atomic<int64_t>, static_cast<size_t>(CopyCounter::kCount)> copy_counters{};
// memo._C.copy_counters()' keys, in CopyCounter's order. See NOTE [ Copy counters ].
constexpr std::array<const char*, static_cast<size_t>(CopyCounter::kCount)> kCopyCounterNames = {
    "d2h_dma_bytes", "d2h_kernel_bytes", "h2d_dma_bytes", "h2d_kernel_bytes", "d2d_kernel_bytes",
    "host_pack_bytes", "host_unpack_bytes"};

constexpr int64_t kUnitBytes = 1 << 18;      // bytes per unit of work handed to a thread

// Copies smaller than this run on the calling thread (in cache, one thread is about as fast).
// A parallel region ends in a barrier: if a worker's core is busy with another process, the
// copy waits for the scheduler (about 8 ms on the loaded 2-core CI machine, measured with
// benchmarks/copy.py); torch's own copy_ pays the same. MEMO_PARALLEL_COPY_BYTES overrides it
// (0: always parallel; a huge value: never).
int64_t parallel_min_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MEMO_PARALLEL_COPY_BYTES");
    return env != nullptr ? std::atoll(env) : int64_t{8} << 20;
  }();
  return bytes;
}

// Runs f(u) for u in [0, units). Threads pull units from a shared counter, so a thread slowed
// down by a busy core takes fewer units (the region's closing barrier still waits for it to
// arrive: see parallel_min_bytes).
template <typename F>
void for_each_unit(int64_t units, int64_t total_bytes, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units);
  if (threads <= 1 || total_bytes < parallel_min_bytes() || at::in_parallel_region()) {
    for (int64_t u = 0; u < units; ++u) f(u);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) f(u);
  });
}

// Copies at least this large write with non-temporal (streaming) stores: the destination is
// not read again soon, and skipping the read-for-ownership of every written cache line is what
// makes glibc's memcpy fast on large copies. Smaller copies stay in cache with plain stores.
constexpr int64_t kStreamingBytes = int64_t{8} << 20;

// memcpy with streaming stores for the 16-byte-aligned body of the destination.
inline void stream_copy(uint8_t* dst, const uint8_t* src, int64_t n) {
#if defined(__SSE2__)
  if (n >= 128) {
    const int64_t head = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15);
    std::memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    const int64_t body = n & ~int64_t{63};
    for (int64_t i = 0; i < body; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    std::memcpy(dst + body, src + body, n - body);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Makes streaming stores visible before the unit counts as done.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <bool kPack, bool kStream>
inline void copy_bytes(uint8_t* strided, uint8_t* packed, int64_t n) {
  uint8_t* dst = kPack ? packed : strided;
  const uint8_t* src = kPack ? strided : packed;
  kStream ? stream_copy(dst, src, n) : (void)std::memcpy(dst, src, n);
}

// Element offset (on the strided side) of row `r`, rows numbered in packed order over the
// outer dimensions [0, n - 1); idx receives the row's multi-index.
inline int64_t row_offset(const SliceLayout& l, int64_t r, int64_t* idx) {
  int64_t off = 0;
  for (int d = l.ndim - 2; d >= 0; --d) {
    idx[d] = r % l.sizes[d];
    r /= l.sizes[d];
    off += idx[d] * l.strides[d];
  }
  return off;
}

// Copies between the strided slice at `strided` (layout l, elements of `esize` bytes) and the
// contiguous buffer `packed`; kPack: strided -> packed, else packed -> strided.
// See NOTE [ Token slice layout ].
// kEsize: the element size when known at compile time (0: use esize_arg).
template <bool kPack, int64_t kEsize, bool kStream>
void copy_rows(uint8_t* strided, uint8_t* packed, const SliceLayout& l, int64_t esize_arg) {
  const int64_t esize = kEsize != 0 ? kEsize : esize_arg;
  const int n = l.ndim;
  const int64_t total = l.numel * esize;
  if (n == 0) return copy_bytes<kPack, false>(strided, packed, esize);  // a single element
  const bool inner_contiguous = l.strides[n - 1] == 1;
  const int64_t row_len = l.sizes[n - 1];
  const int64_t row_bytes = row_len * esize;
  const int64_t rows = l.numel / row_len;

  if (inner_contiguous && row_bytes >= 2 * kUnitBytes) {
    // 1. Long contiguous rows (a whole slice, or a few batch rows): units are pieces of rows.
    const int64_t per_row = (row_bytes + kUnitBytes - 1) / kUnitBytes;
    for_each_unit(rows * per_row, total, [&](int64_t u) {
      int64_t idx[kMaxCopyDims];
      const int64_t r = u / per_row, lo = (u % per_row) * kUnitBytes;
      const int64_t off = row_offset(l, r, idx) * esize + lo;
      copy_bytes<kPack, kStream>(strided + off, packed + r * row_bytes + lo, std::min(kUnitBytes, row_bytes - lo));
      if (kStream) stream_fence();
    });
    return;
  }

  if (inner_contiguous && n >= 3 && l.strides[n - 3] < l.strides[n - 2]) {
    // 2. The last two outer dimensions are transposed in memory (SDPA's (b, heads, s, d) view
    //    of (b, s, heads, d)): walking packed order would touch a new page every row. Tile the
    //    token-like dimension n - 2 so that reads and writes are both runs within a tile.
    const int64_t a = l.sizes[n - 3], t_size = l.sizes[n - 2];
    const int64_t tile = std::max<int64_t>(1, std::min(t_size, kUnitBytes / std::max<int64_t>(a * row_bytes, 1)));
    const int64_t tiles = (t_size + tile - 1) / tile;
    const int64_t outer = rows / (a * t_size);
    for_each_unit(outer * tiles, total, [&](int64_t u) {
      int64_t idx[kMaxCopyDims];
      const int64_t o = u / tiles, t0 = (u % tiles) * tile, t1 = std::min(t_size, t0 + tile);
      const int64_t base_row = o * a * t_size;  // row of (o, 0, 0) in packed order
      const int64_t base_off = row_offset(l, base_row, idx);
      // Read the source side in address order; writes (streaming above 8 MiB) need no prefetch.
      auto row = [&](int64_t i, int64_t t) {
        const int64_t off = base_off + i * l.strides[n - 3] + t * l.strides[n - 2];
        copy_bytes<kPack, kStream>(strided + off * esize, packed + (base_row + i * t_size + t) * row_bytes, row_bytes);
      };
      if (kPack) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t i = 0; i < a; ++i) row(i, t);
      } else {
        for (int64_t i = 0; i < a; ++i)
          for (int64_t t = t0; t < t1; ++t) row(i, t);
      }
      if (kStream) stream_fence();
    });
    return;
  }

  // 3. Rows in packed order, many rows per unit, the row index carried from row to row.
  const int64_t per_unit = std::max<int64_t>(1, kUnitBytes / std::max<int64_t>(row_bytes, 1));
  const int64_t units = (rows + per_unit - 1) / per_unit;
  for_each_unit(units, total, [&](int64_t u) {
    int64_t idx[kMaxCopyDims];
    const int64_t begin = u * per_unit, end = std::min(rows, begin + per_unit);
    int64_t off = row_offset(l, begin, idx);
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* s = strided + off * esize;
      uint8_t* p = packed + r * row_bytes;
      if (inner_contiguous) {
        copy_bytes<kPack, kStream>(s, p, row_bytes);
      } else {
        const int64_t step = l.strides[n - 1] * esize;
        for (int64_t i = 0; i < row_len; ++i, p += esize, s += step) copy_bytes<kPack, false>(s, p, esize);
      }
      for (int d = n - 2; d >= 0; --d) {  // advance the row index
        off += l.strides[d];
        if (++idx[d] < l.sizes[d]) break;
        off -= idx[d] * l.strides[d];
        idx[d] = 0;
      }
    }
    if (kStream) stream_fence();
  });
}

template <bool kPack, int64_t kEsize>
void copy_rows_sized(uint8_t* strided, uint8_t* packed, const SliceLayout& l, int64_t esize) {
  if (l.numel * esize >= kStreamingBytes) {
    copy_rows<kPack, kEsize, true>(strided, packed, l, esize);
  } else {
    copy_rows<kPack, kEsize, false>(strided, packed, l, esize);
  }
}

template <bool kPack>
void copy_dispatch(uint8_t* strided, uint8_t* packed, const SliceLayout& l, int64_t esize) {
  // Fixed-size memcpy lets the compiler emit one load and one store per element.
  switch (esize) {
    case 1: return copy_rows_sized<kPack, 1>(strided, packed, l, 1);
    case 2: return copy_rows_sized<kPack, 2>(strided, packed, l, 2);
    case 4: return copy_rows_sized<kPack, 4>(strided, packed, l, 4);
    case 8: return copy_rows_sized<kPack, 8>(strided, packed, l, 8);
    default: return copy_rows_sized<kPack, 0>(strided, packed, l, esize);
  }
}

// src: any shape and strides, token dimension `dim`; out: contiguous, numel of the slice.
// out <- src.narrow(dim, start, stop - start), byte for byte.
void pack_tokens_cpu(const at::Tensor& src, int64_t dim, int64_t start, int64_t stop, const at::Tensor& out) {
  MEMO_CHECK_ARG("pack_tokens", src.device().is_cpu() && out.device().is_cpu(), "src/out",
                 "must both be CPU tensors for the CPU op, got ", src.device(), " and ", out.device());
  SliceLayout l = check_token_slice("pack_tokens", src, dim, start, stop, out, "out");
  if (l.numel == 0) return;
  const int64_t esize = src.element_size();
  count_copy(CopyCounter::kHostPack, l.numel * esize);
  auto* base = static_cast<uint8_t*>(src.data_ptr()) + l.offset * esize;
  copy_dispatch<true>(base, static_cast<uint8_t*>(out.data_ptr()), l, esize);
}

// packed: contiguous, numel of the slice; dst: any shape and strides, token dimension `dim`.
// dst.narrow(dim, start, n) <- packed, n = packed.numel() / (dst.numel() / dst.size(dim)).
void unpack_tokens_cpu(const at::Tensor& packed, const at::Tensor& dst, int64_t dim, int64_t start) {
  MEMO_CHECK_ARG("unpack_tokens", packed.device().is_cpu() && dst.device().is_cpu(), "packed/dst",
                 "must both be CPU tensors for the CPU op, got ", packed.device(), " and ", dst.device());
  const int64_t n = unpack_token_count(packed, dst, dim);
  SliceLayout l = check_token_slice("unpack_tokens", dst, dim, start, start + n, packed, "packed");
  if (l.numel == 0) return;
  const int64_t esize = dst.element_size();
  count_copy(CopyCounter::kHostUnpack, l.numel * esize);
  auto* base = static_cast<uint8_t*>(dst.data_ptr()) + l.offset * esize;
  copy_dispatch<false>(base, static_cast<uint8_t*>(packed.data_ptr()), l, esize);
}

// One piece of a copy plan on the host, exactly as cudaMemcpy3D moves linear memory: row y of
// slice z at ptr + z * (pitch * ysize) + y * pitch, on each side. CUDA's own checks are
// repeated here, so a plan that would make CUDA refuse fails the CPU tests too.
// See NOTE [ Token slice copy plan ] rule 1.
void pitched_copy_host(const PitchedCopy& c) {
  for (const PitchedSide& side : {c.dst_side, c.src_side}) {
    TORCH_CHECK(c.width <= side.pitch && side.pitch <= kMaxPitchBytes && (c.depth == 1 || c.height <= side.ysize),
                "memo.ops: copy plan: width ", c.width, ", height ", c.height, " against pitch ", side.pitch,
                ", ysize ", side.ysize, " would be refused by CUDA (bug in memo; please report it)");
  }
  auto* dst = static_cast<uint8_t*>(c.dst);
  const auto* src = static_cast<const uint8_t*>(c.src);
  for (int64_t z = 0; z < c.depth; ++z) {
    for (int64_t y = 0; y < c.height; ++y) {
      std::memcpy(dst + z * c.dst_side.pitch * c.dst_side.ysize + y * c.dst_side.pitch,
                  src + z * c.src_side.pitch * c.src_side.ysize + y * c.src_side.pitch, c.width);
    }
  }
}

// The plan's host executor, a test entry point for the DMA path of cuda_ops.cpp (which issues the
// same pieces with cudaMemcpy2DAsync/3DAsync). kPack: strided -> packed.
template <bool kPack>
void copy_by_plan(const at::Tensor& strided, int64_t dim, int64_t start, int64_t stop, const at::Tensor& packed) {
  const char* op = kPack ? "pack_by_plan" : "unpack_by_plan";
  MEMO_CHECK_ARG(op, strided.device().is_cpu() && packed.device().is_cpu(), "tensors",
                 "must be CPU tensors (this is the host executor of the GPU's copy plan)");
  SliceLayout l = check_token_slice(op, strided, dim, start, stop, packed, kPack ? "out" : "packed");
  const int64_t esize = strided.element_size();
  const CopyPlan plan = make_copy_plan(l, esize);
  MEMO_CHECK_ARG(op, plan.dma, "src/dst", "has a slice that needs the gather kernel: ", plan.reason,
                 "; see memo._C.copy_plan");
  const auto* base = static_cast<const uint8_t*>(strided.data_ptr()) + l.offset * esize;
  for_each_pitched_copy(plan, base, packed.data_ptr(), kPack, pitched_copy_host);
}

pybind11::dict plan_dict(const CopyPlan& p) {
  pybind11::dict d;
  d["dma"] = p.dma;
  d["reason"] = std::string(p.reason);
  d["pieces"] = p.pieces;
  d["width"] = p.width;
  d["height"] = p.height;
  d["depth"] = p.depth;
  d["strided_pitch"] = p.strided.pitch;
  d["strided_ysize"] = p.strided.ysize;
  d["packed_pitch"] = p.packed.pitch;
  d["packed_ysize"] = p.packed.ysize;
  pybind11::list loops;
  for (int i = 0; i < p.loops; ++i) loops.append(pybind11::make_tuple(p.loop_sizes[i], p.loop_strided[i], p.loop_packed[i]));
  d["loops"] = loops;  // (size, strided stride, packed stride) in bytes
  return d;
}

}  // namespace

void count_copy(CopyCounter counter, int64_t bytes) {
  copy_counters[static_cast<size_t>(counter)].fetch_add(bytes, std::memory_order_relaxed);
}

// memo._C entries of the copy plan and the copy counters; called from bindings.cpp.
void init_copy_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  // sizes/strides: the whole tensor (strides in elements); the slice is [start, stop) of `dim`.
  m.def("copy_plan", [](const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, int64_t dim,
                        int64_t start, int64_t stop, int64_t element_size) {
    const int64_t ndim = static_cast<int64_t>(sizes.size());
    MEMO_CHECK_ARG("copy_plan", ndim > 0 && strides.size() == sizes.size(), "sizes/strides",
                   "must be equally long and not empty, got ", ndim, " sizes and ", strides.size(), " strides");
    MEMO_CHECK_ARG("copy_plan", dim >= -ndim && dim < ndim, "dim", "is ", dim, " for ", ndim, " dimensions");
    if (dim < 0) dim += ndim;
    MEMO_CHECK_ARG("copy_plan", 0 <= start && start <= stop && stop <= sizes[dim], "start/stop", "[", start, ", ",
                   stop, ") is not inside the ", sizes[dim], " tokens of dimension ", dim);
    MEMO_CHECK_ARG("copy_plan", element_size > 0, "element_size", "is ", element_size, ", must be positive");
    for (int64_t d = 0; d < ndim; ++d) {
      MEMO_CHECK_ARG("copy_plan", sizes[d] >= 0 && strides[d] >= 0, "sizes/strides", "must not be negative, got ",
                     sizes[d], " and ", strides[d], " at dimension ", d);
    }
    SliceLayout l;
    MEMO_CHECK_ARG("copy_plan",
                   make_slice_layout(sizes.data(), strides.data(), static_cast<int>(ndim), static_cast<int>(dim),
                                     start, stop, &l),
                   "sizes/strides", "have more than ", kMaxCopyDims, " dimensions that cannot be merged");
    return plan_dict(make_copy_plan(l, element_size));
  }, py::arg("sizes"), py::arg("strides"), py::arg("dim"), py::arg("start"), py::arg("stop"),
     py::arg("element_size"));
  m.def("_pack_by_plan", &copy_by_plan<true>, py::arg("src"), py::arg("dim"), py::arg("start"), py::arg("stop"),
        py::arg("out"));
  m.def("_unpack_by_plan", [](const at::Tensor& packed, const at::Tensor& dst, int64_t dim, int64_t start) {
    const int64_t n = unpack_token_count(packed, dst, dim);
    copy_by_plan<false>(dst, dim, start, start + n, packed);
  }, py::arg("packed"), py::arg("dst"), py::arg("dim"), py::arg("start"));
  m.def("copy_counters", [] {
    py::dict d;
    for (size_t i = 0; i < kCopyCounterNames.size(); ++i) d[kCopyCounterNames[i]] = copy_counters[i].load();
    return d;
  });
  m.def("reset_copy_counters", [] {
    for (auto& c : copy_counters) c.store(0);
  });
}

// Shared argument checks of both ops; returns the slice layout. `packed` is the contiguous side.
SliceLayout check_token_slice(const char* op, const at::Tensor& strided, int64_t& dim, int64_t start,
                             int64_t stop, const at::Tensor& packed, const char* packed_name) {
  MEMO_CHECK_ARG(op, strided.dim() > 0, "src/dst", "must have a token dimension, got a 0-d tensor");
  MEMO_CHECK_ARG(op, dim >= -strided.dim() && dim < strided.dim(), "dim",
                 "is ", dim, " but the tensor has ", strided.dim(), " dimensions");
  if (dim < 0) dim += strided.dim();
  const int64_t len = strided.size(dim);
  MEMO_CHECK_ARG(op, 0 <= start && start <= stop && stop <= len, "start/stop",
                 "[", start, ", ", stop, ") is not inside the ", len, " tokens of dimension ", dim);
  MEMO_CHECK_ARG(op, packed.is_contiguous(), packed_name, "must be contiguous");
  MEMO_CHECK_ARG(op, packed.scalar_type() == strided.scalar_type(), packed_name, "has dtype ",
                 packed.scalar_type(), " but the strided tensor has ", strided.scalar_type());
  const int64_t per_token = len == 0 ? 0 : strided.numel() / len;
  MEMO_CHECK_ARG(op, packed.numel() == per_token * (stop - start), packed_name, "has ", packed.numel(),
                 " elements but the slice has ", per_token * (stop - start), " (", stop - start, " tokens of ",
                 per_token, ")");
  SliceLayout l;
  bool ok = make_slice_layout(strided.sizes().data(), strided.strides().data(), static_cast<int>(strided.dim()),
                              static_cast<int>(dim), start, stop, &l);
  MEMO_CHECK_ARG(op, ok, "src/dst", "has more than ", kMaxCopyDims, " dimensions that cannot be merged");
  return l;
}


int64_t unpack_token_count(const at::Tensor& packed, const at::Tensor& dst, int64_t dim) {
  MEMO_CHECK_ARG("unpack_tokens", dst.dim() > 0 && dim >= -dst.dim() && dim < dst.dim(), "dim",
                 "is ", dim, " but dst has ", dst.dim(), " dimensions");
  const int64_t d = dim < 0 ? dim + dst.dim() : dim;
  const int64_t per_token = dst.size(d) == 0 ? 0 : dst.numel() / dst.size(d);
  MEMO_CHECK_ARG("unpack_tokens", per_token > 0 ? packed.numel() % per_token == 0 : packed.numel() == 0, "packed",
                 "has ", packed.numel(), " elements, not a whole number of tokens of ", per_token);
  MEMO_CHECK_ARG("unpack_tokens", at::has_internal_overlap(dst) != at::MemOverlap::Yes, "dst",
                 "has elements that share memory (an expanded tensor); unpack into a tensor that owns its elements");
  return per_token == 0 ? 0 : packed.numel() / per_token;
}

// Schemas: declared once here; CPU kernels below, CUDA kernels in cuda_ops.cpp.
TORCH_LIBRARY(memo, m) {
  m.def("pack_tokens(Tensor src, int dim, int start, int stop, Tensor(a!) out) -> ()");
  m.def("unpack_tokens(Tensor packed, Tensor(a!) dst, int dim, int start) -> ()");
}

// Meta (and so FakeTensorMode, which the planner's profiler traces under): the checks, no copy.
void pack_tokens_meta(const at::Tensor& src, int64_t dim, int64_t start, int64_t stop, const at::Tensor& out) {
  check_token_slice("pack_tokens", src, dim, start, stop, out, "out");
}

void unpack_tokens_meta(const at::Tensor& packed, const at::Tensor& dst, int64_t dim, int64_t start) {
  const int64_t n = unpack_token_count(packed, dst, dim);
  check_token_slice("unpack_tokens", dst, dim, start, start + n, packed, "packed");
}

TORCH_LIBRARY_IMPL(memo, Meta, m) {
  m.impl("pack_tokens", &pack_tokens_meta);
  m.impl("unpack_tokens", &unpack_tokens_meta);
}

TORCH_LIBRARY_IMPL(memo, CPU, m) {
  m.impl("pack_tokens", &pack_tokens_cpu);
  m.impl("unpack_tokens", &unpack_tokens_cpu);
}

}  // namespace memo
