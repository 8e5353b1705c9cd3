// CPU kernels: the fused stage (parallel over elements) and a deterministic squared norm.
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../ops.h"

namespace odegan {

namespace {

template <typename T>
void stage_segment(T* p, const T* g, T* x0, T* acc, const T* r, int64_t rlen, const T* cf, int64_t lo, int64_t hi,
                   bool write_x0) {
  const T a = cf[0], b = cf[1], c = cf[2], d = cf[3], e = cf[4];
  at::parallel_for(lo, hi, 1 << 15, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T k = g[i];
      if (r != nullptr && i < rlen) k = k + e * r[i];
      const T old = (a == T(0)) ? T(0) : a * acc[i];  // acc is not read where a == 0
      const T na = old + b * k;
      const T pv = (x0[i] + c * k) + d * na;
      acc[i] = na;
      p[i] = pv;
      if (write_x0) x0[i] = pv;
    }
  });
}

}  // namespace

void stage_cpu(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
               at::IntArrayRef starts, const c10::optional<at::Tensor>& reg, bool write_x0) {
  check_stage_args(params, grads, x0, acc, coeffs, starts, reg);
  const int64_t n = params.numel();
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "odegan_stage_cpu", [&] {
    const scalar_t* r = reg.has_value() ? reg->data_ptr<scalar_t>() : nullptr;
    const int64_t rlen = reg.has_value() ? reg->numel() : 0;
    for (size_t s = 0; s < starts.size(); ++s) {
      const int64_t lo = starts[s];
      const int64_t hi = s + 1 < starts.size() ? starts[s + 1] : n;
      stage_segment<scalar_t>(params.data_ptr<scalar_t>(), grads.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(),
                              acc.data_ptr<scalar_t>(), r, rlen, coeffs.data_ptr<scalar_t>() + 5 * s, lo, hi,
                              write_x0);
    }
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
          double s = 0.0;
          const int64_t end = std::min(len, (c + 1) * kChunk);
          for (int64_t i = c * kChunk; i < end; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
          partial[first_chunk[ti] + c] = s;
        }
      });
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return at::scalar_tensor(total, tensors[0].options().dtype(tensors[0].scalar_type()));
}

}  // namespace odegan
