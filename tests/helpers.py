"""Shared test utilities: the low-precision accuracy rule of docs/design.md §5, its attention yardstick, and dispatch
assertions."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of x against the float64 reference (NaN-aware: NaN must match NaN)."""
    x64, r64 = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    nan_x, nan_r = torch.isnan(x64), torch.isnan(r64)
    assert torch.equal(nan_x, nan_r), "NaN pattern differs from the reference"
    x64, r64 = x64.masked_fill(nan_x, 0.0), r64.masked_fill(nan_r, 0.0)
    denom = torch.linalg.vector_norm(r64).item()
    num = torch.linalg.vector_norm(x64 - r64).item()
    return num / denom if denom > 0 else num


def assert_rule(ours: torch.Tensor, torch_same_dtype: torch.Tensor, oracle: torch.Tensor, what: str = "") -> None:
    """err(ours) <= 2 * err(PyTorch's own op in the same dtype) + 1e-5 (errors against the float64 oracle)."""
    e_ours, e_torch = rel_err(ours, oracle), rel_err(torch_same_dtype, oracle)
    assert e_ours <= 2 * e_torch + 1e-5, f"{what}: err {e_ours:.3e} > 2 * torch err {e_torch:.3e} + 1e-5"


def assert_close64(ours: torch.Tensor, oracle: torch.Tensor, what: str = "", tol: float | None = None) -> None:
    """Tight check for float32/float64 results against the float64 oracle."""
    if tol is None:
        tol = 1e-10 if ours.dtype == torch.float64 else 2e-5
    e = rel_err(ours, oracle)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def assert_ran(events: Iterable[tuple[str, str, str]], op: str, backend: str, phases=("forward",)) -> None:
    """The recorded dispatch events show ``op`` ran on ``backend`` for every phase listed."""
    events = list(events)
    for phase in phases:
        assert (op, backend, phase) in events, f"expected {op}/{backend}/{phase} to run, saw {events}"


def ran_the_op(out: torch.Tensor) -> bool:
    """Whether a ptfast op's own autograd Function made ``out`` (an explicit backend, or where auto's CPU routes
    step aside) rather than one of auto's CPU routes of PyTorch's differentiable ops."""
    return type(out.grad_fn).__name__.endswith("_eagerBackward")


def autograd_node_names(node) -> list[str]:
    """The class names of the autograd nodes reachable from ``node`` (a tensor's ``grad_fn``), itself first."""
    names, todo = [], [node]
    while todo:
        n = todo.pop()
        if n is not None:
            names.append(type(n).__name__)
            todo.extend(next_fn for next_fn, _ in n.next_functions)
    return names


def fallback_warnings(caught) -> list[str]:
    """The messages of the ptfast.FallbackWarnings among warnings caught with ``warnings.catch_warnings``."""
    import ptfast

    return [str(w.message) for w in caught if issubclass(w.category, ptfast.FallbackWarning)]


def peak_rss_growth_bytes(fn) -> int:
    """How far the process's peak resident memory rises above its current size while ``fn()`` runs (Linux).

    Writing "5" to /proc/self/clear_refs resets the peak (VmHWM) to the current resident size, so the reading
    is this call's own peak, not the process's history.
    """

    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def conv_inputs(n, cin, cout, h, w, k, dtype, fmt, with_bias, seed=0):
    """(x, weight, bias) for conv tests: drawn in float64 from a seeded generator, rounded to ``dtype``, x in
    memory format ``fmt``, all requiring grad; weight scaled by 1/sqrt(fan-in)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=gen)
    weight = torch.randn(cout, cin, k, k, dtype=torch.float64, generator=gen) / (cin * k * k) ** 0.5
    bias = torch.randn(cout, dtype=torch.float64, generator=gen) if with_bias else None
    x = x.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
    bias = bias.to(dtype).requires_grad_() if with_bias else None
    return x, weight, bias


def conv_params(x, weight, bias):
    """The leaves a conv test differentiates: x, weight and (when present) bias."""
    return [x, weight] + ([bias] if bias is not None else [])


def sdpa_same_dtype(q, k, v, attn_mask=None, key_mask=None, is_causal=False, scale=None, dropout_p=0.0, keep=None):
    """PyTorch's own attention in q's dtype on q's device: the yardstick of the low-precision rule.

    Every mask becomes one additive mask; dropout runs SDPA's math path with the oracle's exact keep mask; rows with
    no admissible key are neutralized and zeroed (as the contract demands); no keys at all gives zeros.
    """
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if q.numel() == 0 or lk == 0:
        return torch.zeros(b, h, lq, v.shape[-1], dtype=q.dtype, device=q.device)
    m = torch.zeros(1, 1, lq, lk, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        m = m.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else m + attn_mask.to(q.dtype)
    if key_mask is not None:
        m = m.masked_fill(~key_mask[:, None, None, :], -math.inf)
    if is_causal:
        m = m.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(), -math.inf)
    valid = (m != -math.inf).any(-1, keepdim=True)
    m = m.masked_fill(~valid, 0.0)
    if dropout_p > 0:
        keep = keep.to(q.device).expand(b, h, lq, lk)
        out = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, m, dropout_p, False, keep, scale=scale)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m.expand(b, h, lq, lk), scale=scale)
    return out * valid
