// pybind11 boundary of cnpose_trt._C (the decode and the crop): every argument is checked here,
// once, before any pointer is touched; the kernels assume valid input. Messages name the
// argument and what is allowed. ValueError for shapes and values, TypeError for types.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_parallel.h"
#include "crop.h"
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

// Arrays in the other byte order hold the right values but the kernels would read them as
// native ones: refused (cnpose_trt.decode converts them before they get here).
void require_native_order(const py::array& a, const char* what) {
  const char order = a.dtype().byteorder();
  constexpr char kForeign = (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) ? '>' : '<';
  if (order == kForeign)
    throw py::type_error(cat(what, " must be in the machine's byte order, got ", std::string(py::str(a.dtype())),
                             " (convert with a.astype(a.dtype.newbyteorder('=')))"));
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

// The same for double-precision inputs (affine maps).
py::array_t<double> small_array_d(const py::object& obj, const char* what, std::vector<int64_t> shape) {
  py::array_t<double, py::array::c_style | py::array::forcecast> arr;
  try {
    arr = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(obj);
  } catch (const py::error_already_set&) {
    arr = {};
  }
  if (!arr) throw py::type_error(cat(what, " must be a numeric array of shape ", shape_str(shape)));
  std::vector<int64_t> got(arr.shape(), arr.shape() + arr.ndim());
  if (got != shape) throw py::value_error(cat(what, " must have shape ", shape_str(shape), ", got ", shape_str(got)));
  const double* p = arr.data();
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

// Byte ranges [lo, hi) of buffers a kernel reads while it writes `out`: any overlap is refused
// (the kernel would read what it has already overwritten).
struct Span {
  uintptr_t lo, hi;
  const char* what;
};

void require_disjoint(const Span& out, const std::vector<Span>& inputs) {
  for (const Span& in : inputs)
    if (in.lo < in.hi && out.lo < in.hi && in.lo < out.hi)
      throw py::value_error(cat(out.what, " must not overlap ", in.what, " (the kernel reads ", in.what,
                                " while it writes ", out.what, "): pass a separate buffer"));
}

Span span_of(const py::array& a, const char* what) {
  const auto lo = reinterpret_cast<uintptr_t>(a.data());
  return {lo, lo + static_cast<uintptr_t>(a.nbytes()), what};
}

cnpose::Isa parse_isa(const std::string& isa) {
  cnpose::Isa chosen = cnpose::best_isa();
  if (isa == "avx512") chosen = cnpose::Isa::kAvx512;
  else if (isa == "avx2") chosen = cnpose::Isa::kAvx2;
  else if (isa == "portable") chosen = cnpose::Isa::kPortable;
  else if (isa != "auto") throw py::value_error(cat("isa must be 'auto', 'avx512', 'avx2' or 'portable', got '", isa, "'"));
  if (!cnpose::cpu_supports(chosen)) throw py::value_error(cat("isa='", isa, "': this processor lacks it"));
  return chosen;
}

void check_threads(int64_t threads) {
  if (threads < 0) throw py::value_error(cat("threads must be >= 0 (0: all cores), got ", threads));
}

void check_depth_range(double depth_range_mm) {
  if (!(depth_range_mm > 0) || !std::isfinite(depth_range_mm))
    throw py::value_error(cat("depth_range_mm must be a positive finite number, got ", depth_range_mm));
  if (depth_range_mm > static_cast<double>(FLT_MAX))
    throw py::value_error(cat("depth_range_mm must fit float32 (<= ", static_cast<double>(FLT_MAX), "), got ",
                              depth_range_mm));
}

py::array decode_host(const py::object& heatmaps_obj, int64_t joints, std::optional<int64_t> depth_dim,
                      const py::object& flipped_obj, std::optional<std::vector<int64_t>> flip_perm,
                      const py::object& boxes_obj, const py::object& root_obj, const py::object& intr_obj,
                      const py::object& out_obj, double depth_range_mm, int64_t threads, const std::string& isa) {
  py::array hm = check_host_heatmaps(heatmaps_obj, "heatmaps");
  std::vector<int64_t> shape(hm.shape(), hm.shape() + hm.ndim());
  DecodeArgs a = check_shape(shape, joints, depth_dim);
  a.dtype = numpy_dtype(hm, "heatmaps");
  a.heatmaps = hm.data();
  check_depth_range(depth_range_mm);
  a.depth_range_mm = static_cast<float>(depth_range_mm);

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
    if (!py::isinstance<py::array>(out_obj) || py::array(out_obj).dtype().kind() != 'f' ||
        py::array(out_obj).dtype().itemsize() != 4)
      throw py::type_error("out must be a float32 numpy array of shape (N, J, 10)");
    require_native_order(py::array(out_obj), "out");
    out = py::reinterpret_borrow<py::array_t<float>>(out_obj);
    std::vector<int64_t> got(out.shape(), out.shape() + out.ndim());
    if (got != out_shape) throw py::value_error(cat("out must have shape ", shape_str(out_shape), ", got ", shape_str(got)));
    if (!(out.flags() & py::array::c_style) || !out.writeable())
      throw py::value_error("out must be C-contiguous and writeable");
  }
  a.out = out.mutable_data();
  if (!out_obj.is_none()) {
    std::vector<Span> inputs{span_of(hm, "heatmaps")};
    if (fl) inputs.push_back(span_of(fl, "flipped"));
    if (a.boxes) inputs.push_back(span_of(boxes, "boxes"));
    if (a.root_depth) inputs.push_back(span_of(root, "root_depth"));
    if (a.intrinsics) inputs.push_back(span_of(intr, "intrinsics"));
    require_disjoint(span_of(out, "out"), inputs);
  }

  const cnpose::Isa chosen = parse_isa(isa);
  check_threads(threads);
  {
    py::gil_scoped_release release;
    cnpose::decode_cpu_isa(a, threads, chosen);
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
  check_depth_range(depth_range_mm);
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
  {
    const uintptr_t hm_bytes = static_cast<uintptr_t>(a.n * a.joints * a.volume() * (a.dtype == DType::kFloat32 ? 4 : 2));
    const auto n4 = static_cast<uintptr_t>(a.n * 4);
    require_disjoint({out, out + static_cast<uintptr_t>(a.n * a.joints * cnpose::OUT_FIELDS * 4), "out"},
                     {{heatmaps, heatmaps + hm_bytes, "heatmaps"},
                      {flipped, flipped ? flipped + hm_bytes : 0, "flipped"},
                      {boxes, boxes ? boxes + 4 * n4 : 0, "boxes"},
                      {root_depth, root_depth ? root_depth + n4 : 0, "root_depth"},
                      {intrinsics, intrinsics ? intrinsics + 4 * n4 : 0, "intrinsics"}});
  }
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
uint64_t memory_read_probe(const py::array& buf, int64_t threads) {
  if (!(buf.flags() & py::array::c_style)) throw py::value_error("buf must be C-contiguous");
  check_threads(threads);
  const int64_t parts = cnpose::thread_cap(threads, std::max<int64_t>(1, buf.nbytes() / 4096));
  const auto* words = static_cast<const uint64_t*>(buf.data());
  const int64_t count = buf.nbytes() / 8;
  std::vector<uint64_t> partial(static_cast<size_t>(parts), 0);
  std::atomic<int64_t> next{0};
  py::gil_scoped_release release;
  cnpose::run_parallel(parts, [&](int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < parts;) {
      const int64_t lo = count * t / parts, hi = count * (t + 1) / parts;
      uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int64_t i = lo;
      for (; i + 4 <= hi; i += 4) a0 += words[i], a1 += words[i + 1], a2 += words[i + 2], a3 += words[i + 3];
      for (; i < hi; ++i) a0 += words[i];
      partial[static_cast<size_t>(t)] = a0 + a1 + a2 + a3;
    }
  });
  uint64_t total = 0;
  for (uint64_t v : partial) total += v;
  return total;
}

// ----------------------------------------------------------------------------------- crop

// What the crop needs to know of one image, host or device.
struct ImageInfo {
  uintptr_t data;
  int64_t height, width, row_stride;
};

void check_image_geometry(const ImageInfo& im, size_t i) {
  if (im.height < 1 || im.width < 1)
    throw py::value_error(cat("images[", i, "] must not be empty, got ", im.height, "x", im.width));
  if (im.width > std::numeric_limits<int32_t>::max() / 3)
    throw py::value_error(cat("images[", i, "] is ", im.width, " pixels wide: at most ",
                              std::numeric_limits<int32_t>::max() / 3, " are supported"));
  if (im.row_stride < 3 * im.width)
    throw py::value_error(cat("images[", i, "] must have a row stride of at least 3 * width = ", 3 * im.width,
                              " bytes, got ", im.row_stride, " (use np.ascontiguousarray)"));
  checked_mul(im.height, im.row_stride, "images");
}

// The per-person records both backends read: image, inverse map (cv2.invertAffineTransform's
// formulas, in double), flip flag. Validates image_index, affines, flip and size.
std::vector<cnpose::CropPerson> crop_persons(const std::vector<ImageInfo>& images, const py::object& index_obj,
                                             const py::object& affines_obj, const py::object& flip_obj, int64_t size) {
  if (size < 1 || size > cnpose::kMaxCropSize)
    throw py::value_error(cat("size must be an integer in 1..", cnpose::kMaxCropSize, ", got ", size));
  py::array index_arr;
  try {
    index_arr = py::array::ensure(index_obj);
  } catch (const py::error_already_set&) {
    index_arr = {};
  }
  if (!index_arr || (index_arr.dtype().kind() != 'i' && index_arr.dtype().kind() != 'u'))
    throw py::type_error("image_index must be an integer array of shape (P,)");
  if (index_arr.ndim() != 1)
    throw py::value_error(cat("image_index must have shape (P,), got ", index_arr.ndim(), " dimensions"));
  const auto index = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(index_arr);
  const int64_t P = index.shape(0);
  const auto affines = small_array_d(affines_obj, "affines", {P, 2, 3});
  std::vector<uint8_t> flips(static_cast<size_t>(P), 0);
  if (py::isinstance<py::bool_>(flip_obj)) {
    std::fill(flips.begin(), flips.end(), flip_obj.cast<bool>() ? 1 : 0);
  } else {
    py::array f;
    try {
      f = py::array::ensure(flip_obj);
    } catch (const py::error_already_set&) {
      f = {};
    }
    if (!f || f.dtype().kind() != 'b')
      throw py::type_error("flip must be a bool or a bool array of shape (P,)");
    if (f.ndim() != 1 || f.shape(0) != P)
      throw py::value_error(cat("flip must have shape (", P, ",), got ", f.ndim() == 1 ? f.shape(0) : -1, " entries"));
    const auto fb = py::array_t<bool, py::array::c_style | py::array::forcecast>::ensure(f);
    for (int64_t p = 0; p < P; ++p) flips[static_cast<size_t>(p)] = fb.data()[p] ? 1 : 0;
  }
  std::vector<cnpose::CropPerson> persons(static_cast<size_t>(P));
  const int64_t* idx = index.data();
  const double* m = affines.data();
  const double last = static_cast<double>(size - 1);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k = idx[p];
    if (k < 0 || k >= static_cast<int64_t>(images.size()))
      throw py::value_error(cat("image_index[", p, "] = ", k, " is not an index of the ", images.size(), " images"));
    const double* a = m + 6 * p;
    const double det = a[0] * a[4] - a[1] * a[3];
    if (!(det != 0.0) || !std::isfinite(1.0 / det))
      throw py::value_error(cat("affines[", p, "] is not invertible (determinant ", det, ")"));
    cnpose::CropPerson& q = persons[static_cast<size_t>(p)];
    const double d = 1.0 / det;
    q.inv[0] = a[4] * d, q.inv[1] = -a[1] * d, q.inv[3] = -a[3] * d, q.inv[4] = a[0] * d;
    q.inv[2] = -q.inv[0] * a[2] - q.inv[1] * a[5];
    q.inv[5] = -q.inv[3] * a[2] - q.inv[4] * a[5];
    for (double u : {0.0, last})
      for (double v : {0.0, last}) {
        const double x = q.inv[0] * u + q.inv[1] * v + q.inv[2], y = q.inv[3] * u + q.inv[4] * v + q.inv[5];
        if (!(std::fabs(x) <= cnpose::kMaxCropCoord && std::fabs(y) <= cnpose::kMaxCropCoord))
          throw py::value_error(cat("affines[", p, "] maps crop corner (", u, ", ", v, ") to image point (", x, ", ",
                                    y, "), beyond +-2^30 px: not a crop of an image"));
      }
    const ImageInfo& im = images[static_cast<size_t>(k)];
    q.image = reinterpret_cast<const uint8_t*>(im.data);
    q.height = im.height, q.width = im.width, q.row_stride = im.row_stride;
    q.flip = flips[static_cast<size_t>(p)] != 0;
  }
  return persons;
}

void set_normalisation(cnpose::CropArgs& a, const py::object& mean_obj, const py::object& std_obj) {
  const auto mean = small_array(mean_obj, "mean", {3});
  const auto sd = small_array(std_obj, "std", {3});
  for (int c = 0; c < 3; ++c) {
    if (!(sd.data()[c] > 0) || !std::isfinite(1.0f / sd.data()[c]))
      throw py::value_error(cat("std must be positive, got ", sd.data()[c], " for channel ", c));
    a.mean[c] = mean.data()[c];
    a.inv_std[c] = 1.0f / sd.data()[c];
  }
}

cnpose::CropOut parse_crop_dtype(const std::string& name, const char* what) {
  if (name == "float32") return cnpose::CropOut::kFloat32;
  if (name == "float16") return cnpose::CropOut::kFloat16;
  throw py::type_error(cat(what, " must be float32 or float16, got ", name));
}

py::array crop_host(const py::object& images_obj, const py::object& index_obj, const py::object& affines_obj,
                    int64_t size, const py::object& flip_obj, const py::object& mean_obj, const py::object& std_obj,
                    const py::object& out_obj, std::optional<std::string> dtype, bool round_pixels, int64_t threads,
                    const std::string& isa) {
  if (!py::isinstance<py::list>(images_obj) && !py::isinstance<py::tuple>(images_obj))
    throw py::type_error("images must be a list of (H, W, 3) uint8 numpy arrays");
  const auto seq = py::reinterpret_borrow<py::sequence>(images_obj);
  std::vector<py::array> keep;
  std::vector<ImageInfo> images;
  for (size_t i = 0; i < seq.size(); ++i) {
    const py::object item = seq[i];
    if (!py::isinstance<py::array>(item))
      throw py::type_error(cat("images[", i, "] must be a numpy array (H, W, 3) uint8, got ",
                               std::string(py::str(py::type::handle_of(item).attr("__name__")))));
    py::array im = py::reinterpret_borrow<py::array>(item);
    if (im.dtype().kind() != 'u' || im.dtype().itemsize() != 1)
      throw py::type_error(cat("images[", i, "] must be uint8 RGB, got ", std::string(py::str(im.dtype()))));
    if (im.ndim() != 3 || im.shape(2) != 3) {
      std::vector<int64_t> shape(im.shape(), im.shape() + im.ndim());
      throw py::value_error(cat("images[", i, "] must have shape (H, W, 3) RGB, got ", shape_str(shape)));
    }
    if (im.shape(0) < 1 || im.shape(1) < 1)
      throw py::value_error(cat("images[", i, "] must not be empty, got ", im.shape(0), "x", im.shape(1)));
    if (im.strides(2) != 1 || im.strides(1) != 3)
      throw py::value_error(cat("images[", i, "] must have interleaved RGB pixels (strides (row, 3, 1)), got strides (",
                                im.strides(0), ", ", im.strides(1), ", ", im.strides(2), "): use np.ascontiguousarray"));
    ImageInfo info{reinterpret_cast<uintptr_t>(im.data()), im.shape(0), im.shape(1), im.strides(0)};
    check_image_geometry(info, i);
    images.push_back(info);
    keep.push_back(im);
  }
  cnpose::CropArgs a;
  const std::vector<cnpose::CropPerson> persons = crop_persons(images, index_obj, affines_obj, flip_obj, size);
  a.people = static_cast<int64_t>(persons.size()), a.size = size, a.persons = persons.data();
  a.round_pixels = round_pixels;
  set_normalisation(a, mean_obj, std_obj);
  const std::vector<int64_t> out_shape{a.people, 3, size, size};
  checked_mul(checked_mul(checked_mul(a.people, 3, "out"), size * size, "out"), 4, "out");
  py::array out;
  if (out_obj.is_none()) {
    a.out_dtype = parse_crop_dtype(dtype.value_or("float32"), "dtype");
    out = a.out_dtype == cnpose::CropOut::kFloat32 ? py::array(py::array_t<float>(out_shape))
                                                    : py::array(py::dtype("float16"), out_shape);
  } else {
    if (!py::isinstance<py::array>(out_obj))
      throw py::type_error(cat("out must be a float32 or float16 numpy array of shape ", shape_str(out_shape)));
    out = py::reinterpret_borrow<py::array>(out_obj);
    const py::dtype dt = out.dtype();
    if (dt.kind() != 'f' || (dt.itemsize() != 4 && dt.itemsize() != 2))
      throw py::type_error(cat("out must be float32 or float16, got ", std::string(py::str(dt))));
    require_native_order(out, "out");
    a.out_dtype = dt.itemsize() == 4 ? cnpose::CropOut::kFloat32 : cnpose::CropOut::kFloat16;
    if (dtype && parse_crop_dtype(*dtype, "dtype") != a.out_dtype)
      throw py::value_error(cat("dtype='", *dtype, "' does not match out's dtype ", std::string(py::str(dt))));
    std::vector<int64_t> got(out.shape(), out.shape() + out.ndim());
    if (got != out_shape)
      throw py::value_error(cat("out must have shape ", shape_str(out_shape), " (P, 3, size, size), got ", shape_str(got)));
    if (!(out.flags() & py::array::c_style) || !out.writeable())
      throw py::value_error("out must be C-contiguous and writeable");
    std::vector<Span> inputs;
    for (const ImageInfo& im : images)
      inputs.push_back({im.data, im.data + static_cast<uintptr_t>((im.height - 1) * im.row_stride + 3 * im.width),
                        "images"});
    require_disjoint(span_of(out, "out"), inputs);
  }
  a.out = out.mutable_data();
  const cnpose::Isa chosen = parse_isa(isa);
  check_threads(threads);
  {
    py::gil_scoped_release release;
    cnpose::crop_cpu_isa(a, threads, chosen);
  }
  return out;
}

void crop_device(const std::vector<uintptr_t>& image_ptrs, const std::vector<std::pair<int64_t, int64_t>>& image_hw,
                 const std::vector<int64_t>& row_strides, const py::object& index_obj, const py::object& affines_obj,
                 int64_t size, const py::object& flip_obj, const py::object& mean_obj, const py::object& std_obj,
                 uintptr_t out, const std::string& out_dtype, bool round_pixels, uintptr_t stream) {
  if (image_hw.size() != image_ptrs.size() || row_strides.size() != image_ptrs.size())
    throw py::value_error(cat("image_ptrs (", image_ptrs.size(), "), image_hw (", image_hw.size(), ") and row_strides (",
                              row_strides.size(), ") must have one entry per image"));
  std::vector<ImageInfo> images;
  for (size_t i = 0; i < image_ptrs.size(); ++i) {
    ImageInfo info{image_ptrs[i], image_hw[i].first, image_hw[i].second, row_strides[i]};
    if (info.data == 0) throw py::value_error(cat("images[", i, "] pointer must not be null"));
    check_image_geometry(info, i);
    images.push_back(info);
  }
  cnpose::CropArgs a;
  const std::vector<cnpose::CropPerson> persons = crop_persons(images, index_obj, affines_obj, flip_obj, size);
  a.people = static_cast<int64_t>(persons.size()), a.size = size, a.persons = persons.data();
  a.round_pixels = round_pixels;
  set_normalisation(a, mean_obj, std_obj);
  a.out_dtype = parse_crop_dtype(out_dtype, "out dtype");
  require_cuda();
  if (a.people == 0) return;
  if (out == 0) throw py::value_error("out pointer must not be null");
  const int64_t elem = a.out_dtype == cnpose::CropOut::kFloat32 ? 4 : 2;
  if (out % static_cast<uintptr_t>(elem) != 0)
    throw py::value_error(cat("out must be ", elem, "-byte aligned for ", out_dtype));
  const int dev = cnpose::cuda_pointer_device(reinterpret_cast<const void*>(out), "out");
  std::vector<Span> inputs;
  for (size_t i = 0; i < images.size(); ++i) {
    const int d = cnpose::cuda_pointer_device(reinterpret_cast<const void*>(images[i].data), "images");
    if (d != dev) throw py::value_error(cat("images[", i, "] is on GPU ", d, ", out on GPU ", dev, ": all buffers must be on one device"));
    const ImageInfo& im = images[i];
    inputs.push_back({im.data, im.data + static_cast<uintptr_t>((im.height - 1) * im.row_stride + 3 * im.width),
                      "images"});
  }
  const int64_t out_bytes = checked_mul(checked_mul(checked_mul(a.people, 3, "out"), size * size, "out"), elem, "out");
  require_disjoint({out, out + static_cast<uintptr_t>(out_bytes), "out"}, inputs);
  a.out = reinterpret_cast<void*>(out);
  py::gil_scoped_release release;
#ifdef CNPOSE_WITH_CUDA
  cnpose::crop_cuda(a, reinterpret_cast<void*>(stream));
#else
  (void)stream;
#endif
}

}  // namespace

#ifndef CNPOSE_WITH_CUDA
namespace cnpose {
int cuda_pointer_device(const void*, const char*) { require_cuda(); return -1; }
int cuda_device_count() { return 0; }
}  // namespace cnpose
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "cnpose_trt's compiled kernels: fused single-pass soft-argmax decode and fused crop-and-normalise, "
            "on the CPU and the GPU.";
  m.attr("OUT_FIELDS") = cnpose::OUT_FIELDS;
  m.attr("built_with_cuda") = kWithCuda;
  m.attr("MAX_FLIP_JOINTS_CUDA") = cnpose::kMaxFlipJoints;
  m.attr("MAX_CROP_SIZE") = cnpose::kMaxCropSize;
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
  m.def("crop_host", &crop_host, py::arg("images"), py::arg("image_index"), py::arg("affines"), py::kw_only(),
        py::arg("size") = 256, py::arg("flip") = false, py::arg("mean"), py::arg("std"), py::arg("out") = py::none(),
        py::arg("dtype") = py::none(), py::arg("round_pixels") = false, py::arg("threads") = 0,
        py::arg("isa") = "auto",
        "Crop, warp and normalise people from host uint8 RGB images into a (P, 3, size, size) array (see crop.h).");
  m.def("crop_device", &crop_device, py::arg("image_ptrs"), py::arg("image_hw"), py::arg("row_strides"),
        py::arg("image_index"), py::arg("affines"), py::kw_only(), py::arg("size") = 256, py::arg("flip") = false,
        py::arg("mean"), py::arg("std"), py::arg("out"), py::arg("out_dtype") = "float32",
        py::arg("round_pixels") = false, py::arg("stream") = 0,
        "Enqueue the crop of device uint8 RGB images (raw pointers) into a device buffer on `stream`; no host sync.");
  m.def("hardware_threads", &cnpose::hardware_threads, "Processors the CPU kernels count with threads=0.");
  m.def("_set_thread_spawn_limit", [](int64_t n) { cnpose::thread_spawn_budget().store(n < 0 ? -1 : n); },
        py::arg("n"),
        "Testing only: let the CPU kernels create n more threads, then fail as a refusing system would (-1: no limit).");
}
