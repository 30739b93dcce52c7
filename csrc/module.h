// The parts of cnpose_trt._C: each binding file registers its functions and constants on the
// module that module.cpp creates (pytorch_scatter's layout: one binding file per op over the
// shared checks of common/checks.h).
#pragma once

#include <pybind11/pybind11.h>

namespace cnpose {

void register_common(pybind11::module_& m);  // common/bindings.cpp: processor, threads, CUDA devices
void register_decode(pybind11::module_& m);  // decode/bindings.cpp: decode_host, decode_device
void register_crop(pybind11::module_& m);    // crop/bindings.cpp: crop_host, crop_device

}  // namespace cnpose
