// CPU kernels: the fused stage and the weight average's update (parallel over elements), and a deterministic
// squared norm.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops.h"

namespace odegan {

namespace {

// Branch-free inner loops (the choices are hoisted into template flags) so the compiler vectorises them.
template <typename T, bool HAS_R, bool READ_ACC, bool WRITE_X0>
void stage_range(T* __restrict p, const T* __restrict g, T* __restrict x0, T* __restrict acc,
                 const T* __restrict r, const T* cf, int64_t lo, int64_t hi) {
  const T a = cf[0], b = cf[1], c = cf[2], d = cf[3], e = cf[4];
  for (int64_t i = lo; i < hi; ++i) {
    T k = g[i];
    if constexpr (HAS_R) k = k + e * r[i];
    T na = b * k;
    if constexpr (READ_ACC) na = a * acc[i] + na;  // acc is not read where a == 0
    const T pv = (x0[i] + c * k) + d * na;
    acc[i] = na;
    p[i] = pv;
    if constexpr (WRITE_X0) x0[i] = pv;
  }
}

template <typename T, bool HAS_R>
void stage_range_dispatch(T* p, const T* g, T* x0, T* acc, const T* r, const T* cf, int64_t lo, int64_t hi,
                          bool write_x0) {
  const bool read_acc = cf[0] != T(0);
  if (read_acc && write_x0) stage_range<T, HAS_R, true, true>(p, g, x0, acc, r, cf, lo, hi);
  else if (read_acc) stage_range<T, HAS_R, true, false>(p, g, x0, acc, r, cf, lo, hi);
  else if (write_x0) stage_range<T, HAS_R, false, true>(p, g, x0, acc, r, cf, lo, hi);
  else stage_range<T, HAS_R, false, false>(p, g, x0, acc, r, cf, lo, hi);
}

template <typename T>
void stage_segment(T* p, const T* g, T* x0, T* acc, const T* r, int64_t rlen, const T* cf, int64_t lo, int64_t hi,
                   bool write_x0) {
  at::parallel_for(lo, hi, 1 << 15, [&](int64_t i0, int64_t i1) {
    const int64_t split = r == nullptr ? i0 : std::clamp(rlen, i0, i1);  // [i0, split) sees r
    if (split > i0) stage_range_dispatch<T, true>(p, g, x0, acc, r, cf, i0, split, write_x0);
    if (i1 > split) stage_range_dispatch<T, false>(p, g, x0, acc, r, cf, split, i1, write_x0);
  });
}

}  // namespace

void stage_cpu(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
               at::IntArrayRef starts, const c10::optional<at::Tensor>& reg_grad, bool write_x0) {
  check_stage_args(params, grads, x0, acc, coeffs, starts, reg_grad);
  const int64_t n = params.numel();
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "odegan_stage_cpu", [&] {
    const scalar_t* r = reg_grad.has_value() ? reg_grad->data_ptr<scalar_t>() : nullptr;
    const int64_t rlen = reg_grad.has_value() ? reg_grad->numel() : 0;
    for (size_t s = 0; s < starts.size(); ++s) {
      const int64_t lo = starts[s];
      const int64_t hi = s + 1 < starts.size() ? starts[s + 1] : n;
      stage_segment<scalar_t>(params.data_ptr<scalar_t>(), grads.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(),
                              acc.data_ptr<scalar_t>(), r, rlen, coeffs.data_ptr<scalar_t>() + 5 * s, lo, hi,
                              write_x0);
    }
  });
}

void ema_update_cpu(at::Tensor avg, const at::Tensor& params, const c10::optional<at::Tensor>& decay_tensor,
                    double decay) {
  check_ema_args(avg, params, decay_tensor, decay);
  const int64_t n = avg.numel();
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "odegan_ema_update_cpu", [&] {
    // The weights in the buffers' dtype, 1 - d computed there (as every backend does): they sum to one there.
    const scalar_t d = decay_tensor.has_value() ? *decay_tensor->data_ptr<scalar_t>() : static_cast<scalar_t>(decay);
    TORCH_CHECK(std::isfinite(d) && d >= scalar_t(0) && d <= scalar_t(1),
                "odegan ema_update: decay must be finite, in [0, 1], got ", d);
    const scalar_t w = scalar_t(1) - d;
    scalar_t* __restrict a = avg.data_ptr<scalar_t>();
    const scalar_t* __restrict p = params.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 15, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) a[i] = d * a[i] + w * p[i];
    });
  });
}

at::Tensor sqnorm_cpu(at::TensorList tensors) {
  check_sqnorm_args(tensors);
  // Fixed-size chunks summed in double, then added in chunk order: the result does not depend on the
  // number of threads.
  constexpr int64_t kChunk = 1 << 14;
  std::vector<at::Tensor> cont;
  std::vector<int64_t> first_chunk;
  int64_t chunks = 0;
  for (const auto& t : tensors) {
    cont.push_back(t.contiguous());
    first_chunk.push_back(chunks);
    chunks += (t.numel() + kChunk - 1) / kChunk;
  }
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(tensors[0].scalar_type(), "odegan_sqnorm_cpu", [&] {
    for (size_t ti = 0; ti < cont.size(); ++ti) {
      const scalar_t* x = cont[ti].data_ptr<scalar_t>();
      const int64_t len = cont[ti].numel();
      const int64_t nch = (len + kChunk - 1) / kChunk;
      at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          // eight independent accumulators: a fixed summation order the compiler can vectorise
          double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          const int64_t begin = c * kChunk, end = std::min(len, (c + 1) * kChunk);
          int64_t i = begin;
          for (; i + 8 <= end; i += 8) {
            for (int j = 0; j < 8; ++j) lanes[j] += static_cast<double>(x[i + j]) * static_cast<double>(x[i + j]);
          }
          for (; i < end; ++i) lanes[0] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
          double s = 0.0;
          for (double v : lanes) s += v;
          partial[first_chunk[ti] + c] = s;
        }
      });
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  // Accumulated in double; the cast (unlike scalar_tensor into float) turns an overflow into inf, so a diverging
  // run reaches the caller's non-finite check instead of failing here.
  return at::scalar_tensor(total, tensors[0].options().dtype(at::kDouble)).to(tensors[0].scalar_type());
}

}  // namespace odegan
