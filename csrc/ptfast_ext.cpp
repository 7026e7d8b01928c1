// Torch binding of the ptfast CUDA kernels: the Python module `ptfast._C` (built by setup.py when CUDA is
// available; see ptfast/backends/cuda/__init__.py for how it is loaded).
//
// Every entry point checks device, dtype, shape and layout here, before any launch, so a kernel only ever
// sees the layouts it was written for; launches go on the current CUDA stream of the tensor's device.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "bias_relu/bias_relu.cuh"

namespace {

int bias_relu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ptfast::kBiasReluFloat32;
    case at::kHalf:
      return ptfast::kBiasReluFloat16;
    case at::kBFloat16:
      return ptfast::kBiasReluBFloat16;
    default:
      TORCH_CHECK(false, "ptfast._C.bias_relu_: y must be float32, float16 or bfloat16, got ", t);
  }
  return -1;  // unreachable
}

// y <- max(y + bias[c], 0) in place; y is (N, C, H, W), contiguous in NCHW or channels_last.
at::Tensor bias_relu_(at::Tensor y, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.is_cuda(), "ptfast._C.bias_relu_: y must be a CUDA tensor, got ", y.device());
  TORCH_CHECK(y.dim() == 4, "ptfast._C.bias_relu_: y must be 4-D (N, C, H, W), got shape ", y.sizes());
  const int dtype = bias_relu_dtype(y.scalar_type());
  // A tensor that is contiguous both ways (C == 1 or H * W == 1) reads the same memory either way; prefer NCHW.
  int layout;
  if (y.is_contiguous()) {
    layout = ptfast::kBiasReluNCHW;
  } else if (y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    layout = ptfast::kBiasReluNHWC;
  } else {
    TORCH_CHECK(false, "ptfast._C.bias_relu_: y must be contiguous in NCHW or channels_last, got strides ",
                y.strides());
  }
  const int64_t c = y.size(1);
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == y.device(), "ptfast._C.bias_relu_: bias is on ", b.device(), " but y is on ",
                y.device());
    TORCH_CHECK(b.scalar_type() == y.scalar_type(), "ptfast._C.bias_relu_: bias has dtype ", b.scalar_type(),
                " but y has ", y.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == c, "ptfast._C.bias_relu_: bias must have shape (", c,
                ",), got ", b.sizes());
    TORCH_CHECK(b.is_contiguous(), "ptfast._C.bias_relu_: bias must be contiguous");
    bias_ptr = b.data_ptr();
  }
  if (y.numel() == 0) {
    return y;
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  const cudaError_t err = ptfast_bias_relu_inplace(y.data_ptr(), bias_ptr, y.size(0), c, y.size(2) * y.size(3),
                                                   layout, dtype, stream);
  TORCH_CHECK(err == cudaSuccess, "ptfast._C.bias_relu_: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptfast CUDA kernels (optional extension; see ptfast.backends.cuda)";
  m.def("bias_relu_", &bias_relu_, "In place y = relu(y + bias[c]) for NCHW / channels_last CUDA tensors",
        pybind11::arg("y"), pybind11::arg("bias") = pybind11::none());
}
