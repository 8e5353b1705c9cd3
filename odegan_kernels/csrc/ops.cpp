// Schemas, argument checks and dispatch registration for the odegan_kernels operator library.
#include <torch/library.h>

#include "ops.h"

namespace odegan {

void check_stage_args(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& x0,
                      const at::Tensor& acc, const at::Tensor& coeffs, at::IntArrayRef starts,
                      const c10::optional<at::Tensor>& reg) {
  const auto n = params.numel();
  TORCH_CHECK(n > 0, "odegan stage: params is empty");
  TORCH_CHECK(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble,
              "odegan stage: params must be float32 or float64, got ", params.scalar_type());
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"params", &params}, {"grads", &grads}, {"x0", &x0}, {"acc", &acc}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->dim() == 1, "odegan stage: ", name, " must be 1-D, got ", t->dim(), " dims");
    TORCH_CHECK(t->is_contiguous(), "odegan stage: ", name, " must be contiguous");
    TORCH_CHECK(t->scalar_type() == params.scalar_type(), "odegan stage: ", name, " is ", t->scalar_type(),
                " but params is ", params.scalar_type());
    TORCH_CHECK(t->device() == params.device(), "odegan stage: ", name, " is on ", t->device(),
                " but params is on ", params.device());
    TORCH_CHECK(t->numel() == n, "odegan stage: ", name, " has ", t->numel(), " elements, params has ", n);
  }
  TORCH_CHECK(!starts.empty() && starts[0] == 0, "odegan stage: starts must begin at 0");
  TORCH_CHECK(static_cast<int64_t>(starts.size()) <= kMaxSegments, "odegan stage: at most ", kMaxSegments,
              " segments, got ", starts.size());
  for (size_t i = 1; i < starts.size(); ++i) {
    TORCH_CHECK(starts[i] >= starts[i - 1] && starts[i] <= n, "odegan stage: starts must be ascending within [0, ",
                n, "]");
  }
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == static_cast<int64_t>(starts.size()) && coeffs.size(1) == 5,
              "odegan stage: coeffs must be [", starts.size(), ", 5], got ", coeffs.sizes());
  TORCH_CHECK(coeffs.is_contiguous() && coeffs.scalar_type() == params.scalar_type() &&
                  coeffs.device() == params.device(),
              "odegan stage: coeffs must be contiguous, of params' dtype and on params' device");
  if (reg.has_value()) {
    const auto& r = reg.value();
    TORCH_CHECK(r.dim() == 1 && r.is_contiguous() && r.scalar_type() == params.scalar_type() &&
                    r.device() == params.device(),
                "odegan stage: reg must be a contiguous 1-D tensor of params' dtype on params' device");
    TORCH_CHECK(r.numel() <= n, "odegan stage: reg has ", r.numel(), " elements, more than params (", n, ")");
  }
}

void check_sqnorm_args(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "odegan sqnorm: tensors is empty");
  const auto& t0 = tensors[0];
  TORCH_CHECK(t0.scalar_type() == at::kFloat || t0.scalar_type() == at::kDouble,
              "odegan sqnorm: tensors must be float32 or float64, got ", t0.scalar_type());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == t0.scalar_type(), "odegan sqnorm: tensors[", i, "] is ",
                tensors[i].scalar_type(), " but tensors[0] is ", t0.scalar_type());
    TORCH_CHECK(tensors[i].device() == t0.device(), "odegan sqnorm: tensors[", i, "] is on ", tensors[i].device(),
                " but tensors[0] is on ", t0.device());
  }
}

}  // namespace odegan

TORCH_LIBRARY(odegan_kernels, m) {
  m.def(
      "stage(Tensor(a!) params, Tensor grads, Tensor(b!) x0, Tensor(c!) acc, Tensor coeffs, int[] starts, "
      "Tensor? reg, bool write_x0) -> ()");
  m.def("sqnorm(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(odegan_kernels, CPU, m) {
  m.impl("stage", &odegan::stage_cpu);
  m.impl("sqnorm", &odegan::sqnorm_cpu);
}

#ifdef ODEGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(odegan_kernels, CUDA, m) {
  m.impl("stage", &odegan::stage_cuda);
  m.impl("sqnorm", &odegan::sqnorm_cuda);
}
#endif
