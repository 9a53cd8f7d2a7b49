// Token slices between a strided device tensor and a contiguous buffer: pitched DMA copies
// where the copy plan allows (NOTE [ Token slice copy plan ]), else a gather/scatter kernel.
// See NOTE [ Token slice layout ] (csrc/layout.h) for what the layout means.

#include <cstdint>

#include "kernels.h"

namespace memo {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Widens the copy unit from esize bytes to `unit` bytes when the innermost dimension is
// contiguous and every stride and pointer allows it (16-byte loads move a warp's row at once).
int widen(SliceLayout* l, int esize, const void* a, const void* b) {
  if (l->ndim == 0 || l->strides[l->ndim - 1] != 1) return esize;
  for (int unit = 16; unit > esize; unit /= 2) {
    bool ok = (reinterpret_cast<uintptr_t>(a) % unit == 0) && (reinterpret_cast<uintptr_t>(b) % unit == 0) &&
              (l->sizes[l->ndim - 1] * esize) % unit == 0;
    for (int d = 0; ok && d < l->ndim - 1; ++d) ok = (l->strides[d] * esize) % unit == 0;
    if (!ok) continue;
    l->sizes[l->ndim - 1] = l->sizes[l->ndim - 1] * esize / unit;
    for (int d = 0; d < l->ndim - 1; ++d) l->strides[d] = l->strides[d] * esize / unit;
    l->numel = l->numel * esize / unit;
    return unit;
  }
  return esize;
}

// One thread per unit of the packed buffer, grid-stride, over units [begin, end) of the packed
// order; `packed` points at unit `begin`. kGather: strided -> packed.
template <typename T, bool kGather>
__global__ void token_copy_kernel(T* strided, T* packed, SliceLayout l, int64_t begin, int64_t end) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  packed -= begin;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    int64_t rem = i, off = 0;
    for (int d = l.ndim - 1; d >= 0; --d) {
      off += (rem % l.sizes[d]) * l.strides[d];
      rem /= l.sizes[d];
    }
    if (kGather) {
      packed[i] = strided[off];
    } else {
      strided[off] = packed[i];
    }
  }
}

struct alignas(16) Unit16 {
  uint64_t lo, hi;
};

// begin, end: elements of the packed order (see gather_tokens_range in kernels.h).
template <bool kGather>
cudaError_t launch(void* strided, void* packed, SliceLayout l, int esize, int64_t begin, int64_t end,
                   cudaStream_t stream) {
  if (begin >= end) return cudaSuccess;
  if (l.ndim == 0) {  // one element
    l.ndim = 1;
    l.sizes[0] = 1;
    l.strides[0] = 1;
  }
  const int unit = widen(&l, esize, strided, packed);
  const int64_t scale = unit / esize;  // elements per unit
  if (begin % scale != 0 || end % scale != 0) return cudaErrorInvalidValue;  // a range not on unit boundaries
  begin /= scale;
  end /= scale;
  const int64_t blocks64 = (end - begin + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  switch (unit) {
    case 1:
      token_copy_kernel<uint8_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint8_t*>(strided), static_cast<uint8_t*>(packed), l, begin, end);
      break;
    case 2:
      token_copy_kernel<uint16_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint16_t*>(strided), static_cast<uint16_t*>(packed), l, begin, end);
      break;
    case 4:
      token_copy_kernel<uint32_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint32_t*>(strided), static_cast<uint32_t*>(packed), l, begin, end);
      break;
    case 8:
      token_copy_kernel<uint64_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint64_t*>(strided), static_cast<uint64_t*>(packed), l, begin, end);
      break;
    case 16:
      token_copy_kernel<Unit16, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<Unit16*>(strided), static_cast<Unit16*>(packed), l, begin, end);
      break;
    default:
      return cudaErrorInvalidValue;  // element sizes other than 1, 2, 4, 8, 16 bytes
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_tokens(const void* strided, void* packed, const SliceLayout& layout, int esize,
                          cudaStream_t stream) {
  return launch<true>(const_cast<void*>(strided), packed, layout, esize, 0, layout.numel, stream);
}

cudaError_t scatter_tokens(const void* packed, void* strided, const SliceLayout& layout, int esize,
                           cudaStream_t stream) {
  return launch<false>(strided, const_cast<void*>(packed), layout, esize, 0, layout.numel, stream);
}

cudaError_t gather_tokens_range(const void* strided, void* packed, const SliceLayout& layout, int esize,
                                int64_t begin, int64_t end, cudaStream_t stream) {
  return launch<true>(const_cast<void*>(strided), packed, layout, esize, begin, end, stream);
}

cudaError_t scatter_tokens_range(const void* packed, void* strided, const SliceLayout& layout, int esize,
                                 int64_t begin, int64_t end, cudaStream_t stream) {
  return launch<false>(strided, const_cast<void*>(packed), layout, esize, begin, end, stream);
}

cudaError_t copy_plan_async(const CopyPlan& plan, const void* strided, const void* packed, bool to_packed,
                            cudaMemcpyKind kind, cudaStream_t stream) {
  if (!plan.dma) return cudaErrorInvalidValue;  // the plan needs the gather kernel
  cudaError_t err = cudaSuccess;
  // One call per piece, in the terms NOTE [ Token slice copy plan ] rule 1 gives (and
  // pitched_copy_host in token_copy.cpp runs on the CPU tests).
  for_each_pitched_copy(plan, strided, packed, to_packed, [&](const PitchedCopy& c) {
    if (err != cudaSuccess) return;
    if (c.height == 1 && c.depth == 1) {
      err = cudaMemcpyAsync(c.dst, c.src, c.width, kind, stream);
    } else if (c.depth == 1) {
      err = cudaMemcpy2DAsync(c.dst, c.dst_side.pitch, c.src, c.src_side.pitch, c.width, c.height, kind, stream);
    } else {
      cudaMemcpy3DParms p = {};
      p.srcPtr = make_cudaPitchedPtr(const_cast<void*>(c.src), c.src_side.pitch, c.width, c.src_side.ysize);
      p.dstPtr = make_cudaPitchedPtr(c.dst, c.dst_side.pitch, c.width, c.dst_side.ysize);
      p.extent = make_cudaExtent(c.width, c.height, c.depth);
      p.kind = kind;
      err = cudaMemcpy3DAsync(&p, stream);
    }
  });
  return err;
}

}  // namespace cuda
}  // namespace memo
