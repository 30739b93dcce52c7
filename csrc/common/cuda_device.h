// CUDA device queries shared by the decode and the crop: which device a pointer lives on (the
// bindings refuse host pointers and buffers spread over devices with it, the kernels switch to
// that device), how many devices are visible, and, for the .cu files, one check that turns a
// CUDA error into std::runtime_error. Defined in cuda_device.cu when built with CUDA, else in
// cuda_device.cpp (a device-count of 0 and a "built without CUDA" error).
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#endif

namespace cnpose {

// Device ordinal of a device (or managed) pointer; std::invalid_argument naming `what` for
// host or unknown pointers.
int cuda_pointer_device(const void* ptr, const char* what);
int cuda_device_count();

#if defined(__CUDACC__)
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
#endif

}  // namespace cnpose
