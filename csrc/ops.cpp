// Schemas, argument checks and dispatch registration for the odegan_kernels operator library.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <utility>

#include "ops.h"

namespace odegan {

void check_stage_args(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& x0,
                      const at::Tensor& acc, const at::Tensor& coeffs, at::IntArrayRef starts,
                      const c10::optional<at::Tensor>& reg_grad) {
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
  for (size_t i = 1; i < starts.size(); ++i) {
    TORCH_CHECK(starts[i] >= starts[i - 1] && starts[i] <= n, "odegan stage: starts must be ascending within [0, ",
                n, "]");
  }
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == static_cast<int64_t>(starts.size()) && coeffs.size(1) == 5,
              "odegan stage: coeffs must be [", starts.size(), ", 5], got ", coeffs.sizes());
  TORCH_CHECK(coeffs.is_contiguous() && coeffs.scalar_type() == params.scalar_type() &&
                  coeffs.device() == params.device(),
              "odegan stage: coeffs must be contiguous, of params' dtype and on params' device");
  if (reg_grad.has_value()) {
    const auto& r = reg_grad.value();
    TORCH_CHECK(r.dim() == 1 && r.is_contiguous() && r.scalar_type() == params.scalar_type() &&
                    r.device() == params.device(),
                "odegan stage: reg_grad must be a contiguous 1-D tensor of params' dtype on params' device");
    TORCH_CHECK(r.numel() <= n, "odegan stage: reg_grad has ", r.numel(), " elements, more than params (", n, ")");
  }
}

void check_ema_args(const at::Tensor& avg, const at::Tensor& params, const c10::optional<at::Tensor>& decay_tensor,
                    double decay) {
  TORCH_CHECK(avg.scalar_type() == at::kFloat || avg.scalar_type() == at::kDouble,
              "odegan ema_update: avg must be float32 or float64, got ", avg.scalar_type());
  const std::pair<const char*, const at::Tensor*> named[] = {{"avg", &avg}, {"params", &params}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->dim() == 1, "odegan ema_update: ", name, " must be 1-D, got ", t->dim(), " dims");
    TORCH_CHECK(t->is_contiguous(), "odegan ema_update: ", name, " must be contiguous");
  }
  TORCH_CHECK(params.scalar_type() == avg.scalar_type(), "odegan ema_update: params is ", params.scalar_type(),
              " but avg is ", avg.scalar_type());
  TORCH_CHECK(params.device() == avg.device(), "odegan ema_update: params is on ", params.device(), " but avg is on ",
              avg.device());
  TORCH_CHECK(params.numel() == avg.numel(), "odegan ema_update: params has ", params.numel(),
              " elements but avg has ", avg.numel());
  TORCH_CHECK(at::get_overlap_status(avg, params) == at::MemOverlapStatus::No,
              "odegan ema_update: avg (the output) overlaps params in memory");
  if (decay_tensor.has_value()) {
    const auto& d = decay_tensor.value();
    TORCH_CHECK(d.dim() == 0, "odegan ema_update: decay_tensor must be 0-dim, got ", d.dim(), " dims");
    TORCH_CHECK(d.scalar_type() == avg.scalar_type() && d.device() == avg.device(),
                "odegan ema_update: decay_tensor must be of avg's dtype on avg's device, got ", d.scalar_type(),
                " on ", d.device());
    TORCH_CHECK(at::get_overlap_status(avg, d) == at::MemOverlapStatus::No,
                "odegan ema_update: avg (the output) overlaps decay_tensor in memory");
  } else {
    TORCH_CHECK(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0,
                "odegan ema_update: decay must be finite, in [0, 1], got ", decay);
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

// The in-place ops' Autograd kernels refuse, with grad mode on, a tensor argument that requires grad, naming it
// (an absent optional argument is a nullptr).
void refuse_requires_grad(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> named) {
  if (!c10::GradMode::is_enabled()) return;
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t == nullptr || !t->requires_grad(), "odegan ", op, ": ", name, " requires grad, but ", op,
                " updates flat buffers in place and is not differentiable: pass ", name,
                ".detach() or call it under torch.no_grad()");
  }
}

// The stage op's Autograd kernel. It writes params, acc and x0 in place and has no derivative, so, as ATen's
// in-place ops do: with grad mode on, a tensor argument that requires grad is refused (a leaf would be written
// behind autograd's back; any other would lose its gradient path); and every buffer it writes has its version
// bumped, so a backward through a graph that saved one of them fails instead of silently using the new values.
// (sqnorm's autograd is registered from Python.)
void stage_autograd(c10::DispatchKeySet ks, at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc,
                    const at::Tensor& coeffs, at::IntArrayRef starts, const c10::optional<at::Tensor>& reg_grad,
                    bool write_x0) {
  refuse_requires_grad("stage", {{"params", &params},
                                 {"grads", &grads},
                                 {"x0", &x0},
                                 {"acc", &acc},
                                 {"coeffs", &coeffs},
                                 {"reg_grad", reg_grad.has_value() ? &*reg_grad : nullptr}});
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("odegan_kernels::stage", "")
                             .typed<void(at::Tensor, const at::Tensor&, at::Tensor, at::Tensor, const at::Tensor&,
                                         at::IntArrayRef, const c10::optional<at::Tensor>&, bool)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, x0, acc, coeffs, starts, reg_grad,
                  write_x0);
  }
  params.unsafeGetTensorImpl()->bump_version();
  acc.unsafeGetTensorImpl()->bump_version();
  if (write_x0) x0.unsafeGetTensorImpl()->bump_version();
}

// ema_update's Autograd kernel, as the stage op's: tensors that require grad refused with grad mode on, avg's
// version bumped.
void ema_update_autograd(c10::DispatchKeySet ks, at::Tensor avg, const at::Tensor& params,
                         const c10::optional<at::Tensor>& decay_tensor, double decay) {
  refuse_requires_grad("ema_update", {{"avg", &avg},
                                      {"params", &params},
                                      {"decay_tensor", decay_tensor.has_value() ? &*decay_tensor : nullptr}});
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("odegan_kernels::ema_update", "")
          .typed<void(at::Tensor, const at::Tensor&, const c10::optional<at::Tensor>&, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, avg, params, decay_tensor, decay);
  }
  avg.unsafeGetTensorImpl()->bump_version();
}

}  // namespace odegan

TORCH_LIBRARY(odegan_kernels, m) {
  m.def(
      "stage(Tensor(a!) params, Tensor grads, Tensor(b!) x0, Tensor(c!) acc, Tensor coeffs, int[] starts, "
      "Tensor? reg_grad, bool write_x0) -> ()");
  m.def("sqnorm(Tensor[] tensors) -> Tensor");
  // decay_tensor (0-dim, on the buffers' device, read there: a graph replays with its new value) overrides decay
  m.def("ema_update(Tensor(a!) avg, Tensor params, Tensor? decay_tensor, float decay) -> ()");
}

TORCH_LIBRARY_IMPL(odegan_kernels, CPU, m) {
  m.impl("stage", &odegan::stage_cpu);
  m.impl("sqnorm", &odegan::sqnorm_cpu);
  m.impl("ema_update", &odegan::ema_update_cpu);
}

TORCH_LIBRARY_IMPL(odegan_kernels, Autograd, m) {
  m.impl("stage", &odegan::stage_autograd);
  m.impl("ema_update", &odegan::ema_update_autograd);
}

#ifdef ODEGAN_WITH_CUDA
TORCH_LIBRARY_IMPL(odegan_kernels, CUDA, m) {
  m.impl("stage", &odegan::stage_cuda);
  m.impl("sqnorm", &odegan::sqnorm_cuda);
  m.impl("ema_update", &odegan::ema_update_cuda);
}
#endif
