// nvcc translation unit of the HyperLinear kernels (the code is in hyper_linear_kernels.cuh,
// shared with the CPU emulation build in csrc/emulate/).
#include "hyper_linear_kernels.cuh"
