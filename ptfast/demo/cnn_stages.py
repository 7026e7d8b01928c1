"""The demo's CNN stages on scikit-learn's digits, stock and ``ptfast.patch`` side by side (see :mod:`.workflow`).

3. a VGG in torchvision's layout (``features`` as an ``nn.Sequential``): pretrained on digits 0-4, then a new
   10-way head with the backbone frozen, then everything unfrozen;
4. a hand-written VGG (seed workflow 4: one attribute per conv / ReLU / pool, ``x.view(x.size(0), -1)``, three
   ``nn.Linear``) trained from scratch with SGD + momentum;
5. a ResNet in torchvision's layout (seed workflows 2 and 3): pretrained on digits 0-4 in ``train()``, then a new
   ``fc`` trained with the backbone frozen (``requires_grad=False``, backbone in ``eval()``: the patched twin folds
   each BatchNorm into its convolution and runs conv + BatchNorm (+ residual) + ReLU as one ``ptfast.conv_relu``),
   then everything unfrozen in ``train()`` (BatchNorm on batch statistics: the patched twin runs the stock conv and
   BatchNorm math, and each block's residual add + ReLU as one ``ptfast.add_relu``; on a CPU, where that is stock's
   own composition, its blocks run their stock forward).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptfast.demo import data as D
from ptfast.demo.models import VGG, AttributeVGG, ResNet, set_dropout
from ptfast.demo.training import NAMES, STAGE_TITLES, Env, Phase, Stage, accuracy, adamw, make_twins, train_side_by_side


@dataclass
class Digits:
    """The digits images on the run's device, in its memory format."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    fmt: torch.memory_format
    summary: str

    def batches(self, pool: torch.Tensor, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
        """``steps`` batches of indices into the training set, drawn from ``pool``."""
        draws = D.classification_batches(len(pool), batch, steps, seed)
        return [pool[torch.tensor(idx, device=pool.device)] for idx in draws]

    def loss_on(self, batches: list[torch.Tensor]):
        return lambda model, i: F.cross_entropy(
            model(self.x_train[batches[i]].contiguous(memory_format=self.fmt)), self.y_train[batches[i]]
        )

    def test_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x_test[i : i + 256], self.y_test[i : i + 256]) for i in range(0, len(self.y_test), 256)]


def load_digits(env: Env, size: dict) -> Digits:
    x_train, y_train, x_test, y_test = D.load_digits_images(size["image"], env.seed)
    fmt = torch.channels_last if env.channels_last else torch.contiguous_format
    summary = (
        f"data: scikit-learn digits (1,797 8x8 images) upscaled to {size['image']}x{size['image']}, split per class "
        f"{len(y_train)} train / {len(y_test)} test; batch {size['cnn_batch']}"
        + (", channels_last" if env.channels_last else "")
    )
    return Digits(
        x_train.to(env.device).contiguous(memory_format=fmt), y_train.to(env.device),
        x_test.to(env.device).contiguous(memory_format=fmt), y_test.to(env.device), fmt, summary,
    )  # fmt: skip


def _sgd(lr: float):
    """SGD with momentum 0.9 and weight decay 5e-4 over the trainable parameters (the CIFAR-10 tutorials' choice)."""
    return lambda model: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=5e-4
    )


def _n_params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"


# --- stage 3: VGG in torchvision's layout ---------------------------------------------------------------------


def stage_cnn(env: Env, size: dict, steps: tuple[int, ...]) -> Stage:
    stage = Stage("cnn", STAGE_TITLES["cnn"])
    parity_steps, pre_steps, frozen_steps, unfrozen_steps = steps[0], steps[3], steps[4], steps[5]
    data = load_digits(env, size)
    half = (data.y_train < 5).nonzero().squeeze(1)
    everything = torch.arange(len(data.y_train), device=env.device)
    bs, lrs = size["cnn_batch"], size["cnn_lr"]
    torch.manual_seed(env.seed + 3)
    init = VGG(size["cnn"], num_classes=5, hidden=size["cnn_hidden"]).to(env.device, memory_format=data.fmt)
    new_head = nn.Linear(init.classifier[-1].in_features, 10).to(env.device)
    test_batches = data.test_batches()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in init.features)
    stage.details += [
        f"VGG layout built in code: features {size['cnn']} ({n_conv} Conv2d 3x3 + ReLU, 'M' = MaxPool2d(2, 2)), "
        f"avgpool (2, 2), classifier Linear-ReLU-Dropout(0.5) x2 + Linear; {_n_params(init)}",
        data.summary,
        f"schedule: {pre_steps} steps on digits 0-4 (5-way head, AdamW {lrs[0]}), new 10-way head, {frozen_steps} "
        f"steps with the backbone frozen (head only, AdamW {lrs[1]}), {unfrozen_steps} steps unfrozen (AdamW {lrs[2]});"
        " each with 10% warmup then linear decay",
    ]

    def run(phase: Phase, models: dict[str, nn.Module], counts: tuple[int, int, int], amp: bool, seed: int, tag: str):
        sched = tag == ""
        pre = data.batches(half, bs, counts[0], env.seed + 10)
        fine = data.batches(everything, bs, counts[1] + counts[2], env.seed + 11)
        train_side_by_side(
            env, stage, phase, f"pretrain 0-4{tag}", models, adamw(lrs[0]), counts[0], data.loss_on(pre), amp=amp,
            seed=seed, schedule=sched,
        )  # fmt: skip
        for model in models.values():
            model.classifier[-1] = copy.deepcopy(new_head)
            model.features.requires_grad_(False)
        train_side_by_side(
            env, stage, phase, f"frozen backbone{tag}", models, adamw(lrs[1]), counts[1], data.loss_on(fine),
            amp=amp, seed=seed + 10_000, schedule=sched,
        )  # fmt: skip
        frozen_acc = {n: accuracy(env, models[n], test_batches) for n in NAMES}
        for model in models.values():
            model.features.requires_grad_(True)
        train_side_by_side(
            env, stage, phase, f"unfrozen{tag}", models, adamw(lrs[2]), counts[2], data.loss_on(fine[counts[1] :]),
            amp=amp, seed=seed + 20_000, schedule=sched,
        )  # fmt: skip
        return frozen_acc

    parity_stock = copy.deepcopy(init)
    set_dropout(parity_stock, 0.0)
    with env.exact_fp32():
        run(
            stage.parity, make_twins(env, parity_stock, stage), (parity_steps,) * 3, False, env.seed * 1000 + 2,
            " (parity)",
        )  # fmt: skip
    del parity_stock
    models = make_twins(env, init, stage, record=False)
    frozen_acc = run(stage.main, models, (pre_steps, frozen_steps, unfrozen_steps), True, env.seed * 1000 + 700_000, "")
    stage.metrics["test accuracy after the frozen phase"] = frozen_acc
    stage.metrics["test accuracy"] = {n: accuracy(env, models[n], test_batches) for n in NAMES}
    stage.baselines["test accuracy"] = ("chance", 0.1)
    return stage


# --- stage 4: a hand-written VGG ------------------------------------------------------------------------------


def stage_vgg_attr(env: Env, size: dict, steps: tuple[int, ...]) -> Stage:
    stage = Stage("vgg_attr", STAGE_TITLES["vgg_attr"], main_note="no dropout in this model")
    parity_steps, train_steps = steps[0], steps[6]
    data = load_digits(env, size)
    everything = torch.arange(len(data.y_train), device=env.device)
    bs, lr = size["cnn_batch"], size["vgg_lr"]
    torch.manual_seed(env.seed + 4)
    init = AttributeVGG(size["vgg_widths"], 10, in_channels=1, image=size["image"], hidden=size["vgg_hidden"])
    init = init.to(env.device, memory_format=data.fmt)
    test_batches = data.test_batches()
    stage.details += [
        f"hand-written VGG (seed workflow 4): five stages `self.pool{{i}}(self.relu{{i}}(self.conv{{i}}(x)))` of "
        f"Conv2d 3x3 (widths {', '.join(map(str, size['vgg_widths']))}) / ReLU(inplace=True) / MaxPool2d(2, 2), each "
        f"layer its own attribute; then `x.view(x.size(0), -1)`, fc1-ReLU-fc2-ReLU-fc3 (hidden "
        f"{size['vgg_hidden']}); PyTorch's default initialisation; {_n_params(init)}",
        data.summary,
        f"schedule: {train_steps} steps from scratch on digits 0-9, cross-entropy, AdamW lr {lr}, 10% warmup then "
        "linear decay (SGD + momentum did not train this default-initialised, BatchNorm-free stack in so few steps); "
        "the model has no dropout, so the training phase runs the same computation as the parity phase (with bf16 "
        "autocast on CUDA)",
    ]
    pool = data.batches(everything, bs, max(parity_steps, train_steps), env.seed + 12)
    with env.exact_fp32():
        train_side_by_side(
            env, stage, stage.parity, "parity (fp32)", make_twins(env, copy.deepcopy(init), stage), adamw(lr),
            parity_steps, data.loss_on(pool), amp=False, seed=env.seed * 1000 + 3, schedule=False,
        )  # fmt: skip
    models = make_twins(env, init, stage, record=False)
    train_side_by_side(
        env, stage, stage.main, "train", models, adamw(lr), train_steps, data.loss_on(pool), amp=True,
        seed=env.seed * 1000 + 800_000,
    )  # fmt: skip
    stage.metrics["test accuracy"] = {n: accuracy(env, models[n], test_batches) for n in NAMES}
    stage.baselines["test accuracy"] = ("chance", 0.1)
    return stage


# --- stage 5: a ResNet, frozen then unfrozen --------------------------------------------------------------------


def _freeze_backbone(model: nn.Module) -> None:
    """Seed workflow 3: every parameter but the new ``fc``'s frozen, the backbone in ``eval()``."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    model.eval()


def _unfreeze(model: nn.Module) -> None:
    model.requires_grad_(True)
    model.train()


def _merged(stage: Stage, sub_phase: str) -> Counter:
    """ptfast ops of the patched twin in one sub-phase, parity and training runs together."""
    out: Counter = Counter()
    for label, counts in stage.phase_dispatch.items():
        if label.removesuffix(" (parity)") == sub_phase:
            out.update(counts)
    return out


def _conv_ops(counts: Counter, kind: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for (op, backend, k), n in counts.items():
        if op.startswith("conv") and k == kind:
            found[f"{op} ({backend})"] = found.get(f"{op} ({backend})", 0) + n
    return found


def _fmt_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))


def _folding_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the patched model's fused conv + BatchNorm modules (stem, downsample) that fold their BatchNorm in
    the next forward (``uses_folded_bn()``), and of those that do not."""
    yes, no = [], []
    for name, m in model.named_modules():
        if callable(getattr(m, "uses_folded_bn", None)):
            (yes if m.uses_folded_bn() else no).append(name)
    return yes, no


def _bn_findings(stage: Stage, steps: tuple[int, int], modules: tuple[list[str], list[str]]) -> None:
    """What the dispatch record (and the fused modules' own state) shows about the BatchNorms, per sub-phase."""
    frozen = _merged(stage, "frozen backbone")
    fwd, bwd = _conv_ops(frozen, "forward"), _conv_ops(frozen, "backward")
    folding, not_folding = modules
    folded = bool(fwd) and not bwd and not not_folding
    stage.checks["bn_folded_in_frozen_phase"] = folded
    n_steps = sum(steps)
    per_step = ", ".join(f"{n / n_steps:g}" for n in fwd.values())
    if folded:
        stage.details.append(
            f"frozen phase (backbone in eval(), BatchNorm on its running statistics): BatchNorm folded into the "
            f"convolutions. The patched twin ran {_fmt_ops(fwd)} forward ({per_step} per step over {steps[0]} parity "
            f"+ {steps[1]} training steps): each conv -> BatchNorm -> [+ residual] -> ReLU chain as one call with the "
            "BatchNorm folded into the conv's weight and bias; no conv backward (the frozen backbone needs no "
            f"gradients). The fused conv + BatchNorm modules ({', '.join(folding)}) reported uses_folded_bn() = True "
            "in this phase (the downsample ones run one folded F.conv2d, which is no ptfast op)"
        )
    else:
        stage.details.append(
            "frozen phase: the dispatch record does NOT show the folded BatchNorm path (ptfast conv ops forward: "
            f"{_fmt_ops(fwd) or 'none'}; backward: {_fmt_ops(bwd) or 'none'})"
        )
    train_mode = _merged(stage, "pretrain 0-4") + _merged(stage, "unfrozen")
    conv_in_train = {**_conv_ops(train_mode, "forward"), **_conv_ops(train_mode, "backward")}
    tails = {f"add_relu ({b})": n for (op, b, k), n in train_mode.items() if op == "add_relu" and k == "forward"}
    stage.checks["stock_bn_math_in_train_mode"] = not conv_in_train
    stage.details.append(
        "pretrain and unfrozen phases (train(), BatchNorm on batch statistics, which cannot be folded): "
        + (
            "no ptfast conv op ran: the patched blocks ran their own convolutions and BatchNorms (stock math, "
            "running statistics updated as stock), "
            + (
                f"then each block's residual add + ReLU as one ptfast.add_relu ({_fmt_ops(tails)})"
                if tails
                else "and their stock add + ReLU (on a CPU, with nothing to fold or pool, a fused block runs its "
                "stock forward: ptfast's add_relu is stock's add + ReLU there, and the plan would only add Python)"
            )
            if not conv_in_train
            else f"ptfast conv ops ran: {_fmt_ops(conv_in_train)}"
        )
    )


def stage_resnet(env: Env, size: dict, steps: tuple[int, ...]) -> Stage:
    stage = Stage("resnet", STAGE_TITLES["resnet"], main_note="no dropout in this model; bf16 autocast on CUDA")
    parity_steps, pre_steps, frozen_steps, unfrozen_steps = steps[0], steps[7], steps[8], steps[9]
    data = load_digits(env, size)
    half = (data.y_train < 5).nonzero().squeeze(1)
    everything = torch.arange(len(data.y_train), device=env.device)
    bs, lrs, width = size["cnn_batch"], size["resnet_lr"], size["resnet_width"]
    torch.manual_seed(env.seed + 5)
    init = ResNet(size["resnet_layers"], 5, width=width, in_channels=1).to(env.device, memory_format=data.fmt)
    new_fc = nn.Linear(init.fc.in_features, 10).to(env.device)
    test_batches = data.test_batches()
    stage.details += [
        f"ResNet in torchvision's layout, built in code: conv1 7x7/2 - bn1 - relu - maxpool 3x3/2, layer1..layer4 "
        f"of {', '.join(map(str, size['resnet_layers']))} BasicBlock(s) (conv1 bn1 relu conv2 bn2 downsample, "
        f"`out += identity` before the last ReLU; widths {width}, {2 * width}, {4 * width}, {8 * width}; 1x1/2 conv "
        f"+ BatchNorm downsample), avgpool, fc; torchvision's initialisation; 1 input channel; {_n_params(init)}",
        data.summary,
        f"schedule: {pre_steps} steps on digits 0-4 in train() (5-way fc, SGD lr {lrs[0]}), then `model.fc = "
        f"nn.Linear(..., 10)`, {frozen_steps} steps with every other parameter `requires_grad=False` and the model "
        f"in eval() (only fc in the optimizer, SGD lr {lrs[1]}), then {unfrozen_steps} steps unfrozen in train() "
        f"(SGD lr {lrs[2]}); SGD momentum 0.9, weight decay 5e-4, 10% warmup then linear decay per phase; "
        "CrossEntropyLoss; test accuracy under torch.no_grad() in eval()",
    ]

    def run(phase: Phase, models: dict[str, nn.Module], counts: tuple[int, int, int], amp: bool, seed: int, tag: str):
        sched = tag == ""
        pre = data.batches(half, bs, counts[0], env.seed + 20)
        fine = data.batches(everything, bs, counts[1] + counts[2], env.seed + 21)
        for model in models.values():
            model.train()
        train_side_by_side(
            env, stage, phase, f"pretrain 0-4{tag}", models, _sgd(lrs[0]), counts[0], data.loss_on(pre), amp=amp,
            seed=seed, schedule=sched,
        )  # fmt: skip
        for model in models.values():
            model.fc = copy.deepcopy(new_fc)
            _freeze_backbone(model)
        folding.update(zip(("yes", "no"), _folding_modules(models["ptfast"]), strict=True))
        train_side_by_side(
            env, stage, phase, f"frozen backbone{tag}", models, _sgd(lrs[1]), counts[1], data.loss_on(fine),
            amp=amp, seed=seed + 10_000, schedule=sched,
        )  # fmt: skip
        frozen_acc = {n: accuracy(env, models[n], test_batches) for n in NAMES}
        for model in models.values():
            _unfreeze(model)
        train_side_by_side(
            env, stage, phase, f"unfrozen{tag}", models, _sgd(lrs[2]), counts[2], data.loss_on(fine[counts[1] :]),
            amp=amp, seed=seed + 20_000, schedule=sched,
        )  # fmt: skip
        return frozen_acc

    folding: dict[str, list[str]] = {}
    with env.exact_fp32():
        run(
            stage.parity, make_twins(env, copy.deepcopy(init), stage), (parity_steps,) * 3, False, env.seed * 1000 + 4,
            " (parity)",
        )  # fmt: skip
    models = make_twins(env, init, stage, record=False)
    frozen_acc = run(stage.main, models, (pre_steps, frozen_steps, unfrozen_steps), True, env.seed * 1000 + 900_000, "")
    stage.metrics["test accuracy after the frozen phase"] = frozen_acc
    stage.metrics["test accuracy"] = {n: accuracy(env, models[n], test_batches) for n in NAMES}
    stage.baselines["test accuracy"] = ("chance", 0.1)
    _bn_findings(stage, (parity_steps, frozen_steps), (folding["yes"], folding["no"]))
    return stage
