// CPU backend of the fused crop-and-normalise (contract: crop.h).
//
// Work unit: a block of output rows of one person, handed to threads through an atomic counter
// (whole crops when there are enough people to keep every thread busy). For an axis-aligned
// map, x depends on the output column only and y on the row only, so a table per person gives
// each column's two source pixels and their weights, computed once in double; a row then needs
// its two source rows and weights, and the inner loop is table-driven:
//   AVX2 / AVX-512: per 8 / 16 columns, four 32-bit gathers per row pair read the bytes of both
//   taps (a word at 3*base holds R G B of the left pixel, a word at 3*base + 2 holds R G B of
//   the right one, both inside the row because base <= width - 2), byte shuffles split the
//   channels, and float FMAs interpolate and normalise straight into the three output planes;
//   portable: the same table-driven loop in scalar C++.
// The last, partial vector of a row runs the same instructions on padded tables (every pixel
// gets the same arithmetic: a flipped crop is exactly the mirrored one). Maps with rotation or
// shear, and images one pixel wide or high, take a per-pixel scalar loop.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CNPOSE_X86 1
#endif

#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "crop/crop.h"

namespace cnpose {
namespace {

// float -> IEEE half, round to nearest even (what F16C's vcvtps2ph does), for the portable kernel.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                               // below 2^-14: subnormal half
    if (a <= 0x33000000u) return static_cast<uint16_t>(sign);            // <= 2^-25 rounds to 0
    const uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t r = (a - 0x38000000u) >> 13;  // rebias the exponent 127 -> 15
  const uint32_t rem = a & 0x1FFFu;
  // Branch-free rounding (the remainder is random: a branch would mispredict half the time);
  // a carry into the exponent is right.
  const uint32_t up = static_cast<uint32_t>(rem > 0x1000u) | (static_cast<uint32_t>(rem == 0x1000u) & r);
  return static_cast<uint16_t>(sign | (r + (up & 1u)));
}

// The two taps of one axis: pixels base and base + 1 with weights w0 and w1 (0 for a tap outside
// the image). base is clamped to [0, n - 2], so both pixels exist when n >= 2; with n == 1 only
// base (= 0) does and w1 is 0. Positions far outside are clamped to where both taps are outside,
// which keeps floor() finite and in range.
struct AxisTaps {
  int64_t base;
  float w0, w1;
};

inline AxisTaps axis_taps(double x, int64_t n) {
  x = std::min(std::max(x, -2.0), static_cast<double>(n));
  const double fl = std::floor(x);
  const int64_t x0 = static_cast<int64_t>(fl);
  const double f = x - fl;
  const int64_t base = std::max<int64_t>(0, std::min<int64_t>(x0, n - 2));
  float w0 = 0.f, w1 = 0.f;
  if (x0 == base) w0 = static_cast<float>(1.0 - f);
  else if (x0 + 1 == base) w0 = static_cast<float>(f);
  if (x0 == base + 1) w1 = static_cast<float>(1.0 - f);
  else if (x0 + 1 == base + 1) w1 = static_cast<float>(f);
  if (n < 2) w1 = 0.f;
  return {base, w0, w1};
}

// One output row of one person for the table-driven kernels.
struct RowJob {
  const uint8_t* row0;  // source row base and base + 1
  const uint8_t* row1;
  const int32_t* off;   // (S,) byte offset 3 * base of each output column
  const float* wl;      // (S,) weight of pixel base
  const float* wr;      // (S,) weight of pixel base + 1
  float a[3], b[3], bias[3];  // per channel: w_row0 * inv_std, w_row1 * inv_std, -mean * inv_std
  float wt, wb;               // the row weights; inv_std: for round_pixels
  float inv_std[3];
  void* out[3];               // the row in each channel plane
};

template <CropOut OT>
inline void store_scalar(void* row, int64_t u, float v) {
  if constexpr (OT == CropOut::kFloat32) {
    static_cast<float*>(row)[u] = v;
  } else {
    static_cast<uint16_t*>(row)[u] = float_to_half(v);
  }
}

// R (round_pixels): the interpolated value is rounded to an integer grey level (half to even,
// as cv2's uint8 result) before it is normalised; else interpolation and normalisation fold
// into two FMAs.
template <CropOut OT, bool R>
inline void row_scalar(const RowJob& j, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t* p0 = j.row0 + j.off[u];
    const uint8_t* p1 = j.row1 + j.off[u];
    const float wl = j.wl[u], wr = j.wr[u];
    for (int c = 0; c < 3; ++c) {
      const float h0 = wl * static_cast<float>(p0[c]) + wr * static_cast<float>(p0[3 + c]);
      const float h1 = wl * static_cast<float>(p1[c]) + wr * static_cast<float>(p1[3 + c]);
      if constexpr (R) {
        const float v = std::nearbyint(h0 * j.wt + h1 * j.wb);
        store_scalar<OT>(j.out[c], u, v * j.inv_std[c] + j.bias[c]);
      } else {
        store_scalar<OT>(j.out[c], u, h0 * j.a[c] + (h1 * j.b[c] + j.bias[c]));
      }
    }
  }
}

#ifdef CNPOSE_X86
#define CNPOSE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CNPOSE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// pshufb control that moves byte k of every 32-bit word into its low byte, zeroing the rest.
constexpr uint64_t byte_pick_lo(int k) {
  const uint64_t z = 0x80;
  return (uint64_t{static_cast<uint8_t>(k)} | z << 8 | z << 16 | z << 24) |
         (uint64_t{static_cast<uint8_t>(k + 4)} | z << 8 | z << 16 | z << 24) << 32;
}
constexpr uint64_t byte_pick_hi(int k) {
  const uint64_t z = 0x80;
  return (uint64_t{static_cast<uint8_t>(k + 8)} | z << 8 | z << 16 | z << 24) |
         (uint64_t{static_cast<uint8_t>(k + 12)} | z << 8 | z << 16 | z << 24) << 32;
}

template <CropOut OT, bool R>
CNPOSE_AVX2 void row_avx2(const RowJob& j, int64_t S) {
  constexpr int N = 8;
  __m256i pick[4];
  for (int k = 0; k < 4; ++k) {
    const long long lo = static_cast<long long>(byte_pick_lo(k)), hi = static_cast<long long>(byte_pick_hi(k));
    pick[k] = _mm256_set_epi64x(hi, lo, hi, lo);
  }
  const int* r0 = reinterpret_cast<const int*>(j.row0);
  const int* r1 = reinterpret_cast<const int*>(j.row1);
  const int* r0b = reinterpret_cast<const int*>(j.row0 + 2);
  const int* r1b = reinterpret_cast<const int*>(j.row1 + 2);
  for (int64_t u = 0; u < S; u += N) {
    const int64_t valid = std::min<int64_t>(N, S - u);
    const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j.off + u));
    const __m256 wl = _mm256_loadu_ps(j.wl + u), wr = _mm256_loadu_ps(j.wr + u);
    const __m256i g0 = _mm256_i32gather_epi32(r0, off, 1), g0b = _mm256_i32gather_epi32(r0b, off, 1);
    const __m256i g1 = _mm256_i32gather_epi32(r1, off, 1), g1b = _mm256_i32gather_epi32(r1b, off, 1);
    for (int c = 0; c < 3; ++c) {
      const __m256 l0 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(g0, pick[c]));
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(g0b, pick[c + 1]));
      const __m256 l1 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(g1, pick[c]));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(g1b, pick[c + 1]));
      const __m256 h0 = _mm256_fmadd_ps(wr, q0, _mm256_mul_ps(wl, l0));
      const __m256 h1 = _mm256_fmadd_ps(wr, q1, _mm256_mul_ps(wl, l1));
      __m256 o;
      if constexpr (R) {
        const __m256 v = _mm256_fmadd_ps(h0, _mm256_set1_ps(j.wt), _mm256_mul_ps(h1, _mm256_set1_ps(j.wb)));
        o = _mm256_fmadd_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                            _mm256_set1_ps(j.inv_std[c]), _mm256_set1_ps(j.bias[c]));
      } else {
        o = _mm256_fmadd_ps(h0, _mm256_set1_ps(j.a[c]),
                            _mm256_fmadd_ps(h1, _mm256_set1_ps(j.b[c]), _mm256_set1_ps(j.bias[c])));
      }
      if constexpr (OT == CropOut::kFloat32) {
        float* dst = static_cast<float*>(j.out[c]) + u;
        if (valid == N) {
          _mm256_storeu_ps(dst, o);
        } else {
          alignas(32) float tmp[N];
          _mm256_store_ps(tmp, o);
          std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(float));
        }
      } else {
        const __m128i h = _mm256_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        uint16_t* dst = static_cast<uint16_t*>(j.out[c]) + u;
        if (valid == N) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
        } else {
          alignas(16) uint16_t tmp[N];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
          std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(uint16_t));
        }
      }
    }
  }
}

template <CropOut OT, bool R>
CNPOSE_AVX512 void row_avx512(const RowJob& j, int64_t S) {
  constexpr int N = 16;
  __m512i pick[4];
  for (int k = 0; k < 4; ++k) {
    const long long lo = static_cast<long long>(byte_pick_lo(k)), hi = static_cast<long long>(byte_pick_hi(k));
    pick[k] = _mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo);
  }
  for (int64_t u = 0; u < S; u += N) {
    const int64_t valid = std::min<int64_t>(N, S - u);
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1u);
    const __m512i off = _mm512_loadu_si512(j.off + u);
    const __m512 wl = _mm512_loadu_ps(j.wl + u), wr = _mm512_loadu_ps(j.wr + u);
    const __m512i g0 = _mm512_i32gather_epi32(off, j.row0, 1), g0b = _mm512_i32gather_epi32(off, j.row0 + 2, 1);
    const __m512i g1 = _mm512_i32gather_epi32(off, j.row1, 1), g1b = _mm512_i32gather_epi32(off, j.row1 + 2, 1);
    for (int c = 0; c < 3; ++c) {
      const __m512 l0 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(g0, pick[c]));
      const __m512 q0 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(g0b, pick[c + 1]));
      const __m512 l1 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(g1, pick[c]));
      const __m512 q1 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(g1b, pick[c + 1]));
      const __m512 h0 = _mm512_fmadd_ps(wr, q0, _mm512_mul_ps(wl, l0));
      const __m512 h1 = _mm512_fmadd_ps(wr, q1, _mm512_mul_ps(wl, l1));
      __m512 o;
      if constexpr (R) {
        const __m512 v = _mm512_fmadd_ps(h0, _mm512_set1_ps(j.wt), _mm512_mul_ps(h1, _mm512_set1_ps(j.wb)));
        o = _mm512_fmadd_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                            _mm512_set1_ps(j.inv_std[c]), _mm512_set1_ps(j.bias[c]));
      } else {
        o = _mm512_fmadd_ps(h0, _mm512_set1_ps(j.a[c]),
                            _mm512_fmadd_ps(h1, _mm512_set1_ps(j.b[c]), _mm512_set1_ps(j.bias[c])));
      }
      if constexpr (OT == CropOut::kFloat32) {
        _mm512_mask_storeu_ps(static_cast<float*>(j.out[c]) + u, keep, o);
      } else {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(j.out[c]) + u, keep,
                                 _mm512_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
    }
  }
}
#endif  // CNPOSE_X86

using RowFn = void (*)(const RowJob&, int64_t);

template <CropOut OT, bool R>
void row_portable(const RowJob& j, int64_t S) {
  row_scalar<OT, R>(j, 0, S);
}

template <CropOut OT, bool R>
RowFn pick_row(Isa isa) {
#ifdef CNPOSE_X86
  if (isa == Isa::kAvx512) return &row_avx512<OT, R>;
  if (isa == Isa::kAvx2) return &row_avx2<OT, R>;
#endif
  (void)isa;
  return &row_portable<OT, R>;
}

template <CropOut OT>
void fill_row(void* row, int64_t S, float v) {
  for (int64_t u = 0; u < S; ++u) store_scalar<OT>(row, u, v);
}

inline bool table_driven(const CropPerson& q) {
  return q.inv[1] == 0.0 && q.inv[3] == 0.0 && q.width >= 2 && q.height >= 2;
}

// Tables hold S entries rounded up to whole vectors; the padding (offset 0, weights 0) lets the
// last, partial vector of a row run the same instructions as the others (then only its valid
// lanes are stored), so every output pixel gets exactly the same arithmetic.
constexpr int64_t kTablePad = 16;
inline int64_t padded(int64_t S) { return (S + kTablePad - 1) / kTablePad * kTablePad; }

// Per-column taps of an axis-aligned map: x = inv[0] * u' + inv[2], u' mirrored when flipped.
void build_columns(const CropPerson& q, int64_t S, int32_t* off, float* wl, float* wr) {
  for (int64_t u = 0; u < S; ++u) {
    const double uc = static_cast<double>(q.flip ? S - 1 - u : u);
    const AxisTaps t = axis_taps(q.inv[0] * uc + q.inv[2], q.width);
    off[u] = static_cast<int32_t>(3 * t.base);
    wl[u] = t.w0;
    wr[u] = t.w1;
  }
  for (int64_t u = S; u < padded(S); ++u) off[u] = 0, wl[u] = 0.f, wr[u] = 0.f;
}

// Rows [v0, v1) of any map, one pixel at a time (rotation, shear, 1-pixel images).
template <CropOut OT, bool R>
void rows_general(const CropArgs& a, const CropPerson& q, void* const planes[3], int64_t v0, int64_t v1) {
  const int64_t S = a.size;
  const int64_t elem = OT == CropOut::kFloat32 ? 4 : 2;
  for (int64_t v = v0; v < v1; ++v) {
    for (int64_t u = 0; u < S; ++u) {
      const double uc = static_cast<double>(q.flip ? S - 1 - u : u), vd = static_cast<double>(v);
      const AxisTaps tx = axis_taps(q.inv[0] * uc + q.inv[1] * vd + q.inv[2], q.width);
      const AxisTaps ty = axis_taps(q.inv[3] * uc + q.inv[4] * vd + q.inv[5], q.height);
      float val[3] = {0.f, 0.f, 0.f};
      for (int dy = 0; dy < 2; ++dy) {
        const float wy = dy ? ty.w1 : ty.w0;
        if (wy == 0.f) continue;
        const uint8_t* row = q.image + (ty.base + dy) * q.row_stride;
        for (int dx = 0; dx < 2; ++dx) {
          const float wx = dx ? tx.w1 : tx.w0;
          if (wx == 0.f) continue;
          const uint8_t* px = row + 3 * (tx.base + dx);
          for (int c = 0; c < 3; ++c) val[c] += (wy * wx) * static_cast<float>(px[c]);
        }
      }
      for (int c = 0; c < 3; ++c) {
        void* row_out = static_cast<char*>(planes[c]) + v * S * elem;
        const float value = R ? std::nearbyint(val[c]) : val[c];
        store_scalar<OT>(row_out, u, (value - a.mean[c]) * a.inv_std[c]);
      }
    }
  }
}

template <CropOut OT, bool R>
int64_t crop_typed(const CropArgs& a, int64_t threads, Isa isa) {
  const RowFn row = pick_row<OT, R>(isa);
  const int64_t S = a.size, P = a.people;
  const int64_t elem = OT == CropOut::kFloat32 ? 4 : 2;
  // Whole crops per task when people outnumber threads 4 to 1, else row blocks of >= 8 rows.
  const int64_t guess = thread_cap(threads, P * S);
  const int64_t blocks_per_person = std::max<int64_t>(1, (4 * guess + P - 1) / P);
  const int64_t rows = std::max<int64_t>(std::min<int64_t>(8, S), (S + blocks_per_person - 1) / blocks_per_person);
  const int64_t blocks = (S + rows - 1) / rows;
  const int64_t tasks = P * blocks;
  const int64_t nthreads = thread_cap(threads, tasks);
  // Column tables, one per thread slot, allocated before any thread starts (workers never throw).
  const int64_t sp = padded(S);
  std::vector<int32_t> off_all(static_cast<size_t>(nthreads * sp));
  std::vector<float> w_all(static_cast<size_t>(2 * nthreads * sp));
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t slot) {
    int32_t* off = off_all.data() + slot * sp;
    float* wl = w_all.data() + 2 * slot * sp;
    float* wr = wl + sp;
    int64_t table_of = -1;
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t p = t / blocks, v0 = (t % blocks) * rows, v1 = std::min(S, v0 + rows);
      const CropPerson& q = a.persons[p];
      void* planes[3];
      for (int c = 0; c < 3; ++c) planes[c] = static_cast<char*>(a.out) + (p * 3 + c) * S * S * elem;
      if (!table_driven(q)) {
        rows_general<OT, R>(a, q, planes, v0, v1);
        continue;
      }
      if (table_of != p) build_columns(q, S, off, wl, wr), table_of = p;
      RowJob j;
      j.off = off, j.wl = wl, j.wr = wr;
      for (int c = 0; c < 3; ++c) j.bias[c] = -a.mean[c] * a.inv_std[c], j.inv_std[c] = a.inv_std[c];
      for (int64_t v = v0; v < v1; ++v) {
        const AxisTaps ty = axis_taps(q.inv[4] * static_cast<double>(v) + q.inv[5], q.height);
        for (int c = 0; c < 3; ++c) j.out[c] = static_cast<char*>(planes[c]) + v * S * elem;
        if (ty.w0 == 0.f && ty.w1 == 0.f) {  // the whole row lies outside the image
          for (int c = 0; c < 3; ++c) fill_row<OT>(j.out[c], S, j.bias[c]);
          continue;
        }
        j.row0 = q.image + ty.base * q.row_stride;
        j.row1 = j.row0 + q.row_stride;
        for (int c = 0; c < 3; ++c) j.a[c] = ty.w0 * a.inv_std[c], j.b[c] = ty.w1 * a.inv_std[c];
        j.wt = ty.w0, j.wb = ty.w1;
        row(j, S);
      }
    }
  };
  return run_parallel(nthreads, worker);
}

}  // namespace

int64_t crop_cpu_isa(const CropArgs& a, int64_t threads, Isa isa) {
  if (a.people == 0) return 0;
  if (!cpu_supports(isa)) isa = Isa::kPortable;
  if (a.round_pixels)
    return a.out_dtype == CropOut::kFloat32 ? crop_typed<CropOut::kFloat32, true>(a, threads, isa)
                                            : crop_typed<CropOut::kFloat16, true>(a, threads, isa);
  return a.out_dtype == CropOut::kFloat32 ? crop_typed<CropOut::kFloat32, false>(a, threads, isa)
                                          : crop_typed<CropOut::kFloat16, false>(a, threads, isa);
}

}  // namespace cnpose
