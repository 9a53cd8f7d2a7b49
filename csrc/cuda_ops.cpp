// CUDA implementations of memo's ops and the CUDA half of memo._C. Compiled only in CUDA
// builds (setup.py adds it with MEMO_WITH_CUDA); the kernels it calls are in csrc/cuda/*.cu and
// take raw pointers, sizes, strides and the current stream's handle.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cuda/kernels.h"
#include "host_pool.h"
#include "token_copy.h"

namespace memo {
namespace {

#define MEMO_CUDA_OK(op, expr)                                                                     \
  do {                                                                                             \
    cudaError_t memo_err_ = (expr);                                                                \
    if (memo_err_ != cudaSuccess) (void)cudaGetLastError(); /* reported here, not by a later launch */ \
    TORCH_CHECK(memo_err_ == cudaSuccess, "memo.ops: ", op, ": ", #expr, " failed: ",             \
                cudaGetErrorString(memo_err_), "; check the device with memo env and report a bug"); \
  } while (0)

// Bytes of the device staging buffer the kernel path uses for host transfers, at most: the
// slice moves through it in chunks of this size (never a buffer as large as the slice).
constexpr int64_t kStagingBytes = int64_t{64} << 20;

// The kernel path between a strided device slice and host memory (a layout the copy plan cannot
// move by DMA): gather a chunk into the staging buffer and copy it out, or copy it in and
// scatter, chunk after chunk. One staging buffer suffices: on one stream, chunk k + 1's gather
// (or copy in) is ordered after chunk k's copy out (or scatter). The buffer returns to the
// caching allocator on this stream, so its reuse is ordered after the last chunk too.
void staged_host_copy(const char* op, bool pack, uint8_t* strided, const SliceLayout& l, int esize, void* host,
                      const at::Tensor& device_tensor, cudaStream_t stream) {
  const int64_t chunk = std::min<int64_t>(l.numel, kStagingBytes / esize);  // kStagingBytes / esize: 16-byte multiple
  at::Tensor staging = at::empty({chunk * esize}, device_tensor.options().dtype(at::kByte));
  for (int64_t begin = 0; begin < l.numel; begin += chunk) {
    const int64_t end = std::min(l.numel, begin + chunk);
    auto* h = static_cast<uint8_t*>(host) + begin * esize;
    const size_t bytes = static_cast<size_t>((end - begin) * esize);
    if (pack) {
      MEMO_CUDA_OK(op, cuda::gather_tokens_range(strided, staging.data_ptr(), l, esize, begin, end, stream));
      MEMO_CUDA_OK(op, cuda::copy_d2h_async(h, staging.data_ptr(), bytes, stream));
    } else {
      MEMO_CUDA_OK(op, cuda::copy_h2d_async(staging.data_ptr(), h, bytes, stream));
      MEMO_CUDA_OK(op, cuda::scatter_tokens_range(staging.data_ptr(), strided, l, esize, begin, end, stream));
    }
  }
}

// NOTE [ CUDA token copies ]
// 1. Device <-> host: the pieces of the copy plan (NOTE [ Token slice copy plan ]), straight
//    between the device tensor and the host block: copy engines only, no kernel that would wait
//    for SMs behind an attention kernel, no staging buffer. Host memory should be page-locked
//    (the host pool is); pageable memory still works, but CUDA then returns only once the copy
//    is done. Layouts the plan refuses take staged_host_copy (a kernel, bounded staging).
// 2. Device -> device (same device): the gather/scatter kernel. It runs at HBM bandwidth where
//    the copy engines' device-to-device copies are slower, and the swap engine never issues
//    these on its copy streams (its blocks are in the host pool).
// 3. Everything is enqueued on the current stream of the tensor's device; the caller keeps the
//    host side alive and unread until that stream reaches this point. Bytes are counted per
//    path (NOTE [ Copy counters ]).

// src: CUDA, any strides, token dimension `dim`; out: contiguous, on src's device or in host
// memory. out <- src.narrow(dim, start, stop - start). See NOTE [ CUDA token copies ].
void pack_tokens_cuda(const at::Tensor& src, int64_t dim, int64_t start, int64_t stop, const at::Tensor& out) {
  MEMO_CHECK_ARG("pack_tokens", src.is_cuda(), "src", "must be a CUDA tensor when out is, got ", src.device());
  MEMO_CHECK_ARG("pack_tokens", out.device().is_cpu() || out.device() == src.device(), "out",
                 "must be on ", src.device(), " or in host memory, got ", out.device());
  SliceLayout l = check_token_slice("pack_tokens", src, dim, start, stop, out, "out");
  if (l.numel == 0) return;
  c10::cuda::CUDAGuard guard(src.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(src.device().index()).stream();
  const int esize = static_cast<int>(src.element_size());
  auto* base = static_cast<uint8_t*>(src.data_ptr()) + l.offset * esize;
  const int64_t nbytes = l.numel * esize;
  if (out.is_cuda()) {  // rule 2
    count_copy(CopyCounter::kD2DKernel, nbytes);
    MEMO_CUDA_OK("pack_tokens", cuda::gather_tokens(base, out.data_ptr(), l, esize, stream));
    return;
  }
  const CopyPlan plan = make_copy_plan(l, esize);
  if (plan.dma) {  // rule 1
    count_copy(CopyCounter::kD2HDma, nbytes);
    MEMO_CUDA_OK("pack_tokens",
                 cuda::copy_plan_async(plan, base, out.data_ptr(), true, cudaMemcpyDeviceToHost, stream));
    return;
  }
  count_copy(CopyCounter::kD2HKernel, nbytes);
  staged_host_copy("pack_tokens", true, base, l, esize, out.data_ptr(), src, stream);
}

// packed: contiguous, on dst's device or in host memory; dst: CUDA, any strides.
// dst.narrow(dim, start, n) <- packed. See NOTE [ CUDA token copies ].
void unpack_tokens_cuda(const at::Tensor& packed, const at::Tensor& dst, int64_t dim, int64_t start) {
  MEMO_CHECK_ARG("unpack_tokens", dst.is_cuda(), "dst", "must be a CUDA tensor when packed is, got ", dst.device());
  MEMO_CHECK_ARG("unpack_tokens", packed.device().is_cpu() || packed.device() == dst.device(), "packed",
                 "must be on ", dst.device(), " or in host memory, got ", packed.device());
  const int64_t n = unpack_token_count(packed, dst, dim);
  SliceLayout l = check_token_slice("unpack_tokens", dst, dim, start, start + n, packed, "packed");
  if (l.numel == 0) return;
  c10::cuda::CUDAGuard guard(dst.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dst.device().index()).stream();
  const int esize = static_cast<int>(dst.element_size());
  auto* base = static_cast<uint8_t*>(dst.data_ptr()) + l.offset * esize;
  const int64_t nbytes = l.numel * esize;
  if (packed.is_cuda()) {  // rule 2
    count_copy(CopyCounter::kD2DKernel, nbytes);
    MEMO_CUDA_OK("unpack_tokens", cuda::scatter_tokens(packed.data_ptr(), base, l, esize, stream));
    return;
  }
  const CopyPlan plan = make_copy_plan(l, esize);
  if (plan.dma) {  // rule 1
    count_copy(CopyCounter::kH2DDma, nbytes);
    MEMO_CUDA_OK("unpack_tokens",
                 cuda::copy_plan_async(plan, base, packed.data_ptr(), false, cudaMemcpyHostToDevice, stream));
    return;
  }
  count_copy(CopyCounter::kH2DKernel, nbytes);
  staged_host_copy("unpack_tokens", false, base, l, esize, packed.data_ptr(), dst, stream);
}

// The host pool page-locks through these (csrc/host_pool.h).
[[maybe_unused]] const bool pin_hooks_installed = [] {
  pin_hooks().pin = &cuda::host_register;
  pin_hooks().unpin = &cuda::host_unregister;
  return true;
}();

}  // namespace

TORCH_LIBRARY_IMPL(memo, CUDA, m) {
  m.impl("pack_tokens", &pack_tokens_cuda);
  m.impl("unpack_tokens", &unpack_tokens_cuda);
}

void init_cuda_bindings(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cuda_device_count", &cuda::device_count);
  // plan: one list of (offset or None: unplanned, size) per phase. See NOTE [ Arena replay ] in arena.h.
  m.def("arena_configure", [](size_t arena_bytes,
                              const std::vector<std::vector<std::pair<std::optional<size_t>, size_t>>>& plan,
                              size_t alignment, int device) {
    std::vector<size_t> offsets, sizes, lengths;
    for (const auto& phase : plan) {
      lengths.push_back(phase.size());
      for (const auto& slot : phase) {
        offsets.push_back(slot.first.value_or(SIZE_MAX));
        sizes.push_back(slot.second);
      }
    }
    char err[512] = {0};
    int rc = memo_arena_configure(arena_bytes, offsets.data(), sizes.data(), lengths.data(), lengths.size(),
                                  alignment, device, err, sizeof(err));
    TORCH_CHECK(rc == 0, err);
  });
  m.def("arena_begin_phase", [](int device, size_t p) {
    TORCH_CHECK(memo_arena_begin_phase(device, p) == 0, "memo.arena: phase ", p, " does not exist or device ", device,
                " has no arena; call arena_configure with the plan first");
  });
  m.def("arena_end_phase", &memo_arena_end_phase);
  m.def("arena_suspend", &memo_arena_suspend);
  m.def("arena_resume", &memo_arena_resume);
  m.def("arena_release", &memo_arena_release);
  m.def("arena_stats", [](int device) {
    const char* keys[] = {"requests", "hits", "misses", "conflicts", "unplanned", "outside", "hit_bytes",
                          "miss_bytes", "fallback_bytes", "stream_waits", "live_arena_blocks",
                          "live_fallback_blocks", "live_arena_bytes", "peak_arena_bytes", "arena_bytes"};
    constexpr size_t n = sizeof(keys) / sizeof(keys[0]);
    size_t s[n] = {0};
    py::dict d;
    size_t got = memo_arena_stats(device, s, n);
    for (size_t i = 0; i < got; ++i) d[keys[i]] = s[i];
    size_t pool[4] = {0};
    if (memo_arena_fallback_memory(device, pool) == 0) {
      d["fallback_reserved_bytes"] = pool[0];
      d["fallback_reserved_peak_bytes"] = pool[1];
      d["fallback_used_bytes"] = pool[2];
      d["fallback_used_peak_bytes"] = pool[3];
    }
    return d;
  });
  // Symbol names for torch.cuda.memory.CUDAPluggableAllocator(memo._C.__file__, alloc, free).
  m.attr("arena_alloc_symbol") = "memo_arena_alloc";
  m.attr("arena_free_symbol") = "memo_arena_free";
}

}  // namespace memo
