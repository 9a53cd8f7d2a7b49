// The layout of a token slice, reduced to as few dimensions as possible, and the plan that
// copies it with pitched DMA copies. Plain C++ (no torch, no CUDA) so the CPU ops, the CUDA
// binding and the tests describe a slice the same way.
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
#include <utility>

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
  for (int d = 0; d < ndim; ++d) l.numel *= d == dim ? stop - start : sizes[d];
  if (l.numel == 0) {  // no dimensions, whatever the tensor's rank
    *out = l;
    return true;
  }
  int64_t sz[kMaxCopyDims], st[kMaxCopyDims];
  int n = 0;
  for (int d = 0; d < ndim; ++d) {
    int64_t s = d == dim ? stop - start : sizes[d];
    if (s == 1) continue;  // rule 3
    if (n > 0 && st[n - 1] == strides[d] * s) {
      sz[n - 1] *= s;
      st[n - 1] = strides[d];
    } else {
      if (n == kMaxCopyDims) return false;  // one more than the layout holds
      sz[n] = s;
      st[n] = strides[d];
      ++n;
    }
  }
  l.ndim = n;
  for (int d = 0; d < n; ++d) {
    l.sizes[d] = sz[d];
    l.strides[d] = st[d];
  }
  *out = l;
  return true;
}

// NOTE [ Token slice copy plan ]
// Between a device tensor and host memory, a token slice is copied by the GPU's copy engines
// (DMA: no kernel, no SMs, no staging buffer) whenever its layout allows; the plan says how.
// 1. A piece is one cudaMemcpy3DAsync on linear memory, in its exact terms (PitchedCopy below):
//    extent (width bytes, height rows, depth slices); each side a pitched pointer (ptr, pitch,
//    ysize) whose row y of slice z starts at ptr + z * (pitch * ysize) + y * pitch. CUDA requires,
//    on both sides, width <= pitch <= kMaxPitchBytes and height <= ysize (the copied region lies
//    inside the pitched object). depth == 1 is a cudaMemcpy2DAsync (ysize unused); height ==
//    depth == 1 a cudaMemcpyAsync of width bytes.
// 2. The rows are the innermost merged dimension (NOTE [ Token slice layout ] rule 3), so it must
//    have stride 1; width = its size * element size. Every other merged dimension is "outer".
//    A piece walks up to two outer dimensions on both sides at once: y (the pitch is the
//    dimension's stride in bytes) and z (the slice pitch is its stride, which must be pitch *
//    ysize for a whole ysize >= the size of y; the 3D pitched pointer has no free slice pitch).
//    The packed side's strides are those of a contiguous tensor in the slice's index order.
// 3. The outer dimensions that are neither y nor z are loops: one piece per index, at the
//    offsets their strides give on each side. Among no y, every valid y, and every valid (y, z),
//    the plan takes the fewest pieces (then the fewest dimensions: a 2D copy over a 3D one).
//    A slice that outer dimensions cannot fit (e.g. a (b, h, s, d) view of (b, s, h, d): heads
//    and tokens are transposed) is thereby split over the outer dimension that does not fit.
// 4. The plan says "needs the gather kernel" (dma == false, `reason` says why) when the
//    innermost stride is not 1 (rows of one element), rows are narrower than kMinDmaRowBytes
//    (copy engines move a row at a time; tiny rows crawl), or more than kMaxDmaPieces pieces
//    would be needed (each piece is one API call, a few microseconds of host time).
// 5. A slice of no elements has no pieces; a single element is one 1D piece.
// Host-side, run_copy_plan() with a memcpy executor reproduces CUDA's semantics byte for byte;
// the tests check it against torch's narrow().contiguous() (tests/test_copy_plan.py).

constexpr int64_t kMaxPitchBytes = (int64_t{1} << 31) - 1;  // cudaDevAttrMaxPitch on current GPUs
constexpr int64_t kMinDmaRowBytes = 64;
constexpr int64_t kMaxDmaPieces = 256;

struct PitchedSide {
  int64_t pitch = 0;  // bytes between rows
  int64_t ysize = 1;  // rows between slices: slice pitch = pitch * ysize
};

struct CopyPlan {
  bool dma = true;
  const char* reason = "";    // why the gather kernel is needed, when !dma
  int64_t width = 0;          // bytes per row
  int64_t height = 1;         // rows per slice (dimension y)
  int64_t depth = 1;          // slices per piece (dimension z)
  PitchedSide strided, packed;
  int loops = 0;              // rule 3: outer dimensions walked by issuing pieces
  int64_t loop_sizes[kMaxCopyDims] = {};
  int64_t loop_strided[kMaxCopyDims] = {};  // bytes
  int64_t loop_packed[kMaxCopyDims] = {};   // bytes
  int64_t pieces = 0;
};

// One piece in cudaMemcpy3DParms' terms (srcPtr, dstPtr, extent; positions 0).
struct PitchedCopy {
  void* dst;
  PitchedSide dst_side;
  const void* src;
  PitchedSide src_side;
  int64_t width, height, depth;
};

// esize: bytes per element. See NOTE [ Token slice copy plan ].
inline CopyPlan make_copy_plan(const SliceLayout& l, int64_t esize) {
  CopyPlan p;
  if (l.numel == 0) return p;  // rule 5
  if (l.ndim == 0) {
    p.width = esize;
    p.strided.pitch = p.packed.pitch = esize;
    p.pieces = 1;
    return p;
  }
  const int n = l.ndim, k = n - 1;  // k outer dimensions
  if (l.strides[n - 1] != 1) {
    p.dma = false;
    p.reason = "the innermost dimension is not contiguous (stride != 1)";
    return p;
  }
  p.width = l.sizes[n - 1] * esize;
  if (k > 0 && p.width < kMinDmaRowBytes) {
    p.dma = false;
    p.reason = "rows are narrower than kMinDmaRowBytes";
    return p;
  }
  int64_t sst[kMaxCopyDims], pst[kMaxCopyDims], outer = 1;
  int64_t packed_stride = p.width;
  for (int d = k - 1; d >= 0; --d) {
    sst[d] = l.strides[d] * esize;
    pst[d] = packed_stride;
    packed_stride *= l.sizes[d];
    outer *= l.sizes[d];
  }
  auto row_ok = [&](int d) {
    return sst[d] >= p.width && sst[d] <= kMaxPitchBytes && pst[d] >= p.width && pst[d] <= kMaxPitchBytes;
  };
  auto slice_ok = [&](int y, int z) {  // z's stride is y's pitch times a whole ysize >= size[y]
    return sst[z] % sst[y] == 0 && sst[z] / sst[y] >= l.sizes[y] && pst[z] % pst[y] == 0 &&
           pst[z] / pst[y] >= l.sizes[y];
  };
  int best_y = -1, best_z = -1;
  int64_t best = outer;  // no y: one piece per row
  for (int y = 0; y < k; ++y) {
    if (!row_ok(y)) continue;
    if (outer / l.sizes[y] < best) best = outer / l.sizes[y], best_y = y, best_z = -1;
    for (int z = 0; z < k; ++z) {
      if (z == y || !slice_ok(y, z)) continue;
      const int64_t pieces = outer / (l.sizes[y] * l.sizes[z]);
      if (pieces < best) best = pieces, best_y = y, best_z = z;
    }
  }
  if (best > kMaxDmaPieces) {
    p.dma = false;
    p.reason = "more than kMaxDmaPieces pitched copies would be needed";
    return p;
  }
  p.pieces = best;
  p.strided.pitch = p.packed.pitch = p.width;
  if (best_y >= 0) {
    p.height = l.sizes[best_y];
    p.strided = {sst[best_y], p.height};
    p.packed = {pst[best_y], p.height};
  }
  if (best_z >= 0) {
    p.depth = l.sizes[best_z];
    p.strided.ysize = sst[best_z] / sst[best_y];
    p.packed.ysize = pst[best_z] / pst[best_y];
  }
  for (int d = 0; d < k; ++d) {
    if (d == best_y || d == best_z) continue;
    p.loop_sizes[p.loops] = l.sizes[d];
    p.loop_strided[p.loops] = sst[d];
    p.loop_packed[p.loops] = pst[d];
    ++p.loops;
  }
  return p;
}

// Calls f(const PitchedCopy&) for every piece of the plan, in packed order. strided: the first
// byte of the slice (tensor data + layout.offset elements); packed: the contiguous side.
// to_packed: strided -> packed (pack), else packed -> strided (unpack).
template <typename F>
inline void for_each_pitched_copy(const CopyPlan& p, const void* strided, const void* packed, bool to_packed,
                                  const F& f) {
  if (!p.dma) return;
  int64_t idx[kMaxCopyDims] = {};
  for (int64_t piece = 0; piece < p.pieces; ++piece) {
    int64_t s_off = 0, p_off = 0;
    for (int d = 0; d < p.loops; ++d) {
      s_off += idx[d] * p.loop_strided[d];
      p_off += idx[d] * p.loop_packed[d];
    }
    auto* s = const_cast<uint8_t*>(static_cast<const uint8_t*>(strided)) + s_off;
    auto* q = const_cast<uint8_t*>(static_cast<const uint8_t*>(packed)) + p_off;
    PitchedCopy c{to_packed ? q : s, to_packed ? p.packed : p.strided, to_packed ? s : q,
                  to_packed ? p.strided : p.packed, p.width, p.height, p.depth};
    f(c);
    for (int d = p.loops - 1; d >= 0 && ++idx[d] == p.loop_sizes[d]; --d) idx[d] = 0;  // next loop index
  }
}

}  // namespace memo
