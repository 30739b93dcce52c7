// pybind11 boundary of what the ops share: the processor's instruction sets, the CPU kernels'
// threads (and their testing hook), the CUDA devices, whether CUDA was built in, and the memory
// read bandwidth probe the benchmarks compare the decode with.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"
#include "common/cuda_device.h"
#include "module.h"

namespace py = pybind11;

namespace cnpose {
namespace {

using namespace checks;

// Reads a buffer with `threads` threads (64-bit words, independent accumulators): the memory
// read bandwidth the decode is compared with in the benchmarks, measured in the same run.
uint64_t memory_read_probe(const py::array& buf, int64_t threads) {
  if (!(buf.flags() & py::array::c_style)) throw py::value_error("buf must be C-contiguous");
  check_threads(threads);
  const int64_t parts = thread_cap(threads, std::max<int64_t>(1, buf.nbytes() / 4096));
  const auto* words = static_cast<const uint64_t*>(buf.data());
  const int64_t count = buf.nbytes() / 8;
  std::vector<uint64_t> partial(static_cast<size_t>(parts), 0);
  std::atomic<int64_t> next{0};
  py::gil_scoped_release release;
  run_parallel(parts, [&](int64_t) {
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

}  // namespace

void register_common(py::module_& m) {
  m.attr("built_with_cuda") = kWithCuda;
  m.def("cpu_has_avx2", [] { return cpu_supports(Isa::kAvx2); },
        "Whether the AVX2+FMA+F16C kernel runs on this processor.");
  m.def("cpu_has_avx512", [] { return cpu_supports(Isa::kAvx512); },
        "Whether the AVX-512 (F, BW, VL) kernel runs on this processor.");
  m.def("cpu_isa", [] {
    const Isa i = best_isa();
    return std::string(i == Isa::kAvx512 ? "avx512" : i == Isa::kAvx2 ? "avx2" : "portable");
  }, "The kernel decode_host uses with isa='auto'.");
  m.def("cuda_device_count", &cuda_device_count, "Visible CUDA devices (0 when built without CUDA).");
  m.def(
      "cuda_pointer_device",
      [](uintptr_t ptr) {
        require_cuda();
        return cuda_pointer_device(reinterpret_cast<const void*>(ptr), "ptr");
      },
      py::arg("ptr"), "Device ordinal of a CUDA device pointer (ValueError for host pointers).");
  m.def("memory_read_probe", &memory_read_probe, py::arg("buf"), py::arg("threads") = 0,
        "Sum a C-contiguous buffer as 64-bit words on `threads` threads (a memory read bandwidth probe).");
  m.def("hardware_threads", &hardware_threads, "Processors the CPU kernels count with threads=0.");
  m.def("_set_thread_spawn_limit", [](int64_t n) { thread_spawn_budget().store(n < 0 ? -1 : n); },
        py::arg("n"),
        "Testing only: let the CPU kernels create n more threads, then fail as a refusing system would (-1: no limit).");
}

}  // namespace cnpose
