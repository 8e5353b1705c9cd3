// CUDA kernels: the fused RK stage and the weight average's update (16-byte vector access), and a multi-tensor
// deterministic squared norm. Everything launches on the current stream with its metadata passed by value, so
// every op can be captured in a CUDA graph and replayed with new coefficient (or decay) values.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "../ops.h"

namespace odegan {

namespace {

struct Segments {
  int64_t start[kMaxSegments];
  int n;
};

__device__ __forceinline__ int segment_of(const Segments& segs, int64_t i) {
  int s = 0;
#pragma unroll
  for (int j = 1; j < kMaxSegments; ++j) s += (j < segs.n && i >= segs.start[j]) ? 1 : 0;
  return s;
}

template <typename T>
__device__ __forceinline__ void stage_one(T* p, const T* g, T* x0, T* acc, const T* r, int64_t rlen, const T* coef,
                                          const Segments& segs, int64_t i, bool write_x0) {
  const T* cf = coef + 5 * segment_of(segs, i);
  const T a = __ldg(cf), b = __ldg(cf + 1), c = __ldg(cf + 2), d = __ldg(cf + 3), e = __ldg(cf + 4);
  T k = g[i];
  if (r != nullptr && i < rlen) k = k + e * r[i];
  const T old = (a == T(0)) ? T(0) : a * acc[i];
  const T na = old + b * k;
  const T pv = (x0[i] + c * k) + d * na;
  acc[i] = na;
  p[i] = pv;
  if (write_x0) x0[i] = pv;
}

template <typename T>
__global__ void stage_scalar_kernel(T* p, const T* g, T* x0, T* acc, const T* r, int64_t rlen, const T* coef,
                                    Segments segs, int64_t n, bool write_x0) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    stage_one(p, g, x0, acc, r, rlen, coef, segs, i, write_x0);
  }
}

// float4 path: every buffer is 16-byte aligned (FlatParams guarantees it; the host checks).
__global__ void stage_vec4_kernel(float* p, const float* g, float* x0, float* acc, const float* r, int64_t rlen,
                                  const float* coef, Segments segs, int64_t n, bool write_x0) {
  const int64_t nvec = n / 4;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = 4 * v;
    float4 gk = reinterpret_cast<const float4*>(g)[v];
    float kv[4] = {gk.x, gk.y, gk.z, gk.w};
    float av[4], bv[4], cv[4], dv[4], ev[4];
    const int s_first = segment_of(segs, i);
    if (s_first == segment_of(segs, i + 3)) {  // the common case: one coefficient row for all four
      const float* cf = coef + 5 * s_first;
      const float a = __ldg(cf), b = __ldg(cf + 1), c = __ldg(cf + 2), d = __ldg(cf + 3), e = __ldg(cf + 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        av[j] = a; bv[j] = b; cv[j] = c; dv[j] = d; ev[j] = e;
      }
    } else {  // a segment boundary inside this vector
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float* cf = coef + 5 * segment_of(segs, i + j);
        av[j] = __ldg(cf); bv[j] = __ldg(cf + 1); cv[j] = __ldg(cf + 2); dv[j] = __ldg(cf + 3); ev[j] = __ldg(cf + 4);
      }
    }
    if (r != nullptr) {
      if (i + 3 < rlen) {  // reg is 16-byte aligned too (checked on the host)
        const float4 r4 = reinterpret_cast<const float4*>(r)[v];
        kv[0] += ev[0] * r4.x; kv[1] += ev[1] * r4.y; kv[2] += ev[2] * r4.z; kv[3] += ev[3] * r4.w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (i + j < rlen) kv[j] += ev[j] * r[i + j];
        }
      }
    }
    bool read_acc = false;
#pragma unroll
    for (int j = 0; j < 4; ++j) read_acc |= av[j] != 0.f;
    float accv[4] = {0.f, 0.f, 0.f, 0.f};
    if (read_acc) {  // stage 1 (a == 0) skips acc's read: a fifth of the traffic
      float4 a4 = reinterpret_cast<const float4*>(acc)[v];
      accv[0] = a4.x; accv[1] = a4.y; accv[2] = a4.z; accv[3] = a4.w;
    }
    const float4 x4 = reinterpret_cast<const float4*>(x0)[v];
    const float xv[4] = {x4.x, x4.y, x4.z, x4.w};
    float na[4], pv[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float old = av[j] == 0.f ? 0.f : av[j] * accv[j];
      na[j] = old + bv[j] * kv[j];
      pv[j] = (xv[j] + cv[j] * kv[j]) + dv[j] * na[j];
    }
    reinterpret_cast<float4*>(acc)[v] = make_float4(na[0], na[1], na[2], na[3]);
    const float4 p4 = make_float4(pv[0], pv[1], pv[2], pv[3]);
    reinterpret_cast<float4*>(p)[v] = p4;
    if (write_x0) reinterpret_cast<float4*>(x0)[v] = p4;
  }
  // tail (n % 4 elements), handled by the first threads of block 0
  if (blockIdx.x == 0 && threadIdx.x < n % 4) {
    stage_one(p, g, x0, acc, r, rlen, coef, segs, 4 * nvec + threadIdx.x, write_x0);
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

int grid_for(int64_t work, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 32LL * sms)));
}

// -- ema_update -----------------------------------------------------------------------------------------------
// The decay from the device (decay_ptr, a 0-dim tensor: a captured graph replays with its new value) or by value.
template <typename T>
__device__ __forceinline__ T ema_decay(const T* decay_ptr, T decay) {
  return decay_ptr != nullptr ? __ldg(decay_ptr) : decay;
}

template <typename T>
__global__ void ema_scalar_kernel(T* avg, const T* p, const T* decay_ptr, T decay, int64_t n) {
  const T d = ema_decay(decay_ptr, decay);
  const T w = T(1) - d;  // in T, as every backend: the two weights sum to one there
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    avg[i] = d * avg[i] + w * p[i];
  }
}

// 16 bytes of T: loads and stores of it are single 128-bit accesses (LDG.E.128 / STG.E.128).
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Both buffers 16-byte aligned (FlatParams' segments are; the host checks): float4 / double2 accesses, the
// n % N tail done by the first threads of block 0.
template <typename T>
__global__ void ema_vec_kernel(T* avg, const T* p, const T* decay_ptr, T decay, int64_t n) {
  constexpr int N = Pack16<T>::N;
  const T d = ema_decay(decay_ptr, decay);
  const T w = T(1) - d;
  const int64_t nvec = n / N;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Pack16<T> a = reinterpret_cast<const Pack16<T>*>(avg)[v];
    const Pack16<T> x = reinterpret_cast<const Pack16<T>*>(p)[v];
#pragma unroll
    for (int j = 0; j < N; ++j) a.v[j] = d * a.v[j] + w * x.v[j];
    reinterpret_cast<Pack16<T>*>(avg)[v] = a;
  }
  if (blockIdx.x == 0 && threadIdx.x < n % N) {
    const int64_t i = N * nvec + threadIdx.x;
    avg[i] = d * avg[i] + w * p[i];
  }
}

// -- sqnorm -------------------------------------------------------------------------------------------------
// Partial sums of squares, then one fixed-order sum (deterministic). A launch takes a table of up to N tensors by
// value (pointer, length, first chunk) and grid-strides over all their kSqChunk-element chunks: one launch per N
// tensors whatever their sizes (before, a launch covered at most 320 chunks, 5.2M elements, so P = 1e9 took ~191
// launches). The large table is 1024 x 24 B of kernel parameters, which CUDA >= 12.1 allows (up to 32764 B); the
// small one keeps the common launch's parameters under 1 KB.
constexpr int kSqThreads = 512;
constexpr int64_t kSqChunk = 16384;  // elements per chunk: 32 per thread
constexpr int kSqBlocksPerSM = 4;    // 4 x 512 threads fill an SM
constexpr int kSqSmallTable = 32;
constexpr int kSqLargeTable = 1024;

template <int N>
struct SqTable {
  const void* ptr[N];
  int64_t len[N];
  int64_t first_chunk[N];  // the tensor's first chunk in the launch's numbering (ascending)
  int64_t chunks;          // chunks in this launch
  int n;                   // tensors in this launch
};
static_assert(sizeof(SqTable<kSqLargeTable>) < 32764, "kernel parameters are limited to 32764 bytes");

template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? warp_sums[lane] : T(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <int N>
__device__ __forceinline__ int tensor_of_chunk(const SqTable<N>& tab, int64_t c) {
  int lo = 0, hi = tab.n - 1;  // the last tensor whose first chunk is <= c
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.first_chunk[mid] <= c) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Each block sums its chunks (blockIdx.x, + gridDim.x, ...) in a fixed order and writes one partial.
template <typename T, int N>
__global__ void __launch_bounds__(kSqThreads) sqnorm_partial_kernel(const __grid_constant__ SqTable<N> tab,
                                                                     T* partials) {
  using Pack = Pack16<T>;
  constexpr int V = Pack::N;
  T s = T(0);
  for (int64_t c = blockIdx.x; c < tab.chunks; c += gridDim.x) {
    const int t = tensor_of_chunk(tab, c);
    const T* x = static_cast<const T*>(tab.ptr[t]);
    const int64_t lo = (c - tab.first_chunk[t]) * kSqChunk;
    const int64_t hi = min(tab.len[t], lo + kSqChunk);
    int64_t i = lo;
    if (aligned16(x)) {  // chunk starts are multiples of kSqChunk elements: 16-byte aligned with the tensor
      const Pack* xv = reinterpret_cast<const Pack*>(x + lo);
      const int64_t nvec = (hi - lo) / V;
#pragma unroll 4
      for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        const Pack p = xv[v];
#pragma unroll
        for (int j = 0; j < V; ++j) s += p.v[j] * p.v[j];
      }
      i = lo + nvec * V;
    }
    for (i += threadIdx.x; i < hi; i += blockDim.x) {  // the unaligned tensor, or the last chunk's tail
      const T v = x[i];
      s += v * v;
    }
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <typename T>
__global__ void sum_kernel(const T* partials, int64_t m, T* out) {
  T s = T(0);
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) s += partials[i];  // fixed order: deterministic
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

// One launch over tensors [first, last) of cont: returns the number of partials it wrote at partials.
template <typename T, int N>
int64_t launch_sqnorm_partials(const std::vector<at::Tensor>& cont, size_t first, size_t last, T* partials,
                               cudaStream_t stream) {
  SqTable<N> tab{};
  tab.n = static_cast<int>(last - first);
  int64_t chunks = 0;
  for (int i = 0; i < tab.n; ++i) {
    const at::Tensor& t = cont[first + i];
    tab.ptr[i] = t.data_ptr();
    tab.len[i] = t.numel();
    tab.first_chunk[i] = chunks;
    chunks += (t.numel() + kSqChunk - 1) / kSqChunk;
  }
  tab.chunks = chunks;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(chunks, static_cast<int64_t>(kSqBlocksPerSM) * sms);
  sqnorm_partial_kernel<T, N><<<static_cast<unsigned>(blocks), kSqThreads, 0, stream>>>(tab, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return blocks;
}

}  // namespace

void stage_cuda(at::Tensor params, const at::Tensor& grads, at::Tensor x0, at::Tensor acc, const at::Tensor& coeffs,
                at::IntArrayRef starts, const c10::optional<at::Tensor>& reg_grad, bool write_x0) {
  check_stage_args(params, grads, x0, acc, coeffs, starts, reg_grad);
  const c10::cuda::CUDAGuard guard(params.device());
  const int64_t n = params.numel();
  const int64_t nseg = static_cast<int64_t>(starts.size());
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  // One launch per group of up to kMaxSegments segments (one launch for the usual two players), each over its own
  // part [lo, hi) of the buffers with the group's segment starts relative to lo.
  for (int64_t first = 0; first < nseg; first += kMaxSegments) {
    const int64_t last = std::min<int64_t>(nseg, first + kMaxSegments);
    const int64_t lo = starts[first];
    const int64_t hi = last < nseg ? starts[last] : n;
    const int64_t len = hi - lo;
    if (len == 0) continue;  // empty segments only
    Segments segs{};
    segs.n = static_cast<int>(last - first);
    for (int i = 0; i < segs.n; ++i) segs.start[i] = starts[first + i] - lo;
    const int64_t rlen =
        reg_grad.has_value() ? std::max<int64_t>(0, std::min<int64_t>(reg_grad->numel(), hi) - lo) : 0;
    if (params.scalar_type() == at::kFloat) {
      float* p = params.data_ptr<float>() + lo;
      const float* g = grads.data_ptr<float>() + lo;
      float* x = x0.data_ptr<float>() + lo;
      float* a = acc.data_ptr<float>() + lo;
      const float* r = rlen > 0 ? reg_grad->data_ptr<float>() + lo : nullptr;
      const float* cf = coeffs.data_ptr<float>() + 5 * first;
      const bool vec = aligned16(p) && aligned16(g) && aligned16(x) && aligned16(a) && (r == nullptr || aligned16(r));
      if (vec) {
        stage_vec4_kernel<<<grid_for(std::max<int64_t>(len / 4, 1), threads), threads, 0, stream>>>(
            p, g, x, a, r, rlen, cf, segs, len, write_x0);
      } else {
        stage_scalar_kernel<float><<<grid_for(len, threads), threads, 0, stream>>>(p, g, x, a, r, rlen, cf, segs, len,
                                                                                   write_x0);
      }
    } else {
      const double* r = rlen > 0 ? reg_grad->data_ptr<double>() + lo : nullptr;
      stage_scalar_kernel<double><<<grid_for(len, threads), threads, 0, stream>>>(
          params.data_ptr<double>() + lo, grads.data_ptr<double>() + lo, x0.data_ptr<double>() + lo,
          acc.data_ptr<double>() + lo, r, rlen, coeffs.data_ptr<double>() + 5 * first, segs, len, write_x0);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void ema_update_cuda(at::Tensor avg, const at::Tensor& params, const c10::optional<at::Tensor>& decay_tensor,
                     double decay) {
  check_ema_args(avg, params, decay_tensor, decay);
  const int64_t n = avg.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(avg.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES(avg.scalar_type(), "odegan_ema_update_cuda", [&] {
    scalar_t* a = avg.data_ptr<scalar_t>();
    const scalar_t* p = params.data_ptr<scalar_t>();
    const scalar_t* dp = decay_tensor.has_value() ? decay_tensor->data_ptr<scalar_t>() : nullptr;
    const scalar_t d = static_cast<scalar_t>(decay);
    if (aligned16(a) && aligned16(p)) {
      constexpr int64_t N = Pack16<scalar_t>::N;
      ema_vec_kernel<scalar_t><<<grid_for(std::max<int64_t>(n / N, 1), threads), threads, 0, stream>>>(a, p, dp, d, n);
    } else {
      ema_scalar_kernel<scalar_t><<<grid_for(n, threads), threads, 0, stream>>>(a, p, dp, d, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor sqnorm_cuda(at::TensorList tensors) {
  check_sqnorm_args(tensors);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> cont;
  for (const auto& t : tensors) {
    if (t.numel() > 0) cont.push_back(t.contiguous());
  }
  auto out = at::zeros({}, tensors[0].options());
  if (cont.empty()) return out;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t launches = (cont.size() + kSqLargeTable - 1) / kSqLargeTable;
  // at most kSqBlocksPerSM x SMs partials per launch
  auto partials = at::empty({static_cast<int64_t>(launches) * kSqBlocksPerSM * sms}, tensors[0].options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tensors[0].scalar_type(), "odegan_sqnorm_cuda", [&] {
    scalar_t* part = partials.data_ptr<scalar_t>();
    int64_t done = 0;
    for (size_t first = 0; first < cont.size(); first += kSqLargeTable) {
      const size_t last = std::min(cont.size(), first + kSqLargeTable);
      done += last - first <= static_cast<size_t>(kSqSmallTable)
                  ? launch_sqnorm_partials<scalar_t, kSqSmallTable>(cont, first, last, part + done, stream)
                  : launch_sqnorm_partials<scalar_t, kSqLargeTable>(cont, first, last, part + done, stream);
    }
    sum_kernel<scalar_t><<<1, 1024, 0, stream>>>(part, done, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace odegan
