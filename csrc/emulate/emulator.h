// A small CPU emulation of the CUDA execution model, enough to run the kernels of
// ../hyper_linear_kernels.cuh unchanged under g++ (tests/_cuda.py builds
// host_kernels.cpp with it and checks the kernels against a float64 reference through ctypes).
//
// Every CUDA thread of a block is a fiber (its own stack) on one OS thread; the blocks of a
// grid run one after another. __syncthreads() and the warp barriers inside __shfl_xor_sync
// switch fibers; a fiber waiting on a barrier is resumed only once the barrier is released,
// and a barrier that can never be released (a kernel bug) aborts with a message instead of
// hanging. __shared__ variables are function statics (one block at a time), atomicAdd is a
// plain add (one OS thread). Fibers start with makecontext/swapcontext and then switch with
// _setjmp/_longjmp (no signal-mask system call per switch).
#pragma once

#define STN_EMULATE 1

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <cmath>
#include <functional>
#include <memory>
#include <vector>

// No CUDA header is needed: the few CUDA types and intrinsics the kernels use are defined here
// (the conversions round to nearest even, bit for bit like the device's).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline uint32_t stn_emu_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline float stn_emu_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m · 2^-24, exact
    const float f = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  if (e == 31) return stn_emu_float(sign | 0x7f800000u | (m << 13));
  return stn_emu_float(sign | ((e - 15 + 127) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = stn_emu_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u))};
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half (or zero, or the smallest normal)
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(stn_emu_float(a) * 16777216.0f));
    return __half{static_cast<uint16_t>(sign | m)};
  }
  uint32_t h = (((a >> 23) - 127 + 15) << 10) | ((a & 0x7fffffu) >> 13);
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return stn_emu_float(static_cast<uint32_t>(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = stn_emu_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  return __nv_bfloat16{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

namespace stn_emu {

struct Fiber {
  ucontext_t uctx;
  jmp_buf env;
  std::unique_ptr<char[]> stack;
  dim3 tid;
  bool started = false;
  bool done = false;
  const unsigned long* wait_gen = nullptr;  // the barrier generation this fiber waits to change
  unsigned long wait_val = 0;
};

struct Barrier {
  int arrived = 0;
  unsigned long gen = 0;
};

struct State {
  dim3 grid, block, block_idx;
  int nthreads = 0;
  int current = 0;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> shfl;
  std::function<void()> body;
  jmp_buf sched;
  ucontext_t sched_uctx;
  int sms = 4;  // what device_sms() reports (tests change it to vary the launch plans)
};

inline State& st() {
  static State s;
  return s;
}

inline Fiber& cur() { return st().fibers[st().current]; }

inline void yield() {
  if (!_setjmp(cur().env)) _longjmp(st().sched, 1);
}

inline void arrive(Barrier& b, int n) {
  if (++b.arrived == n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  Fiber& f = cur();
  f.wait_gen = &b.gen;
  f.wait_val = b.gen;
  yield();
  cur().wait_gen = nullptr;
}

inline void sync_block() { arrive(st().block_barrier, st().nthreads); }

inline float shfl_xor(float v, int mask) {
  State& s = st();
  const int t = s.current;
  const int w = t / 32;
  const int lane = t % 32;
  s.shfl[t] = v;
  arrive(s.warp_barriers[w], 32);
  const float r = s.shfl[w * 32 + (lane ^ mask)];
  arrive(s.warp_barriers[w], 32);
  return r;
}

inline void entry() {
  State& s = st();
  Fiber& f = cur();
  if (!_setjmp(f.env)) _longjmp(s.sched, 1);  // back to the scheduler; resumed by _longjmp
  s.body();
  cur().done = true;
  _longjmp(s.sched, 1);
}

constexpr size_t kStack = 256 * 1024;

template <typename F>
void launch(dim3 grid, dim3 block, F&& kernel_call) {
  State& s = st();
  s.grid = grid;
  s.block = block;
  s.nthreads = static_cast<int>(block.x * block.y * block.z);
  if (s.nthreads % 32 != 0) {
    fprintf(stderr, "stn_emu: block size %d is not a multiple of 32\n", s.nthreads);
    abort();
  }
  s.fibers.clear();
  s.fibers.resize(s.nthreads);
  s.warp_barriers.assign(s.nthreads / 32, Barrier{});
  s.shfl.assign(s.nthreads, 0.f);
  s.body = [&kernel_call]() { kernel_call(); };
  for (auto& f : s.fibers) f.stack.reset(new char[kStack]);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = dim3(bx, by, bz);
        s.block_barrier = Barrier{};
        for (auto& b : s.warp_barriers) b = Barrier{};
        for (int t = 0; t < s.nthreads; ++t) {
          Fiber& f = s.fibers[t];
          f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          f.done = false;
          f.wait_gen = nullptr;
          getcontext(&f.uctx);
          f.uctx.uc_stack.ss_sp = f.stack.get();
          f.uctx.uc_stack.ss_size = kStack;
          f.uctx.uc_link = nullptr;
          makecontext(&f.uctx, entry, 0);
          s.current = t;
          if (!_setjmp(s.sched)) swapcontext(&s.sched_uctx, &f.uctx);  // runs to entry's first _setjmp
        }
        int live = s.nthreads;
        while (live > 0) {
          bool ran = false;
          for (int t = 0; t < s.nthreads; ++t) {
            Fiber& f = s.fibers[t];
            if (f.done || (f.wait_gen != nullptr && *f.wait_gen == f.wait_val)) continue;
            ran = true;
            s.current = t;
            if (!_setjmp(s.sched)) _longjmp(f.env, 1);
            if (f.done) --live;
          }
          if (!ran && live > 0) {
            fprintf(stderr, "stn_emu: deadlock in block (%u, %u, %u): %d threads wait on a barrier that the "
                            "others never reach\n", bx, by, bz, live);
            abort();
          }
        }
      }
  s.body = nullptr;
}

}  // namespace stn_emu

#define threadIdx (::stn_emu::cur().tid)
#define blockIdx (::stn_emu::st().block_idx)
#define blockDim (::stn_emu::st().block)
#define gridDim (::stn_emu::st().grid)

inline void __syncthreads() { ::stn_emu::sync_block(); }
inline float __shfl_xor_sync(unsigned, float v, int mask, int = 32) { return ::stn_emu::shfl_xor(v, mask); }
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

#define STN_LAUNCH(kernel, grid, block, stream, ...) \
  ::stn_emu::launch((grid), (block), [&]() { kernel(__VA_ARGS__); })

namespace stn_hl {
inline int device_sms() { return ::stn_emu::st().sms; }
inline int memset_async(void* p, int64_t bytes, void*) {
  memset(p, 0, static_cast<size_t>(bytes));
  return 0;
}
inline int launch_error() { return 0; }
inline const char* error_text(int code) { return code == 0 ? "no error" : "invalid argument"; }
constexpr int kInvalidValue = 1;
}  // namespace stn_hl
