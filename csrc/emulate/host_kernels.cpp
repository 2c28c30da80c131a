// The kernels of ../hyper_linear_kernels.cuh built for the CPU emulation (emulator.h), as a
// shared library with the C interface of ../hyper_linear_kernels.h plus stn_hl_emu_set_sms.
// Built and loaded by tests/_cuda.py (the tests test_cuda_emulated_kernels.py and test_cuda_hyper_linear.py):
//   g++ -std=c++20 -O1 -fPIC -shared -fno-strict-aliasing -U_FORTIFY_SOURCE host_kernels.cpp -o libstn_hl_emu.so
// (no CUDA toolkit needed: emulator.h defines the CUDA types and intrinsics the kernels use).
#include "emulator.h"

#include "../hyper_linear_kernels.cuh"

// The SM count the launch plans see (default 4): small values give several row chunks and
// deterministic slots even at test sizes.
extern "C" void stn_hl_emu_set_sms(int sms) { ::stn_emu::st().sms = sms > 0 ? sms : 1; }
