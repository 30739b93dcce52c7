// pybind11 boundary of the crop (crop_host, crop_device, MAX_CROP_SIZE): every argument is
// checked here, once, before any pointer is touched; the kernels (crop_cpu.cpp, crop_cuda.cu)
// assume valid input. The shared checks are in common/checks.h; the image geometry, the
// person records (image index, inverse affine map, flip) and the normalisation of the crop
// contract (crop.h) are checked here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "crop/crop.h"
#include "module.h"

namespace py = pybind11;

namespace cnpose {
namespace {

using namespace checks;

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

// The bytes the kernel reads of one image.
Span image_span(const ImageInfo& im) {
  return {im.data, im.data + static_cast<uintptr_t>((im.height - 1) * im.row_stride + 3 * im.width), "images"};
}

// ------------------------------------------------------------------------ person records

// image_index: integers, one dimension (P,).
py::array_t<int64_t> check_index(const py::object& index_obj) {
  const py::array index_arr = array_or_null(index_obj);
  if (!index_arr || (index_arr.dtype().kind() != 'i' && index_arr.dtype().kind() != 'u'))
    throw py::type_error("image_index must be an integer array of shape (P,)");
  if (index_arr.ndim() != 1)
    throw py::value_error(cat("image_index must have shape (P,), got ", index_arr.ndim(), " dimensions"));
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(index_arr);
}

// flip: one bool for every person, or a bool array of shape (P,); 1 = mirrored crop.
std::vector<uint8_t> check_flips(const py::object& flip_obj, int64_t P) {
  std::vector<uint8_t> flips(static_cast<size_t>(P), 0);
  if (py::isinstance<py::bool_>(flip_obj)) {
    std::fill(flips.begin(), flips.end(), flip_obj.cast<bool>() ? 1 : 0);
    return flips;
  }
  const py::array f = array_or_null(flip_obj);
  if (!f || f.dtype().kind() != 'b') throw py::type_error("flip must be a bool or a bool array of shape (P,)");
  if (f.ndim() != 1 || f.shape(0) != P)
    throw py::value_error(cat("flip must have shape (", P, ",), got ", f.ndim() == 1 ? f.shape(0) : -1, " entries"));
  const auto fb = py::array_t<bool, py::array::c_style | py::array::forcecast>::ensure(f);
  for (int64_t p = 0; p < P; ++p) flips[static_cast<size_t>(p)] = fb.data()[p] ? 1 : 0;
  return flips;
}

// q.inv = the inverse of person p's image -> crop map a (cv2.invertAffineTransform's formulas,
// in double); refused when a is singular or sends a crop corner beyond +-kMaxCropCoord px.
void invert_affine(const double* a, int64_t p, int64_t size, CropPerson& q) {
  const double det = a[0] * a[4] - a[1] * a[3];
  if (!(det != 0.0) || !std::isfinite(1.0 / det))
    throw py::value_error(cat("affines[", p, "] is not invertible (determinant ", det, ")"));
  const double d = 1.0 / det;
  q.inv[0] = a[4] * d, q.inv[1] = -a[1] * d, q.inv[3] = -a[3] * d, q.inv[4] = a[0] * d;
  q.inv[2] = -q.inv[0] * a[2] - q.inv[1] * a[5];
  q.inv[5] = -q.inv[3] * a[2] - q.inv[4] * a[5];
  const double last = static_cast<double>(size - 1);
  for (double u : {0.0, last})
    for (double v : {0.0, last}) {
      const double x = q.inv[0] * u + q.inv[1] * v + q.inv[2], y = q.inv[3] * u + q.inv[4] * v + q.inv[5];
      if (!(std::fabs(x) <= kMaxCropCoord && std::fabs(y) <= kMaxCropCoord))
        throw py::value_error(cat("affines[", p, "] maps crop corner (", u, ", ", v, ") to image point (", x, ", ",
                                  y, "), beyond +-2^30 px: not a crop of an image"));
    }
}

// The per-person records both backends read: image, inverse map, flip flag. Validates
// image_index, affines, flip and size.
std::vector<CropPerson> crop_persons(const std::vector<ImageInfo>& images, const py::object& index_obj,
                                     const py::object& affines_obj, const py::object& flip_obj, int64_t size) {
  if (size < 1 || size > kMaxCropSize)
    throw py::value_error(cat("size must be an integer in 1..", kMaxCropSize, ", got ", size));
  const auto index = check_index(index_obj);
  const int64_t P = index.shape(0);
  const auto affines = small_array<double>(affines_obj, "affines", {P, 2, 3});
  const std::vector<uint8_t> flips = check_flips(flip_obj, P);
  std::vector<CropPerson> persons(static_cast<size_t>(P));
  const int64_t* idx = index.data();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k = idx[p];
    if (k < 0 || k >= static_cast<int64_t>(images.size()))
      throw py::value_error(cat("image_index[", p, "] = ", k, " is not an index of the ", images.size(), " images"));
    CropPerson& q = persons[static_cast<size_t>(p)];
    invert_affine(affines.data() + 6 * p, p, size, q);
    const ImageInfo& im = images[static_cast<size_t>(k)];
    q.image = reinterpret_cast<const uint8_t*>(im.data);
    q.height = im.height, q.width = im.width, q.row_stride = im.row_stride;
    q.flip = flips[static_cast<size_t>(p)] != 0;
  }
  return persons;
}

void set_normalisation(CropArgs& a, const py::object& mean_obj, const py::object& std_obj) {
  const auto mean = small_array(mean_obj, "mean", {3});
  const auto sd = small_array(std_obj, "std", {3});
  for (int c = 0; c < 3; ++c) {
    if (!(sd.data()[c] > 0) || !std::isfinite(1.0f / sd.data()[c]))
      throw py::value_error(cat("std must be positive, got ", sd.data()[c], " for channel ", c));
    a.mean[c] = mean.data()[c];
    a.inv_std[c] = 1.0f / sd.data()[c];
  }
}

// The kernel arguments both entry points share (persons must outlive them), out not yet set.
CropArgs crop_args(const std::vector<CropPerson>& persons, int64_t size, bool round_pixels,
                   const py::object& mean_obj, const py::object& std_obj) {
  CropArgs a;
  a.people = static_cast<int64_t>(persons.size()), a.size = size, a.persons = persons.data();
  a.round_pixels = round_pixels;
  set_normalisation(a, mean_obj, std_obj);
  return a;
}

CropOut parse_crop_dtype(const std::string& name, const char* what) {
  if (name == "float32") return CropOut::kFloat32;
  if (name == "float16") return CropOut::kFloat16;
  throw py::type_error(cat(what, " must be float32 or float16, got ", name));
}

// ------------------------------------------------------------------------------ host arrays

// images: a list or tuple of (H, W, 3) uint8 arrays with interleaved pixels; `keep` holds them.
std::vector<ImageInfo> host_images(const py::object& images_obj, std::vector<py::array>& keep) {
  if (!py::isinstance<py::list>(images_obj) && !py::isinstance<py::tuple>(images_obj))
    throw py::type_error("images must be a list of (H, W, 3) uint8 numpy arrays");
  const auto seq = py::reinterpret_borrow<py::sequence>(images_obj);
  std::vector<ImageInfo> images;
  for (size_t i = 0; i < seq.size(); ++i) {
    const py::object item = seq[i];
    if (!py::isinstance<py::array>(item))
      throw py::type_error(cat("images[", i, "] must be a numpy array (H, W, 3) uint8, got ", type_name(item)));
    py::array im = py::reinterpret_borrow<py::array>(item);
    if (im.dtype().kind() != 'u' || im.dtype().itemsize() != 1)
      throw py::type_error(cat("images[", i, "] must be uint8 RGB, got ", std::string(py::str(im.dtype()))));
    if (im.ndim() != 3 || im.shape(2) != 3)
      throw py::value_error(cat("images[", i, "] must have shape (H, W, 3) RGB, got ", shape_str(shape_of(im))));
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
  return images;
}

// The result array: a new one of `dtype` (default float32), or the caller's `out` (float32 or
// float16 matching dtype when given, (P, 3, size, size), C-contiguous, writeable, apart from
// the images). Sets a.out_dtype.
py::array host_crop_out(const py::object& out_obj, const std::optional<std::string>& dtype,
                        const std::vector<ImageInfo>& images, CropArgs& a) {
  const std::vector<int64_t> out_shape{a.people, 3, a.size, a.size};
  checked_mul(checked_mul(checked_mul(a.people, 3, "out"), a.size * a.size, "out"), 4, "out");
  if (out_obj.is_none()) {
    a.out_dtype = parse_crop_dtype(dtype.value_or("float32"), "dtype");
    return a.out_dtype == CropOut::kFloat32 ? py::array(py::array_t<float>(out_shape))
                                            : py::array(py::dtype("float16"), out_shape);
  }
  if (!py::isinstance<py::array>(out_obj))
    throw py::type_error(cat("out must be a float32 or float16 numpy array of shape ", shape_str(out_shape)));
  auto out = py::reinterpret_borrow<py::array>(out_obj);
  const py::dtype dt = out.dtype();
  if (dt.kind() != 'f' || (dt.itemsize() != 4 && dt.itemsize() != 2))
    throw py::type_error(cat("out must be float32 or float16, got ", std::string(py::str(dt))));
  require_native_order(out, "out");
  a.out_dtype = dt.itemsize() == 4 ? CropOut::kFloat32 : CropOut::kFloat16;
  if (dtype && parse_crop_dtype(*dtype, "dtype") != a.out_dtype)
    throw py::value_error(cat("dtype='", *dtype, "' does not match out's dtype ", std::string(py::str(dt))));
  const std::vector<int64_t> got = shape_of(out);
  if (got != out_shape)
    throw py::value_error(cat("out must have shape ", shape_str(out_shape), " (P, 3, size, size), got ", shape_str(got)));
  require_writeable_c(out, "out");
  std::vector<Span> inputs;
  for (const ImageInfo& im : images) inputs.push_back(image_span(im));
  require_disjoint(span_of(out, "out"), inputs);
  return out;
}

py::array crop_host(const py::object& images_obj, const py::object& index_obj, const py::object& affines_obj,
                    int64_t size, const py::object& flip_obj, const py::object& mean_obj, const py::object& std_obj,
                    const py::object& out_obj, std::optional<std::string> dtype, bool round_pixels, int64_t threads,
                    const std::string& isa) {
  std::vector<py::array> keep;
  const std::vector<ImageInfo> images = host_images(images_obj, keep);
  const std::vector<CropPerson> persons = crop_persons(images, index_obj, affines_obj, flip_obj, size);
  CropArgs a = crop_args(persons, size, round_pixels, mean_obj, std_obj);
  py::array out = host_crop_out(out_obj, dtype, images, a);
  a.out = out.mutable_data();
  const Isa chosen = parse_isa(isa);
  check_threads(threads);
  {
    py::gil_scoped_release release;
    crop_cpu_isa(a, threads, chosen);
  }
  return out;
}

// ---------------------------------------------------------------------------- device pointers

std::vector<ImageInfo> device_images(const std::vector<uintptr_t>& image_ptrs,
                                     const std::vector<std::pair<int64_t, int64_t>>& image_hw,
                                     const std::vector<int64_t>& row_strides) {
  if (image_hw.size() != image_ptrs.size() || row_strides.size() != image_ptrs.size())
    throw py::value_error(cat("image_ptrs (", image_ptrs.size(), "), image_hw (", image_hw.size(), ") and row_strides (",
                              row_strides.size(), ") must have one entry per image"));
  std::vector<ImageInfo> images;
  for (size_t i = 0; i < image_ptrs.size(); ++i) {
    ImageInfo info{image_ptrs[i], image_hw[i].first, image_hw[i].second, row_strides[i]};
    require_pointer(info.data, cat("images[", i, "]"));
    check_image_geometry(info, i);
    images.push_back(info);
  }
  return images;
}

// out: not null, aligned for its dtype, on the images' device and apart from them.
void check_device_out(uintptr_t out, const std::string& out_dtype, const std::vector<ImageInfo>& images,
                      const CropArgs& a) {
  require_pointer(out, "out");
  const int64_t elem = a.out_dtype == CropOut::kFloat32 ? 4 : 2;
  if (out % static_cast<uintptr_t>(elem) != 0)
    throw py::value_error(cat("out must be ", elem, "-byte aligned for ", out_dtype));
  const int dev = device_of(out, "out");
  std::vector<Span> inputs;
  for (size_t i = 0; i < images.size(); ++i) {
    require_same_device(device_of(images[i].data, "images"), cat("images[", i, "]"), dev, "out");
    inputs.push_back(image_span(images[i]));
  }
  const int64_t out_bytes = checked_mul(checked_mul(checked_mul(a.people, 3, "out"), a.size * a.size, "out"), elem, "out");
  require_disjoint({out, out + static_cast<uintptr_t>(out_bytes), "out"}, inputs);
}

void crop_device(const std::vector<uintptr_t>& image_ptrs, const std::vector<std::pair<int64_t, int64_t>>& image_hw,
                 const std::vector<int64_t>& row_strides, const py::object& index_obj, const py::object& affines_obj,
                 int64_t size, const py::object& flip_obj, const py::object& mean_obj, const py::object& std_obj,
                 uintptr_t out, const std::string& out_dtype, bool round_pixels, uintptr_t stream) {
  const std::vector<ImageInfo> images = device_images(image_ptrs, image_hw, row_strides);
  const std::vector<CropPerson> persons = crop_persons(images, index_obj, affines_obj, flip_obj, size);
  CropArgs a = crop_args(persons, size, round_pixels, mean_obj, std_obj);
  a.out_dtype = parse_crop_dtype(out_dtype, "out dtype");
  require_cuda();
  if (a.people == 0) return;
  check_device_out(out, out_dtype, images, a);
  a.out = reinterpret_cast<void*>(out);
  py::gil_scoped_release release;
#ifdef CNPOSE_WITH_CUDA
  crop_cuda(a, reinterpret_cast<void*>(stream));
#else
  (void)stream;
#endif
}

}  // namespace

void register_crop(py::module_& m) {
  m.attr("MAX_CROP_SIZE") = kMaxCropSize;
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
}

}  // namespace cnpose
