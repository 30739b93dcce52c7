// CPU backend of the fused soft-argmax (contract: softargmax.h).
//
// Work unit: one (image, joint) volume, handed to threads through an atomic counter. A volume
// is streamed row by row (W contiguous logits): the row's max is taken first (the row sits in
// L1 afterwards), the running max and sums are rescaled only when that max grows, then the
// row's exponentials are summed. Each logit is read from memory once. Row sums are small
// (W terms per lane) and go into double accumulators, which keeps float32 results within
// ~1e-6 of the float64 oracle on 262,144-voxel volumes.
//
// Two kernels: AVX2+FMA+F16C (8 lanes, own exp) chosen at run time where the processor has
// them, and a portable scalar one. The build never requires AVX2.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CNPOSE_X86 1
#endif

#include "decode_common.h"
#include "softargmax.h"

namespace cnpose {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {  // inf / NaN
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: renormalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <DType DT>
inline float load_scalar(const void* base, int64_t i) {
  if constexpr (DT == DType::kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (DT == DType::kFloat16) {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

struct Accum {
  float m = kNegInf;
  double s = 0, sx = 0, sy = 0, sz = 0;
  bool bad = false;

  // Called with a row's max before its sums are added.
  inline void raise_max(float row_max) {
    if (row_max > m) {
      const double f = (m == kNegInf) ? 0.0 : std::exp(static_cast<double>(m) - row_max);
      s *= f, sx *= f, sy *= f, sz *= f;
      m = row_max;
    }
  }
  inline void add_row(double rs, double rx, int64_t h, int64_t d) {
    s += rs, sx += rx, sy += rs * static_cast<double>(h), sz += rs * static_cast<double>(d);
  }
};

template <DType DT>
JointMoments reduce_portable(const void* vol, int64_t D, int64_t H, int64_t W) {
  Accum acc;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t row = (d * H + h) * W;
      float rmax = kNegInf;
      for (int64_t w = 0; w < W; ++w) {
        const float v = load_scalar<DT>(vol, row + w);
        if (std::isnan(v)) acc.bad = true;
        rmax = v > rmax ? v : rmax;
      }
      if (rmax == kNegInf) continue;  // no mass in this row (or NaN only: flagged)
      acc.raise_max(rmax);
      float rs = 0.f, rx = 0.f;
      for (int64_t w = 0; w < W; ++w) {
        const float e = std::exp(load_scalar<DT>(vol, row + w) - acc.m);
        rs += e;
        rx += e * static_cast<float>(w);
      }
      acc.add_row(rs, rx, h, d);
    }
  }
  return finish_moments(acc.m, acc.s, acc.sx, acc.sy, acc.sz, acc.bad);
}

#ifdef CNPOSE_X86
#define CNPOSE_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp(x) for x <= 0 to ~2 ulp: x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial in r,
// 2^n put into the exponent bits. Inputs below -87.3 (incl. -inf) clamp to ~1e-38: negligible
// against s >= 1. NaN inputs are detected separately by the caller.
CNPOSE_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

template <DType DT>
CNPOSE_AVX2 inline __m256 load8(const void* base, int64_t i) {
  if constexpr (DT == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (DT == DType::kFloat16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

CNPOSE_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

CNPOSE_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <DType DT>
CNPOSE_AVX2 JointMoments reduce_avx2(const void* vol, int64_t D, int64_t H, int64_t W) {
  Accum acc;
  const int64_t wv = W & ~int64_t{7};
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 nan_seen = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t row = (d * H + h) * W;
      // max(v, m) returns m when v is NaN, so NaN never becomes the max; it is flagged instead.
      __m256 vmax = _mm256_set1_ps(kNegInf);
      for (int64_t w = 0; w < wv; w += 8) {
        const __m256 v = load8<DT>(vol, row + w);
        nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(v, vmax);
      }
      float rmax = hmax(vmax);
      for (int64_t w = wv; w < W; ++w) {
        const float v = load_scalar<DT>(vol, row + w);
        if (std::isnan(v)) acc.bad = true;
        rmax = v > rmax ? v : rmax;
      }
      if (rmax == kNegInf) continue;
      acc.raise_max(rmax);
      const __m256 vm = _mm256_set1_ps(acc.m);
      __m256 es = _mm256_setzero_ps(), ex = _mm256_setzero_ps();
      for (int64_t w = 0; w < wv; w += 8) {
        const __m256 e = exp256(_mm256_sub_ps(load8<DT>(vol, row + w), vm));
        es = _mm256_add_ps(es, e);
        ex = _mm256_fmadd_ps(e, _mm256_add_ps(lane, _mm256_set1_ps(static_cast<float>(w))), ex);
      }
      double rs = hsum(es), rx = hsum(ex);
      for (int64_t w = wv; w < W; ++w) {
        const double e = std::exp(static_cast<double>(load_scalar<DT>(vol, row + w)) - acc.m);
        rs += e;
        rx += e * static_cast<double>(w);
      }
      acc.add_row(rs, rx, h, d);
    }
  }
  if (_mm256_movemask_ps(nan_seen) != 0) acc.bad = true;
  return finish_moments(acc.m, acc.s, acc.sx, acc.sy, acc.sz, acc.bad);
}
#endif  // CNPOSE_X86

using ReduceFn = JointMoments (*)(const void*, int64_t, int64_t, int64_t);

template <DType DT>
ReduceFn pick(bool avx2) {
#ifdef CNPOSE_X86
  if (avx2) return &reduce_avx2<DT>;
#endif
  (void)avx2;
  return &reduce_portable<DT>;
}

ReduceFn pick_reduce(DType dt, bool avx2) {
  switch (dt) {
    case DType::kFloat32: return pick<DType::kFloat32>(avx2);
    case DType::kFloat16: return pick<DType::kFloat16>(avx2);
    default: return pick<DType::kBFloat16>(avx2);
  }
}

}  // namespace

bool cpu_has_avx2() {
#ifdef CNPOSE_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

void decode_cpu_isa(const DecodeArgs& a, int threads, bool use_avx2) {
  const ReduceFn reduce = pick_reduce(a.dtype, use_avx2 && cpu_has_avx2());
  const int64_t tasks = a.n * a.joints;
  const int64_t V = a.volume();
  const int64_t elem = a.dtype == DType::kFloat32 ? 4 : 2;
  const auto* hm = static_cast<const char*>(a.heatmaps);
  const auto* fl = static_cast<const char*>(a.flipped);
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t n = t / a.joints, j = t % a.joints;
      JointMoments r = reduce(hm + (n * a.joints + j) * V * elem, a.depth, a.height, a.width);
      if (fl != nullptr) {
        const int64_t jf = a.flip_perm[j];
        r = average_flip(r, reduce(fl + (n * a.joints + jf) * V * elem, a.depth, a.height, a.width), a.width);
      }
      write_joint(a, n, j, r, a.out);
    }
  };
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(threads, tasks));
  if (nthreads == 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(nthreads - 1));
  for (int64_t i = 1; i < nthreads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

void decode_cpu(const DecodeArgs& a, int threads) { decode_cpu_isa(a, threads, true); }

}  // namespace cnpose
