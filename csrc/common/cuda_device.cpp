// The device queries of cuda_device.h in a build without CUDA: no device is visible, and asking
// where a pointer lives is the "built without CUDA" error. Empty in a CUDA build (cuda_device.cu).
#include "common/checks.h"
#include "common/cuda_device.h"

#ifndef CNPOSE_WITH_CUDA
namespace cnpose {
int cuda_pointer_device(const void*, const char*) { checks::require_cuda(); return -1; }
int cuda_device_count() { return 0; }
}  // namespace cnpose
#endif
