// pybind11 boundary of cnpose_trt._C: every argument is checked here, once, before any
// pointer is touched; the kernels assume valid input. Messages name the argument and what is
// allowed. ValueError for shapes and values, TypeError for types.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <cstdio>
#include <type_traits>
#include <string>
#include <thread>
#include <vector>

#include "softargmax.h"

namespace py = pybind11;
using cnpose::DecodeArgs;
using cnpose::DType;

namespace {

// Messages are built without iostreams: some hosts link extensions with -Bsymbolic-functions
// next to another libstdc++ user (torch), and an ostringstream there crashed in locale code.
inline std::string to_s(const std::string& s) { return s; }
inline std::string to_s(const char* s) { return s; }
inline std::string to_s(char c) { return std::string(1, c); }
inline std::string to_s(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string to_s(T v) {
  return std::to_string(v);
}

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  ((out += to_s(parts)), ...);
  return out;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

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
  if (dt.kind() == 'f' && dt.itemsize() == 4) return DType::kFloat32;
  if (dt.kind() == 'f' && dt.itemsize() == 2) return DType::kFloat16;
  const std::string name = py::str(dt);
  if (name == "bfloat16" && dt.itemsize() == 2) return DType::kBFloat16;  // ml_dtypes.bfloat16
  throw py::type_error(cat(what, " dtype must be float32, float16 or bfloat16, got ", name));
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw py::value_error(cat(what, ": sizes overflow 64-bit index arithmetic"));
  return r;
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

// Host arrays: float32 C-contiguous copies of the small per-image inputs, shape-checked.
py::array_t<float> small_array(const py::object& obj, const char* what, std::vector<int64_t> shape) {
  py::array_t<float, py::array::c_style | py::array::forcecast> arr;
  try {
    arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(obj);
  } catch (const py::error_already_set&) {
    arr = {};
  }
  if (!arr) throw py::type_error(cat(what, " must be a numeric array of shape ", shape_str(shape)));
  std::vector<int64_t> got(arr.shape(), arr.shape() + arr.ndim());
  if (got != shape) throw py::value_error(cat(what, " must have shape ", shape_str(shape), ", got ", shape_str(got)));
  const float* p = arr.data();
  for (py::ssize_t i = 0; i < arr.size(); ++i)
    if (!std::isfinite(p[i])) throw py::value_error(cat(what, " must be finite, found ", p[i]));
  return arr;
}

void check_post_values(const float* boxes, const float* intr, int64_t n) {
  for (int64_t i = 0; boxes && i < n; ++i)
    if (!(boxes[i * 4 + 2] > 0 && boxes[i * 4 + 3] > 0))
      throw py::value_error(cat("boxes[", i, "] must have width and height > 0"));
  for (int64_t i = 0; intr && i < n; ++i)
    if (!(intr[i * 4] > 0 && intr[i * 4 + 1] > 0))
      throw py::value_error(cat("intrinsics[", i, "] must have focal lengths fx, fy > 0"));
}

py::array check_host_heatmaps(const py::object& obj, const char* what) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(cat(what, " must be a numpy array on the host, got ", std::string(py::str(py::type::handle_of(obj).attr("__name__")))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(cat(what, " must be C-contiguous (use np.ascontiguousarray)"));
  return a;
}

py::array decode_host(const py::object& heatmaps_obj, int64_t joints, std::optional<int64_t> depth_dim,
                      const py::object& flipped_obj, std::optional<std::vector<int64_t>> flip_perm,
                      const py::object& boxes_obj, const py::object& root_obj, const py::object& intr_obj,
                      const py::object& out_obj, double depth_range_mm, int threads, const std::string& isa) {
  py::array hm = check_host_heatmaps(heatmaps_obj, "heatmaps");
  std::vector<int64_t> shape(hm.shape(), hm.shape() + hm.ndim());
  DecodeArgs a = check_shape(shape, joints, depth_dim);
  a.dtype = numpy_dtype(hm, "heatmaps");
  a.heatmaps = hm.data();
  a.depth_range_mm = static_cast<float>(depth_range_mm);
  if (!(depth_range_mm > 0) || !std::isfinite(depth_range_mm))
    throw py::value_error(cat("depth_range_mm must be a positive finite number, got ", depth_range_mm));

  py::array fl;
  if (!flipped_obj.is_none()) {
    fl = check_host_heatmaps(flipped_obj, "flipped");
    std::vector<int64_t> fshape(fl.shape(), fl.shape() + fl.ndim());
    if (fshape != shape)
      throw py::value_error(cat("flipped must have the shape of heatmaps ", shape_str(shape), ", got ", shape_str(fshape)));
    if (numpy_dtype(fl, "flipped") != a.dtype)
      throw py::type_error(cat("flipped must have the dtype of heatmaps (", dtype_name(a.dtype), ")"));
    if (!flip_perm) throw py::value_error("flipped needs flip_perm (or flip_pairs in cnpose_trt.decode)");
    a.flipped = fl.data();
  } else if (flip_perm) {
    throw py::value_error("flip_perm is only meaningful with flipped heatmaps");
  }
  const std::vector<int32_t> perm = check_perm(flip_perm, joints);
  a.flip_perm = perm.empty() ? nullptr : perm.data();

  py::array_t<float> boxes, root, intr;
  if (!boxes_obj.is_none()) boxes = small_array(boxes_obj, "boxes", {a.n, 4});
  if (!root_obj.is_none()) {
    if (boxes_obj.is_none()) throw py::value_error("root_depth needs boxes (depth in mm is computed with the image frame)");
    root = small_array(root_obj, "root_depth", {a.n});
  }
  if (!intr_obj.is_none()) {
    if (boxes_obj.is_none()) throw py::value_error("intrinsics need boxes (camera coordinates start from image pixels)");
    intr = small_array(intr_obj, "intrinsics", {a.n, 4});
  }
  // A default-constructed py::array_t is an empty array, not null: test the arguments instead.
  a.boxes = boxes_obj.is_none() ? nullptr : boxes.data();
  a.root_depth = root_obj.is_none() ? nullptr : root.data();
  a.intrinsics = intr_obj.is_none() ? nullptr : intr.data();
  check_post_values(a.boxes, a.intrinsics, a.n);

  py::array_t<float> out;
  const std::vector<int64_t> out_shape{a.n, a.joints, cnpose::OUT_FIELDS};
  if (out_obj.is_none()) {
    out = py::array_t<float>(out_shape);
  } else {
    if (!py::isinstance<py::array_t<float>>(out_obj) || py::array(out_obj).dtype().kind() != 'f' ||
        py::array(out_obj).dtype().itemsize() != 4)
      throw py::type_error("out must be a float32 numpy array of shape (N, J, 10)");
    out = py::reinterpret_borrow<py::array_t<float>>(out_obj);
    std::vector<int64_t> got(out.shape(), out.shape() + out.ndim());
    if (got != out_shape) throw py::value_error(cat("out must have shape ", shape_str(out_shape), ", got ", shape_str(got)));
    if (!(out.flags() & py::array::c_style) || !out.writeable())
      throw py::value_error("out must be C-contiguous and writeable");
  }
  a.out = out.mutable_data();

  cnpose::Isa chosen = cnpose::best_isa();
  if (isa == "avx512") chosen = cnpose::Isa::kAvx512;
  else if (isa == "avx2") chosen = cnpose::Isa::kAvx2;
  else if (isa == "portable") chosen = cnpose::Isa::kPortable;
  else if (isa != "auto") throw py::value_error(cat("isa must be 'auto', 'avx512', 'avx2' or 'portable', got '", isa, "'"));
  if (!cnpose::cpu_supports(chosen)) throw py::value_error(cat("isa='", isa, "': this processor lacks it"));
  if (threads < 0) throw py::value_error(cat("threads must be >= 0 (0: all cores), got ", threads));
  const int nthreads = threads > 0 ? threads : std::max(1u, std::thread::hardware_concurrency());
  {
    py::gil_scoped_release release;
    cnpose::decode_cpu_isa(a, nthreads, chosen);
  }
  return out;
}

#ifdef CNPOSE_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

void require_cuda() {
  if (!kWithCuda)
    throw std::runtime_error(
        "cnpose_trt._C was built without CUDA: reinstall where nvcc is found (or with CNPOSE_TRT_CUDA=1) "
        "to decode on the GPU");
}

void decode_device(uintptr_t heatmaps, const std::vector<int64_t>& shape, const std::string& dtype, int64_t joints,
                   std::optional<int64_t> depth_dim, uintptr_t out, uintptr_t flipped,
                   std::optional<std::vector<int64_t>> flip_perm, uintptr_t boxes, uintptr_t root_depth,
                   uintptr_t intrinsics, uintptr_t stream, double depth_range_mm) {
  DecodeArgs a = check_shape(shape, joints, depth_dim);
  a.dtype = parse_dtype(dtype, "heatmaps");
  require_cuda();
  if (!(depth_range_mm > 0) || !std::isfinite(depth_range_mm))
    throw py::value_error(cat("depth_range_mm must be a positive finite number, got ", depth_range_mm));
  a.depth_range_mm = static_cast<float>(depth_range_mm);
  if (heatmaps == 0) throw py::value_error("heatmaps pointer must not be null");
  if (out == 0) throw py::value_error("out pointer must not be null");
  if ((flipped == 0) != !flip_perm) throw py::value_error("flipped and flip_perm go together");
  if (root_depth && !boxes) throw py::value_error("root_depth needs boxes");
  if (intrinsics && !boxes) throw py::value_error("intrinsics need boxes");
  if (flip_perm && joints > cnpose::kMaxFlipJoints)
    throw py::value_error(cat("flip averaging on the GPU supports at most ", cnpose::kMaxFlipJoints, " joints, got ", joints));
  const std::vector<int32_t> perm = check_perm(flip_perm, joints);
  const auto ptr = [](uintptr_t p) { return reinterpret_cast<const void*>(p); };
  const int dev = cnpose::cuda_pointer_device(ptr(heatmaps), "heatmaps");
  const std::pair<uintptr_t, const char*> others[] = {
      {out, "out"}, {flipped, "flipped"}, {boxes, "boxes"}, {root_depth, "root_depth"}, {intrinsics, "intrinsics"}};
  for (const auto& [p, what] : others) {
    if (p != 0 && cnpose::cuda_pointer_device(ptr(p), what) != dev)
      throw py::value_error(cat(what, " is on GPU ", cnpose::cuda_pointer_device(ptr(p), what),
                                ", heatmaps on GPU ", dev, ": all buffers must be on one device"));
  }
  if (out % alignof(float) != 0 || boxes % alignof(float) != 0 || root_depth % alignof(float) != 0 ||
      intrinsics % alignof(float) != 0)
    throw py::value_error("out, boxes, root_depth and intrinsics must be 4-byte aligned float32 buffers");
  a.heatmaps = ptr(heatmaps);
  a.flipped = flipped ? ptr(flipped) : nullptr;
  a.flip_perm = perm.empty() ? nullptr : perm.data();
  a.boxes = reinterpret_cast<const float*>(boxes);
  a.root_depth = reinterpret_cast<const float*>(root_depth);
  a.intrinsics = reinterpret_cast<const float*>(intrinsics);
  a.out = reinterpret_cast<float*>(out);
  py::gil_scoped_release release;
#ifdef CNPOSE_WITH_CUDA
  cnpose::decode_cuda(a, reinterpret_cast<void*>(stream));
#else
  (void)stream, (void)a;
#endif
}

// Reads a buffer with `threads` threads (64-bit words, independent accumulators): the memory
// read bandwidth the decode is compared with in the benchmarks, measured in the same run.
uint64_t memory_read_probe(const py::array& buf, int threads) {
  if (!(buf.flags() & py::array::c_style)) throw py::value_error("buf must be C-contiguous");
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  const auto* words = static_cast<const uint64_t*>(buf.data());
  const int64_t count = buf.nbytes() / 8;
  std::vector<uint64_t> partial(static_cast<size_t>(threads), 0);
  py::gil_scoped_release release;
  auto work = [&](int t) {
    const int64_t lo = count * t / threads, hi = count * (t + 1) / threads;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) a0 += words[i], a1 += words[i + 1], a2 += words[i + 2], a3 += words[i + 3];
    for (; i < hi; ++i) a0 += words[i];
    partial[static_cast<size_t>(t)] = a0 + a1 + a2 + a3;
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  uint64_t total = 0;
  for (uint64_t v : partial) total += v;
  return total;
}

}  // namespace

#ifndef CNPOSE_WITH_CUDA
namespace cnpose {
int cuda_pointer_device(const void*, const char*) { require_cuda(); return -1; }
int cuda_device_count() { return 0; }
}  // namespace cnpose
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "cnpose_trt's compiled decode: fused single-pass soft-argmax on the CPU and the GPU.";
  m.attr("OUT_FIELDS") = cnpose::OUT_FIELDS;
  m.attr("built_with_cuda") = kWithCuda;
  m.attr("MAX_FLIP_JOINTS_CUDA") = cnpose::kMaxFlipJoints;
  m.def("cpu_has_avx2", [] { return cnpose::cpu_supports(cnpose::Isa::kAvx2); },
        "Whether the AVX2+FMA+F16C kernel runs on this processor.");
  m.def("cpu_has_avx512", [] { return cnpose::cpu_supports(cnpose::Isa::kAvx512); },
        "Whether the AVX-512 (F, BW, VL) kernel runs on this processor.");
  m.def("cpu_isa", [] {
    const cnpose::Isa i = cnpose::best_isa();
    return std::string(i == cnpose::Isa::kAvx512 ? "avx512" : i == cnpose::Isa::kAvx2 ? "avx2" : "portable");
  }, "The kernel decode_host uses with isa='auto'.");
  m.def("cuda_device_count", &cnpose::cuda_device_count, "Visible CUDA devices (0 when built without CUDA).");
  m.def(
      "cuda_pointer_device",
      [](uintptr_t ptr) {
        require_cuda();
        return cnpose::cuda_pointer_device(reinterpret_cast<const void*>(ptr), "ptr");
      },
      py::arg("ptr"), "Device ordinal of a CUDA device pointer (ValueError for host pointers).");
  m.def("memory_read_probe", &memory_read_probe, py::arg("buf"), py::arg("threads") = 0,
        "Sum a C-contiguous buffer as 64-bit words on `threads` threads (a memory read bandwidth probe).");
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
