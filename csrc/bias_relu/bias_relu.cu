// Fused bias (+ residual) + ReLU for NCHW and NHWC (channels_last) tensors: out = max(y + bias[c] + residual, 0),
// in place (out == y: the conv epilogue) or into a separate tensor of y's layout (ptfast.add_relu).
//
// Pure CUDA (no torch headers) so `nvcc -c` compiles it on a machine without a GPU (csrc/compile_check.py).
//
// Both layouts are viewed as a row-major matrix [rows, inner] whose inner dimension is contiguous:
//   NCHW: rows = N * C, inner = H * W, channel = row % C  (one bias value per row)
//   NHWC: rows = N * H * W, inner = C, channel = col      (the bias vector runs along the row)
// so no thread ever divides a 64-bit element index per element (64-bit division is emulated and would make
// this memory-bound kernel compute-bound); NCHW needs one modulo per row.
// The optional residual and out have y's layout (the same linear offsets), so both use y's offset. Whether there is
// one is a template parameter: the residual-free kernel is exactly the bias + ReLU one.
// All index arithmetic is int64: y may hold more than 2^31 elements.
// No vectorized loads: the rows are not 16-byte aligned in general (odd H*W or C), and a scalar loop is
// correct for every size; the kernel is bandwidth-bound either way.

#include "bias_relu.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ptfast {
namespace {

constexpr int kThreadsPerBlock = 256;
// gridDim.y is limited to 65535; gridDim.x to 2^31 - 1 but more blocks than this gain nothing. Both loops
// below are grid-stride loops, so capping the grid never skips elements.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t{1} << 20;

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Thread (threadIdx.x, threadIdx.y) of block (blockIdx.x, blockIdx.y) walks columns blockIdx.x * blockDim.x +
// threadIdx.x (+ k * gridDim.x * blockDim.x) of rows blockIdx.y * blockDim.y + threadIdx.y
// (+ k * gridDim.y * blockDim.y). Consecutive threadIdx.x touch consecutive addresses (coalesced).
// kHasResidual: adds residual (y's layout) after the bias; residual is not read (may be nullptr) without it.
// y and out may be the same memory (no __restrict__ on them): each element is read, then written, by one thread.
template <typename T, bool kChannelIsRow, bool kHasResidual>
__global__ void __launch_bounds__(kThreadsPerBlock)
    bias_relu_kernel(const T* y, T* out, const T* __restrict__ bias, const T* __restrict__ residual, int64_t rows,
                     int64_t inner, int64_t channels) {
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
    const T* row_ptr = y + row * inner;
    T* out_row_ptr = out + row * inner;
    const T* res_row_ptr = kHasResidual ? residual + row * inner : nullptr;
    float row_bias = 0.0f;
    if (kChannelIsRow && bias != nullptr) {
      row_bias = Convert<T>::to_float(bias[row % channels]);
    }
    for (int64_t col = col_begin; col < inner; col += col_step) {
      float b = row_bias;
      if (!kChannelIsRow && bias != nullptr) {
        b = Convert<T>::to_float(bias[col]);
      }
      float v = Convert<T>::to_float(row_ptr[col]) + b;
      if (kHasResidual) {
        v += Convert<T>::to_float(res_row_ptr[col]);
      }
      // `v < 0 ? 0 : v` (not fmaxf) keeps NaN as NaN, like torch.relu.
      out_row_ptr[col] = Convert<T>::from_float(v < 0.0f ? 0.0f : v);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, bool kChannelIsRow>
void launch_kernel(dim3 grid, dim3 block, cudaStream_t stream, const T* y, T* out, const T* bias, const T* residual,
                   int64_t rows, int64_t inner, int64_t channels) {
  if (residual != nullptr) {
    bias_relu_kernel<T, kChannelIsRow, true>
        <<<grid, block, 0, stream>>>(y, out, bias, residual, rows, inner, channels);
  } else {
    bias_relu_kernel<T, kChannelIsRow, false>
        <<<grid, block, 0, stream>>>(y, out, bias, nullptr, rows, inner, channels);
  }
}

template <typename T>
cudaError_t launch(const void* y, void* out, const void* bias, const void* residual, int64_t n, int64_t c, int64_t hw,
                   bool nhwc, cudaStream_t stream) {
  const int64_t rows = nhwc ? n * hw : n * c;
  const int64_t inner = nhwc ? c : hw;
  // As many x-threads as the row needs (rounded to whole warps, at most the whole block); the rest of the
  // block covers more rows, so short rows (small H*W or C) still fill the block.
  const int64_t block_x = inner >= kThreadsPerBlock ? kThreadsPerBlock : ceil_div(inner, 32) * 32;
  const int64_t block_y = kThreadsPerBlock / block_x;
  const dim3 block(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y));
  const int64_t grid_x = ceil_div(inner, block_x) < kMaxGridX ? ceil_div(inner, block_x) : kMaxGridX;
  const int64_t grid_y = ceil_div(rows, block_y) < kMaxGridY ? ceil_div(rows, block_y) : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const T* y_t = static_cast<const T*>(y);
  T* out_t = static_cast<T*>(out);
  const T* bias_t = static_cast<const T*>(bias);
  const T* residual_t = static_cast<const T*>(residual);
  if (nhwc) {
    launch_kernel<T, false>(grid, block, stream, y_t, out_t, bias_t, residual_t, rows, inner, c);
  } else {
    launch_kernel<T, true>(grid, block, stream, y_t, out_t, bias_t, residual_t, rows, inner, c);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace ptfast

extern "C" cudaError_t ptfast_bias_relu(const void* y, void* out, const void* bias, const void* residual, int64_t n,
                                        int64_t c, int64_t hw, int layout, int dtype, cudaStream_t stream) {
  if (n < 0 || c < 0 || hw < 0) {
    return cudaErrorInvalidValue;
  }
  if (layout != ptfast::kBiasReluNCHW && layout != ptfast::kBiasReluNHWC) {
    return cudaErrorInvalidValue;
  }
  if (n == 0 || c == 0 || hw == 0) {
    return cudaSuccess;  // nothing to do; a launch with an empty grid would be an error
  }
  if (y == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool nhwc = layout == ptfast::kBiasReluNHWC;
  switch (dtype) {
    case ptfast::kBiasReluFloat32:
      return ptfast::launch<float>(y, out, bias, residual, n, c, hw, nhwc, stream);
    case ptfast::kBiasReluFloat16:
      return ptfast::launch<__half>(y, out, bias, residual, n, c, hw, nhwc, stream);
    case ptfast::kBiasReluBFloat16:
      return ptfast::launch<__nv_bfloat16>(y, out, bias, residual, n, c, hw, nhwc, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t ptfast_bias_relu_inplace(void* y, const void* bias, const void* residual, int64_t n, int64_t c,
                                                int64_t hw, int layout, int dtype, cudaStream_t stream) {
  return ptfast_bias_relu(y, y, bias, residual, n, c, hw, layout, dtype, stream);
}
