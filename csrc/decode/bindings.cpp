// pybind11 boundary of the decode (decode_host, decode_device, OUT_FIELDS, MAX_FLIP_JOINTS_CUDA):
// every argument is checked here, once, before any pointer is touched; the kernels
// (softargmax_cpu.cpp, softargmax_cuda.cu) assume valid input. The shared checks are in
// common/checks.h; the heatmap shape, dtype and flip checks of the decode contract
// (softargmax.h) are here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "decode/softargmax.h"
#include "module.h"

namespace py = pybind11;

namespace cnpose {
namespace {

using namespace checks;

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    default: return "bfloat16";
  }
}

DType parse_dtype(const std::string& name, const char* what) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw py::type_error(cat(what, " dtype must be float32, float16 or bfloat16, got ", name));
}

DType numpy_dtype(const py::array& a, const char* what) {
  const py::dtype dt = a.dtype();
  require_native_order(a, what);
  if (dt.kind() == 'f' && dt.itemsize() == 4) return DType::kFloat32;
  if (dt.kind() == 'f' && dt.itemsize() == 2) return DType::kFloat16;
  const std::string name = py::str(dt);
  if (name == "bfloat16" && dt.itemsize() == 2) return DType::kBFloat16;  // ml_dtypes.bfloat16
  throw py::type_error(cat(what, " dtype must be float32, float16 or bfloat16, got ", name));
}

// Shape checks shared by the host and device entry points. Volumes stay below 2^31 elements
// so kernels may index within one volume in 32 bits; N*J below 2^31 fits a CUDA grid.
DecodeArgs check_shape(const std::vector<int64_t>& shape, int64_t joints, std::optional<int64_t> depth_dim) {
  if (shape.size() != 4)
    throw py::value_error(cat("heatmaps must have 4 dimensions (N, J*D, H, W), got ", shape.size()));
  for (int64_t s : shape)
    if (s <= 0) throw py::value_error(cat("heatmaps must have no empty dimension, got shape ", shape_str(shape)));
  if (joints <= 0) throw py::value_error(cat("joints must be a positive integer, got ", joints));
  const int64_t c = shape[1];
  if (c % joints != 0)
    throw py::value_error(cat("heatmaps channels (", c, ") must be divisible by joints (", joints, ")"));
  const int64_t d = depth_dim.value_or(c / joints);
  if (d <= 0 || checked_mul(d, joints, "depth_dim * joints") != c)
    throw py::value_error(cat("depth_dim must be a positive integer with joints * depth_dim == ", c,
                              " channels, got depth_dim=", d, ", joints=", joints));
  DecodeArgs a;
  a.n = shape[0], a.joints = joints, a.depth = d, a.height = shape[2], a.width = shape[3];
  const int64_t volume = checked_mul(checked_mul(d, a.height, "heatmaps"), a.width, "heatmaps");
  if (volume > std::numeric_limits<int32_t>::max())
    throw py::value_error(cat("one joint volume D*H*W = ", volume, " exceeds 2^31 - 1 elements"));
  const int64_t pairs = checked_mul(a.n, joints, "heatmaps");
  if (pairs > std::numeric_limits<int32_t>::max())
    throw py::value_error(cat("N * joints = ", pairs, " exceeds 2^31 - 1"));
  checked_mul(checked_mul(pairs, volume, "heatmaps"), 4, "heatmaps");
  return a;
}

std::vector<int32_t> check_perm(const std::optional<std::vector<int64_t>>& perm, int64_t joints) {
  if (!perm) return {};
  if (static_cast<int64_t>(perm->size()) != joints)
    throw py::value_error(cat("flip_perm must have one entry per joint (", joints, "), got ", perm->size()));
  std::vector<int32_t> out(perm->size());
  std::vector<bool> seen(perm->size(), false);
  for (size_t i = 0; i < perm->size(); ++i) {
    const int64_t v = (*perm)[i];
    if (v < 0 || v >= joints || seen[v])
      throw py::value_error(cat("flip_perm must be a permutation of 0..", joints - 1, ", got ", v, " at ", i));
    seen[v] = true;
    out[i] = static_cast<int32_t>(v);
  }
  return out;
}

void check_post_values(const float* boxes, const float* intr, int64_t n) {
  for (int64_t i = 0; boxes && i < n; ++i)
    if (!(boxes[i * 4 + 2] > 0 && boxes[i * 4 + 3] > 0))
      throw py::value_error(cat("boxes[", i, "] must have width and height > 0"));
  for (int64_t i = 0; intr && i < n; ++i)
    if (!(intr[i * 4] > 0 && intr[i * 4 + 1] > 0))
      throw py::value_error(cat("intrinsics[", i, "] must have focal lengths fx, fy > 0"));
}

void check_depth_range(double depth_range_mm) {
  if (!(depth_range_mm > 0) || !std::isfinite(depth_range_mm))
    throw py::value_error(cat("depth_range_mm must be a positive finite number, got ", depth_range_mm));
  if (depth_range_mm > static_cast<double>(FLT_MAX))
    throw py::value_error(cat("depth_range_mm must fit float32 (<= ", static_cast<double>(FLT_MAX), "), got ",
                              depth_range_mm));
}

// ------------------------------------------------------------------------------ host arrays

py::array check_host_heatmaps(const py::object& obj, const char* what) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(cat(what, " must be a numpy array on the host, got ", type_name(obj)));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(cat(what, " must be C-contiguous (use np.ascontiguousarray)"));
  return a;
}

// The flipped pass: the heatmaps' shape and dtype, and a flip_perm with it. Without flipped
// heatmaps the result is an empty array (a default py::array is not null: test the argument).
py::array check_flipped(const py::object& flipped_obj, const std::vector<int64_t>& shape, DType dtype,
                        bool has_perm) {
  if (flipped_obj.is_none()) {
    if (has_perm) throw py::value_error("flip_perm is only meaningful with flipped heatmaps");
    return {};
  }
  py::array fl = check_host_heatmaps(flipped_obj, "flipped");
  const std::vector<int64_t> fshape = shape_of(fl);
  if (fshape != shape)
    throw py::value_error(cat("flipped must have the shape of heatmaps ", shape_str(shape), ", got ", shape_str(fshape)));
  if (numpy_dtype(fl, "flipped") != dtype)
    throw py::type_error(cat("flipped must have the dtype of heatmaps (", dtype_name(dtype), ")"));
  if (!has_perm) throw py::value_error("flipped needs flip_perm (or flip_pairs in cnpose_trt.decode)");
  return fl;
}

// The post-processing inputs, float32 copies the kernel reads through a.boxes, a.root_depth and
// a.intrinsics (null when not given).
struct PostInputs {
  py::array_t<float> boxes, root, intr;
};

PostInputs post_inputs(const py::object& boxes_obj, const py::object& root_obj, const py::object& intr_obj,
                       DecodeArgs& a) {
  PostInputs in;
  if (!boxes_obj.is_none()) in.boxes = small_array(boxes_obj, "boxes", {a.n, 4});
  if (!root_obj.is_none()) {
    if (boxes_obj.is_none()) throw py::value_error("root_depth needs boxes (depth in mm is computed with the image frame)");
    in.root = small_array(root_obj, "root_depth", {a.n});
  }
  if (!intr_obj.is_none()) {
    if (boxes_obj.is_none()) throw py::value_error("intrinsics need boxes (camera coordinates start from image pixels)");
    in.intr = small_array(intr_obj, "intrinsics", {a.n, 4});
  }
  // A default-constructed py::array_t is an empty array, not null: test the arguments instead.
  a.boxes = boxes_obj.is_none() ? nullptr : in.boxes.data();
  a.root_depth = root_obj.is_none() ? nullptr : in.root.data();
  a.intrinsics = intr_obj.is_none() ? nullptr : in.intr.data();
  check_post_values(a.boxes, a.intrinsics, a.n);
  return in;
}

// The result array: a new one, or the caller's `out` (float32, (N, J, 10), C-contiguous, writeable).
py::array_t<float> host_out(const py::object& out_obj, const DecodeArgs& a) {
  const std::vector<int64_t> out_shape{a.n, a.joints, OUT_FIELDS};
  if (out_obj.is_none()) return py::array_t<float>(out_shape);
  if (!py::isinstance<py::array>(out_obj) || py::array(out_obj).dtype().kind() != 'f' ||
      py::array(out_obj).dtype().itemsize() != 4)
    throw py::type_error("out must be a float32 numpy array of shape (N, J, 10)");
  require_native_order(py::array(out_obj), "out");
  auto out = py::reinterpret_borrow<py::array_t<float>>(out_obj);
  const std::vector<int64_t> got = shape_of(out);
  if (got != out_shape) throw py::value_error(cat("out must have shape ", shape_str(out_shape), ", got ", shape_str(got)));
  require_writeable_c(out, "out");
  return out;
}

py::array decode_host(const py::object& heatmaps_obj, int64_t joints, std::optional<int64_t> depth_dim,
                      const py::object& flipped_obj, std::optional<std::vector<int64_t>> flip_perm,
                      const py::object& boxes_obj, const py::object& root_obj, const py::object& intr_obj,
                      const py::object& out_obj, double depth_range_mm, int64_t threads, const std::string& isa) {
  py::array hm = check_host_heatmaps(heatmaps_obj, "heatmaps");
  const std::vector<int64_t> shape = shape_of(hm);
  DecodeArgs a = check_shape(shape, joints, depth_dim);
  a.dtype = numpy_dtype(hm, "heatmaps");
  a.heatmaps = hm.data();
  check_depth_range(depth_range_mm);
  a.depth_range_mm = static_cast<float>(depth_range_mm);

  const py::array fl = check_flipped(flipped_obj, shape, a.dtype, flip_perm.has_value());
  if (!flipped_obj.is_none()) a.flipped = fl.data();
  const std::vector<int32_t> perm = check_perm(flip_perm, joints);
  a.flip_perm = perm.empty() ? nullptr : perm.data();
  const PostInputs post = post_inputs(boxes_obj, root_obj, intr_obj, a);

  py::array_t<float> out = host_out(out_obj, a);
  a.out = out.mutable_data();
  if (!out_obj.is_none()) {
    std::vector<Span> inputs{span_of(hm, "heatmaps")};
    if (a.flipped) inputs.push_back(span_of(fl, "flipped"));
    if (a.boxes) inputs.push_back(span_of(post.boxes, "boxes"));
    if (a.root_depth) inputs.push_back(span_of(post.root, "root_depth"));
    if (a.intrinsics) inputs.push_back(span_of(post.intr, "intrinsics"));
    require_disjoint(span_of(out, "out"), inputs);
  }

  const Isa chosen = parse_isa(isa);
  check_threads(threads);
  {
    py::gil_scoped_release release;
    decode_cpu_isa(a, threads, chosen);
  }
  return out;
}

// ---------------------------------------------------------------------------- device pointers

// The device buffers of one decode_device call (0: not given).
struct DeviceBuffers {
  uintptr_t heatmaps, out, flipped, boxes, root_depth, intrinsics;
};

// Every given buffer on the heatmaps' device, float32 buffers 4-byte aligned, out apart from
// every input.
void check_device_buffers(const DeviceBuffers& b, const DecodeArgs& a) {
  const int dev = device_of(b.heatmaps, "heatmaps");
  const std::pair<uintptr_t, const char*> others[] = {
      {b.out, "out"}, {b.flipped, "flipped"}, {b.boxes, "boxes"}, {b.root_depth, "root_depth"},
      {b.intrinsics, "intrinsics"}};
  for (const auto& [p, what] : others)
    if (p != 0) require_same_device(device_of(p, what), what, dev, "heatmaps");
  if (b.out % alignof(float) != 0 || b.boxes % alignof(float) != 0 || b.root_depth % alignof(float) != 0 ||
      b.intrinsics % alignof(float) != 0)
    throw py::value_error("out, boxes, root_depth and intrinsics must be 4-byte aligned float32 buffers");
  const uintptr_t hm_bytes = static_cast<uintptr_t>(a.n * a.joints * a.volume() * (a.dtype == DType::kFloat32 ? 4 : 2));
  const auto n4 = static_cast<uintptr_t>(a.n * 4);
  require_disjoint({b.out, b.out + static_cast<uintptr_t>(a.n * a.joints * OUT_FIELDS * 4), "out"},
                   {{b.heatmaps, b.heatmaps + hm_bytes, "heatmaps"},
                    {b.flipped, b.flipped ? b.flipped + hm_bytes : 0, "flipped"},
                    {b.boxes, b.boxes ? b.boxes + 4 * n4 : 0, "boxes"},
                    {b.root_depth, b.root_depth ? b.root_depth + n4 : 0, "root_depth"},
                    {b.intrinsics, b.intrinsics ? b.intrinsics + 4 * n4 : 0, "intrinsics"}});
}

void decode_device(uintptr_t heatmaps, const std::vector<int64_t>& shape, const std::string& dtype, int64_t joints,
                   std::optional<int64_t> depth_dim, uintptr_t out, uintptr_t flipped,
                   std::optional<std::vector<int64_t>> flip_perm, uintptr_t boxes, uintptr_t root_depth,
                   uintptr_t intrinsics, uintptr_t stream, double depth_range_mm) {
  DecodeArgs a = check_shape(shape, joints, depth_dim);
  a.dtype = parse_dtype(dtype, "heatmaps");
  require_cuda();
  check_depth_range(depth_range_mm);
  a.depth_range_mm = static_cast<float>(depth_range_mm);
  require_pointer(heatmaps, "heatmaps");
  require_pointer(out, "out");
  if ((flipped == 0) != !flip_perm) throw py::value_error("flipped and flip_perm go together");
  if (root_depth && !boxes) throw py::value_error("root_depth needs boxes");
  if (intrinsics && !boxes) throw py::value_error("intrinsics need boxes");
  if (flip_perm && joints > kMaxFlipJoints)
    throw py::value_error(cat("flip averaging on the GPU supports at most ", kMaxFlipJoints, " joints, got ", joints));
  const std::vector<int32_t> perm = check_perm(flip_perm, joints);
  check_device_buffers({heatmaps, out, flipped, boxes, root_depth, intrinsics}, a);
  a.heatmaps = reinterpret_cast<const void*>(heatmaps);
  a.flipped = flipped ? reinterpret_cast<const void*>(flipped) : nullptr;
  a.flip_perm = perm.empty() ? nullptr : perm.data();
  a.boxes = reinterpret_cast<const float*>(boxes);
  a.root_depth = reinterpret_cast<const float*>(root_depth);
  a.intrinsics = reinterpret_cast<const float*>(intrinsics);
  a.out = reinterpret_cast<float*>(out);
  py::gil_scoped_release release;
#ifdef CNPOSE_WITH_CUDA
  decode_cuda(a, reinterpret_cast<void*>(stream));
#else
  (void)stream, (void)a;
#endif
}

}  // namespace

void register_decode(py::module_& m) {
  m.attr("OUT_FIELDS") = OUT_FIELDS;
  m.attr("MAX_FLIP_JOINTS_CUDA") = kMaxFlipJoints;
  m.def("decode_host", &decode_host, py::arg("heatmaps"), py::arg("joints") = 18, py::arg("depth_dim") = py::none(),
        py::kw_only(), py::arg("flipped") = py::none(), py::arg("flip_perm") = py::none(),
        py::arg("boxes") = py::none(), py::arg("root_depth") = py::none(), py::arg("intrinsics") = py::none(),
        py::arg("out") = py::none(), py::arg("depth_range_mm") = 2000.0, py::arg("threads") = 0,
        py::arg("isa") = "auto",
        "Decode host heatmaps (N, J*D, H, W) into a float32 (N, J, 10) array (see softargmax.h).");
  m.def("decode_device", &decode_device, py::arg("heatmaps"), py::arg("shape"), py::arg("dtype"),
        py::arg("joints") = 18, py::arg("depth_dim") = py::none(), py::kw_only(), py::arg("out"),
        py::arg("flipped") = 0, py::arg("flip_perm") = py::none(), py::arg("boxes") = 0, py::arg("root_depth") = 0,
        py::arg("intrinsics") = 0, py::arg("stream") = 0, py::arg("depth_range_mm") = 2000.0,
        "Enqueue the decode of device heatmaps (raw pointers) on `stream`; no host sync.");
}

}  // namespace cnpose
