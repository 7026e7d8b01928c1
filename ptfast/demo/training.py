"""What every stage of the demo shares: the run's environment, the per-stage results, and training a stock model
and its ``ptfast.patch``-ed twin side by side on the same batches (:func:`train_side_by_side`).

The bottom of the demo's imports: :mod:`.workflow` (the text stages and the command line), :mod:`.cnn_stages`,
:mod:`.report` and :mod:`.plot` import this module, and it imports none of them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

import ptfast
from ptfast.testing import record_dispatch

NAMES = ("stock", "ptfast")
STAGE_TITLES = {
    "pretrain": "1. masked-LM pretraining (BERT, stdlib docstrings)",
    "classify": "2. fine-tuning: which stdlib module is this docstring from?",
    "cnn": "3. VGG-style CNN: pretrain on digits 0-4, fine-tune on 0-9 (frozen, then unfrozen)",
    "vgg_attr": "4. hand-written VGG (one attribute per layer): trained from scratch on digits 0-9",
    "resnet": "5. ResNet (torchvision layout): pretrain on digits 0-4, new fc: backbone frozen (eval), then unfrozen",
}


# --- environment ------------------------------------------------------------------------------------------


@dataclass
class Env:
    device: torch.device
    device_name: str
    amp: bool  # bf16 autocast in the main phases (CUDA)
    channels_last: bool
    progress: bool
    seed: int
    backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self, enabled: bool):
        if enabled and self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def exact_fp32(self):
        """fp32 without TF32 (cuDNN convolutions and matmuls) for the parity phases."""
        if not self.cuda:
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- results ----------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """Per-step losses, step times and (CUDA) peak step memory of both models over one or more sub-phases."""

    losses: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})
    times: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NAMES})
    mem: dict[str, list[int]] = field(default_factory=lambda: {n: [] for n in NAMES})
    boundaries: list[tuple[int, str]] = field(default_factory=list)  # (first step, sub-phase name)
    # Parity phases: per step, the largest gradient difference relative to the stock gradient's largest magnitude
    # (over every parameter tensor), measured on identical weights (see train_side_by_side).
    grad_diffs: list[float] = field(default_factory=list)

    def max_abs_diff(self) -> float:
        a, b = self.losses["stock"], self.losses["ptfast"]
        return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)

    def max_grad_diff(self) -> float:
        return max(self.grad_diffs, default=0.0)


@dataclass
class Stage:
    key: str
    title: str
    parity: Phase = field(default_factory=Phase)
    main: Phase = field(default_factory=Phase)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {stock, ptfast}
    baselines: dict[str, tuple[str, float]] = field(default_factory=dict)  # metric -> (what, value)
    dispatch: dict[str, Counter] = field(default_factory=lambda: {n: Counter() for n in NAMES})
    patch_report: list[str] = field(default_factory=list)
    control_losses: list[float] = field(default_factory=list)  # a stock-only control run, if any
    control_metrics: dict[str, float] = field(default_factory=dict)
    control_what: str = ""
    elapsed: float = 0.0
    details: list[str] = field(default_factory=list)
    # ptfast ops of the patched twin per sub-phase label (train_side_by_side's label), and named yes/no findings
    # a stage derives from them (e.g. the ResNet stage: was the BatchNorm folded in the frozen phase?).
    phase_dispatch: dict[str, Counter] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    main_note: str = "dropout on"  # what the training phase differs from the parity phase by


# --- side-by-side training --------------------------------------------------------------------------------


def _linear_schedule(opt: torch.optim.Optimizer, steps: int, warmup_fraction: float = 0.1, decay: bool = True):
    """Linear warmup over ``warmup_fraction`` of ``steps``, then linear decay to 0 at ``steps`` (or, ``decay=False``,
    the full rate from then on: a run that may continue past ``steps``)."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay:
            return 1.0
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_side_by_side(
    env: Env,
    stage: Stage,
    phase: Phase,
    label: str,
    models: dict[str, nn.Module],
    make_opt,
    steps: int,
    loss_fn,
    *,
    amp: bool,
    seed: int,
    schedule: bool = True,
    decay: bool = True,
) -> dict[str, torch.optim.Optimizer]:
    """Train both models ``steps`` steps on the same batches, alternating which goes first each step; returns the
    optimizers (a run may continue with them).

    Before each model's step the torch seed is set to ``seed + step``, so any random draw starts from the same
    generator state for both; losses, step times and (CUDA) peak step memory are appended to ``phase``.

    In the stage's parity phase, every step starts from identical state: after each step the patched twin gets the
    stock twin's weights, buffers and optimizer state, and the step's gradients are compared first. A parity step
    thus measures what ptfast's ops change in one step (loss and gradients), not how AdamW and many steps amplify
    fp32 rounding differences: where ptfast runs other kernels than stock (the GPU kernels; on a CPU the pooled
    convolutions, which run channels-last), a difference of 1e-7 in the first step grew past 1e-3 by step 18.
    """
    from tqdm.auto import tqdm

    opts = {n: make_opt(models[n]) for n in NAMES}
    scheds = {n: _linear_schedule(opts[n], steps, decay=decay) if schedule else None for n in NAMES}
    phase.boundaries.append((len(phase.losses["stock"]), label))
    bar = tqdm(total=steps, desc=f"{stage.key}: {label}", disable=not env.progress, leave=False, dynamic_ncols=True)
    for i in range(steps):
        for name in NAMES if i % 2 == 0 else NAMES[::-1]:
            model, opt = models[name], opts[name]
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(seed + i)
            if env.cuda:
                env.sync()
                torch.cuda.reset_peak_memory_stats(env.device)
                resident = torch.cuda.memory_allocated(env.device)
            start = time.perf_counter()
            with record_dispatch() as events:
                with env.autocast(amp):
                    loss = loss_fn(model, i)
                loss.backward()
                opt.step()
            value = loss.item()
            env.sync()
            phase.times[name].append(time.perf_counter() - start)
            if env.cuda:
                phase.mem[name].append(torch.cuda.max_memory_allocated(env.device) - resident)
            if scheds[name] is not None:
                scheds[name].step()
            if not math.isfinite(value):
                raise RuntimeError(f"{stage.key} {label}: {name} loss is {value} at step {i}")
            phase.losses[name].append(value)
            stage.dispatch[name].update((op, backend, kind) for op, backend, kind in events)
            if name == "ptfast":
                stage.phase_dispatch.setdefault(label, Counter()).update(events)
        if phase is stage.parity:
            phase.grad_diffs.append(_grad_diff(models))
            _resync(models, opts)
        bar.set_postfix(stock=f"{phase.losses['stock'][-1]:.4f}", ptfast=f"{phase.losses['ptfast'][-1]:.4f}")
        bar.update()
    bar.close()
    return opts


def _grad_diff(models: dict[str, nn.Module]) -> float:
    """max over parameter tensors of max |g_ptfast - g_stock| / max |g_stock|, the denominator floored at 1e-4 of the
    largest stock gradient: a gradient that is zero in exact arithmetic (attention's key bias: softmax ignores a
    shift shared by a row) holds only rounding noise on both twins (measured ~5e-12 against a largest gradient of
    ~0.1-0.3 in the demo's BERT). patch keeps the parameters and their
    order, so the twins' parameter lists correspond."""
    pairs = []
    for p_stock, p_fast in zip(models["stock"].parameters(), models["ptfast"].parameters(), strict=True):
        if p_stock.grad is None and p_fast.grad is None:
            continue
        if p_stock.grad is None or p_fast.grad is None:
            return math.inf  # one twin got a gradient the other did not
        pairs.append((float(p_stock.grad.abs().max()), float((p_fast.grad - p_stock.grad).abs().max())))
    floor = 1e-4 * max((scale for scale, _ in pairs), default=0.0)
    return max((diff / max(scale, floor) if max(scale, floor) > 0 else diff for scale, diff in pairs), default=0.0)


@torch.no_grad()
def _resync(models: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer]) -> None:
    """The patched twin takes the stock twin's weights, buffers and optimizer state (a deep copy: the two optimizers
    must not share state tensors)."""
    stock, fast = models["stock"], models["ptfast"]
    for a, b in zip(fast.parameters(), stock.parameters(), strict=True):
        a.copy_(b)
    for a, b in zip(fast.buffers(), stock.buffers(), strict=True):
        a.copy_(b)
    opts["ptfast"].load_state_dict(copy.deepcopy(opts["stock"].state_dict()))


def train_single(env: Env, model: nn.Module, make_opt, steps: int, loss_fn, *, amp: bool, seed: int, label: str):
    """Train one (stock) model like :func:`train_side_by_side` does; returns its losses."""
    from tqdm.auto import tqdm

    opt = make_opt(model)
    sched = _linear_schedule(opt, steps)
    losses = []
    for i in tqdm(range(steps), desc=label, disable=not env.progress, leave=False, dynamic_ncols=True):
        loss = train_step(env, model, opt, loss_fn, i, amp=amp, seed=seed)
        sched.step()
        losses.append(loss.item())
    return losses


def train_step(
    env: Env, model: nn.Module, opt: torch.optim.Optimizer, loss_fn, i: int, *, amp: bool, seed: int
) -> torch.Tensor:
    """Step ``i`` of a run seeded like :func:`train_side_by_side` (torch seed ``seed + i``); returns the loss."""
    opt.zero_grad(set_to_none=True)
    torch.manual_seed(seed + i)
    with env.autocast(amp):
        loss = loss_fn(model, i)
    loss.backward()
    opt.step()
    return loss


def make_twins(env: Env, stock: nn.Module, stage: Stage, *, record: bool = True) -> dict[str, nn.Module]:
    """The stock model and a deep copy patched with ptfast (same weights); the patch report goes on ``stage``."""
    fast = ptfast.patch(copy.deepcopy(stock))
    if record and not stage.patch_report:
        stage.patch_report = [
            *fast.ptfast_patch_report.replaced,
            *(f"kept: {s}" for s in fast.ptfast_patch_report.skipped),
        ]
    return {"stock": stock, "ptfast": fast}


def adamw(lr: float, weight_decay: float = 0.01):
    return lambda model: torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


# --- evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(env: Env, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    model.eval()
    correct = total = 0
    for *inputs, y in batches:
        with env.autocast(True):
            out = model(*inputs)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    model.train()
    return correct / max(total, 1)
