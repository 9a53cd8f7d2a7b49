// Raw-pointer entry points of memo's CUDA code. CUDA runtime API only, no torch headers, so
// every .cu file compiles with plain nvcc (`make test` does so on every machine with nvcc).
// The torch-facing binding (csrc/cuda_ops.cpp) passes tensors' data pointers and the current
// stream's handle. All functions return the CUDA error instead of throwing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "../layout.h"

namespace memo {
namespace cuda {

// strided: device pointer to the start of the token slice (tensor data + layout.offset
// elements); packed: device pointer to numel * esize contiguous bytes. esize in bytes.
// Both enqueue one kernel on `stream`. See NOTE [ Token slice layout ].
cudaError_t gather_tokens(const void* strided, void* packed, const SliceLayout& layout, int esize,
                          cudaStream_t stream);
cudaError_t scatter_tokens(const void* packed, void* strided, const SliceLayout& layout, int esize,
                           cudaStream_t stream);
// The same for elements [begin, end) of the packed order only: `packed` points at element
// `begin`. begin * esize and end * esize must be multiples of 16 bytes, or end == numel
// (the chunks of a bounded staging buffer).
cudaError_t gather_tokens_range(const void* strided, void* packed, const SliceLayout& layout, int esize,
                                int64_t begin, int64_t end, cudaStream_t stream);
cudaError_t scatter_tokens_range(const void* packed, void* strided, const SliceLayout& layout, int esize,
                                 int64_t begin, int64_t end, cudaStream_t stream);

// Issues every piece of `plan` on `stream` as cudaMemcpyAsync / cudaMemcpy2DAsync /
// cudaMemcpy3DAsync (copy engines, no kernel); strided and packed as for gather_tokens, either
// on the host (page-locked) or the device, as `kind` says. to_packed: strided -> packed.
// See NOTE [ Token slice copy plan ].
cudaError_t copy_plan_async(const CopyPlan& plan, const void* strided, const void* packed, bool to_packed,
                            cudaMemcpyKind kind, cudaStream_t stream);

// Asynchronous copies on `stream` (host memory must be page-locked to overlap with compute).
cudaError_t copy_d2h_async(void* host_dst, const void* device_src, size_t nbytes, cudaStream_t stream);
cudaError_t copy_h2d_async(void* device_dst, const void* host_src, size_t nbytes, cudaStream_t stream);
// Stream hand-off: `waiter` waits for the work enqueued on `producer` so far.
cudaError_t stream_wait(cudaStream_t waiter, cudaStream_t producer);

// Page-locking of host memory the pool already owns; "" on success, the CUDA error otherwise.
std::string host_register(void* ptr, size_t nbytes);
std::string host_unregister(void* ptr);
// Number of visible devices, 0 when there is no driver or no device.
int device_count();

}  // namespace cuda
}  // namespace memo

// PyTorch pluggable-allocator entry points (torch.cuda.memory.CUDAPluggableAllocator) serving
// the planned arena, one per device; see NOTE [ Arena replay ] in csrc/arena.h and
// csrc/cuda/arena_alloc.cu.
extern "C" {
void* memo_arena_alloc(size_t size, int device, cudaStream_t stream);
void memo_arena_free(void* ptr, size_t size, int device, cudaStream_t stream);
// phases: num_phases lists; phase p has phase_lengths[p] slots, read in order from offsets/sizes;
// offset SIZE_MAX marks an unplanned slot. Requests are rounded up to `alignment` (a power of
// two) before they are matched. Allocates the arena on `device`. Returns cudaSuccess, or the
// error (message in err/err_len).
int memo_arena_configure(size_t arena_bytes, const size_t* offsets, const size_t* sizes,
                         const size_t* phase_lengths, size_t num_phases, size_t alignment, int device, char* err,
                         size_t err_len);
int memo_arena_begin_phase(int device, size_t phase);
void memo_arena_end_phase(int device);
void memo_arena_suspend(int device);
void memo_arena_resume(int device);
// Fills out[0..n) with requests, hits, misses, conflicts, unplanned, outside, hit_bytes,
// miss_bytes, fallback_bytes, stream_waits, live_arena_blocks, live_fallback_blocks,
// live_arena_bytes, peak_arena_bytes, arena_bytes; returns how many (0: no arena on `device`).
size_t memo_arena_stats(int device, size_t* out, size_t n);
// out[0..4): the fallback's memory pool: reserved now, reserved peak, used now, used peak.
int memo_arena_fallback_memory(int device, size_t* out);
void memo_arena_release(int device);
}
