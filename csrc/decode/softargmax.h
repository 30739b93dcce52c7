// Fused soft-argmax decode: the math contract shared by the CPU and CUDA backends.
//
// Heatmaps (N, J*D, H, W), C-contiguous, float32 / float16 / bfloat16. For image n and joint j
// the V = D*H*W logits of channels j*D .. j*D+D-1 form one softmax p; the decode returns
//   x = sum p * w,  y = sum p * h,  z = sum p * d        (0-based heatmap cells)
//   confidence = max p = 1 / sum exp(logit - max)       (peak probability, in (0, 1])
// in ONE pass over the data: a streaming softmax keeps a running max m and the sums
// s = sum exp(l - m), sx, sy, sz of exp(l - m) times w, h, d, rescaled whenever m grows.
// A volume that holds NaN or +inf, or only -inf, has no distribution: every output of that
// joint is NaN. -inf logits are otherwise allowed (p = 0).
//
// Optional post-processing in the same call (the formulas of geometry.py):
//   flipped heatmaps + flip permutation: x' = W - 1 - x of the flipped decode of joint perm[j],
//     averaged with the unflipped decode of joint j (confidence averaged too);
//   boxes (N, 4) x, y, w, h:  x_px = x / W * w + x0,  y_px = y / H * h + y0,
//     z_mm = (z / D * 2 - 1) * (depth_range_mm / 2) + root_depth[n]  (root_depth may be null: 0);
//   intrinsics (N, 4) fx, fy, cx, cy: X = (x_px - cx) / fx * z_mm, Y = (y_px - cy) / fy * z_mm, Z = z_mm.
// Output: float32 (N, J, OUT_FIELDS) laid out as below; fields not requested are NaN.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"

#if defined(__CUDACC__)
#define CNPOSE_HD __host__ __device__ __forceinline__
#else
#define CNPOSE_HD inline
#endif

namespace cnpose {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int OUT_FIELDS = 10;
enum OutField : int {
  kCellX = 0, kCellY = 1, kCellZ = 2, kConfidence = 3,
  kImageX = 4, kImageY = 5, kDepthMM = 6,
  kCamX = 7, kCamY = 8, kCamZ = 9,
};

struct DecodeArgs {
  // Shapes, validated by the binding before any pointer is touched.
  int64_t n = 0, joints = 0, depth = 0, height = 0, width = 0;
  DType dtype = DType::kFloat32;
  const void* heatmaps = nullptr;   // (N, J*D, H, W)
  const void* flipped = nullptr;    // same shape and dtype, or null
  const int32_t* flip_perm = nullptr;  // (J,) HOST array: result joint j reads flipped joint flip_perm[j]
  const float* boxes = nullptr;     // (N, 4) or null
  const float* root_depth = nullptr;  // (N,) or null
  const float* intrinsics = nullptr;  // (N, 4) or null; needs boxes
  float depth_range_mm = 2000.0f;
  float* out = nullptr;             // (N, J, OUT_FIELDS)

  CNPOSE_HD int64_t volume() const { return depth * height * width; }
};

// CPU: threads over (image, joint) pairs; the widest kernel the processor runs (AVX-512,
// AVX2+FMA+F16C, or portable C++). decode_cpu_isa picks one explicitly (tests, benchmarks); an
// unsupported choice falls back to the portable kernel. threads: 0 = one per processor; capped
// by the tasks and cpu_parallel.h's limit; a thread the system refuses means fewer threads, never
// an abort. Returns the number of threads that ran.
int64_t decode_cpu(const DecodeArgs& args, int64_t threads);
int64_t decode_cpu_isa(const DecodeArgs& args, int64_t threads, Isa isa);

// CUDA: at least one thread block per (image, joint), enqueued on `stream`, no host sync.
// Pointers in args are device pointers except flip_perm (host, copied into the launch).
// Throws std::runtime_error on a launch failure. Defined only when built with CUDA.
constexpr int64_t kMaxFlipJoints = 128;
void decode_cuda(const DecodeArgs& args, void* stream);

}  // namespace cnpose
