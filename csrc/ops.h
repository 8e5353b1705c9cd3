// odegan_kernels csrc: the fused RK stage, the multi-tensor squared norm and the weight average's update (CPU and
// CUDA).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace odegan {

// Validates the stage op's arguments (dtype, device, size, contiguity, segments) with TORCH_CHECK.
void check_stage_args(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& x0,
                      const at::Tensor& acc, const at::Tensor& coeffs, at::IntArrayRef starts,
                      const c10::optional<at::Tensor>& reg_grad);
void check_sqnorm_args(at::TensorList tensors);
// ema_update's: avg and params flat, contiguous, of one float dtype and device, the same length, not overlapping;
// decay_tensor (when given) 0-dim of their dtype on their device. A float decay must be finite, in [0, 1].
void check_ema_args(const at::Tensor& avg, const at::Tensor& params, const c10::optional<at::Tensor>& decay_tensor,
                    double decay);

void stage_cpu(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
               at::IntArrayRef starts, const c10::optional<at::Tensor>& reg_grad, bool write_x0);
at::Tensor sqnorm_cpu(at::TensorList tensors);
// avg <- d*avg + (1-d)*params, with d = decay_tensor's value when given, else decay (both taken in avg's dtype).
void ema_update_cpu(at::Tensor avg, const at::Tensor& params, const c10::optional<at::Tensor>& decay_tensor,
                    double decay);

#ifdef ODEGAN_WITH_CUDA
void stage_cuda(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
                at::IntArrayRef starts, const c10::optional<at::Tensor>& reg_grad, bool write_x0);
at::Tensor sqnorm_cuda(at::TensorList tensors);
void ema_update_cuda(at::Tensor avg, const at::Tensor& params, const c10::optional<at::Tensor>& decay_tensor,
                     double decay);
#endif

// Segments per CUDA launch (their starts travel by value in the kernel's arguments); more go in several launches.
constexpr int kMaxSegments = 8;

}  // namespace odegan
