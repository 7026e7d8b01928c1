"""The CPU benchmark scripts that CI does not run end to end still run against the current ops (a few calls).

``benchmarks.cpu_call_overhead``: one row per op and mode, each a measured time, and ptfast's calls really take
auto's CPU route (no ptfast Function in the graph), which is what its numbers are about.
``benchmarks.cpu_cnn_layout``: every model in every variant, and each variant is what its name says (layout of the
parameters and images, patched or not).
"""

from __future__ import annotations

import math

import torch

import ptfast
from benchmarks import cpu_call_overhead, cpu_cnn_layout
from ptfast.testing import record_dispatch


def test_cpu_call_overhead_measures_every_op_in_both_modes() -> None:
    rows = cpu_call_overhead.measure(calls=2, repeats=1)
    cases = cpu_call_overhead._cases()
    assert [(name, mode) for name, mode, _s, _p in rows] == [
        (name, mode) for name in cases for mode in ("forward, no_grad", "forward, graph recorded")
    ]
    for _name, _mode, stock_us, ptfast_us in rows:
        assert math.isfinite(stock_us) and stock_us > 0
        assert math.isfinite(ptfast_us) and ptfast_us > 0


def _node_names(out: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def test_cpu_call_overhead_times_the_cpu_route() -> None:
    """The op's own autograd Function (``<op>_eagerBackward``, what an explicit backend runs) is not in the graph."""
    for name, (_stock, ours, leaves) in cpu_call_overhead._cases().items():
        for t in leaves:
            t.requires_grad_(True)
        with record_dispatch() as events:
            out = ours()
        assert {(op, backend) for op, backend, phase in events if phase == "forward"} == {
            (name.split(" ")[0], "torch")
        }, (name, events)
        names = _node_names(out)
        assert names and not any(n.endswith("_eagerBackward") for n in names), (name, names)
        with ptfast.use_backend("torch"):  # the check can fail: the op's Function is found when it runs
            assert any(n.endswith("_eagerBackward") for n in _node_names(ours())), name


def test_cpu_cnn_layout_measures_every_variant() -> None:
    rows = cpu_cnn_layout.measure(rounds=2, inner=1, batch=3, width=4)
    names = list(cpu_cnn_layout._models(4))
    assert [(m, v) for m, v, *_ in rows] == [(m, v) for m in names for v in cpu_cnn_layout.VARIANTS]
    for _m, variant, ms, ratio, lo, hi in rows:
        assert math.isfinite(ms) and ms > 0 and lo <= ratio <= hi
        if variant == "stock NCHW":
            assert ratio == 1.0


def test_cpu_cnn_layout_variants_are_what_they_say() -> None:
    for make in cpu_cnn_layout._models(4).values():
        base = make()
        for variant, (model, x) in cpu_cnn_layout.variants(base, torch.randn(2, 1, 32, 32)).items():
            fmt = torch.channels_last if variant.endswith("channels_last") else torch.contiguous_format
            convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
            assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs), variant
            assert x.is_contiguous(memory_format=fmt)
            patched = any(type(m).__module__.startswith("ptfast.nn") for m in model.modules())
            assert patched == variant.startswith("ptfast"), variant
            assert model is not base
