// bias + ReLU + 2x2 max-pool + uint8 argmax (forward) and the matching backward, for NCHW and NHWC tensors.
//
// Pure CUDA (no torch headers): `nvcc -c` compiles it without a GPU (csrc/compile_check.py).
//
// One thread per pooled element in both directions: it reads (forward) or writes (backward) its 2x2 window, so
// no full-resolution activation is ever saved for backward and no index wider than a byte is stored. The
// pooled element's coordinates come from its linear index in memory order (64-bit: tensors may exceed 2^31
// elements). The per-channel bias gradient is a separate, deterministic reduction at pooled resolution.

#include "bias_relu_pool.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ptfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops: capping the grid never skips elements

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float f(float v) { return v; }
  static __device__ __forceinline__ float t(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half t(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};

// Offsets (in elements) of pooled element `idx` in the pooled tensor and of the top-left of its window in the
// full-resolution tensor, plus its channel and the element stride between the window's two columns and rows.
struct Window {
  int64_t pooled;
  int64_t top_left;
  int64_t col_step;
  int64_t row_step;
  int64_t channel;
};

template <bool kNHWC>
__device__ __forceinline__ Window locate(int64_t idx, int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo) {
  Window win;
  win.pooled = idx;
  if (kNHWC) {  // (n, i, j, ch), ch fastest
    const int64_t ch = idx % c;
    const int64_t j = (idx / c) % wo;
    const int64_t i = (idx / (c * wo)) % ho;
    const int64_t n = idx / (c * wo * ho);
    win.top_left = ((n * h + 2 * i) * w + 2 * j) * c + ch;
    win.col_step = c;
    win.row_step = w * c;
    win.channel = ch;
  } else {  // (n, ch, i, j), j fastest
    const int64_t j = idx % wo;
    const int64_t i = (idx / wo) % ho;
    const int64_t plane = idx / (wo * ho);  // n * c + ch
    win.top_left = plane * h * w + 2 * i * w + 2 * j;
    win.col_step = 1;
    win.row_step = w;
    win.channel = plane % c;
  }
  return win;
}

template <typename T, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    pool_forward_kernel(const T* __restrict__ z, const T* __restrict__ bias, T* __restrict__ out,
                        uint8_t* __restrict__ argmax, int64_t total, int64_t c, int64_t h, int64_t w, int64_t ho,
                        int64_t wo) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const Window win = locate<kNHWC>(idx, c, h, w, ho, wo);
    const float b = bias != nullptr ? Cvt<T>::f(bias[win.channel]) : 0.0f;
    float best = 0.0f;
    int best_k = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t off = win.top_left + (k >> 1) * win.row_step + (k & 1) * win.col_step;
      // Round to the output dtype before comparing: ties are decided on the values the caller sees.
      const float v = Cvt<T>::f(Cvt<T>::t(Cvt<T>::f(z[off]) + b));
      if (k == 0) {
        best = v;
      } else if (!isnan(best) && (isnan(v) || v > best)) {  // first maximum; the first NaN wins
        best = v;
        best_k = k;
      }
    }
    out[win.pooled] = Cvt<T>::t(best < 0.0f ? 0.0f : best);  // not fmaxf: NaN stays NaN, like torch.relu
    if (argmax != nullptr) {
      argmax[win.pooled] = static_cast<uint8_t>(best_k);
    }
  }
}

template <typename T, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    pool_backward_kernel(const T* __restrict__ grad, const T* __restrict__ out, const uint8_t* __restrict__ argmax,
                         T* __restrict__ g_conv, int64_t total, int64_t c, int64_t h, int64_t w, int64_t ho,
                         int64_t wo) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const Window win = locate<kNHWC>(idx, c, h, w, ho, wo);
    // At the argmax the ReLU mask is out > 0 (out is relu of that very element).
    const T g = Cvt<T>::f(out[win.pooled]) > 0.0f ? grad[win.pooled] : Cvt<T>::t(0.0f);
    const int k_max = argmax[win.pooled];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t off = win.top_left + (k >> 1) * win.row_step + (k & 1) * win.col_step;
      g_conv[off] = k == k_max ? g : Cvt<T>::t(0.0f);
    }
  }
}

// dbias[ch] = sum of grad * (out > 0) over the pooled elements of channel ch: one block per channel, each
// thread sums a fixed strided subset, then a fixed-shape tree in shared memory (same order every run).
template <typename T, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    pool_dbias_kernel(const T* __restrict__ grad, const T* __restrict__ out, float* __restrict__ dbias, int64_t n,
                      int64_t c, int64_t hw_pooled) {
  __shared__ float partial[kThreads];
  for (int64_t ch = blockIdx.x; ch < c; ch += gridDim.x) {
    float acc = 0.0f;
    const int64_t per_channel = n * hw_pooled;
    for (int64_t e = threadIdx.x; e < per_channel; e += blockDim.x) {
      const int64_t img = e / hw_pooled;
      const int64_t pos = e % hw_pooled;
      const int64_t off = kNHWC ? (img * hw_pooled + pos) * c + ch : (img * c + ch) * hw_pooled + pos;
      if (Cvt<T>::f(out[off]) > 0.0f) {
        acc += Cvt<T>::f(grad[off]);
      }
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        partial[threadIdx.x] += partial[threadIdx.x + s];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      dbias[ch] = partial[0];
    }
    __syncthreads();  // partial[] is reused by this block's next channel
  }
}

int64_t blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return b < kMaxBlocks ? b : kMaxBlocks;
}

template <typename T>
cudaError_t forward(const void* z, const void* bias, void* out, uint8_t* argmax, int64_t n, int64_t c, int64_t h,
                    int64_t w, bool nhwc, cudaStream_t stream) {
  const int64_t ho = h / 2, wo = w / 2, total = n * c * ho * wo;
  const auto* zt = static_cast<const T*>(z);
  const auto* bt = static_cast<const T*>(bias);
  auto* ot = static_cast<T*>(out);
  const unsigned blocks = static_cast<unsigned>(blocks_for(total));
  if (nhwc) {
    pool_forward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(zt, bt, ot, argmax, total, c, h, w, ho, wo);
  } else {
    pool_forward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(zt, bt, ot, argmax, total, c, h, w, ho, wo);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const void* grad, const void* out, const uint8_t* argmax, void* g_conv, float* dbias,
                     int64_t n, int64_t c, int64_t h, int64_t w, bool nhwc, cudaStream_t stream) {
  const int64_t ho = h / 2, wo = w / 2, total = n * c * ho * wo;
  const auto* gt = static_cast<const T*>(grad);
  const auto* ot = static_cast<const T*>(out);
  auto* ct = static_cast<T*>(g_conv);
  const unsigned blocks = static_cast<unsigned>(blocks_for(total));
  if (nhwc) {
    pool_backward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(gt, ot, argmax, ct, total, c, h, w, ho, wo);
  } else {
    pool_backward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(gt, ot, argmax, ct, total, c, h, w, ho, wo);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dbias == nullptr) {
    return err;
  }
  const unsigned cblocks = static_cast<unsigned>(c < kMaxBlocks ? c : kMaxBlocks);
  if (nhwc) {
    pool_dbias_kernel<T, true><<<cblocks, kThreads, 0, stream>>>(gt, ot, dbias, n, c, ho * wo);
  } else {
    pool_dbias_kernel<T, false><<<cblocks, kThreads, 0, stream>>>(gt, ot, dbias, n, c, ho * wo);
  }
  return cudaGetLastError();
}

bool bad_args(int64_t n, int64_t c, int64_t h, int64_t w, int layout) {
  return n < 0 || c < 0 || h < 0 || w < 0 || (layout != kBiasReluNCHW && layout != kBiasReluNHWC);
}

}  // namespace
}  // namespace ptfast

extern "C" cudaError_t ptfast_bias_relu_pool(const void* z, const void* bias, void* out, uint8_t* argmax, int64_t n,
                                             int64_t c, int64_t h, int64_t w, int layout, int dtype,
                                             cudaStream_t stream) {
  if (ptfast::bad_args(n, c, h, w, layout)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0 || c == 0 || h / 2 == 0 || w / 2 == 0) {
    return cudaSuccess;  // empty output: an empty grid would be a launch error
  }
  if (z == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool nhwc = layout == ptfast::kBiasReluNHWC;
  switch (dtype) {
    case ptfast::kBiasReluFloat32:
      return ptfast::forward<float>(z, bias, out, argmax, n, c, h, w, nhwc, stream);
    case ptfast::kBiasReluFloat16:
      return ptfast::forward<__half>(z, bias, out, argmax, n, c, h, w, nhwc, stream);
    case ptfast::kBiasReluBFloat16:
      return ptfast::forward<__nv_bfloat16>(z, bias, out, argmax, n, c, h, w, nhwc, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t ptfast_pool_relu_backward(const void* grad, const void* out, const uint8_t* argmax,
                                                 void* g_conv, float* dbias, int64_t n, int64_t c, int64_t h,
                                                 int64_t w, int layout, int dtype, cudaStream_t stream) {
  if (ptfast::bad_args(n, c, h, w, layout)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0 || c == 0 || h / 2 == 0 || w / 2 == 0) {
    if (dbias != nullptr && c > 0) {
      return cudaMemsetAsync(dbias, 0, static_cast<size_t>(c) * sizeof(float), stream);
    }
    return cudaSuccess;
  }
  if (grad == nullptr || out == nullptr || argmax == nullptr || g_conv == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool nhwc = layout == ptfast::kBiasReluNHWC;
  switch (dtype) {
    case ptfast::kBiasReluFloat32:
      return ptfast::backward<float>(grad, out, argmax, g_conv, dbias, n, c, h, w, nhwc, stream);
    case ptfast::kBiasReluFloat16:
      return ptfast::backward<__half>(grad, out, argmax, g_conv, dbias, n, c, h, w, nhwc, stream);
    case ptfast::kBiasReluBFloat16:
      return ptfast::backward<__nv_bfloat16>(grad, out, argmax, g_conv, dbias, n, c, h, w, nhwc, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
