"""The providers of the image-classifier training-step benchmarks (``vgg16_train_step``, ``resnet50_frozen_step``,
``resnet18_train_step``): one definition of what "eager", "ptfast[...]" and "compile[...]" run.

Each provider trains its own deep copy of the case's initial model (``inp["model"]``) on
``cross_entropy(model(x), y)`` under the harness's training autocast; ``ptfast`` providers patch the copy with
``ptfast.patch`` and run under ``ptfast.use_backend(...)``, compiled providers wrap it in ``torch.compile``. Only the
optimizer and the words describing the patched model differ between the benchmarks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    TRAIN_MODE,
    Case,
    Inputs,
    Options,
    Provider,
    Skip,
    Step,
    TrainState,
    dropout_free_loss,
    import_ptfast,
    require_compile,
    train_autocast,
    train_check,
    train_state,
    train_step,
)

MakeOptimizer = Callable[[list[torch.nn.Parameter], Options], torch.optim.Optimizer]


def providers(opts: Options, ptfast_desc: str, make_optimizer: MakeOptimizer, optimizer_desc: str) -> list[Provider]:
    """eager, ptfast (auto / triton / cuda) and compile (default / max-autotune) training-step providers.

    ``ptfast_desc``: what ``ptfast.patch`` does to the model (``{backend!r}`` is filled in);
    ``make_optimizer(trainable parameters, opts)``; ``optimizer_desc``: appended to every description."""

    def provider(name: str, backend: str | None, compile_mode: str | None) -> Provider:
        def build(case: Case, inp: Inputs, mode: str) -> Step:
            if mode != TRAIN_MODE:
                raise Skip(f"this op times whole training steps only (mode {TRAIN_MODE!r})")
            if compile_mode is not None:
                require_compile(opts)
                if compile_mode == "max-autotune" and not opts.max_autotune:
                    raise Skip("max-autotune is slow to compile: pass --max-autotune")
            ptfast = import_ptfast() if backend is not None else None

            def context() -> contextlib.ExitStack:
                stack = contextlib.ExitStack()
                stack.enter_context(train_autocast(opts))
                if ptfast is not None:
                    stack.enter_context(ptfast.use_backend(backend))
                return stack

            def make() -> TrainState:
                model = copy.deepcopy(inp["model"])
                if ptfast is not None:
                    ptfast.patch(model)

                def eager_loss(i: Inputs) -> Tensor:
                    return F.cross_entropy(model(i["x"]), i["y"])

                check = None if compile_mode else dropout_free_loss(model, eager_loss, inp, context)
                fn = torch.compile(model, mode=compile_mode, dynamic=False) if compile_mode else model

                def loss(i: Inputs) -> Tensor:
                    return F.cross_entropy(fn(i["x"]), i["y"])

                opt = make_optimizer([q for q in model.parameters() if q.requires_grad], opts)
                return TrainState(model, loss, opt, check)

            state = train_state((name, inp["token"]), make)
            return train_step(state, inp, context)

        if backend is not None:
            desc = ptfast_desc.format(backend=backend)
        elif compile_mode is not None:
            desc = f"torch.compile(model, mode={compile_mode!r}, dynamic=False) (compiled in the untimed first call)"
        else:
            desc = "the stock model, eager, cudnn.benchmark=True"
        return Provider(name, "ptfast" if backend else "pytorch", f"{desc}; {optimizer_desc}", build,
                        canonical=train_check)  # fmt: skip

    return [
        provider("eager", None, None),
        provider("ptfast", "auto", None),
        provider("ptfast[triton]", "triton", None),
        provider("ptfast[cuda]", "cuda", None),
        provider("compile[default]", None, "default"),
        provider("compile[max-autotune]", None, "max-autotune"),
    ]
