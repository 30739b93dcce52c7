// Pieces of the decode that the CPU and CUDA backends share: the streaming-softmax state and
// the post-processing formulas, written once as host/device inline functions.
#pragma once

#include <cmath>
#include <cstdint>

#include "decode/softargmax.h"

namespace cnpose {

// Reduced moments of one joint volume: x, y, z in cells and the peak probability, or NaN.
struct JointMoments {
  float x, y, z, conf;
};

CNPOSE_HD JointMoments nan_moments() {
  const float q = NAN;
  return {q, q, q, q};
}

// s, sx, sy, sz are sums of exp(l - m); `bad` says a NaN was seen. The max logit contributes
// exp(0) = 1 to s, so the peak probability is exactly 1 / s.
CNPOSE_HD JointMoments finish_moments(float m, double s, double sx, double sy, double sz, bool bad) {
  if (bad || !(m > -INFINITY && m < INFINITY) || !(s > 0.0)) return nan_moments();
  return {static_cast<float>(sx / s), static_cast<float>(sy / s), static_cast<float>(sz / s),
          static_cast<float>(1.0 / s)};
}

// Combine the decode of joint j with the flipped decode of joint perm[j] (already gathered):
// mirror x in the heatmap frame, average everything.
CNPOSE_HD JointMoments average_flip(JointMoments a, JointMoments flipped, int64_t width) {
  const float wm1 = static_cast<float>(width - 1);
  return {0.5f * (a.x + (wm1 - flipped.x)), 0.5f * (a.y + flipped.y), 0.5f * (a.z + flipped.z),
          0.5f * (a.conf + flipped.conf)};
}

// Write the OUT_FIELDS floats of joint (n, j): cells, confidence, and the image / camera
// frames when boxes / intrinsics were given (NaN otherwise).
CNPOSE_HD void write_joint(const DecodeArgs& a, int64_t n, int64_t j, JointMoments r, float* out) {
  float* o = out + (n * a.joints + j) * OUT_FIELDS;
  o[kCellX] = r.x;
  o[kCellY] = r.y;
  o[kCellZ] = r.z;
  o[kConfidence] = r.conf;
  float px = NAN, py = NAN, zmm = NAN;
  if (a.boxes != nullptr) {
    const float* b = a.boxes + n * 4;
    px = r.x / static_cast<float>(a.width) * b[2] + b[0];
    py = r.y / static_cast<float>(a.height) * b[3] + b[1];
    const float root = a.root_depth != nullptr ? a.root_depth[n] : 0.0f;
    zmm = (r.z / static_cast<float>(a.depth) * 2.0f - 1.0f) * (0.5f * a.depth_range_mm) + root;
  }
  o[kImageX] = px;
  o[kImageY] = py;
  o[kDepthMM] = zmm;
  float cx = NAN, cy = NAN, cz = NAN;
  if (a.intrinsics != nullptr && a.boxes != nullptr) {
    const float* k = a.intrinsics + n * 4;
    cx = (px - k[2]) / k[0] * zmm;
    cy = (py - k[3]) / k[1] * zmm;
    cz = zmm;
  }
  o[kCamX] = cx;
  o[kCamY] = cy;
  o[kCamZ] = cz;
}

}  // namespace cnpose
