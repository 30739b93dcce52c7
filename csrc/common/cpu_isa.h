// The instruction-set switch of the CPU kernels (decode and crop): each kernel has an
// AVX-512 (F, BW, VL), an AVX2 (+FMA, F16C) and a portable version, picked at run time.
#pragma once

namespace cnpose {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
bool cpu_supports(Isa isa);
Isa best_isa();

}  // namespace cnpose
