// Launchers of the hand-written HyperLinear kernels (hyper_linear_kernels.cuh).
//
// A plain C interface (raw pointers, row strides, dtype codes, a cudaStream_t passed as
// void*): hyper_linear_ops.cpp calls it with tensors' pointers, and the CPU emulation
// build in csrc/emulate/ exports the same functions to the tests through ctypes.
//
// Every 2-D operand is row-major with unit stride along its last dim; the row stride is
// passed (it may be 0, e.g. hparams shared by the batch and expanded). Vectors (biases)
// are contiguous. Each function returns 0 on success, else a cudaError_t value.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes (both the data dtype T and the hparams dtype L)
enum { STN_FLOAT32 = 0, STN_FLOAT16 = 1, STN_BFLOAT16 = 2 };

// out = acc + s ⊙ z + bias + t ⊙ hyper_bias with s = λ·Vᵀ, t = λ·Cᵀ formed in the kernel
// (float32 math, one rounding to T at the store).
//   acc, z, out: [M, N] in T (acc may be NULL: taken as 0)
//   lam [M, H], v [N, H], c [N, H] in L (c may be NULL, and must be when hyper_bias is)
//   bias, hyper_bias: [N] in T, may be NULL
int stn_hl_epilogue(int dtype, int lam_dtype,
                    const void* acc, int64_t acc_rs, const void* z, int64_t z_rs, void* out, int64_t out_rs,
                    const void* lam, int64_t lam_rs, const void* v, int64_t v_rs, const void* c, int64_t c_rs,
                    const void* bias, const void* hyper_bias,
                    int64_t M, int64_t N, int64_t H, void* stream);

// Bytes of float32 workspace that stn_hl_reduce needs for these sizes and outputs.
int64_t stn_hl_reduce_workspace_bytes(int64_t M, int64_t N, int64_t H, int deterministic, int need_dlam,
                                      int need_dv, int need_gl, int need_dbe);

// The backward's non-GEMM work in one pass over g (and z):
//   gs   = g ⊙ s                                   [M, N] in T   (gs may be NULL)
//   dlam = (g ⊙ z)·V + (g ⊙ b_h)·C                 [M, H] in L
//   dv   = (g ⊙ z)ᵀ·λ                              [N, H] in L
//   dc   = (g ⊙ b_h)ᵀ·λ = b_h ⊙ (gᵀ·λ)            [N, H] in L  (needs c, hyper_bias)
//   dbe  = Σ_m g                                   [N]    in T
//   dbh  = Σ_m g ⊙ t = Σ_h C ⊙ (gᵀ·λ)             [N]    in T  (needs c, hyper_bias)
// Outputs are contiguous; each may be NULL when not wanted (z may be NULL unless dlam or
// dv is wanted). deterministic=0 accumulates the partial sums with float atomics;
// deterministic=1 writes them to per-block slots summed in a fixed order (no atomics).
int stn_hl_reduce(int dtype, int lam_dtype,
                  const void* g, int64_t g_rs, const void* z, int64_t z_rs,
                  const void* lam, int64_t lam_rs, const void* v, int64_t v_rs, const void* c, int64_t c_rs,
                  const void* hyper_bias,
                  void* gs, int64_t gs_rs, void* dlam, void* dv, void* dc, void* dbe, void* dbh,
                  int64_t M, int64_t N, int64_t H, int deterministic,
                  void* workspace, int64_t workspace_bytes, void* stream);

// Text for a return code of the functions above.
const char* stn_hl_error_string(int code);

#ifdef __cplusplus
}
#endif
