// Fused crop-and-normalise: the math contract shared by the CPU and CUDA backends.
//
// Images: uint8 RGB, HWC, pixel stride 3 bytes, `row_stride` bytes between rows (a view of a
// larger image is fine), any size: every offset is 64-bit (a 27000 x 27000 image holds more
// than 2^31 bytes). Person p is cut from one image with the inverse affine map A (crop px ->
// image px; the inverse of the image -> crop map M that cv2.warpAffine takes) and written to
// out[p] (3, S, S), float32 or float16, C-contiguous:
//   u' = S - 1 - u if the person is flipped, else u           (mirrored crop, flip test)
//   (x, y) = A (u', v)                                        (pixel centres at integers)
//   value_c = bilinear sample of channel c at (x, y), the four taps floor(x)+{0,1} x
//             floor(y)+{0,1} weighted (1-fx, fx) x (1-fy, fy); taps outside the image are 0
//   out[p, c, v, u] = (value_c - mean[c]) * inv_std[c]       (value on 0..255)
// which is cv2.warpAffine(image, M, (S, S), INTER_LINEAR, BORDER_CONSTANT 0) computed in
// floating point. OpenCV rounds its uint8 result to integers (and up to 4.10 also snaps the
// sample position to 1/32 px; the tests bound both differences). With round_pixels, value_c
// is rounded to the nearest integer (half to even) first, as OpenCV's uint8 result is: crops
// then equal those of cv2 + NumPy except where a value lies within float32 noise of k + 1/2.
// The CPU kernels compute sample positions in double; the CUDA kernel in float32 relative to
// the image position of the crop centre (|error| < 2^-24 of the crop's footprint in px).
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"

namespace cnpose {

enum class CropOut : int { kFloat32 = 0, kFloat16 = 1 };

struct CropPerson {
  const uint8_t* image = nullptr;  // pixel (0, 0), channel 0
  int64_t row_stride = 0;          // bytes from one row to the next (>= 3 * width)
  int64_t height = 0, width = 0;   // >= 1
  double inv[6] = {};              // A: x = inv[0] u + inv[1] v + inv[2], y = inv[3] u + inv[4] v + inv[5]
  bool flip = false;
};

struct CropArgs {
  int64_t people = 0, size = 0;  // P, S
  const CropPerson* persons = nullptr;  // (P,) HOST array (also for the CUDA backend)
  float mean[3] = {0, 0, 0};
  float inv_std[3] = {1, 1, 1};
  CropOut out_dtype = CropOut::kFloat32;
  bool round_pixels = false;
  void* out = nullptr;  // (P, 3, S, S)
};

// Validation limits, checked by the binding: the crop's corners map within +-kMaxCropCoord px
// of the image origin (keeps CUDA's float32 offsets and int conversions exact and in range).
constexpr double kMaxCropCoord = 1073741824.0;  // 2^30
constexpr int64_t kMaxCropSize = 16384;

// CPU: threads over (person, block of rows); AVX-512 / AVX2 / portable like the decode
// (Isa from softargmax.h, same switch). Axis-aligned maps (A[0][1] = A[1][0] = 0, what
// geometry.crop_matrices makes) of images at least 2 x 2 take the SIMD kernel; other maps and
// 1-pixel-wide/high images take a scalar loop. Returns the number of threads that ran.
int64_t crop_cpu_isa(const CropArgs& args, int64_t threads, Isa isa);

// CUDA: image pointers and out are device pointers (persons itself is a host array, copied
// into the launch parameters: no device allocation, no host sync). Enqueued on `stream`.
// Throws std::runtime_error on a launch failure. Defined only when built with CUDA.
constexpr int64_t kCropPeoplePerLaunch = 48;
void crop_cuda(const CropArgs& args, void* stream);

}  // namespace cnpose
