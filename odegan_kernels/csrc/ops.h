// odegan_kernels csrc: the fused RK stage and the multi-tensor squared norm (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace odegan {

// Validates the stage op's arguments (dtype, device, size, contiguity, segments) with TORCH_CHECK.
void check_stage_args(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& x0,
                      const at::Tensor& acc, const at::Tensor& coeffs, at::IntArrayRef starts,
                      const c10::optional<at::Tensor>& reg);
void check_sqnorm_args(at::TensorList tensors);

void stage_cpu(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
               at::IntArrayRef starts, const c10::optional<at::Tensor>& reg, bool write_x0);
at::Tensor sqnorm_cpu(at::TensorList tensors);

#ifdef ODEGAN_WITH_CUDA
void stage_cuda(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
                at::IntArrayRef starts, const c10::optional<at::Tensor>& reg, bool write_x0);
at::Tensor sqnorm_cuda(at::TensorList tensors);
#endif

// Segments per CUDA launch (their starts travel by value in the kernel's arguments); more go in several launches.
constexpr int kMaxSegments = 8;

}  // namespace odegan
