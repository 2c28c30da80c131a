// Hand-written CUDA kernels of the HyperLinear op and their launchers (the C interface of
// hyper_linear_kernels.h). No ATen or torch header here, only the CUDA runtime's: nvcc
// compiles this file fast, and csrc/emulate/ compiles the very same code with g++ for a
// CPU emulation that the tests run (so this file uses no warp intrinsic other than
// __shfl_xor_sync, no dynamic shared memory and no early return before a barrier).
//
//   epilogue_kernel   out = acc + s ⊙ z + b_e + t ⊙ b_h, s = λ·Vᵀ and t = λ·Cᵀ formed in
//                     the kernel (forward; acc = x·W_eᵀ and z = x·W_hᵀ come from cuBLAS).
//   reduce_kernel     one pass over g (and z) for the backward: g ⊙ s (the operand of the
//                     dx and dW_h GEMMs), dλ, dV, gᵀ·λ (→ dC, db_h) and Σ_m g.
//   finalize_kernel   sums the reduce kernel's partial sums (slots, or one atomic buffer),
//                     forms dC and db_h, casts to the output dtypes.
//
// All arithmetic is float32; outputs are rounded once, at the store.
#pragma once

#ifndef STN_EMULATE
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define STN_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

#include <stdint.h>

#include "hyper_linear_kernels.h"

namespace stn_hl {

constexpr int kThreads = 128;  // every kernel: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// --------------------------------------------------------------------------- helpers

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// λ, V, C and the small outputs: dtype known at run time (read once per block or thread).
__device__ __forceinline__ float load_dyn(const void* p, int64_t i, int dtype) {
  if (dtype == STN_FLOAT16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == STN_BFLOAT16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_dyn(void* p, int64_t i, int dtype, float v) {
  if (dtype == STN_FLOAT16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (dtype == STN_BFLOAT16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

template <typename T> struct Vec { static constexpr int kN = 16 / sizeof(T); };  // elements per 16 bytes

template <typename T, int N>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&f)[N]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < N; ++j) f[j] = to_f(e[j]);
}

template <typename T, int N>
__device__ __forceinline__ uint4 pack16(const float (&f)[N]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < N; ++j) e[j] = from_f<T>(f[j]);
  return raw;
}

// One step of warp_reduce_scatter: lanes exchange half of their 2·W live values with lane ^ W.
template <int W>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[32], int lane) {
  const bool upper = (lane & W) != 0;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float send = upper ? v[i] : v[i + W];
    const float keep = upper ? v[i + W] : v[i];
    v[i] = keep + __shfl_xor_sync(kFullMask, send, W);
  }
}

// Sum over the 32 lanes of a warp of 32 values per lane; lane l returns the sum of v[l].
// Recursive halving: 31 shuffles for the 32 sums (instead of 32 · 5). The steps are
// separate instantiations so that every index is a compile-time constant (v stays in registers).
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0];
}

// --------------------------------------------------------------------------- forward epilogue

struct EpilogueParams {
  const void* acc; int64_t acc_rs;  // [M, N] T or null
  const void* z; int64_t z_rs;      // [M, N] T
  void* out; int64_t out_rs;        // [M, N] T
  const void* lam; int64_t lam_rs;  // [M, H] L
  const void* v; int64_t v_rs;      // [N, H] L
  const void* c; int64_t c_rs;      // [N, H] L or null
  const void* bias;                 // [N] T or null
  const void* hyper_bias;           // [N] T or null
  int64_t M, N, H;
  int lam_dtype;
  int64_t rows_per_block;           // a multiple of kEpiTileM
};

constexpr int kEpiRows = 4;                     // rows per thread in a tile
constexpr int kEpiTileM = kWarps * kEpiRows;    // 16 rows per tile

// Block = 4 warps; tile = 16 rows × BN = 32·VEC columns (VEC = 16 bytes of T: 4 floats or 8
// halves); thread = 4 rows × VEC columns. kAligned: each thread's VEC columns are adjacent
// and moved with one 16-byte load/store per row; otherwise column j of lane l is l + 32·j
// (coalesced scalar accesses). V and C ⊙ b_h for the block's columns sit in shared memory
// (float), λ for the tile's rows too; H is taken in chunks of kHB.
template <typename T, bool kAligned, int kHB>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueParams p) {
  constexpr int VEC = Vec<T>::kN;
  constexpr int BN = 32 * VEC;
  __shared__ __align__(16) float sV[kHB][BN];
  __shared__ __align__(16) float sCb[kHB][BN];
  __shared__ float sLam[kEpiTileM][kHB];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t m_end = min64(p.M, m_begin + p.rows_per_block);
  const T* acc = static_cast<const T*>(p.acc);
  const T* z = static_cast<const T*>(p.z);
  T* out = static_cast<T*>(p.out);
  const T* hb = static_cast<const T*>(p.hyper_bias);
  const T* be_ptr = static_cast<const T*>(p.bias);
  const bool has_hb = p.c != nullptr && hb != nullptr;
  const int nchunks = static_cast<int>(cdiv(p.H, kHB));

  float be[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int64_t n = n0 + (kAligned ? lane * VEC + j : lane + 32 * j);
    be[j] = (be_ptr != nullptr && n < p.N) ? to_f(be_ptr[n]) : 0.f;
  }

  for (int64_t tm = m_begin; tm < m_end; tm += kEpiTileM) {
    // The tile's z and acc rows are loaded first: their latency overlaps the λ·Vᵀ work.
    uint4 zr[kEpiRows], ar[kEpiRows];
    if (kAligned) {
      const int64_t n = n0 + lane * VEC;
#pragma unroll
      for (int i = 0; i < kEpiRows; ++i) {
        const int64_t m = tm + warp * kEpiRows + i;
        zr[i] = make_uint4(0u, 0u, 0u, 0u);
        ar[i] = make_uint4(0u, 0u, 0u, 0u);
        if (m < m_end && n < p.N) {
          zr[i] = *reinterpret_cast<const uint4*>(z + m * p.z_rs + n);
          if (acc != nullptr) ar[i] = *reinterpret_cast<const uint4*>(acc + m * p.acc_rs + n);
        }
      }
    }
    float s[kEpiRows][VEC], tb[kEpiRows][VEC];
#pragma unroll
    for (int i = 0; i < kEpiRows; ++i) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[i][j] = tb[i][j] = 0.f;
    }

    for (int ch = 0; ch < nchunks; ++ch) {
      const int64_t h0 = static_cast<int64_t>(ch) * kHB;
      __syncthreads();  // the previous tile or chunk is done with the shared buffers
      if (nchunks > 1 || tm == m_begin) {
        for (int idx = tid; idx < BN * kHB; idx += kThreads) {
          const int c = idx / kHB, h = idx % kHB;
          const int64_t n = n0 + c, hh = h0 + h;
          float v = 0.f, cb = 0.f;
          if (n < p.N && hh < p.H) {
            v = load_dyn(p.v, n * p.v_rs + hh, p.lam_dtype);
            if (has_hb) cb = load_dyn(p.c, n * p.c_rs + hh, p.lam_dtype) * to_f(hb[n]);
          }
          sV[h][c] = v;
          sCb[h][c] = cb;
        }
      }
      for (int idx = tid; idx < kEpiTileM * kHB; idx += kThreads) {
        const int r = idx / kHB, h = idx % kHB;
        const int64_t m = tm + r, hh = h0 + h;
        sLam[r][h] = (m < m_end && hh < p.H) ? load_dyn(p.lam, m * p.lam_rs + hh, p.lam_dtype) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < kHB; ++h) {
        float v[VEC], cb[VEC];
        if (kAligned) {
#pragma unroll
          for (int q = 0; q < VEC / 4; ++q) {
            const float4 a = *reinterpret_cast<const float4*>(&sV[h][lane * VEC + 4 * q]);
            const float4 b = *reinterpret_cast<const float4*>(&sCb[h][lane * VEC + 4 * q]);
            v[4 * q] = a.x; v[4 * q + 1] = a.y; v[4 * q + 2] = a.z; v[4 * q + 3] = a.w;
            cb[4 * q] = b.x; cb[4 * q + 1] = b.y; cb[4 * q + 2] = b.z; cb[4 * q + 3] = b.w;
          }
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            v[j] = sV[h][lane + 32 * j];
            cb[j] = sCb[h][lane + 32 * j];
          }
        }
#pragma unroll
        for (int i = 0; i < kEpiRows; ++i) {
          const float lam = sLam[warp * kEpiRows + i][h];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            s[i][j] = fmaf(lam, v[j], s[i][j]);
            tb[i][j] = fmaf(lam, cb[j], tb[i][j]);
          }
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kEpiRows; ++i) {
      const int64_t m = tm + warp * kEpiRows + i;
      if (m >= m_end) continue;
      if (kAligned) {
        const int64_t n = n0 + lane * VEC;
        if (n >= p.N) continue;
        float zf[VEC], af[VEC], o[VEC];
        unpack16<T>(zr[i], zf);
        unpack16<T>(ar[i], af);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = fmaf(s[i][j], zf[j], af[j]) + be[j] + tb[i][j];
        *reinterpret_cast<uint4*>(out + m * p.out_rs + n) = pack16<T>(o);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int64_t n = n0 + lane + 32 * j;
          if (n >= p.N) continue;
          const float zf = to_f(z[m * p.z_rs + n]);
          const float af = acc != nullptr ? to_f(acc[m * p.acc_rs + n]) : 0.f;
          out[m * p.out_rs + n] = from_f<T>(fmaf(s[i][j], zf, af) + be[j] + tb[i][j]);
        }
      }
    }
  }
}

// --------------------------------------------------------------------------- backward reductions

struct ReduceParams {
  const void* g; int64_t g_rs;      // [M, N] T
  const void* z; int64_t z_rs;      // [M, N] T or null
  const void* lam; int64_t lam_rs;  // [M, H] L
  const void* v; int64_t v_rs;      // [N, H] L
  const void* c; int64_t c_rs;      // [N, H] L or null
  const void* hyper_bias;           // [N] T or null
  void* gs; int64_t gs_rs;          // [M, N] T or null: g ⊙ s (only with a single H chunk)
  float* ws_dlam;                   // [slots_l, M, H] or null
  float* ws_v;                      // [slots_n, N, H] or null
  float* ws_gl;                     // [slots_n, N, H] or null: gᵀ·λ
  float* ws_be;                     // [slots_n, N] or null
  int64_t M, N, H;
  int lam_dtype;
  int64_t rows_per_chunk;           // a multiple of kRedGroup
  int atomic;                       // 1: atomicAdd into slot 0; 0: store into this block's slot
};

constexpr int kRedCols = kThreads;  // columns per block: one per thread
constexpr int kRedGroup = 16;       // rows staged per block barrier

// Block (chunk of rows, 128 columns, chunk of kHB hyperparameters). Each thread owns one
// column n and walks the chunk's rows: V[n, :] and C[n, :]·b_h[n] stay in registers, and so do
// its running sums of dV[n, :] = Σ_m g z λ_m, (gᵀλ)[n, :] = Σ_m g λ_m and Σ_m g. dλ[m, :]
// sums over columns: per batch of 32/kHB rows each lane holds 32 values, summed over the warp
// by warp_reduce_scatter, then over the 4 warps in shared memory (fixed order). Partial sums
// leave the block by store into its own slot (deterministic) or by atomicAdd.
template <typename T, int kHB>
__global__ void __launch_bounds__(kThreads) reduce_kernel(ReduceParams p) {
  constexpr int RW = 32 / kHB;  // rows per warp reduction
  static_assert(kRedGroup % RW == 0, "row group must hold whole batches");
  __shared__ float sLam[kRedGroup][kHB];
  __shared__ float sRed[kWarps][kRedGroup][kHB];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kRedCols + tid;
  const bool n_ok = n < p.N;
  const int64_t h0 = static_cast<int64_t>(blockIdx.z) * kHB;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_chunk;
  const int64_t m_end = min64(p.M, m_begin + p.rows_per_chunk);
  const T* g = static_cast<const T*>(p.g);
  const T* z = static_cast<const T*>(p.z);
  const T* hb = static_cast<const T*>(p.hyper_bias);
  T* gs = blockIdx.z == 0 ? static_cast<T*>(p.gs) : nullptr;
  const bool has_hb = p.c != nullptr && hb != nullptr;
  const bool need_dlam = p.ws_dlam != nullptr;
  const bool need_v = p.ws_v != nullptr;
  const bool need_gl = p.ws_gl != nullptr;
  const bool need_gs = gs != nullptr;

  float v[kHB], cb[kHB], acc_v[kHB], acc_gl[kHB];
#pragma unroll
  for (int h = 0; h < kHB; ++h) {
    const int64_t hh = h0 + h;
    const bool ok = n_ok && hh < p.H;
    v[h] = ok ? load_dyn(p.v, n * p.v_rs + hh, p.lam_dtype) : 0.f;
    cb[h] = (ok && has_hb) ? load_dyn(p.c, n * p.c_rs + hh, p.lam_dtype) * to_f(hb[n]) : 0.f;
    acc_v[h] = acc_gl[h] = 0.f;
  }
  float acc_b = 0.f;

  for (int64_t mg = m_begin; mg < m_end; mg += kRedGroup) {
    __syncthreads();  // the previous group's sLam and sRed have been read
    for (int idx = tid; idx < kRedGroup * kHB; idx += kThreads) {
      const int r = idx / kHB, h = idx % kHB;
      const int64_t m = mg + r, hh = h0 + h;
      sLam[r][h] = (m < m_end && hh < p.H) ? load_dyn(p.lam, m * p.lam_rs + hh, p.lam_dtype) : 0.f;
    }
    __syncthreads();
#pragma unroll 1
    for (int rb = 0; rb < kRedGroup; rb += RW) {
      float gv[RW], zv[RW];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const int64_t m = mg + rb + i;
        const bool ok = n_ok && m < m_end;
        gv[i] = ok ? to_f(g[m * p.g_rs + n]) : 0.f;
        zv[i] = (ok && z != nullptr) ? to_f(z[m * p.z_rs + n]) : 0.f;
      }
      float dl[32];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const float gi = gv[i];
        const float ds = gi * zv[i];
        float si = 0.f;
#pragma unroll
        for (int h = 0; h < kHB; ++h) {
          const float lam = sLam[rb + i][h];
          if (need_dlam) dl[i * kHB + h] = fmaf(ds, v[h], gi * cb[h]);
          if (need_v) acc_v[h] = fmaf(ds, lam, acc_v[h]);
          if (need_gl) acc_gl[h] = fmaf(gi, lam, acc_gl[h]);
          si = fmaf(lam, v[h], si);
        }
        acc_b += gi;
        const int64_t m = mg + rb + i;
        if (need_gs && n_ok && m < m_end) gs[m * p.gs_rs + n] = from_f<T>(gi * si);
      }
      if (need_dlam) {  // uniform over the block: every lane of the warp takes part
        const float r = warp_reduce_scatter(dl, lane);
        sRed[warp][rb + lane / kHB][lane % kHB] = r;
      }
    }
    __syncthreads();
    if (need_dlam) {
      float* dst_base = p.ws_dlam + (p.atomic ? 0 : static_cast<int64_t>(blockIdx.y) * p.M * p.H);
      for (int idx = tid; idx < kRedGroup * kHB; idx += kThreads) {
        const int r = idx / kHB, h = idx % kHB;
        const int64_t m = mg + r, hh = h0 + h;
        if (m < m_end && hh < p.H) {
          float sum = sRed[0][r][h];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) sum += sRed[w][r][h];
          float* dst = dst_base + m * p.H + hh;
          if (p.atomic) atomicAdd(dst, sum);
          else *dst = sum;
        }
      }
    }
  }

  if (n_ok) {
    const int64_t slot = p.atomic ? 0 : static_cast<int64_t>(blockIdx.x);
#pragma unroll
    for (int h = 0; h < kHB; ++h) {
      const int64_t hh = h0 + h;
      if (hh >= p.H) break;
      const int64_t i = (slot * p.N + n) * p.H + hh;
      if (need_v) {
        if (p.atomic) atomicAdd(p.ws_v + i, acc_v[h]);
        else p.ws_v[i] = acc_v[h];
      }
      if (need_gl) {
        if (p.atomic) atomicAdd(p.ws_gl + i, acc_gl[h]);
        else p.ws_gl[i] = acc_gl[h];
      }
    }
    if (p.ws_be != nullptr && blockIdx.z == 0) {
      const int64_t i = slot * p.N + n;
      if (p.atomic) atomicAdd(p.ws_be + i, acc_b);
      else p.ws_be[i] = acc_b;
    }
  }
}

struct FinalizeParams {
  const float* ws_dlam; const float* ws_v; const float* ws_gl; const float* ws_be;
  int64_t slots_l, slots_n;
  void* dlam; void* dv; void* dc; void* dbe; void* dbh;
  const void* c; int64_t c_rs;  // [N, H] L (for db_h)
  const void* hyper_bias;       // [N] T (for dC)
  int64_t M, N, H;
  int lam_dtype, dtype;
};

// Index i < M·H: dλ entry i; then one index per output column n for dV[n, :], dC[n, :],
// db_e[n] and db_h[n]. Slots are summed in slot order.
__global__ void __launch_bounds__(256) finalize_kernel(FinalizeParams p) {
  const int64_t total_l = p.dlam != nullptr ? p.M * p.H : 0;
  const bool n_side = p.dv != nullptr || p.dc != nullptr || p.dbe != nullptr || p.dbh != nullptr;
  const int64_t total = total_l + (n_side ? p.N : 0);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    if (i < total_l) {
      float s = 0.f;
      for (int64_t k = 0; k < p.slots_l; ++k) s += p.ws_dlam[k * p.M * p.H + i];
      store_dyn(p.dlam, i, p.lam_dtype, s);
      continue;
    }
    const int64_t n = i - total_l;
    if (p.dbe != nullptr) {
      float s = 0.f;
      for (int64_t k = 0; k < p.slots_n; ++k) s += p.ws_be[k * p.N + n];
      store_dyn(p.dbe, n, p.dtype, s);
    }
    const float bh = p.dc != nullptr ? load_dyn(p.hyper_bias, n, p.dtype) : 0.f;
    float dbh = 0.f;
    for (int64_t h = 0; h < p.H; ++h) {
      if (p.dv != nullptr) {
        float s = 0.f;
        for (int64_t k = 0; k < p.slots_n; ++k) s += p.ws_v[(k * p.N + n) * p.H + h];
        store_dyn(p.dv, n * p.H + h, p.lam_dtype, s);
      }
      if (p.dc != nullptr || p.dbh != nullptr) {
        float gl = 0.f;
        for (int64_t k = 0; k < p.slots_n; ++k) gl += p.ws_gl[(k * p.N + n) * p.H + h];
        if (p.dc != nullptr) store_dyn(p.dc, n * p.H + h, p.lam_dtype, bh * gl);
        if (p.dbh != nullptr) dbh = fmaf(load_dyn(p.c, n * p.c_rs + h, p.lam_dtype), gl, dbh);
      }
    }
    if (p.dbh != nullptr) store_dyn(p.dbh, n, p.dtype, dbh);
  }
}

// --------------------------------------------------------------------------- host side

#ifndef STN_EMULATE
inline int device_sms() {
  static int cache[128] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 128) return 108;
  if (cache[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 108;
    cache[dev] = n;
  }
  return cache[dev];
}
inline int memset_async(void* p, int64_t bytes, void* stream) {
  return static_cast<int>(cudaMemsetAsync(p, 0, static_cast<size_t>(bytes), static_cast<cudaStream_t>(stream)));
}
inline int launch_error() { return static_cast<int>(cudaGetLastError()); }
inline const char* error_text(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
constexpr int kInvalidValue = static_cast<int>(cudaErrorInvalidValue);
#endif

inline int pick_hb(int64_t H) { return H <= 4 ? 4 : (H <= 8 ? 8 : 16); }

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

template <typename T, bool kAligned>
int launch_epilogue_hb(const EpilogueParams& p, dim3 grid, void* stream) {
  switch (pick_hb(p.H)) {
    case 4: { auto k = &epilogue_kernel<T, kAligned, 4>; STN_LAUNCH(k, grid, dim3(kThreads), stream, p); break; }
    case 8: { auto k = &epilogue_kernel<T, kAligned, 8>; STN_LAUNCH(k, grid, dim3(kThreads), stream, p); break; }
    default: { auto k = &epilogue_kernel<T, kAligned, 16>; STN_LAUNCH(k, grid, dim3(kThreads), stream, p); break; }
  }
  return launch_error();
}

template <typename T>
int launch_epilogue_t(EpilogueParams p, void* stream) {
  constexpr int VEC = Vec<T>::kN;
  constexpr int64_t BN = 32 * VEC;
  const int64_t col_tiles = cdiv(p.N, BN);
  const int64_t row_tiles = cdiv(p.M, kEpiTileM);
  // About 4 blocks per SM; each block keeps its V tile for up to 16 row tiles.
  const int64_t target = 4 * static_cast<int64_t>(device_sms());
  int64_t tiles_per_block = (row_tiles * col_tiles) / target;
  tiles_per_block = tiles_per_block < 1 ? 1 : (tiles_per_block > 16 ? 16 : tiles_per_block);
  p.rows_per_block = tiles_per_block * kEpiTileM;
  if (col_tiles > 65535) return kInvalidValue;
  const dim3 grid(static_cast<unsigned>(cdiv(p.M, p.rows_per_block)), static_cast<unsigned>(col_tiles));
  const bool aligned = p.N % VEC == 0 && aligned16(p.acc) && aligned16(p.z) && aligned16(p.out) &&
                       p.acc_rs % VEC == 0 && p.z_rs % VEC == 0 && p.out_rs % VEC == 0;
  return aligned ? launch_epilogue_hb<T, true>(p, grid, stream) : launch_epilogue_hb<T, false>(p, grid, stream);
}

inline int launch_epilogue(int dtype, const EpilogueParams& p, void* stream) {
  if (p.M <= 0 || p.N <= 0) return 0;
  if (p.H <= 0 || p.z == nullptr || p.out == nullptr || p.lam == nullptr || p.v == nullptr) return kInvalidValue;
  if (p.hyper_bias != nullptr && p.c == nullptr) return kInvalidValue;
  switch (dtype) {
    case STN_FLOAT32: return launch_epilogue_t<float>(p, stream);
    case STN_FLOAT16: return launch_epilogue_t<__half>(p, stream);
    case STN_BFLOAT16: return launch_epilogue_t<__nv_bfloat16>(p, stream);
    default: return kInvalidValue;
  }
}

struct ReducePlan {
  int hb;
  int64_t hz, col_blocks, chunks, rows_per_chunk, slots_l, slots_n;
  int64_t off_dlam, off_v, off_gl, off_be, bytes;
};

inline int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

inline ReducePlan plan_reduce(int64_t M, int64_t N, int64_t H, bool deterministic, bool need_dlam, bool need_v,
                              bool need_gl, bool need_be) {
  ReducePlan q{};
  q.hb = pick_hb(H);
  q.hz = cdiv(H, q.hb);
  q.col_blocks = cdiv(N, kRedCols);
  // About 4 blocks per SM, and at least 32 rows per chunk (each chunk adds a slot of [N, H]).
  const int64_t target = 4 * static_cast<int64_t>(device_sms());
  const int64_t per_chunk = q.col_blocks * q.hz;
  int64_t chunks = cdiv(target, per_chunk);
  const int64_t max_chunks = cdiv(M, 32);
  chunks = chunks > max_chunks ? max_chunks : chunks;
  chunks = chunks < 1 ? 1 : chunks;
  q.rows_per_chunk = cdiv(cdiv(M, chunks), kRedGroup) * kRedGroup;
  q.chunks = cdiv(M, q.rows_per_chunk);
  q.slots_l = deterministic ? q.col_blocks : 1;
  q.slots_n = deterministic ? q.chunks : 1;
  const int64_t f = static_cast<int64_t>(sizeof(float));
  int64_t off = 0;
  q.off_dlam = off; off += need_dlam ? align256(q.slots_l * M * H * f) : 0;
  q.off_v = off;    off += need_v ? align256(q.slots_n * N * H * f) : 0;
  q.off_gl = off;   off += need_gl ? align256(q.slots_n * N * H * f) : 0;
  q.off_be = off;   off += need_be ? align256(q.slots_n * N * f) : 0;
  q.bytes = off;
  return q;
}

template <typename T>
int launch_reduce_t(const ReduceParams& p, const ReducePlan& q, void* stream) {
  const dim3 grid(static_cast<unsigned>(q.chunks), static_cast<unsigned>(q.col_blocks), static_cast<unsigned>(q.hz));
  switch (q.hb) {
    case 4: { auto k = &reduce_kernel<T, 4>; STN_LAUNCH(k, grid, dim3(kThreads), stream, p); break; }
    case 8: { auto k = &reduce_kernel<T, 8>; STN_LAUNCH(k, grid, dim3(kThreads), stream, p); break; }
    default: { auto k = &reduce_kernel<T, 16>; STN_LAUNCH(k, grid, dim3(kThreads), stream, p); break; }
  }
  return launch_error();
}

}  // namespace stn_hl

// --------------------------------------------------------------------------- C interface

extern "C" int stn_hl_epilogue(int dtype, int lam_dtype,
                               const void* acc, int64_t acc_rs, const void* z, int64_t z_rs, void* out,
                               int64_t out_rs, const void* lam, int64_t lam_rs, const void* v, int64_t v_rs,
                               const void* c, int64_t c_rs, const void* bias, const void* hyper_bias,
                               int64_t M, int64_t N, int64_t H, void* stream) {
  stn_hl::EpilogueParams p{};
  p.acc = acc; p.acc_rs = acc_rs; p.z = z; p.z_rs = z_rs; p.out = out; p.out_rs = out_rs;
  p.lam = lam; p.lam_rs = lam_rs; p.v = v; p.v_rs = v_rs;
  p.c = hyper_bias != nullptr ? c : nullptr; p.c_rs = c_rs;
  p.bias = bias; p.hyper_bias = hyper_bias;
  p.M = M; p.N = N; p.H = H; p.lam_dtype = lam_dtype;
  return stn_hl::launch_epilogue(dtype, p, stream);
}

extern "C" int64_t stn_hl_reduce_workspace_bytes(int64_t M, int64_t N, int64_t H, int deterministic,
                                                 int need_dlam, int need_dv, int need_gl, int need_dbe) {
  if (M <= 0 || N <= 0 || H <= 0) return 0;
  return stn_hl::plan_reduce(M, N, H, deterministic != 0, need_dlam != 0, need_dv != 0, need_gl != 0,
                             need_dbe != 0).bytes;
}

extern "C" int stn_hl_reduce(int dtype, int lam_dtype,
                             const void* g, int64_t g_rs, const void* z, int64_t z_rs,
                             const void* lam, int64_t lam_rs, const void* v, int64_t v_rs, const void* c, int64_t c_rs,
                             const void* hyper_bias,
                             void* gs, int64_t gs_rs, void* dlam, void* dv, void* dc, void* dbe, void* dbh,
                             int64_t M, int64_t N, int64_t H, int deterministic,
                             void* workspace, int64_t workspace_bytes, void* stream) {
  using namespace stn_hl;
  if (M <= 0 || N <= 0) return 0;
  if (H <= 0 || g == nullptr || lam == nullptr || v == nullptr) return kInvalidValue;
  if ((dc != nullptr || dbh != nullptr) && (c == nullptr || hyper_bias == nullptr)) return kInvalidValue;
  if ((dlam != nullptr || dv != nullptr) && z == nullptr) return kInvalidValue;
  if (dtype != STN_FLOAT32 && dtype != STN_FLOAT16 && dtype != STN_BFLOAT16) return kInvalidValue;
  const bool need_gl = dc != nullptr || dbh != nullptr;
  const ReducePlan q = plan_reduce(M, N, H, deterministic != 0, dlam != nullptr, dv != nullptr, need_gl,
                                   dbe != nullptr);
  if (workspace_bytes < q.bytes || (q.bytes > 0 && workspace == nullptr)) return kInvalidValue;
  if (q.col_blocks > 65535 || q.hz > 65535 || q.chunks > 2147483647LL) return kInvalidValue;  // grid limits
  const bool any_sum = dlam != nullptr || dv != nullptr || need_gl || dbe != nullptr;
  int err = 0;

  // g ⊙ s needs all of H in one block: with several H chunks it comes from the epilogue kernel.
  const bool gs_here = gs != nullptr && q.hz == 1;
  if (gs != nullptr && !gs_here) {
    err = stn_hl_epilogue(dtype, lam_dtype, nullptr, 0, g, g_rs, gs, gs_rs, lam, lam_rs, v, v_rs, nullptr, 0,
                          nullptr, nullptr, M, N, H, stream);
    if (err != 0) return err;
  }
  if (!any_sum && !gs_here) return 0;

  char* ws = static_cast<char*>(workspace);
  const bool atomic = deterministic == 0;
  if (atomic && q.bytes > 0) {
    err = memset_async(ws, q.bytes, stream);
    if (err != 0) return err;
  }
  ReduceParams p{};
  p.g = g; p.g_rs = g_rs;
  p.z = (dlam != nullptr || dv != nullptr) ? z : nullptr; p.z_rs = z_rs;
  p.lam = lam; p.lam_rs = lam_rs; p.v = v; p.v_rs = v_rs;
  p.c = hyper_bias != nullptr ? c : nullptr; p.c_rs = c_rs;
  p.hyper_bias = c != nullptr ? hyper_bias : nullptr;
  p.gs = gs_here ? gs : nullptr; p.gs_rs = gs_rs;
  p.ws_dlam = dlam != nullptr ? reinterpret_cast<float*>(ws + q.off_dlam) : nullptr;
  p.ws_v = dv != nullptr ? reinterpret_cast<float*>(ws + q.off_v) : nullptr;
  p.ws_gl = need_gl ? reinterpret_cast<float*>(ws + q.off_gl) : nullptr;
  p.ws_be = dbe != nullptr ? reinterpret_cast<float*>(ws + q.off_be) : nullptr;
  p.M = M; p.N = N; p.H = H; p.lam_dtype = lam_dtype;
  p.rows_per_chunk = q.rows_per_chunk;
  p.atomic = atomic ? 1 : 0;
  switch (dtype) {
    case STN_FLOAT32: err = launch_reduce_t<float>(p, q, stream); break;
    case STN_FLOAT16: err = launch_reduce_t<__half>(p, q, stream); break;
    default: err = launch_reduce_t<__nv_bfloat16>(p, q, stream); break;
  }
  if (err != 0 || !any_sum) return err;

  FinalizeParams f{};
  f.ws_dlam = p.ws_dlam; f.ws_v = p.ws_v; f.ws_gl = p.ws_gl; f.ws_be = p.ws_be;
  f.slots_l = q.slots_l; f.slots_n = q.slots_n;
  f.dlam = dlam; f.dv = dv; f.dc = dc; f.dbe = dbe; f.dbh = dbh;
  f.c = c; f.c_rs = c_rs; f.hyper_bias = hyper_bias;
  f.M = M; f.N = N; f.H = H; f.lam_dtype = lam_dtype; f.dtype = dtype;
  const int64_t total = (dlam != nullptr ? M * H : 0) + N;
  int64_t blocks = cdiv(total, 256);
  const int64_t cap = 8 * static_cast<int64_t>(device_sms());
  blocks = blocks > cap ? cap : blocks;
  auto k = &finalize_kernel;
  STN_LAUNCH(k, dim3(static_cast<unsigned>(blocks)), dim3(256), stream, f);
  return launch_error();
}

extern "C" const char* stn_hl_error_string(int code) { return stn_hl::error_text(code); }
