// The layout of a token slice, reduced to as few dimensions as possible. Plain C++ (no torch,
// no CUDA) so the CPU ops and the CUDA binding describe a slice the same way.
//
// NOTE [ Token slice layout ]
// 1. The slice is src.narrow(dim, start, stop - start): same strides as src, size stop - start
//    along `dim`, base offset start * stride[dim] elements.
// 2. The packed buffer is contiguous in the slice's own (row-major) index order, whatever the
//    strides of src. Pack and unpack are exact inverses; bytes are copied, never converted.
// 3. Dimensions of size 1 are dropped, and neighbours d, d+1 merge when
//    stride[d] == stride[d+1] * size[d+1]: this changes neither the element order nor the
//    addresses, only how few loops walk them. After merging, a slice whose last stride is 1 is
//    a list of contiguous rows; a slice with one dimension of stride 1 is one contiguous run.
#pragma once

#include <cstdint>

namespace memo {

constexpr int kMaxCopyDims = 12;

struct SliceLayout {
  int ndim = 0;                      // after rule 3; 0 means a single element
  int64_t sizes[kMaxCopyDims] = {};
  int64_t strides[kMaxCopyDims] = {};  // in elements, of the strided side
  int64_t offset = 0;                // elements from the tensor's data pointer to the slice
  int64_t numel = 1;
};

// sizes/strides: the full tensor (ndim entries); returns false if more than kMaxCopyDims
// dimensions remain after merging (only possible for tensors of > 12 non-mergeable dims).
inline bool make_slice_layout(const int64_t* sizes, const int64_t* strides, int ndim, int dim,
                              int64_t start, int64_t stop, SliceLayout* out) {
  SliceLayout l;
  l.offset = start * strides[dim];
  int64_t sz[64], st[64];
  int n = 0;
  for (int d = 0; d < ndim; ++d) {
    int64_t s = d == dim ? stop - start : sizes[d];
    l.numel *= s;
    if (s == 1) continue;  // rule 3
    if (n > 0 && st[n - 1] == strides[d] * s) {
      sz[n - 1] *= s;
      st[n - 1] = strides[d];
    } else {
      sz[n] = s;
      st[n] = strides[d];
      ++n;
    }
  }
  if (l.numel == 0) n = 0;
  if (n > kMaxCopyDims) return false;
  l.ndim = n;
  for (int d = 0; d < n; ++d) {
    l.sizes[d] = sz[d];
    l.strides[d] = st[d];
  }
  *out = l;
  return true;
}

}  // namespace memo
