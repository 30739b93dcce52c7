// CPU backend of the fused soft-argmax (contract: softargmax.h).
//
// Work unit: one (image, joint) volume, handed to threads through an atomic counter (a thread
// the system refuses means fewer workers: cpu_parallel.h). A volume is streamed in chunks of
// whole rows (about 512 logits): the chunk's max is taken first (four independent max chains;
// the chunk sits in L1 afterwards), the running max and sums are rescaled only when that max
// grows, then the chunk's exponentials are summed while the chunk two ahead is prefetched (so
// memory and arithmetic overlap). Each logit is read from memory once. Chunk
// sums are small and go into double accumulators, which keeps float32 results within ~1e-6 of
// the float64 oracle on 262,144-voxel volumes.
//
// Three kernels, picked at run time by what the processor has: AVX-512 (16 lanes, exp via
// scalef), AVX2+FMA+F16C (8 lanes, exp from the exponent bits) and a portable scalar one; both
// SIMD exps use a degree-4 polynomial (3e-6 relative, exact at 0). The build never requires
// either instruction set: each SIMD entry point carries its own target attribute.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CNPOSE_X86 1
#endif

#include "common/cpu_parallel.h"
#include "decode/decode_common.h"
#include "decode/softargmax.h"

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
constexpr int64_t kElemBytes = DT == DType::kFloat32 ? 4 : 2;

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
JointMoments reduce_portable(const void* vol, int64_t D, int64_t H, int64_t W, const float*) {
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
#define CNPOSE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// SIMD traits: the few vector operations the generic row kernel needs, per instruction set.
// exp(x) is only called with x = logit - running max <= 0 (or -inf, or NaN). Both versions give
// exactly 0 below the float range, as the float64 oracle does (a single hot voxel then decodes
// to its exact cell), and keep NaN as NaN so that a NaN voxel poisons the sums it enters.
struct Avx2 {
  using vec = __m256;
  static constexpr int N = 8;
  static constexpr bool kPairs = false;
  CNPOSE_AVX2 static vec set1(float v) { return _mm256_set1_ps(v); }
  CNPOSE_AVX2 static vec zero() { return _mm256_setzero_ps(); }
  CNPOSE_AVX2 static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  CNPOSE_AVX2 static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  CNPOSE_AVX2 static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  // Returns m where v is NaN: NaN never becomes the max.
  CNPOSE_AVX2 static vec max_ignore_nan(vec v, vec m) { return _mm256_max_ps(v, m); }
  template <DType DT>
  CNPOSE_AVX2 static vec load(const void* base, int64_t i) {
    if constexpr (DT == DType::kFloat32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (DT == DType::kFloat16) return _mm256_cvtph_ps(raw);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
  }
  CNPOSE_AVX2 static float hmax(vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  CNPOSE_AVX2 static double hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  // exp(x) for x = logit - running max <= 0, to ~3e-6 relative (the decode needs ~1e-5; the
  // float64-oracle tests hold it to that). x = n ln2 + r with n = round(x log2 e), |r| <= ln2/2:
  // one FMA rounds x log2(e) to an integer by adding 1.5 * 2^23 + 127, whose low mantissa bits
  // then hold n + 127, so shifting them into the exponent field gives 2^n with no conversion;
  // one FMA reduces r with a single ln 2 constant (|n| <= 127: error < 3e-7); e^r = 1 + r q(r)
  // with q of degree 3 fitted for the least maximum relative error on |r| <= ln2/2 (2.9e-6 in
  // float32), against Cephes' degree 7 before: 11 vector operations instead of 18. exp(0) is
  // exactly 1 (a single hot voxel decodes to its exact cell). The clamp at -127 ln 2 gives
  // n = -127 there, whose 2^n has exponent field 0: exactly 0 below the float range.
  CNPOSE_AVX2 static vec exp(vec x) {
    x = _mm256_max_ps(set1(-88.0296919311f), x);  // NaN x passes through: max returns its second operand
    const vec magic = set1(12583039.0f);            // 1.5 * 2^23 + 127
    const vec t = _mm256_fmadd_ps(x, set1(1.44269504088896341f), magic);
    const vec n = _mm256_sub_ps(t, magic);
    const vec r = _mm256_fnmadd_ps(n, set1(0.693147180559945309f), x);
    vec p = set1(4.152589663863182e-02f);
    p = _mm256_fmadd_ps(p, r, set1(1.6787317395210266e-01f));
    p = _mm256_fmadd_ps(p, r, set1(5.000289678573608e-01f));
    p = _mm256_fmadd_ps(p, r, set1(9.999669790267944e-01f));
    p = _mm256_fmadd_ps(p, r, set1(1.0f));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)));
  }
};

struct Avx512 {
  using vec = __m512;
  static constexpr int N = 16;
  static constexpr bool kPairs = true;
  CNPOSE_AVX512 static vec set1(float v) { return _mm512_set1_ps(v); }
  CNPOSE_AVX512 static vec zero() { return _mm512_setzero_ps(); }
  CNPOSE_AVX512 static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  CNPOSE_AVX512 static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  CNPOSE_AVX512 static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  CNPOSE_AVX512 static vec max_ignore_nan(vec v, vec m) { return _mm512_max_ps(v, m); }
  template <DType DT>
  CNPOSE_AVX512 static vec load(const void* base, int64_t i) {
    if constexpr (DT == DType::kFloat32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (DT == DType::kFloat16) return _mm512_cvtph_ps(raw);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
  }
  CNPOSE_AVX512 static float hmax(vec v) { return _mm512_reduce_max_ps(v); }
  CNPOSE_AVX512 static double hsum(vec v) { return _mm512_reduce_add_ps(v); }
  // In log2 units: x log2(e) = n + f, |f| <= 1/2; 2^f = 1 + f q(f), q of degree 3 fitted for the
  // least maximum relative error (2.9e-6 in float32; exactly 1 at f = 0); scalef puts 2^n in.
  // Clamping at -200 makes -inf (and anything below the float range) exactly 0; NaN passes the
  // clamp (max returns its second operand) and stays NaN.
  CNPOSE_AVX512 static vec exp(vec x) {
    const vec xs = _mm512_max_ps(set1(-200.0f), _mm512_mul_ps(x, set1(1.44269504088896341f)));
    const vec n = _mm512_roundscale_ps(xs, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec f = _mm512_sub_ps(xs, n);
    vec p = set1(9.582852944731712e-03f);
    p = _mm512_fmadd_ps(p, f, set1(5.5906426161527634e-02f));
    p = _mm512_fmadd_ps(p, f, set1(2.4024099111557007e-01f));
    p = _mm512_fmadd_ps(p, f, set1(6.931241750717163e-01f));
    p = _mm512_fmadd_ps(p, f, set1(1.0f));
    return _mm512_scalef_ps(p, n);
  }
};

// One kernel body for both instruction sets: inlined into each ISA's entry point below, so it
// is compiled once per target. Rows are taken in chunks of about kChunk logits (whole rows): a
// max pass over the chunk (it then sits in L1), a rescale of the double accumulators only when
// the running max grows, an exp pass into float vector sums, one flush into doubles per chunk.
constexpr int64_t kChunk = 512;

// The max pass over rows r0..r1 (W logits each, the first wv of them in whole vectors), NaN
// ignored. Four independent max chains: one chain waits for each max's latency (4 cycles a
// vector), which made this pass as slow as the exp pass.
template <class V, DType DT>
__attribute__((always_inline)) inline float chunk_max(const void* vol, int64_t r0, int64_t r1, int64_t W,
                                                      int64_t wv) {
  using vec = typename V::vec;
  constexpr int N = V::N;
  vec m0 = V::set1(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  float cmax = kNegInf;
  if (wv == W) {  // whole rows of vectors: the chunk is one contiguous run
    int64_t i = r0 * W;
    const int64_t end = r1 * W;
    for (; i + 4 * N <= end; i += 4 * N) {
      m0 = V::max_ignore_nan(V::template load<DT>(vol, i), m0);
      m1 = V::max_ignore_nan(V::template load<DT>(vol, i + N), m1);
      m2 = V::max_ignore_nan(V::template load<DT>(vol, i + 2 * N), m2);
      m3 = V::max_ignore_nan(V::template load<DT>(vol, i + 3 * N), m3);
    }
    for (; i < end; i += N) m0 = V::max_ignore_nan(V::template load<DT>(vol, i), m0);
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < wv; w += N) m0 = V::max_ignore_nan(V::template load<DT>(vol, r * W + w), m0);
      for (int64_t w = wv; w < W; ++w) {
        const float v = load_scalar<DT>(vol, r * W + w);
        cmax = v > cmax ? v : cmax;
      }
    }
  }
  const vec vmax = V::max_ignore_nan(V::max_ignore_nan(m0, m1), V::max_ignore_nan(m2, m3));
  return std::max(cmax, V::hmax(vmax));
}

template <class V, DType DT>
__attribute__((always_inline)) inline JointMoments reduce_simd(const void* vol, int64_t D, int64_t H, int64_t W,
                                                                const float* wtab) {
  using vec = typename V::vec;
  constexpr int N = V::N;
  Accum acc;
  const int64_t wv = W - W % N;
  const int64_t rows = D * H;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunk / W);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t r1 = std::min(rows, r0 + chunk_rows);
    const float cmax = chunk_max<V, DT>(vol, r0, r1, W, wv);
    if (cmax == kNegInf) {  // no mass here: only -inf, or NaN, which must still poison the joint
      for (int64_t i = r0 * W; i < r1 * W && !acc.bad; ++i) acc.bad = std::isnan(load_scalar<DT>(vol, i));
      continue;
    }
    acc.raise_max(cmax);
    const vec vm = V::set1(acc.m);
    vec es = V::zero(), ex = V::zero(), ex2 = V::zero(), ey = V::zero(), ez = V::zero();
    double ts = 0, tx = 0, ty = 0, tz = 0;  // scalar row tails
    int64_t hi = r0 % H, di = r0 / H;  // (h, d) of row r, stepped: no division per row
    const int64_t ahead = 2 * (r1 - r0) * W;  // the same row two chunks on
    for (int64_t r = r0; r < r1; ++r) {
      const float h = static_cast<float>(hi), d = static_cast<float>(di);
      if (++hi == H) hi = 0, ++di;
      // Fetch the next chunk while this one is computed: the max pass would otherwise wait for
      // memory with nothing to overlap (the hardware prefetcher runs only a few lines ahead).
      // Prefetches past the volume's end are harmless (they never fault).
      {
        const char* next = static_cast<const char*>(vol) + (r * W + ahead) * kElemBytes<DT>;
        for (int64_t b = 0; b < W * kElemBytes<DT>; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      }
      // AVX-512: two vectors per step with their own sums, so the FMA chains of consecutive
      // vectors overlap (32 registers hold it); AVX2's 16 would spill, one vector per step.
      vec rs = V::zero(), rs2 = V::zero();
      int64_t w = 0;
      for (; V::kPairs && w + 2 * N <= wv; w += 2 * N) {
        const vec e = V::exp(V::sub(V::template load<DT>(vol, r * W + w), vm));
        const vec e2 = V::exp(V::sub(V::template load<DT>(vol, r * W + w + N), vm));
        rs = V::add(rs, e);
        rs2 = V::add(rs2, e2);
        ex = V::fmadd(e, V::template load<DType::kFloat32>(wtab, w), ex);
        ex2 = V::fmadd(e2, V::template load<DType::kFloat32>(wtab, w + N), ex2);
      }
      for (; w < wv; w += N) {
        const vec e = V::exp(V::sub(V::template load<DT>(vol, r * W + w), vm));
        rs = V::add(rs, e);
        ex = V::fmadd(e, V::template load<DType::kFloat32>(wtab, w), ex);
      }
      rs = V::add(rs, rs2);
      es = V::add(es, rs);
      ey = V::fmadd(rs, V::set1(h), ey);
      ez = V::fmadd(rs, V::set1(d), ez);
      for (w = wv; w < W; ++w) {
        const double e = std::exp(static_cast<double>(load_scalar<DT>(vol, r * W + w)) - acc.m);
        ts += e, tx += e * static_cast<double>(w), ty += e * h, tz += e * d;
      }
    }
    acc.s += V::hsum(es) + ts, acc.sx += V::hsum(V::add(ex, ex2)) + tx, acc.sy += V::hsum(ey) + ty,
        acc.sz += V::hsum(ez) + tz;
  }
  if (std::isnan(acc.s)) acc.bad = true;
  return finish_moments(acc.m, acc.s, acc.sx, acc.sy, acc.sz, acc.bad);
}

template <DType DT>
CNPOSE_AVX2 JointMoments reduce_avx2(const void* vol, int64_t D, int64_t H, int64_t W, const float* wtab) {
  return reduce_simd<Avx2, DT>(vol, D, H, W, wtab);
}

template <DType DT>
CNPOSE_AVX512 JointMoments reduce_avx512(const void* vol, int64_t D, int64_t H, int64_t W, const float* wtab) {
  return reduce_simd<Avx512, DT>(vol, D, H, W, wtab);
}
#endif  // CNPOSE_X86

// wtab: the column indices 0..W-1 as floats (the x moment is one FMA with a memory operand).
using ReduceFn = JointMoments (*)(const void*, int64_t, int64_t, int64_t, const float*);

template <DType DT>
ReduceFn pick(Isa isa) {
#ifdef CNPOSE_X86
  if (isa == Isa::kAvx512) return &reduce_avx512<DT>;
  if (isa == Isa::kAvx2) return &reduce_avx2<DT>;
#endif
  (void)isa;
  return &reduce_portable<DT>;
}

ReduceFn pick_reduce(DType dt, Isa isa) {
  switch (dt) {
    case DType::kFloat32: return pick<DType::kFloat32>(isa);
    case DType::kFloat16: return pick<DType::kFloat16>(isa);
    default: return pick<DType::kBFloat16>(isa);
  }
}

}  // namespace

int64_t decode_cpu_isa(const DecodeArgs& a, int64_t threads, Isa isa) {
  const ReduceFn reduce = pick_reduce(a.dtype, cpu_supports(isa) ? isa : Isa::kPortable);
  const int64_t tasks = a.n * a.joints;
  const int64_t V = a.volume();
  const int64_t elem = a.dtype == DType::kFloat32 ? 4 : 2;
  const auto* hm = static_cast<const char*>(a.heatmaps);
  const auto* fl = static_cast<const char*>(a.flipped);
  // Allocated here, not in the workers: nothing a worker does can throw.
  std::vector<float> wtab(static_cast<size_t>(a.width));
  for (int64_t w = 0; w < a.width; ++w) wtab[static_cast<size_t>(w)] = static_cast<float>(w);
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t n = t / a.joints, j = t % a.joints;
      JointMoments r = reduce(hm + (n * a.joints + j) * V * elem, a.depth, a.height, a.width, wtab.data());
      if (fl != nullptr) {
        const int64_t jf = a.flip_perm[j];
        r = average_flip(r, reduce(fl + (n * a.joints + jf) * V * elem, a.depth, a.height, a.width, wtab.data()),
                         a.width);
      }
      write_joint(a, n, j, r, a.out);
    }
  };
  return run_parallel(thread_cap(threads, tasks), worker);
}

int64_t decode_cpu(const DecodeArgs& a, int64_t threads) { return decode_cpu_isa(a, threads, best_isa()); }

}  // namespace cnpose
