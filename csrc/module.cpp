// cnpose_trt._C: the module itself. Its functions and constants are registered by one binding
// file per op (decode/, crop/) and one for what they share (common/: the processor, threads
// and CUDA devices); see module.h.
#include <pybind11/pybind11.h>

#include "module.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "cnpose_trt's compiled kernels: fused single-pass soft-argmax decode and fused crop-and-normalise, "
            "on the CPU and the GPU.";
  cnpose::register_common(m);
  cnpose::register_decode(m);
  cnpose::register_crop(m);
}
