// Fused conv epilogue with 2x2 max-pooling: bias + ReLU + max-pool + 1-byte argmax, and its backward.
//
// Host-only header (no device code, no torch headers), included by the torch binding and by the kernels' own
// translation unit. Layout and dtype enums are the ones of bias_relu.cuh.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../bias_relu/bias_relu.cuh"

extern "C" {

// Forward, on `stream`. z: the conv output, logical (n, c, h, w), WITHOUT bias, laid out as `layout` says.
// For every pooled element (n, c, i, j), i < h / 2, j < w / 2 (odd sizes floor like nn.MaxPool2d(2, 2)):
//   v_k = round_to_dtype(z[n, c, 2i + k / 2, 2j + k % 2] + bias[c]), k = 0..3 (row-major in the window)
//   out = relu(max_k v_k)        (max: first maximum; a NaN wins and the first NaN is taken, like torch.max)
//   argmax = that k              (only written when argmax != nullptr)
// out and argmax have logical shape (n, c, h / 2, w / 2) and the same layout as z. bias may be nullptr.
// Returns cudaErrorInvalidValue for bad arguments, else the launch status. Launches nothing when out is empty.
cudaError_t ptfast_bias_relu_pool(const void* z, const void* bias, void* out, uint8_t* argmax, int64_t n,
                                  int64_t c, int64_t h, int64_t w, int layout, int dtype, cudaStream_t stream);

// Backward, on `stream`. grad, out, argmax: logical (n, c, h / 2, w / 2), layout `layout`; g_conv: logical
// (n, c, h, w), same layout. Writes, for every pooled element, its 2x2 window of g_conv: grad at the argmax
// position if out > 0 (the ReLU mask at the argmax), 0 at the three others. Rows/columns the pool floored
// away are NOT written (the caller zero-fills g_conv when h or w is odd).
// If dbias != nullptr (fp32, c elements), also writes dbias[c] = sum over (n, i, j) of grad * (out > 0),
// summed in a fixed order (bitwise reproducible).
cudaError_t ptfast_pool_relu_backward(const void* grad, const void* out, const uint8_t* argmax, void* g_conv,
                                      float* dbias, int64_t n, int64_t c, int64_t h, int64_t w, int layout,
                                      int dtype, cudaStream_t stream);

}  // extern "C"
