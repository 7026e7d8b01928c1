// Fused bias (+ residual) + ReLU: out = max(y + bias[c] + residual, 0), in place (a convolution's epilogue) or into
// a separate tensor of y's layout.
//
// This header is host-only (no device code, no torch headers) so that both the torch binding
// (compiled by the host C++ compiler) and the kernel's own translation unit (nvcc) can include it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ptfast {

// Memory layout of the 4-D tensor y of logical shape (N, C, H, W).
enum BiasReluLayout : int {
  kBiasReluNCHW = 0,  // contiguous: channel index is constant along each H*W plane
  kBiasReluNHWC = 1,  // channels_last: channel index is the innermost (contiguous) index
};

// Element type of y and bias (both must have the same one).
enum BiasReluDtype : int {
  kBiasReluFloat32 = 0,
  kBiasReluFloat16 = 1,
  kBiasReluBFloat16 = 2,
};

}  // namespace ptfast

extern "C" {

// Launches the kernel on `stream`: for every element of y (logical shape (n, c, hw), hw = H * W) computes
// y = max((y + bias[channel]) + residual, 0) in fp32 (added in that order) and rounds once to y's dtype.
// NaN propagates (like torch.relu).
//
// y:        device pointer to n * c * hw elements laid out as `layout` says.
// bias:     device pointer to c elements of the same dtype, or nullptr for no bias.
// residual: device pointer to n * c * hw elements of the same dtype and layout as y (element i of y's memory
//           pairs with element i of residual's: the same linear offsets), or nullptr for no residual. It must
//           not overlap y. Without it the kernel is the residual-free one (no extra loads or arithmetic).
// layout:   a ptfast::BiasReluLayout value; dtype: a ptfast::BiasReluDtype value.
//
// Returns cudaErrorInvalidValue for bad arguments (negative sizes, unknown enum values, null y with
// elements), otherwise the launch status (cudaGetLastError right after the launch). Launches nothing when
// y is empty. Does not synchronize.
cudaError_t ptfast_bias_relu_inplace(void* y, const void* bias, const void* residual, int64_t n, int64_t c,
                                     int64_t hw, int layout, int dtype, cudaStream_t stream);

// As ptfast_bias_relu_inplace, but the result goes to `out` (n * c * hw elements of y's dtype and layout; it may
// be y itself, and must not overlap residual or bias) and y is only read.
cudaError_t ptfast_bias_relu(const void* y, void* out, const void* bias, const void* residual, int64_t n, int64_t c,
                             int64_t hw, int layout, int dtype, cudaStream_t stream);

}  // extern "C"
