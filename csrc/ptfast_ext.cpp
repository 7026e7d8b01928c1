// Torch binding of the ptfast CUDA kernels: the Python module `ptfast._C` (built by setup.py when CUDA is
// available; see ptfast/backends/cuda/__init__.py for how it is loaded).
//
// Every entry point checks device, dtype, shape and layout here, before any launch, so a kernel only ever
// sees the layouts it was written for; launches go on the current CUDA stream of the tensor's device.

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "bias_relu/bias_relu.cuh"
#include "bias_relu_pool/bias_relu_pool.cuh"

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
      TORCH_CHECK(false, "ptfast._C.bias_relu: y must be float32, float16 or bfloat16, got ", t);
  }
  return -1;  // unreachable
}

// True when `a` addresses each element at the offset `b` does: a and b have one shape (the caller checks) and
// every dim of size > 1 has the same stride (a size-1 dim's stride is never used to address anything).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) {
    return false;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// out <- max(y + bias[c] + residual, 0); y is (N, C, H, W), contiguous in NCHW or channels_last; residual
// (optional) has y's shape, dtype and layout; out is y itself (in place) or a new tensor laid out like y.
at::Tensor bias_relu_into(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool inplace) {
  TORCH_CHECK(y.is_cuda(), "ptfast._C.bias_relu: y must be a CUDA tensor, got ", y.device());
  TORCH_CHECK(y.dim() == 4, "ptfast._C.bias_relu: y must be 4-D (N, C, H, W), got shape ", y.sizes());
  const int dtype = bias_relu_dtype(y.scalar_type());
  // A tensor that is contiguous both ways (C == 1 or H * W == 1) reads the same memory either way; prefer NCHW.
  int layout;
  if (y.is_contiguous()) {
    layout = ptfast::kBiasReluNCHW;
  } else if (y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    layout = ptfast::kBiasReluNHWC;
  } else {
    TORCH_CHECK(false, "ptfast._C.bias_relu: y must be contiguous in NCHW or channels_last, got strides ",
                y.strides());
  }
  const int64_t c = y.size(1);
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == y.device(), "ptfast._C.bias_relu: bias is on ", b.device(), " but y is on ",
                y.device());
    TORCH_CHECK(b.scalar_type() == y.scalar_type(), "ptfast._C.bias_relu: bias has dtype ", b.scalar_type(),
                " but y has ", y.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == c, "ptfast._C.bias_relu: bias must have shape (", c,
                ",), got ", b.sizes());
    TORCH_CHECK(b.is_contiguous(), "ptfast._C.bias_relu: bias must be contiguous");
    bias_ptr = b.data_ptr();
  }
  const void* residual_ptr = nullptr;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device() == y.device(), "ptfast._C.bias_relu: residual is on ", r.device(), " but y is on ",
                y.device());
    TORCH_CHECK(r.scalar_type() == y.scalar_type(), "ptfast._C.bias_relu: residual has dtype ", r.scalar_type(),
                " but y has ", y.scalar_type());
    TORCH_CHECK(r.sizes() == y.sizes(), "ptfast._C.bias_relu: residual must have y's shape ", y.sizes(), ", got ",
                r.sizes());
    TORCH_CHECK(same_layout(r, y), "ptfast._C.bias_relu: residual must have y's strides ", y.strides(),
                " (in every dim of size > 1), got ", r.strides());
    residual_ptr = r.data_ptr();
  }
  const auto format = layout == ptfast::kBiasReluNHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = inplace ? y : at::empty_like(y, y.options(), format);
  if (y.numel() == 0) {
    return out;
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  const cudaError_t err = ptfast_bias_relu(y.data_ptr(), out.data_ptr(), bias_ptr, residual_ptr, y.size(0), c,
                                           y.size(2) * y.size(3), layout, dtype, stream);
  TORCH_CHECK(err == cudaSuccess, "ptfast._C.bias_relu: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor bias_relu_(at::Tensor y, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  return bias_relu_into(y, bias, residual, /*inplace=*/true);
}

at::Tensor bias_relu(const at::Tensor& y, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual) {
  return bias_relu_into(y, bias, residual, /*inplace=*/false);
}

// The layout of a 4-D tensor contiguous in NCHW or channels_last (NCHW when both hold: same memory).
int layout_of(const at::Tensor& t, const char* what) {
  if (t.is_contiguous()) {
    return ptfast::kBiasReluNCHW;
  }
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "ptfast._C: ", what,
              " must be contiguous in NCHW or channels_last, got strides ", t.strides());
  return ptfast::kBiasReluNHWC;
}

at::MemoryFormat memory_format_of(int layout) {
  return layout == ptfast::kBiasReluNHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// (out, argmax): relu(maxpool2x2(round(z + bias[c]))) and the uint8 window offset of the first maximum
// (an empty uint8 tensor when need_argmax is false). z: (N, C, H, W) conv output without bias.
std::tuple<at::Tensor, at::Tensor> bias_relu_pool(const at::Tensor& z, const std::optional<at::Tensor>& bias,
                                                  bool need_argmax) {
  TORCH_CHECK(z.is_cuda(), "ptfast._C.bias_relu_pool: z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 4, "ptfast._C.bias_relu_pool: z must be 4-D (N, C, H, W), got shape ", z.sizes());
  const int dtype = bias_relu_dtype(z.scalar_type());
  const int layout = layout_of(z, "z");
  const int64_t n = z.size(0), c = z.size(1), h = z.size(2), w = z.size(3);
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device() == z.device() && b.scalar_type() == z.scalar_type() && b.dim() == 1 && b.size(0) == c &&
                    b.is_contiguous(),
                "ptfast._C.bias_relu_pool: bias must be a contiguous (", c, ",) tensor of z's dtype and device");
    bias_ptr = b.data_ptr();
  }
  const auto fmt = memory_format_of(layout);
  at::Tensor out = at::empty({n, c, h / 2, w / 2}, z.options().memory_format(fmt));
  at::Tensor argmax = need_argmax ? at::empty({n, c, h / 2, w / 2}, z.options().dtype(at::kByte).memory_format(fmt))
                                  : at::empty({0}, z.options().dtype(at::kByte));
  if (out.numel() == 0) {
    return {out, argmax};
  }
  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const cudaError_t err =
      ptfast_bias_relu_pool(z.data_ptr(), bias_ptr, out.data_ptr(),
                            need_argmax ? argmax.data_ptr<uint8_t>() : nullptr, n, c, h, w, layout, dtype, stream);
  TORCH_CHECK(err == cudaSuccess, "ptfast._C.bias_relu_pool: kernel launch failed: ", cudaGetErrorString(err));
  return {out, argmax};
}

// (g_conv, dbias): the gradient w.r.t. the conv output (N, C, H, W) rebuilt from the pooled (grad, out, argmax),
// and the bias gradient (C,) in grad's dtype (summed in fp32; an empty tensor when need_dbias is false).
std::tuple<at::Tensor, at::Tensor> pool_relu_backward(const at::Tensor& grad, const at::Tensor& out,
                                                      const at::Tensor& argmax, int64_t h, int64_t w,
                                                      bool need_dbias) {
  TORCH_CHECK(grad.is_cuda() && out.is_cuda() && argmax.is_cuda(),
              "ptfast._C.pool_relu_backward: grad, out and argmax must be CUDA tensors");
  TORCH_CHECK(out.dim() == 4 && grad.sizes() == out.sizes() && argmax.sizes() == out.sizes(),
              "ptfast._C.pool_relu_backward: grad ", grad.sizes(), ", out ", out.sizes(), " and argmax ",
              argmax.sizes(), " must have one 4-D shape");
  TORCH_CHECK(grad.scalar_type() == out.scalar_type() && argmax.scalar_type() == at::kByte,
              "ptfast._C.pool_relu_backward: grad and out must share a dtype and argmax must be uint8");
  TORCH_CHECK(h >= 0 && w >= 0 && h / 2 == out.size(2) && w / 2 == out.size(3),
              "ptfast._C.pool_relu_backward: conv output size (", h, ", ", w, ") does not pool to ", out.sizes());
  const int dtype = bias_relu_dtype(out.scalar_type());
  const int layout = layout_of(out, "out");
  const auto fmt = memory_format_of(layout);
  TORCH_CHECK(layout_of(argmax, "argmax") == layout,
              "ptfast._C.pool_relu_backward: argmax must have out's memory format");
  const at::Tensor g = grad.contiguous(fmt);  // autograd may hand any strides
  const int64_t n = out.size(0), c = out.size(1);
  // at::empty, not at::zeros: zeros drops the memory format of its options and returns NCHW, into which the
  // kernel's channels_last offsets would scatter the gradient (seen on the first GPU run, odd sizes only).
  at::Tensor g_conv = at::empty({n, c, h, w}, out.options().memory_format(fmt));
  TORCH_CHECK(layout_of(g_conv, "g_conv") == layout, "ptfast._C.pool_relu_backward: g_conv lost out's layout");
  if (h % 2 || w % 2) {
    g_conv.zero_();  // the kernel writes every 2x2 window; rows/columns the pool floored away must be 0
  }
  at::Tensor dbias = need_dbias ? at::empty({c}, out.options().dtype(at::kFloat)) : at::empty({0}, out.options());
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  const cudaError_t err = ptfast_pool_relu_backward(
      g.data_ptr(), out.data_ptr(), argmax.data_ptr<uint8_t>(), g_conv.data_ptr(),
      need_dbias ? dbias.data_ptr<float>() : nullptr, n, c, h, w, layout, dtype, stream);
  TORCH_CHECK(err == cudaSuccess, "ptfast._C.pool_relu_backward: kernel launch failed: ", cudaGetErrorString(err));
  return {g_conv, need_dbias ? dbias.to(out.scalar_type()) : dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptfast CUDA kernels (optional extension; see ptfast.backends.cuda)";
  m.def("bias_relu_", &bias_relu_,
        "In place y = relu(y + bias[c] + residual) for NCHW / channels_last CUDA tensors (residual: y's layout)",
        pybind11::arg("y"), pybind11::arg("bias") = pybind11::none(), pybind11::arg("residual") = pybind11::none());
  m.def("bias_relu", &bias_relu,
        "relu(y + bias[c] + residual) into a new tensor laid out like y (NCHW / channels_last CUDA tensors)",
        pybind11::arg("y"), pybind11::arg("bias") = pybind11::none(), pybind11::arg("residual") = pybind11::none());
  m.def("bias_relu_pool", &bias_relu_pool,
        "(out, argmax) = fused bias + ReLU + 2x2 max-pool (+ uint8 argmax) of a conv output, NCHW or channels_last",
        pybind11::arg("z"), pybind11::arg("bias") = pybind11::none(), pybind11::arg("need_argmax") = true);
  m.def("pool_relu_backward", &pool_relu_backward,
        "(g_conv, dbias): conv-output gradient rebuilt from pooled (grad, out, argmax), and the bias gradient",
        pybind11::arg("grad"), pybind11::arg("out"), pybind11::arg("argmax"), pybind11::arg("h"),
        pybind11::arg("w"), pybind11::arg("need_dbias") = true);
}
