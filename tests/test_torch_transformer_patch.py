"""Patching PyTorch's ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` (CPU, torch backend).

Each patched module is checked against a stock deep copy made before patching, with dropout 0 so both compute
the same function: outputs and every parameter gradient (fp32, ~1e-5), three AdamW steps, for batch_first
True/False, norm_first True/False, relu / gelu / a callable activation, with and without the final ``norm``, and
every mask form (bool / float key padding, causal with ``is_causal``, bool / float ``(L, L)`` and ``(B*H, L, L)``
masks, combinations). Odd sizes (L=13, d_model=40, nhead=5, dim_feedforward=56, batch 3).

A fully padded sequence: ptfast returns 0 from the attention there (a finite output); PyTorch's SDPA path does the
same on torch 2.13's CPU kernels, other PyTorch paths give NaN (its bool masks become -inf additive masks). The
other sequences are compared with the stock model run on the batch without that sequence (sequences of a batch
are independent), outputs and gradients, and the whole batch with the stock model where that is finite.

Also: ptfast really ran (``record_dispatch``) in train mode, eval mode and under ``torch.no_grad`` with a model
for which PyTorch's own fast paths apply (even head count, batch_first, padding: checked to be taken by the
stock copy), dropout, bf16 autocast, ``.to(dtype)`` before / after patching, idempotence, hooks, what is left
alone and why, state_dict keys and Parameter objects, checkpoints, deepcopy, ``torch.save``, ``nn.Transformer``,
unbatched input, mask validation and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptfast
from ptfast.integrations.torch_transformer import (
    PatchedTransformerEncoder,
    PatchedTransformerEncoderLayer,
    patch_encoders,
)
from ptfast.testing import record_dispatch
from tests.helpers import assert_ran

pytestmark = pytest.mark.filterwarnings(
    # The stock modules warn when a bool and a float mask are mixed, and when enable_nested_tensor cannot apply.
    "ignore:Support for mismatched:UserWarning",
    "ignore:enable_nested_tensor is True:UserWarning",
    "ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning",
)

B, L, E, NHEAD, FF = 3, 13, 40, 5, 56
ATOL = RTOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def _single_threaded() -> Iterator[None]:
    # Tiny models: intra-op threads only add synchronization on a loaded 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_backend() -> Iterator[None]:
    with ptfast.use_backend("torch"):
        yield


def _swish(x: torch.Tensor) -> torch.Tensor:  # a module-level callable: picklable
    return x * torch.sigmoid(x)


def _encoder(
    batch_first: bool = True,
    norm_first: bool = False,
    activation: str | Callable = "relu",
    final_norm: bool = True,
    dropout: float = 0.0,
    nhead: int = NHEAD,
    d_model: int = E,
    layers: int = 2,
    **kw,
) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model, nhead, FF, dropout, activation=activation, batch_first=batch_first, norm_first=norm_first, **kw
    )
    enc = nn.TransformerEncoder(
        layer, layers, norm=nn.LayerNorm(d_model) if final_norm else None, enable_nested_tensor=False
    )
    with torch.no_grad():  # the stock init zeroes the biases: make them count
        for name, p in enc.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return enc


def _pair(**kw) -> tuple[nn.Module, nn.Module]:
    """(stock model, patched deep copy) with the same weights."""
    torch.manual_seed(0)
    stock = _encoder(**kw)
    ours = copy.deepcopy(stock)
    replaced: list[str] = []
    skipped: list[str] = []
    patch_encoders(ours, replaced, skipped)
    assert len(replaced) == 1 + len(stock.layers) and not skipped, (replaced, skipped)
    return stock, ours


def _src(batch_first: bool, b: int = B, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, L, E, generator=g, dtype=dtype)
    return x if batch_first else x.transpose(0, 1).contiguous()


def _padding(b: int = B) -> torch.Tensor:
    """Bool key padding mask, True = padding: right padding on row 0, a hole in row 2."""
    kpm = torch.zeros(b, L, dtype=torch.bool)
    kpm[0, 9:] = True
    kpm[b - 1, 3:5] = True
    return kpm


def _fwd_bwd(model: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None, *, params_of=None, **kw):
    """(output, {name: grad}) for loss = sum(output * weight); grads named after ``params_of`` (default model)."""
    params_of = model if params_of is None else params_of
    params_of.zero_grad(set_to_none=True)
    out = model(x, **kw)
    if weight is None:
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in params_of.named_parameters() if p.grad is not None}


def _assert_same(ours, ref, atol: float = ATOL, rtol: float = RTOL) -> None:
    out_o, g_o = ours
    out_r, g_r = ref
    torch.testing.assert_close(out_o, out_r, atol=atol, rtol=rtol)
    assert g_o.keys() == g_r.keys() and len(g_r) > 10
    for name, g in g_r.items():
        torch.testing.assert_close(g_o[name], g, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


# --- parity with the stock modules --------------------------------------------------------------------------


@pytest.mark.parametrize("final_norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("activation", ["relu", "gelu", _swish], ids=["relu", "gelu", "callable"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_configs_match_stock_with_padding(batch_first, norm_first, activation, final_norm) -> None:
    stock, ours = _pair(batch_first=batch_first, norm_first=norm_first, activation=activation, final_norm=final_norm)
    x, kpm = _src(batch_first), _padding()
    with record_dispatch() as events:
        got = _fwd_bwd(ours, x, src_key_padding_mask=kpm)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    _assert_same(got, _fwd_bwd(stock, x, src_key_padding_mask=kpm))


def _masks(kind: str, nhead: int = NHEAD) -> dict:
    """Keyword arguments of the encoder's forward for each mask form under test."""
    g = torch.Generator().manual_seed(3)
    kpm = _padding()
    float_pad = torch.zeros(B, L).masked_fill(kpm, float("-inf"))
    float_pad[1] = torch.randn(L, generator=g)  # a soft (finite) additive bias on one row
    causal = nn.Transformer.generate_square_subsequent_mask(L)  # float: 0 / -inf
    blocked = torch.rand(L, L, generator=g) < 0.3  # bool, True = NOT allowed
    blocked.fill_diagonal_(False)  # every query keeps a key
    per_head = torch.rand(B * nhead, L, L, generator=g) < 0.3
    per_head[:, torch.arange(L), torch.arange(L)] = False
    soft = torch.randn(L, L, generator=g)
    return {
        "none": {},
        "bool_padding": dict(src_key_padding_mask=kpm),
        "float_padding": dict(src_key_padding_mask=float_pad),
        "causal_hint": dict(mask=causal, is_causal=True),
        "causal_hint_padding": dict(mask=causal, is_causal=True, src_key_padding_mask=kpm),
        "causal_no_hint": dict(mask=causal),
        "bool_mask": dict(mask=blocked),
        "bool_mask_bool_padding": dict(mask=blocked, src_key_padding_mask=kpm),
        "bool_mask_float_padding": dict(mask=blocked, src_key_padding_mask=float_pad),
        "float_mask_bool_padding": dict(mask=soft, src_key_padding_mask=kpm),
        "float_mask_float_padding": dict(mask=soft, src_key_padding_mask=float_pad),
        "per_head_bool": dict(mask=per_head, src_key_padding_mask=kpm),
        "per_head_float": dict(mask=torch.randn(B * nhead, L, L, generator=g), src_key_padding_mask=float_pad),
    }[kind]


MASK_KINDS = [
    "none", "bool_padding", "float_padding", "causal_hint", "causal_hint_padding", "causal_no_hint", "bool_mask",
    "bool_mask_bool_padding", "bool_mask_float_padding", "float_mask_bool_padding", "float_mask_float_padding",
    "per_head_bool", "per_head_float",
]  # fmt: skip


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_forms_match_stock(kind, batch_first) -> None:
    stock, ours = _pair(batch_first=batch_first, norm_first=kind.startswith("causal"))
    x, kw = _src(batch_first), _masks(kind)
    _assert_same(_fwd_bwd(ours, x, **kw), _fwd_bwd(stock, x, **kw))


def test_single_layer_masks_match_stock() -> None:
    """The layer alone (stock signature: src_mask, src_key_padding_mask, is_causal), bool and float masks."""
    stock, ours = _pair(layers=1)
    stock, ours = stock.layers[0], ours.layers[0]
    assert type(ours) is PatchedTransformerEncoderLayer
    x = _src(True)
    for kind in ("bool_padding", "float_mask_bool_padding", "causal_hint_padding", "per_head_bool"):
        kw = _masks(kind)
        kw["src_mask"] = kw.pop("mask", None)
        _assert_same(_fwd_bwd(ours, x, **kw), _fwd_bwd(stock, x, **kw))


def test_adamw_steps_match_stock() -> None:
    for batch_first, norm_first in ((True, False), (False, True)):
        stock, ours = _pair(batch_first=batch_first, norm_first=norm_first, activation="gelu")
        opt_s = torch.optim.AdamW(stock.parameters(), lr=1e-2)
        opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-2)
        x, kpm = _src(batch_first), _padding()
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        for step in range(3):
            losses = []
            for model, opt in ((stock, opt_s), (ours, opt_o)):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(model(x, src_key_padding_mask=kpm), target)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), f"step {step}: {losses}"
        for (n, p_s), p_o in zip(stock.named_parameters(), ours.parameters(), strict=True):
            if n.endswith("in_proj_bias"):
                # The key bias cannot change a softmax: its gradient is rounding noise (~1e-9), which Adam's
                # normalization turns into lr-sized steps of random sign. Compare the query and value biases.
                p_s, p_o = torch.cat([p_s[:E], p_s[2 * E :]]), torch.cat([p_o[:E], p_o[2 * E :]])
            torch.testing.assert_close(p_o, p_s, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_fully_padded_sequence_is_finite_and_the_rest_matches_stock() -> None:
    stock, ours = _pair()
    x, kpm = _src(True), _padding()
    kpm[1] = True  # sequence 1 is all padding
    keep = torch.tensor([0, 2])
    weight = torch.randn(B, L, E, generator=torch.Generator().manual_seed(5))
    weight[1] = 0  # the loss ignores the fully padded sequence
    out, grads = _fwd_bwd(ours, x, weight, src_key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    # Sequences are independent: the others must match the stock model run without the padded one.
    ref = _fwd_bwd(stock, x[keep], weight[keep], src_key_padding_mask=kpm[keep])
    _assert_same((out[keep], grads), ref)
    # PyTorch's SDPA path returns 0 for fully masked rows on torch 2.13's CPU kernels (like ptfast); where a
    # PyTorch path returns NaN there instead, only the other sequences are comparable.
    with torch.no_grad():
        full = stock(x, src_key_padding_mask=kpm)
    if not torch.isnan(full).any():
        torch.testing.assert_close(out, full, atol=ATOL, rtol=RTOL)


def test_bf16_autocast_forward_backward() -> None:
    stock, ours = _pair(norm_first=True)
    x, kpm = _src(True), _padding()
    ref = _fwd_bwd(stock, x, src_key_padding_mask=kpm)  # fp32 reference
    with torch.autocast("cpu", dtype=torch.bfloat16), record_dispatch() as events:
        out, grads = _fwd_bwd(ours, x, src_key_padding_mask=kpm)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    assert torch.isfinite(out).all()
    assert (out.float() - ref[0]).abs().max() < 0.15
    for name, g in ref[1].items():
        assert torch.isfinite(grads[name]).all()
        assert torch.linalg.vector_norm(grads[name].float() - g) <= 0.1 * torch.linalg.vector_norm(g) + 1e-3, name


@pytest.mark.parametrize("when", ["before", "after"])
def test_dtype_conversion_before_or_after_patching(when) -> None:
    torch.manual_seed(0)
    stock = _encoder(norm_first=True).double()
    ours = copy.deepcopy(stock).float()
    if when == "before":
        ours.double()
    patch_encoders(ours, [], [])
    if when == "after":
        ours.double()
    x, kpm = _src(True, dtype=torch.float64), _padding()
    _assert_same(_fwd_bwd(ours, x, src_key_padding_mask=kpm), _fwd_bwd(stock, x, src_key_padding_mask=kpm), 1e-10)


# --- ptfast really runs: PyTorch's fast paths are never taken ----------------------------------------------


def _fast_path_pair() -> tuple[nn.Module, nn.Module]:
    """A model for which both stock fast paths apply in eval / no grad (even heads, batch_first, relu)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 4, FF, 0.0, batch_first=True)
    stock = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    assert stock.use_nested_tensor
    ours = copy.deepcopy(stock)
    patch_encoders(ours, [], [])
    return stock.eval(), ours.eval()


def test_ptfast_runs_in_train_eval_and_no_grad() -> None:
    stock, ours = _fast_path_pair()
    x = _src(True)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, 9:] = True  # right padding only: left aligned, so the stock nested-tensor path applies
    real = ~kpm

    with torch.no_grad():
        ref = stock(x, src_key_padding_mask=kpm)
        assert (ref[0, 9:] == 0).all()  # the stock nested-tensor path ran (zeros at padded positions)
        with record_dispatch() as events:
            got = ours(x, src_key_padding_mask=kpm)
    assert_ran(events, "attention", "torch", ("forward",))
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    # Padded positions hold the stock off-fast-path values (training mode / with grad), not zeros.
    stock.train()
    torch.testing.assert_close(got, stock(x, src_key_padding_mask=kpm).detach(), atol=1e-5, rtol=1e-5)
    stock.eval()

    with record_dispatch() as events:  # eval mode with grad
        ours(x, src_key_padding_mask=kpm).sum().backward()
    assert_ran(events, "attention", "torch", ("forward", "backward"))

    ours.train()
    with record_dispatch() as events:
        ours(x, src_key_padding_mask=kpm).sum().backward()
    assert_ran(events, "attention", "torch", ("forward", "backward"))

    # A patched layer on its own, eval + no grad (the stock layer's torch._transformer_encoder_layer_fwd path).
    layer = ours.layers[0].eval()
    with torch.no_grad(), record_dispatch() as events:
        got = layer(x, src_key_padding_mask=kpm)
        ref = stock.layers[0](x, src_key_padding_mask=kpm)
    assert events == [("attention", "torch", "forward")]
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def test_dropout_in_training() -> None:
    stock, ours = _pair(dropout=0.3)
    x, kpm = _src(True), _padding()
    stock.eval()
    ours.eval()  # eval mode: no dropout anywhere, so the stock model computes the same (with grad: no fast path)
    _assert_same(_fwd_bwd(ours, x, src_key_padding_mask=kpm), _fwd_bwd(stock, x, src_key_padding_mask=kpm))
    with torch.no_grad():
        ref = ours(x, src_key_padding_mask=kpm)
    ours.train()
    torch.manual_seed(7)
    with record_dispatch() as events:
        out = ours(x, src_key_padding_mask=kpm)
        out.sum().backward()
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x, src_key_padding_mask=kpm), out, atol=0, rtol=0)  # same seed, same output


# --- module structure, checkpoints, idempotence, what is left alone ----------------------------------------


def test_structure_state_dict_and_parameters_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_encoder(), nn.Linear(E, 7))
    keys = list(model.state_dict().keys())
    params = [id(p) for p in model.parameters()]
    names = [n for n, _ in model.named_modules()]
    replaced: list[str] = []
    patch_encoders(model, replaced, [], prefix="net.")
    assert replaced[0] == "net.0.layers.0: TransformerEncoderLayer -> ptfast attention"
    assert replaced[-1].startswith("net.0: TransformerEncoder -> ptfast")
    assert list(model.state_dict().keys()) == keys
    assert [id(p) for p in model.parameters()] == params
    assert [n for n, _ in model.named_modules()] == names
    enc = model[0]
    assert isinstance(enc, nn.TransformerEncoder) and type(enc) is PatchedTransformerEncoder
    assert all(isinstance(m, nn.TransformerEncoderLayer) for m in enc.layers)
    assert all(type(m) is PatchedTransformerEncoderLayer for m in enc.layers)


def test_checkpoints_deepcopy_and_pickle() -> None:
    stock, ours = _pair(activation=_swish)
    x, kpm = _src(True), _padding()
    with torch.no_grad():
        ref = ours(x, src_key_padding_mask=kpm)

    # state_dict both ways (a checkpoint of either loads into the other)
    fresh = _encoder(activation=_swish)
    fresh.load_state_dict(ours.state_dict())
    ours.load_state_dict(stock.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, src_key_padding_mask=kpm), ref, atol=1e-5, rtol=1e-5)

    for clone in (copy.deepcopy(ours), _save_load(ours)):
        assert type(clone) is PatchedTransformerEncoder
        assert all(type(m) is PatchedTransformerEncoderLayer for m in clone.layers)
        with torch.no_grad(), record_dispatch() as events:
            torch.testing.assert_close(clone(x, src_key_padding_mask=kpm), ref, atol=0, rtol=0)
        assert_ran(events, "attention", "torch")


def _save_load(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_idempotent() -> None:
    _, ours = _pair()
    params = [id(p) for p in ours.parameters()]
    replaced: list[str] = []
    skipped: list[str] = []
    patch_encoders(ours, replaced, skipped)
    assert replaced == []
    assert skipped == [
        "layers.0 (TransformerEncoderLayer): already patched",
        "layers.1 (TransformerEncoderLayer): already patched",
        "<root> (TransformerEncoder): already patched",
    ]
    assert [id(p) for p in ours.parameters()] == params
    assert type(ours) is PatchedTransformerEncoder


def test_hooks_are_respected() -> None:
    torch.manual_seed(0)
    stock = _encoder(layers=3)
    ours = copy.deepcopy(stock)
    seen: list[str] = []
    for model in (stock, ours):
        model.layers[0].register_forward_hook(lambda m, i, o: seen.append("layer0"))
        model.layers[1].self_attn.register_forward_hook(lambda m, i, o: seen.append("attn1"))
    replaced: list[str] = []
    skipped: list[str] = []
    patch_encoders(ours, replaced, skipped)
    assert skipped == [
        "layers.0 (TransformerEncoderLayer): a hook is registered on the layer",
        "layers.1 (TransformerEncoderLayer): a hook is registered on self_attn (the patched layer computes attention "
        "without calling it)",
    ]
    assert [r.split(":")[0] for r in replaced] == ["layers.2", "<root>"]
    assert [type(m) for m in ours.layers] == [nn.TransformerEncoderLayer] * 2 + [PatchedTransformerEncoderLayer]
    x, kpm = _src(True), _padding()
    with record_dispatch() as events:
        got = _fwd_bwd(ours, x, src_key_padding_mask=kpm)
    assert seen == ["layer0", "attn1"]
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    _assert_same(got, _fwd_bwd(stock, x, src_key_padding_mask=kpm))

    # A hook put on self_attn after patching fires: that layer then runs the stock forward.
    seen.clear()
    ours.layers[2].self_attn.register_forward_hook(lambda m, i, o: seen.append("attn2"))
    with record_dispatch() as events:
        ours(x, src_key_padding_mask=kpm)
    assert seen == ["layer0", "attn1", "attn2"] and events == []

    # An encoder with a hook is kept stock (its hook fires), its layers are patched.
    torch.manual_seed(0)
    hooked = _encoder()
    hooked.register_forward_pre_hook(lambda m, a: seen.append("encoder"))
    skipped.clear()
    patch_encoders(hooked, [], skipped)
    assert type(hooked) is nn.TransformerEncoder and skipped[0].startswith("<root> (TransformerEncoder): a hook")
    assert all(type(m) is PatchedTransformerEncoderLayer for m in hooked.layers)
    with record_dispatch() as events:
        hooked(x, src_key_padding_mask=kpm)
    assert "encoder" in seen and events == [("attention", "torch", "forward")] * 2


class _MyLayer(nn.TransformerEncoderLayer):
    pass


class _MyAttention(nn.MultiheadAttention):
    pass


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: _MyLayer(E, NHEAD, FF, 0.0), "a subclass (_MyLayer) of TransformerEncoderLayer"),
        (lambda: _with_attention(_MyAttention(E, NHEAD)), "self_attn is a _MyAttention"),
        (lambda: _with_attention(nn.MultiheadAttention(E, NHEAD, add_bias_kv=True)), "self_attn uses add_bias_kv"),
        (lambda: _with_attention(nn.MultiheadAttention(E, NHEAD, add_zero_attn=True)), "self_attn uses add_zero_attn"),
    ],
    ids=["subclass", "attention_subclass", "add_bias_kv", "add_zero_attn"],
)
def test_unsupported_layers_are_left_alone(make, reason) -> None:
    layer = make()
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    replaced: list[str] = []
    skipped: list[str] = []
    patch_encoders(enc, replaced, skipped)
    assert replaced == []
    assert skipped[0].startswith(f"layers.0 (TransformerEncoderLayer): {reason}"), skipped
    assert skipped[-1] == (
        "<root> (TransformerEncoder): none of its layers could be patched (kept stock, nested-tensor fast path "
        "included)"
    )
    assert type(enc) is nn.TransformerEncoder


def _with_attention(attn: nn.MultiheadAttention) -> nn.TransformerEncoderLayer:
    layer = nn.TransformerEncoderLayer(E, NHEAD, FF, 0.0)
    layer.self_attn = attn
    return layer


def test_encoder_runs_unpatched_layers_stock() -> None:
    """A stock layer put into a patched encoder afterwards runs as in the stock encoder."""
    stock, ours = _pair(layers=3)
    ours.layers[1] = copy.deepcopy(stock.layers[1])
    x, kw = _src(True), _masks("bool_mask_bool_padding")
    with record_dispatch() as events:
        got = _fwd_bwd(ours, x, **kw)
    assert events.count(("attention", "torch", "forward")) == 2
    _assert_same(got, _fwd_bwd(stock, x, **kw))


def test_nn_transformer_and_unbatched_input() -> None:
    torch.manual_seed(0)
    stock = nn.Transformer(E, 4, 2, 1, FF, 0.0, batch_first=True)
    ours = copy.deepcopy(stock)
    replaced: list[str] = []
    patch_encoders(ours, replaced, [], prefix="model.")
    assert [r.split(":")[0] for r in replaced] == [
        "model.encoder.layers.0", "model.encoder.layers.1", "model.encoder"
    ]  # fmt: skip
    x, tgt, kpm = _src(True), torch.randn(B, 7, E), _padding()
    _assert_same(
        _fwd_bwd(ours, x, tgt=tgt, src_key_padding_mask=kpm), _fwd_bwd(stock, x, tgt=tgt, src_key_padding_mask=kpm)
    )

    stock_enc, ours_enc = _pair()
    seq = _src(True)[2]  # (L, E)
    for kw in ({}, dict(src_key_padding_mask=_padding()[2]), dict(mask=_masks("bool_mask")["mask"])):
        _assert_same(_fwd_bwd(ours_enc, seq, **kw), _fwd_bwd(stock_enc, seq, **kw))


def test_mask_validation() -> None:
    _, ours = _pair()
    x = _src(True)
    with pytest.raises(ValueError, match=r"src_key_padding_mask must be \(B, L\)"):
        ours(x, src_key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"the 2-D mask must be \(L, L\)"):
        ours(x, mask=torch.zeros(L, L - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"the 3-D mask must be \(B \* nhead, L, L\)"):
        ours(x, mask=torch.zeros(B, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="only bool and floating types"):
        ours(x, src_key_padding_mask=torch.zeros(B, L, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model"):
        ours(torch.randn(B, L, E + 1))


def test_compile_fullgraph_matches_eager() -> None:
    _, ours = _pair(norm_first=True, activation="gelu")
    x, kw = _src(True), _masks("float_mask_bool_padding")
    eager = _fwd_bwd(ours, x, **kw)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with record_dispatch() as events:
        got = _fwd_bwd(compiled, x, params_of=ours, **kw)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    _assert_same(got, eager, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_learned_float_mask_runs_stock() -> None:
    """A float mask that requires grad (a learned bias) gets its gradient: the stock forward runs then."""
    stock, ours = _pair()
    x, kpm = _src(True), _padding()
    grads = []
    for model in (stock, ours):
        bias = torch.randn(L, L, generator=torch.Generator().manual_seed(6)).requires_grad_()
        with record_dispatch() as events:
            got = _fwd_bwd(model, x, mask=bias, src_key_padding_mask=kpm)
        assert events == []
        grads.append((got, bias.grad))
    _assert_same(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=0, rtol=0)
    with torch.no_grad(), record_dispatch() as events:  # no gradient wanted: ptfast runs
        torch.testing.assert_close(ours(x, mask=bias, src_key_padding_mask=kpm), grads[1][0][0], atol=ATOL, rtol=RTOL)
    assert events == [("attention", "torch", "forward")] * 2


def test_ptfast_patch_covers_encoders_and_honours_the_opt_out() -> None:
    # Through the public entry point: attention=True (the default) patches, attention=False leaves them stock.
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(E, NHEAD, dim_feedforward=FF, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

        def forward(self, x, pad):
            return self.encoder(x, src_key_padding_mask=pad)

    torch.manual_seed(0)
    stock = Model()
    ours = ptfast.patch(copy.deepcopy(stock))
    lines = ours.ptfast_patch_report.replaced
    assert sum("TransformerEncoderLayer -> ptfast attention" in line for line in lines) == 2, lines
    assert type(ours.encoder) is PatchedTransformerEncoder
    kept = ptfast.patch(copy.deepcopy(stock), attention=False)
    assert type(kept.encoder) is nn.TransformerEncoder and not kept.ptfast_patch_report.replaced
    x = torch.randn(B, L, E)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, L - 4 :] = True
    with record_dispatch() as events:
        out = ours(x, pad)
    assert ("attention", "torch", "forward") in events
    real = ~pad[..., None]
    torch.testing.assert_close(out * real, stock(x, pad) * real, rtol=2e-5, atol=2e-5)
