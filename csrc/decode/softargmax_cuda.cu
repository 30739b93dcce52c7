// CUDA backend of the fused soft-argmax (contract: softargmax.h).
//
// Thread mapping: one block of kThreads per (image, joint); blockIdx.x = n * J + j. Each
// thread streams 16-byte vectors (4 float32 or 8 float16/bfloat16 logits) strided by the
// block, keeping its own online-softmax state (running max in log2 units, sums of 2^(l - m)
// and of their w, h, d moments); a warp-shuffle then shared-memory merge combines the states
// and thread 0 applies the flip average and the post-processing. Every logit is read once,
// natively in its dtype; exp is one FFMA + ex2.approx. A volume whose row length is not a
// multiple of the vector width, or whose base is not 16-byte aligned, takes a scalar loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_device.h"
#include "decode/decode_common.h"
#include "decode/softargmax.h"

namespace cnpose {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

struct FlipPerm {
  int16_t j[kMaxFlipJoints];
};

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct State {
  float m;  // running max of l * log2(e)
  float s, sx, sy, sz;
  int bad;
};

__device__ __forceinline__ State empty_state() { return {-INFINITY, 0.f, 0.f, 0.f, 0.f, 0}; }

__device__ __forceinline__ void rescale_to(State& st, float m_new) {
  if (m_new > st.m) {
    const float f = (st.m == -INFINITY) ? 0.f : fast_exp2(st.m - m_new);
    st.s *= f, st.sx *= f, st.sy *= f, st.sz *= f;
    st.m = m_new;
  }
}

__device__ __forceinline__ void merge(State& a, const State& b) {
  a.bad |= b.bad;
  if (b.m == -INFINITY) return;
  rescale_to(a, b.m);
  const float f = fast_exp2(b.m - a.m);
  a.s += b.s * f, a.sx += b.sx * f, a.sy += b.sy * f, a.sz += b.sz * f;
}

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ static void load(const float* p, float* v) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  }
};
template <>
struct Vec<__half> {
  static constexpr int N = 8;
  __device__ static void load(const __half* p, float* v) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&q);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
  }
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static void load(const __nv_bfloat16* p, float* v) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Fold VN logits starting at cell (d, h, w0) of a row into the state (in log2 units).
template <int VN>
__device__ __forceinline__ void accumulate(State& st, const float* raw, uint32_t w0, uint32_t h, uint32_t d) {
  float l[VN];
  float lm = -INFINITY;
#pragma unroll
  for (int k = 0; k < VN; ++k) {
    l[k] = raw[k] * kLog2e;
    st.bad |= (l[k] != l[k]);
    lm = fmaxf(lm, l[k]);  // fmaxf ignores NaN; NaN is flagged above
  }
  if (lm == -INFINITY) return;
  rescale_to(st, lm);
  float rs = 0.f, rx = 0.f;
#pragma unroll
  for (int k = 0; k < VN; ++k) {
    const float e = fast_exp2(l[k] - st.m);
    rs += e;
    rx = fmaf(e, static_cast<float>(k), rx);
  }
  st.s += rs;
  st.sx += fmaf(rs, static_cast<float>(w0), rx);
  st.sy = fmaf(rs, static_cast<float>(h), st.sy);
  st.sz = fmaf(rs, static_cast<float>(d), st.sz);
}

template <typename T>
__device__ State reduce_volume(const T* __restrict__ vol, uint32_t V, uint32_t H, uint32_t W, bool vector_ok) {
  State st = empty_state();
  constexpr int VN = Vec<T>::N;
  if (vector_ok) {
    const uint32_t nvec = V / VN;
    // Two independent 16-byte loads in flight per thread and iteration.
    uint32_t v = threadIdx.x;
    for (; v + kThreads < nvec; v += 2 * kThreads) {
      float a[VN], b[VN];
      Vec<T>::load(vol + static_cast<size_t>(v) * VN, a);
      Vec<T>::load(vol + static_cast<size_t>(v + kThreads) * VN, b);
      uint32_t i = v * VN, row = i / W;
      accumulate<VN>(st, a, i - row * W, row % H, row / H);
      i = (v + kThreads) * VN, row = i / W;
      accumulate<VN>(st, b, i - row * W, row % H, row / H);
    }
    if (v < nvec) {
      float a[VN];
      Vec<T>::load(vol + static_cast<size_t>(v) * VN, a);
      const uint32_t i = v * VN, row = i / W;
      accumulate<VN>(st, a, i - row * W, row % H, row / H);
    }
  } else {
    for (uint32_t i = threadIdx.x; i < V; i += kThreads) {
      const float l = to_float(vol[i]);
      const uint32_t row = i / W;
      accumulate<1>(st, &l, i - row * W, row % H, row / H);
    }
  }
  return st;
}

// Whole-block merge; the result is valid in thread 0.
__device__ State block_merge(State st) {
  __shared__ State warp_states[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    State o;
    o.m = __shfl_down_sync(0xffffffffu, st.m, off);
    o.s = __shfl_down_sync(0xffffffffu, st.s, off);
    o.sx = __shfl_down_sync(0xffffffffu, st.sx, off);
    o.sy = __shfl_down_sync(0xffffffffu, st.sy, off);
    o.sz = __shfl_down_sync(0xffffffffu, st.sz, off);
    o.bad = __shfl_down_sync(0xffffffffu, st.bad, off);
    merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) merge(st, warp_states[w]);
  }
  __syncthreads();  // warp_states is reused by the flipped volume's merge
  return st;
}

__device__ JointMoments to_moments(const State& st) {
  // m is in log2 units; finish_moments only needs it to test finiteness.
  return finish_moments(st.m, st.s, st.sx, st.sy, st.sz, st.bad != 0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softargmax_kernel(DecodeArgs a, FlipPerm perm, bool vector_ok) {
  const int64_t n = blockIdx.x / a.joints, j = blockIdx.x % a.joints;
  const uint32_t V = static_cast<uint32_t>(a.volume());
  const uint32_t H = static_cast<uint32_t>(a.height), W = static_cast<uint32_t>(a.width);
  const T* hm = static_cast<const T*>(a.heatmaps) + (n * a.joints + j) * static_cast<int64_t>(V);
  const State st = block_merge(reduce_volume(hm, V, H, W, vector_ok));
  State fst;
  if (a.flipped != nullptr) {
    const T* fl = static_cast<const T*>(a.flipped) + (n * a.joints + perm.j[j]) * static_cast<int64_t>(V);
    fst = block_merge(reduce_volume(fl, V, H, W, vector_ok));
  }
  if (threadIdx.x == 0) {
    JointMoments r = to_moments(st);
    if (a.flipped != nullptr) r = average_flip(r, to_moments(fst), a.width);
    write_joint(a, n, j, r, a.out);
  }
}

template <typename T>
void launch(const DecodeArgs& a, const FlipPerm& perm, cudaStream_t stream) {
  constexpr int VN = Vec<T>::N;
  const auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vector_ok = a.width % VN == 0 && aligned(a.heatmaps) && aligned(a.flipped);
  softargmax_kernel<T><<<static_cast<unsigned>(a.n * a.joints), kThreads, 0, stream>>>(a, perm, vector_ok);
  cuda_check(cudaGetLastError(), "cnpose_trt decode kernel launch");
}

}  // namespace

void decode_cuda(const DecodeArgs& a, void* stream_handle) {
  FlipPerm perm{};
  if (a.flip_perm != nullptr) {
    for (int64_t j = 0; j < a.joints; ++j) perm.j[j] = static_cast<int16_t>(a.flip_perm[j]);
  }
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  const int want = cuda_pointer_device(a.heatmaps, "heatmaps");
  if (want != dev) cuda_check(cudaSetDevice(want), "cudaSetDevice");
  auto stream = static_cast<cudaStream_t>(stream_handle);
  try {
    switch (a.dtype) {
      case DType::kFloat32: launch<float>(a, perm, stream); break;
      case DType::kFloat16: launch<__half>(a, perm, stream); break;
      default: launch<__nv_bfloat16>(a, perm, stream); break;
    }
  } catch (...) {
    if (want != dev) cudaSetDevice(dev);
    throw;
  }
  if (want != dev) cuda_check(cudaSetDevice(dev), "cudaSetDevice");
}

}  // namespace cnpose
