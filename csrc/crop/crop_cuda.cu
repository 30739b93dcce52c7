// CUDA backend of the fused crop-and-normalise (contract: crop.h).
//
// Thread mapping: one thread per output pixel (u, v) of one person; blockIdx.x covers kBlockX
// consecutive columns of row blockIdx.y, blockIdx.z picks the person. Consecutive threads read
// neighbouring source pixels (cached loads) and write consecutive floats of each channel plane
// (coalesced). The people of one launch travel in the kernel parameters (kCropPeoplePerLaunch
// records of 64 bytes, under the 4 KB parameter limit): no device allocation and no copy, so a
// call is one or a few launches on the caller's stream and can be captured in a CUDA graph.
// Sample positions: float32 offsets from the image position of the crop centre, whose integer
// part is kept apart, so the error does not grow with the image size (crop.h).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_device.h"
#include "crop/crop.h"

namespace cnpose {
namespace {

constexpr int kBlockX = 128;

struct alignas(16) DevPerson {
  const uint8_t* image;
  long long row_stride;
  int height, width;
  int cx_int, cy_int;      // integer part of the image position of the crop centre
  float cx_frac, cy_frac;  // its fractional part, in [0, 1)
  float a00, a01, a10, a11;  // crop px -> image px, linear part
  int flip;
};

struct Batch {
  DevPerson p[kCropPeoplePerLaunch];
};

struct Common {
  void* out;
  long long first;  // index in out of the launch's first person
  int size;
  int round_pixels;
  float mean[3], inv_std[3];
};

static_assert(sizeof(Batch) + sizeof(Common) <= 4096, "kernel parameters must stay under 4 KB");

template <typename OutT>
__device__ __forceinline__ void store(OutT* p, float v);
template <>
__device__ __forceinline__ void store<float>(float* p, float v) {
  *p = v;
}
template <>
__device__ __forceinline__ void store<__half>(__half* p, float v) {
  *p = __float2half_rn(v);
}

template <typename OutT>
__global__ void __launch_bounds__(kBlockX) crop_kernel(Batch b, Common k) {
  const int S = k.size;
  const int u = blockIdx.x * kBlockX + threadIdx.x, v = blockIdx.y;
  if (u >= S) return;
  const DevPerson& q = b.p[blockIdx.z];
  const float half = 0.5f * static_cast<float>(S - 1);
  const float du = static_cast<float>(q.flip ? S - 1 - u : u) - half, dv = static_cast<float>(v) - half;
  const float dx = fmaf(q.a00, du, fmaf(q.a01, dv, q.cx_frac));
  const float dy = fmaf(q.a10, du, fmaf(q.a11, dv, q.cy_frac));
  const float flx = floorf(dx), fly = floorf(dy);
  const float fx = dx - flx, fy = dy - fly;
  // |flx|, |fly| < 2^31 + 1: the binding keeps the crop's corners within 2^30 px of the origin.
  const long long x0 = q.cx_int + static_cast<long long>(flx);
  const long long y0 = q.cy_int + static_cast<long long>(fly);
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f;
#pragma unroll
  for (int ty = 0; ty < 2; ++ty) {
    const long long yy = y0 + ty;
    const float wy = ty ? fy : 1.f - fy;
    if (yy < 0 || yy >= q.height || wy == 0.f) continue;
    const uint8_t* row = q.image + yy * q.row_stride;
#pragma unroll
    for (int tx = 0; tx < 2; ++tx) {
      const long long xx = x0 + tx;
      const float w = wy * (tx ? fx : 1.f - fx);
      if (xx < 0 || xx >= q.width || w == 0.f) continue;
      const uint8_t* px = row + 3 * xx;
      acc0 = fmaf(w, static_cast<float>(__ldg(px)), acc0);
      acc1 = fmaf(w, static_cast<float>(__ldg(px + 1)), acc1);
      acc2 = fmaf(w, static_cast<float>(__ldg(px + 2)), acc2);
    }
  }
  const long long plane = static_cast<long long>(S) * S;
  OutT* out = static_cast<OutT*>(k.out) + (k.first + blockIdx.z) * 3 * plane + static_cast<long long>(v) * S + u;
  if (k.round_pixels) acc0 = rintf(acc0), acc1 = rintf(acc1), acc2 = rintf(acc2);
  store(out, (acc0 - k.mean[0]) * k.inv_std[0]);
  store(out + plane, (acc1 - k.mean[1]) * k.inv_std[1]);
  store(out + 2 * plane, (acc2 - k.mean[2]) * k.inv_std[2]);
}

DevPerson to_device_record(const CropPerson& q, int64_t S) {
  DevPerson d{};
  d.image = q.image;
  d.row_stride = q.row_stride;
  d.height = static_cast<int>(q.height), d.width = static_cast<int>(q.width);
  const double half = 0.5 * static_cast<double>(S - 1);
  const double cx = q.inv[0] * half + q.inv[1] * half + q.inv[2];
  const double cy = q.inv[3] * half + q.inv[4] * half + q.inv[5];
  const double fcx = std::floor(cx), fcy = std::floor(cy);
  d.cx_int = static_cast<int>(fcx), d.cy_int = static_cast<int>(fcy);
  d.cx_frac = static_cast<float>(cx - fcx), d.cy_frac = static_cast<float>(cy - fcy);
  d.a00 = static_cast<float>(q.inv[0]), d.a01 = static_cast<float>(q.inv[1]);
  d.a10 = static_cast<float>(q.inv[3]), d.a11 = static_cast<float>(q.inv[4]);
  d.flip = q.flip ? 1 : 0;
  return d;
}

}  // namespace

void crop_cuda(const CropArgs& a, void* stream_handle) {
  if (a.people == 0) return;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  const int want = cuda_pointer_device(a.out, "out");
  if (want != dev) cuda_check(cudaSetDevice(want), "cudaSetDevice");
  auto stream = static_cast<cudaStream_t>(stream_handle);
  Common k{};
  k.out = a.out;
  k.size = static_cast<int>(a.size);
  k.round_pixels = a.round_pixels ? 1 : 0;
  for (int c = 0; c < 3; ++c) k.mean[c] = a.mean[c], k.inv_std[c] = a.inv_std[c];
  try {
    for (int64_t first = 0; first < a.people; first += kCropPeoplePerLaunch) {
      const int64_t count = std::min<int64_t>(kCropPeoplePerLaunch, a.people - first);
      Batch b{};
      for (int64_t i = 0; i < count; ++i) b.p[i] = to_device_record(a.persons[first + i], a.size);
      k.first = first;
      const dim3 grid(static_cast<unsigned>((a.size + kBlockX - 1) / kBlockX), static_cast<unsigned>(a.size),
                      static_cast<unsigned>(count));
      if (a.out_dtype == CropOut::kFloat32) {
        crop_kernel<float><<<grid, kBlockX, 0, stream>>>(b, k);
      } else {
        crop_kernel<__half><<<grid, kBlockX, 0, stream>>>(b, k);
      }
      cuda_check(cudaGetLastError(), "cnpose_trt crop kernel launch");
    }
  } catch (...) {
    if (want != dev) cudaSetDevice(dev);
    throw;
  }
  if (want != dev) cuda_check(cudaSetDevice(dev), "cudaSetDevice");
}

}  // namespace cnpose
