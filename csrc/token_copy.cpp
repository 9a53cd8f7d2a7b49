// Token-slice pack and unpack: op schemas (TORCH_LIBRARY) and their CPU implementations.
// The CUDA implementations are in cuda_ops.cpp (binding) and cuda/token_copy.cu (kernels).

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "layout.h"
#include "token_copy.h"

namespace memo {
namespace {

constexpr int64_t kParallelBytes = 1 << 18;  // below this a copy runs on one thread

// Copies between the strided slice at `strided` (layout l, elements of `esize` bytes) and the
// contiguous buffer `packed`; kPack: strided -> packed, else packed -> strided.
// See NOTE [ Token slice layout ].
template <bool kPack>
void copy_rows(uint8_t* strided, uint8_t* packed, const SliceLayout& l, int64_t esize) {
  const int n = l.ndim;
  if (n == 0) {  // a single element
    kPack ? std::memcpy(packed, strided, esize) : std::memcpy(strided, packed, esize);
    return;
  }
  const bool inner_contiguous = l.strides[n - 1] == 1;
  if (inner_contiguous && n == 1) {  // one contiguous run: split it into large chunks
    const int64_t total = l.numel * esize;
    const int64_t chunk = kParallelBytes * 4;
    at::parallel_for(0, (total + chunk - 1) / chunk, 1, [&](int64_t b, int64_t e) {
      const int64_t lo = b * chunk, hi = std::min(total, e * chunk);
      kPack ? std::memcpy(packed + lo, strided + lo, hi - lo) : std::memcpy(strided + lo, packed + lo, hi - lo);
    });
    return;
  }
  // A "row" is the last dimension; rows are walked in packed order with a carried index.
  const int64_t row_len = l.sizes[n - 1];
  const int64_t row_bytes = row_len * esize;
  const int64_t rows = l.numel / row_len;
  const int64_t grain = std::max<int64_t>(1, kParallelBytes / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t idx[kMaxCopyDims];
    int64_t rem = begin, off = 0;
    for (int d = n - 2; d >= 0; --d) {
      idx[d] = rem % l.sizes[d];
      rem /= l.sizes[d];
      off += idx[d] * l.strides[d];
    }
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* s = strided + off * esize;
      uint8_t* p = packed + r * row_bytes;
      if (inner_contiguous) {
        kPack ? std::memcpy(p, s, row_bytes) : std::memcpy(s, p, row_bytes);
      } else {
        const int64_t step = l.strides[n - 1] * esize;
        for (int64_t i = 0; i < row_len; ++i, p += esize, s += step) {
          kPack ? std::memcpy(p, s, esize) : std::memcpy(s, p, esize);  // esize is 1..8: inlined
        }
      }
      for (int d = n - 2; d >= 0; --d) {  // advance the row index
        off += l.strides[d];
        if (++idx[d] < l.sizes[d]) break;
        off -= idx[d] * l.strides[d];
        idx[d] = 0;
      }
    }
  });
}

template <bool kPack>
void copy_dispatch(uint8_t* strided, uint8_t* packed, const SliceLayout& l, int64_t esize) {
  // Fixed-size memcpy lets the compiler emit one load and one store per element.
  switch (esize) {
    case 1: return copy_rows<kPack>(strided, packed, l, 1);
    case 2: return copy_rows<kPack>(strided, packed, l, 2);
    case 4: return copy_rows<kPack>(strided, packed, l, 4);
    case 8: return copy_rows<kPack>(strided, packed, l, 8);
    default: return copy_rows<kPack>(strided, packed, l, esize);
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
  auto* base = static_cast<uint8_t*>(dst.data_ptr()) + l.offset * esize;
  copy_dispatch<false>(base, static_cast<uint8_t*>(packed.data_ptr()), l, esize);
}

}  // namespace

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

TORCH_LIBRARY_IMPL(memo, CPU, m) {
  m.impl("pack_tokens", &pack_tokens_cpu);
  m.impl("unpack_tokens", &unpack_tokens_cpu);
}

}  // namespace memo
