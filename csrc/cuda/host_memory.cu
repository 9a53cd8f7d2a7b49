// Async device/host copies, stream hand-offs and page-locking of the host pool.

#include "kernels.h"

namespace memo {
namespace cuda {

cudaError_t copy_d2h_async(void* host_dst, const void* device_src, size_t nbytes, cudaStream_t stream) {
  return cudaMemcpyAsync(host_dst, device_src, nbytes, cudaMemcpyDeviceToHost, stream);
}

cudaError_t copy_h2d_async(void* device_dst, const void* host_src, size_t nbytes, cudaStream_t stream) {
  return cudaMemcpyAsync(device_dst, host_src, nbytes, cudaMemcpyHostToDevice, stream);
}

cudaError_t stream_wait(cudaStream_t waiter, cudaStream_t producer) {
  if (waiter == producer) return cudaSuccess;
  cudaEvent_t event;
  cudaError_t err = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  if (err != cudaSuccess) return err;
  err = cudaEventRecord(event, producer);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(waiter, event, 0);
  cudaError_t destroyed = cudaEventDestroy(event);  // deferred by CUDA until the wait resolves
  return err != cudaSuccess ? err : destroyed;
}

std::string host_register(void* ptr, size_t nbytes) {
  // Portable: pinned for every device, so one pool serves all GPUs of the process.
  cudaError_t err = cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable);
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

std::string host_unregister(void* ptr) {
  cudaError_t err = cudaHostUnregister(ptr);
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace memo
