// Argument checks and copy counters shared by the CPU ops (token_copy.cpp) and the CUDA binding
// (cuda_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "layout.h"

namespace memo {

// strided: the tensor holding the tokens; packed: the contiguous side, named `packed_name` in
// errors. Normalises a negative `dim` in place. Checks range, dtype, contiguity and numel,
// and returns the slice's layout (NOTE [ Token slice layout ]).
SliceLayout check_token_slice(const char* op, const at::Tensor& strided, int64_t& dim, int64_t start,
                              int64_t stop, const at::Tensor& packed, const char* packed_name);

// How many tokens `packed` holds for `dst`: packed.numel() / (dst.numel() / dst.size(dim)).
int64_t unpack_token_count(const at::Tensor& packed, const at::Tensor& dst, int64_t dim);

// NOTE [ Copy counters ]
// Bytes the ops moved since the last reset, by direction and by how (DMA: pitched copies of
// NOTE [ Token slice copy plan ]; kernel: the gather/scatter kernel, plus its staging memcpy
// for host transfers; host: the CPU ops' memcpy). Counted when a copy is issued (on a GPU,
// enqueued). Process-wide, atomic; memo._C.copy_counters() reads them.
enum class CopyCounter { kD2HDma, kD2HKernel, kH2DDma, kH2DKernel, kD2DKernel, kHostPack, kHostUnpack, kCount };
void count_copy(CopyCounter counter, int64_t bytes);

}  // namespace memo
