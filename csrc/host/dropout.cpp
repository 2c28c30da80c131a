// Per-example dropout on CPU tensors in one pass: stn_kernels.reference_dropout.per_example_dropout_forward, bit
// for bit. The reference forms the counter-based hash of every unit with ~30 int64 tensor ops (each a pass over a
// tensor of the activation's size), then a where; here each element is hashed, compared and scaled in registers,
// so a dropout costs one read and one write of the activation, as torch's own dropout's mask multiply does.
//
// The hash (stn_kernels/reference_dropout.py): k0 = mix(seed_lo ^ 0x9E3779B9), k1 = mix(seed_hi ^ 0x85EBCA6B),
// k2 = mix(k0 ^ k1 ^ 0xC2B2AE35); h = mix(mix(mix(ctr_lo ^ k0) ^ ctr_hi ^ k1) ^ k2); u = (h >> 8) · 2⁻²⁴ (float32,
// exact); an element is kept when u ≥ p_b (p_b rounded to float32 as the reference rounds it), and then scaled
// by 1/(1 − p_b) in the compute dtype (float64 for float64 data, float32 otherwise), rounded once to the data's
// dtype: the reference's (x.to(scales.dtype) * scale).to(x.dtype).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "host.h"

namespace stn_kernels_host {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

struct Keys {
  uint32_t k0, k1, k2;
};

Keys keys_of(int64_t seed) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  Keys k;
  k.k0 = mix32(static_cast<uint32_t>(bits) ^ 0x9E3779B9u);
  k.k1 = mix32(static_cast<uint32_t>(bits >> 32) ^ 0x85EBCA6Bu);
  k.k2 = mix32(k.k0 ^ k.k1 ^ 0xC2B2AE35u);
  return k;
}

// The 24 bits m of u = m·2⁻²⁴ for the counter (lo, hi): the reference's hash.
inline uint32_t hash_bits(const Keys& k, uint32_t lo, uint32_t hi) {
  return mix32(mix32(mix32(lo ^ k.k0) ^ hi ^ k.k1) ^ k.k2) >> 8;
}

// u ≥ p ⟺ m ≥ ⌈p·2²⁴⌉ (u = m·2⁻²⁴ exactly; p a float32, p·2²⁴ exact in double): the comparison in integers, so
// that the loop below has no float compare to keep apart from NaN (a NaN rate keeps nothing, as u ≥ NaN is false).
uint32_t threshold(float rate) {
  if (!(rate > 0.0f)) return std::isnan(rate) ? (1u << 24) + 1 : 0u;
  if (rate > 1.0f) return (1u << 24) + 1;
  return static_cast<uint32_t>(std::ceil(static_cast<double>(rate) * 16777216.0));
}

// y = keep ? v : 0 without a branch, so that the compiler vectorises the elementwise loop: the bits of v and'ed with
// an all-ones or all-zeros mask (float and double); a plain select for the 16-bit types (converted one by one).
template <typename scalar_t>
inline scalar_t select(bool keep, scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using bits_t = std::conditional_t<std::is_same_v<scalar_t, float>, uint32_t, uint64_t>;
    bits_t b;
    std::memcpy(&b, &v, sizeof(b));
    b &= bits_t(0) - static_cast<bits_t>(keep);
    std::memcpy(&v, &b, sizeof(b));
    return v;
  } else {
    return keep ? v : scalar_t(0);
  }
}

// One run of elements of one example whose counters share their high word.
template <typename scalar_t, typename compute_t>
STN_HOST_VECTOR_CLONES void elementwise_run(const scalar_t* __restrict x, scalar_t* __restrict y, int64_t n, uint32_t lo, uint32_t hi,
                     uint32_t thr, compute_t scale, Keys k) {
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = hash_bits(k, lo + static_cast<uint32_t>(j), hi) >= thr;
    y[j] = select(keep, static_cast<scalar_t>(static_cast<compute_t>(x[j]) * scale));
  }
}

// Whole units (channels) of unit_size elements.
template <typename scalar_t, typename compute_t>
void unit_kernel(const scalar_t* x, scalar_t* y, const float* rates, const compute_t* scales, int64_t batch,
                 int64_t per_example, int64_t unit_size, const Keys& keys, uint64_t offset) {
  const int64_t units_per_example = per_example / unit_size;
  const int64_t units = batch * units_per_example;
  const int64_t grain = std::max<int64_t>(1, 32768 / unit_size);  // about 32k elements per task
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / units_per_example;
      const uint64_t counter = offset + static_cast<uint64_t>(unit);
      const bool keep = hash_bits(keys, static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32)) >=
                        threshold(rates[b]);
      const compute_t scale = scales[b];
      for (int64_t i = unit * unit_size; i < (unit + 1) * unit_size; ++i)
        y[i] = select(keep, static_cast<scalar_t>(static_cast<compute_t>(x[i]) * scale));
    }
  });
}

// Single elements (unit_size 1), in runs within one example and one high counter word.
template <typename scalar_t, typename compute_t>
void elementwise_kernel(const scalar_t* x, scalar_t* y, const float* rates, const compute_t* scales, int64_t batch,
                        int64_t per_example, const Keys& keys, uint64_t offset) {
  at::parallel_for(0, batch * per_example, 32768, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / per_example;
      const uint64_t counter = offset + static_cast<uint64_t>(i);
      const uint64_t to_wrap = (uint64_t(1) << 32) - (counter & 0xFFFFFFFFu);
      const int64_t stop = std::min<int64_t>(std::min(end, (b + 1) * per_example),
                                             i + static_cast<int64_t>(std::min<uint64_t>(to_wrap, INT64_MAX)));
      elementwise_run<scalar_t, compute_t>(x + i, y + i, stop - i, static_cast<uint32_t>(counter),
                                           static_cast<uint32_t>(counter >> 32), threshold(rates[b]), scales[b], keys);
      i = stop;
    }
  });
}

}  // namespace

Tensor per_example_dropout_forward(const Tensor& x, const Tensor& rates, const Tensor& scales,
                                   const Tensor& seed_offset, int64_t unit_size) {
  // The caller (stn_kernels/ops/per_example_dropout.py) passes x contiguous, rates float32 [B], scales [B] in the
  // compute dtype and seed_offset int64 [2] on the CPU; checked here again, cheaply, since a wrong layout would
  // read out of bounds.
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() && x.dim() >= 1, "per_example_dropout: x");
  TORCH_CHECK(rates.scalar_type() == at::kFloat && rates.is_contiguous() && rates.numel() == x.size(0),
              "per_example_dropout: rates");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == x.size(0), "per_example_dropout: scales");
  TORCH_CHECK(seed_offset.scalar_type() == at::kLong && seed_offset.numel() == 2 && seed_offset.device().is_cpu(),
              "per_example_dropout: seed_offset");
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0);
  if (x.numel() == 0) return y;
  const int64_t per_example = x.numel() / batch;
  TORCH_CHECK(unit_size >= 1 && per_example % unit_size == 0, "per_example_dropout: unit_size");
  auto so = seed_offset.contiguous();
  const int64_t* so_ptr = so.data_ptr<int64_t>();
  const Keys keys = keys_of(so_ptr[0]);
  const uint64_t offset = static_cast<uint64_t>(so_ptr[1]);
  const float* rate_ptr = rates.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "per_example_dropout", [&] {
    // The compute dtype: float64 for float64 data, float32 otherwise (reference_dropout.compute_dtype).
    using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(scales.scalar_type() == c10::CppTypeToScalarType<compute_t>::value, "per_example_dropout: scales");
    const compute_t* scale_ptr = scales.data_ptr<compute_t>();
    if (unit_size == 1)
      elementwise_kernel<scalar_t, compute_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rate_ptr, scale_ptr,
                                              batch, per_example, keys, offset);
    else
      unit_kernel<scalar_t, compute_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rate_ptr, scale_ptr,
                                          batch, per_example, unit_size, keys, offset);
  });
  return y;
}

}  // namespace stn_kernels_host
