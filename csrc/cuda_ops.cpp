// CUDA implementations of memo's ops and the CUDA half of memo._C. Compiled only in CUDA
// builds (setup.py adds it with MEMO_WITH_CUDA); the kernels it calls are in csrc/cuda/*.cu and
// take raw pointers, sizes, strides and the current stream's handle.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

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
    TORCH_CHECK(memo_err_ == cudaSuccess, "memo.ops: ", op, ": ", #expr, " failed: ",             \
                cudaGetErrorString(memo_err_), "; check the device with memo env and report a bug"); \
  } while (0)

// src: CUDA, any strides, token dimension `dim`; out: contiguous, on src's device (gather
// kernel) or in host memory (gather into a device staging buffer, then one async D2H copy).
// Everything is enqueued on the current stream of src's device; the caller keeps `out` alive
// and unread until that stream reaches this point (See NOTE [ Token slice layout ]).
void pack_tokens_cuda(const at::Tensor& src, int64_t dim, int64_t start, int64_t stop, const at::Tensor& out) {
  MEMO_CHECK_ARG("pack_tokens", src.is_cuda(), "src", "must be a CUDA tensor when out is, got ", src.device());
  MEMO_CHECK_ARG("pack_tokens", out.device().is_cpu() || out.device() == src.device(), "out",
                 "must be on ", src.device(), " or in host memory, got ", out.device());
  SliceLayout l = check_token_slice("pack_tokens", src, dim, start, stop, out, "out");
  if (l.numel == 0) return;
  c10::cuda::CUDAGuard guard(src.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(src.device().index()).stream();
  const int esize = static_cast<int>(src.element_size());
  const auto* base = static_cast<const uint8_t*>(src.data_ptr()) + l.offset * esize;
  if (out.is_cuda()) {
    MEMO_CUDA_OK("pack_tokens", cuda::gather_tokens(base, out.data_ptr(), l, esize, stream));
    return;
  }
  // The staging block returns to the caching allocator on this stream, so its reuse is ordered
  // after the copy below.
  at::Tensor staging = at::empty({l.numel}, src.options());
  MEMO_CUDA_OK("pack_tokens", cuda::gather_tokens(base, staging.data_ptr(), l, esize, stream));
  MEMO_CUDA_OK("pack_tokens", cuda::copy_d2h_async(out.data_ptr(), staging.data_ptr(), out.nbytes(), stream));
}

// packed: contiguous, on dst's device or in host memory; dst: CUDA, any strides.
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
  if (packed.is_cuda()) {
    MEMO_CUDA_OK("unpack_tokens", cuda::scatter_tokens(packed.data_ptr(), base, l, esize, stream));
    return;
  }
  at::Tensor staging = at::empty({l.numel}, dst.options());
  MEMO_CUDA_OK("unpack_tokens", cuda::copy_h2d_async(staging.data_ptr(), packed.data_ptr(), packed.nbytes(), stream));
  MEMO_CUDA_OK("unpack_tokens", cuda::scatter_tokens(staging.data_ptr(), base, l, esize, stream));
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
  // plan: one list of (offset, size) per phase. See NOTE [ Arena replay ] in arena.h.
  m.def("arena_configure", [](size_t arena_bytes, const std::vector<std::vector<std::pair<size_t, size_t>>>& plan,
                              int device) {
    std::vector<size_t> offsets, sizes, lengths;
    for (const auto& phase : plan) {
      lengths.push_back(phase.size());
      for (const auto& slot : phase) {
        offsets.push_back(slot.first);
        sizes.push_back(slot.second);
      }
    }
    char err[512] = {0};
    int rc = memo_arena_configure(arena_bytes, offsets.data(), sizes.data(), lengths.data(), lengths.size(), device,
                                  err, sizeof(err));
    TORCH_CHECK(rc == 0, err);
  });
  m.def("arena_begin_phase", [](size_t p) {
    TORCH_CHECK(memo_arena_begin_phase(p) == 0, "memo.arena: phase ", p,
                " does not exist or no arena is configured; call arena_configure with the plan first");
  });
  m.def("arena_end_phase", &memo_arena_end_phase);
  m.def("arena_release", &memo_arena_release);
  m.def("arena_stats", []() {
    size_t s[6] = {0};
    py::dict d;
    if (memo_arena_stats(s) == 0) return d;
    const char* keys[6] = {"requests", "hits", "misses", "conflicts", "hit_bytes", "miss_bytes"};
    for (int i = 0; i < 6; ++i) d[keys[i]] = s[i];
    return d;
  });
  // Symbol names for torch.cuda.memory.CUDAPluggableAllocator(memo._C.__file__, alloc, free).
  m.attr("arena_alloc_symbol") = "memo_arena_alloc";
  m.attr("arena_free_symbol") = "memo_arena_free";
}

}  // namespace memo
