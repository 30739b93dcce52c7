// CUDA definitions of the device queries in cuda_device.h.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_device.h"

namespace cnpose {

int cuda_pointer_device(const void* ptr, const char* what) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of this call
    throw std::invalid_argument(std::string(what) + " is not a CUDA device pointer (" + cudaGetErrorString(err) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(what) +
                                " must be GPU memory, got a host pointer (pass host arrays to the CPU decode)");
  return attr.device;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace cnpose
