"""One registered ptfast op: its ``torch.library`` definition, and the same body called directly in eager mode.

Every op is defined once (:class:`RegisteredOp`): the schema comes from the body's annotations, the fake kernel
and the autograd formula are registered on the ``torch.library`` op, which is what ``torch.compile``, ``opcheck``,
``torch.export`` and dispatch modes see. A plain eager call does not need the dispatcher's round trip, which costs
a ptfast op tens of microseconds of host time per call (measured on CPU: ``add_relu`` on a small tensor, 26 us
through ``torch.ops`` against 4 us for its body; another ~30 us for the op's autograd wrapper). That is as much as
a small layer's whole kernel time, on a CPU and on a GPU alike. So an eager call runs the body itself, inside a
``torch.autograd.Function`` made of the same ``setup_context`` and ``backward`` when a gradient is needed.

The direct path is taken only where it is the same computation: not while compiling or tracing (dynamo, a
dispatch mode such as FakeTensorMode or FlopCounterMode, functorch transforms) and only for plain tensors
(``Tensor`` / ``Parameter``, not subclasses); everything else goes through the registered op. Backward ops have no
autograd formula of their own: under ``create_graph=True`` they too go through the registered op, which says so
rather than differentiating a kernel silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)


def transforms_active() -> bool:
    try:
        return bool(torch._C._are_functorch_transforms_active())
    except AttributeError:  # pragma: no cover - every supported torch has it; be safe if one drops it
        return True


def direct_call_allowed(args: tuple[Any, ...]) -> bool:
    """Whether an eager call may run an op's body directly (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or transforms_active():
        return False
    for a in args:  # a loop, not all(<generator>): this runs on every eager call
        if a is not None and type(a) not in _PLAIN and isinstance(a, Tensor):
            return False
    return True


class RegisteredOp:
    """``torch.library.custom_op(qualname, impl)`` plus the direct eager call of ``impl``.

    Call it like the op: ``CONV_RELU(x, weight, ...)``. ``register_fake`` and ``register_autograd`` register on the
    library op (and the latter also builds the eager ``autograd.Function``).
    """

    def __init__(self, qualname: str, impl: Callable[..., Any]) -> None:
        self.op = torch.library.custom_op(qualname, impl, mutates_args=())
        namespace, name = qualname.split("::")
        self.overload = getattr(getattr(torch.ops, namespace), name).default
        self.impl = impl
        self._function: type[torch.autograd.Function] | None = None

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., None]) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        # forward(ctx, ...) rather than a separate setup_context staticmethod: the latter form costs ~35 us more
        # per call (measured, torch 2.13 on CPU), most of what this class exists to save.
        def forward(ctx: Any, *args: Any) -> Any:
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(
            f"{self.overload.__name__.split('.')[0]}_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args: Any) -> Any:
        if not direct_call_allowed(args):
            return self.overload(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            if self._function is None:  # a backward op under create_graph=True: no formula for it
                return self.overload(*args)
            return self._function.apply(*args)
        return self.impl(*args)
