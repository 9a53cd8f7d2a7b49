// Gather a token slice of a strided device tensor into a contiguous buffer, and scatter back.
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

// One thread per unit of the packed buffer, grid-stride; kGather: strided -> packed.
template <typename T, bool kGather>
__global__ void token_copy_kernel(T* strided, T* packed, SliceLayout l) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < l.numel; i += stride) {
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

template <bool kGather>
cudaError_t launch(void* strided, void* packed, SliceLayout l, int esize, cudaStream_t stream) {
  if (l.numel == 0) return cudaSuccess;
  if (l.ndim == 0) {  // one element
    l.ndim = 1;
    l.sizes[0] = 1;
    l.strides[0] = 1;
  }
  const int unit = widen(&l, esize, strided, packed);
  const int64_t blocks64 = (l.numel + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  switch (unit) {
    case 1:
      token_copy_kernel<uint8_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint8_t*>(strided), static_cast<uint8_t*>(packed), l);
      break;
    case 2:
      token_copy_kernel<uint16_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint16_t*>(strided), static_cast<uint16_t*>(packed), l);
      break;
    case 4:
      token_copy_kernel<uint32_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint32_t*>(strided), static_cast<uint32_t*>(packed), l);
      break;
    case 8:
      token_copy_kernel<uint64_t, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<uint64_t*>(strided), static_cast<uint64_t*>(packed), l);
      break;
    case 16:
      token_copy_kernel<Unit16, kGather><<<blocks, kThreads, 0, stream>>>(
          static_cast<Unit16*>(strided), static_cast<Unit16*>(packed), l);
      break;
    default:
      return cudaErrorInvalidValue;  // element sizes other than 1, 2, 4, 8, 16 bytes
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_tokens(const void* strided, void* packed, const SliceLayout& layout, int esize,
                          cudaStream_t stream) {
  return launch<true>(const_cast<void*>(strided), packed, layout, esize, stream);
}

cudaError_t scatter_tokens(const void* packed, void* strided, const SliceLayout& layout, int esize,
                           cudaStream_t stream) {
  return launch<false>(strided, const_cast<void*>(packed), layout, esize, stream);
}

}  // namespace cuda
}  // namespace memo
