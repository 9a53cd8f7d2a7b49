// Argument checks shared by the CPU ops (token_copy.cpp) and the CUDA binding (cuda_ops.cpp).
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

}  // namespace memo
