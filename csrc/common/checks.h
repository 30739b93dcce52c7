// The argument checks every binding of cnpose_trt._C shares (decode/bindings.cpp,
// crop/bindings.cpp, common/bindings.cpp): each raises with the argument's name and what is
// allowed, ValueError (py::value_error, or std::invalid_argument from the CUDA queries) for
// shapes and values, TypeError for types, before any pointer is handed to a kernel. Here live
// the message builder, the checks of small numeric arrays, byte order, index overflow, buffer
// overlap, device pointers, the isa and threads options, and the "built without CUDA" error;
// checks that concern one op stay in that op's binding file.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cuda_device.h"

namespace cnpose::checks {

namespace py = pybind11;

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

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

inline std::vector<int64_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// The name of an object's type, for "must be a numpy array, got list" messages.
inline std::string type_name(const py::handle& obj) {
  return py::str(py::type::handle_of(obj).attr("__name__"));
}

// obj as a numpy array (converted if need be), or a null array when numpy cannot convert it.
inline py::array array_or_null(const py::object& obj) {
  try {
    return py::array::ensure(obj);
  } catch (const py::error_already_set&) {
    return py::reinterpret_steal<py::array>(py::handle());
  }
}

// Arrays in the other byte order hold the right values but the kernels would read them as
// native ones: refused (cnpose_trt.decode converts them before they get here).
inline void require_native_order(const py::array& a, const char* what) {
  const char order = a.dtype().byteorder();
  constexpr char kForeign = (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) ? '>' : '<';
  if (order == kForeign)
    throw py::type_error(cat(what, " must be in the machine's byte order, got ", std::string(py::str(a.dtype())),
                             " (convert with a.astype(a.dtype.newbyteorder('=')))"));
}

// An output array the kernel writes in place.
inline void require_writeable_c(const py::array& a, const char* what) {
  if (!(a.flags() & py::array::c_style) || !a.writeable())
    throw py::value_error(cat(what, " must be C-contiguous and writeable"));
}

inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw py::value_error(cat(what, ": sizes overflow 64-bit index arithmetic"));
  return r;
}

// Small per-image inputs (boxes, intrinsics, affines, mean, std): a C-contiguous copy in T
// (float or double) of exactly `shape`, every value finite.
template <typename T = float>
py::array_t<T> small_array(const py::object& obj, const char* what, const std::vector<int64_t>& shape) {
  using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;
  Array arr;
  try {
    arr = Array::ensure(obj);
  } catch (const py::error_already_set&) {
    arr = {};
  }
  if (!arr) throw py::type_error(cat(what, " must be a numeric array of shape ", shape_str(shape)));
  const std::vector<int64_t> got(arr.shape(), arr.shape() + arr.ndim());
  if (got != shape) throw py::value_error(cat(what, " must have shape ", shape_str(shape), ", got ", shape_str(got)));
  const T* p = arr.data();
  for (py::ssize_t i = 0; i < arr.size(); ++i)
    if (!std::isfinite(p[i])) throw py::value_error(cat(what, " must be finite, found ", p[i]));
  return arr;
}

// Byte ranges [lo, hi) of buffers a kernel reads while it writes `out`: any overlap is refused
// (the kernel would read what it has already overwritten).
struct Span {
  uintptr_t lo, hi;
  const char* what;
};

inline void require_disjoint(const Span& out, const std::vector<Span>& inputs) {
  for (const Span& in : inputs)
    if (in.lo < in.hi && out.lo < in.hi && in.lo < out.hi)
      throw py::value_error(cat(out.what, " must not overlap ", in.what, " (the kernel reads ", in.what,
                                " while it writes ", out.what, "): pass a separate buffer"));
}

inline Span span_of(const py::array& a, const char* what) {
  const auto lo = reinterpret_cast<uintptr_t>(a.data());
  return {lo, lo + static_cast<uintptr_t>(a.nbytes()), what};
}

// The CPU kernels' options: the instruction set ('auto' = the widest this processor runs) and
// the thread count (0 = one per processor).
inline Isa parse_isa(const std::string& isa) {
  Isa chosen = best_isa();
  if (isa == "avx512") chosen = Isa::kAvx512;
  else if (isa == "avx2") chosen = Isa::kAvx2;
  else if (isa == "portable") chosen = Isa::kPortable;
  else if (isa != "auto") throw py::value_error(cat("isa must be 'auto', 'avx512', 'avx2' or 'portable', got '", isa, "'"));
  if (!cpu_supports(chosen)) throw py::value_error(cat("isa='", isa, "': this processor lacks it"));
  return chosen;
}

inline void check_threads(int64_t threads) {
  if (threads < 0) throw py::value_error(cat("threads must be >= 0 (0: all cores), got ", threads));
}

#ifdef CNPOSE_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

inline void require_cuda() {
  if (!kWithCuda)
    throw std::runtime_error(
        "cnpose_trt._C was built without CUDA: reinstall where nvcc is found (or with CNPOSE_TRT_CUDA=1) "
        "to decode on the GPU");
}

// Device buffers arrive as raw addresses: not null, on the device of the reference buffer.
inline void require_pointer(uintptr_t p, const std::string& what) {
  if (p == 0) throw py::value_error(what + " pointer must not be null");
}

inline int device_of(uintptr_t p, const char* what) {
  return cuda_pointer_device(reinterpret_cast<const void*>(p), what);
}

inline void require_same_device(int d, const std::string& what, int dev, const char* ref) {
  if (d != dev)
    throw py::value_error(cat(what, " is on GPU ", d, ", ", ref, " on GPU ", dev, ": all buffers must be on one device"));
}

}  // namespace cnpose::checks
