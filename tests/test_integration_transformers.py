"""``attn_implementation="ptfast"`` on tiny random Hugging Face BERT models (CPU, torch backend, float64).

Each ptfast model is checked against the same weights in a stock ``attn_implementation="eager"`` model: hidden
states / logits on real tokens and every parameter gradient, with and without padding of every shape. The
attention function is also called directly to check the mask forms, grouped-query attention, padding-free
(varlen) routing and that keyword arguments it does not implement raise instead of being ignored.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ptfast  # noqa: E402
from ptfast.integrations import transformers as ptfast_hf  # noqa: E402
from ptfast.testing import record_dispatch  # noqa: E402
from tests.helpers import assert_close64, assert_ran  # noqa: E402

VOCAB, HIDDEN, HEADS, HEAD_DIM = 97, 48, 3, 16
TOL = 1e-10  # float64 end to end


@pytest.fixture(scope="module", autouse=True)
def _registered_single_threaded() -> Iterator[None]:
    ptfast_hf.register()
    # The models are tiny: intra-op threads only add synchronization, which on a loaded 2-core CI machine makes
    # each backward 10x slower. One thread keeps this module at a few seconds; the old setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(attn: str, **overrides) -> transformers.BertConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=64, attn_implementation=attn,
    )  # fmt: skip
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def _pair(cls, **overrides):
    """(stock eager model, ptfast model) with identical float64 weights, in eval mode."""
    torch.manual_seed(0)
    ref = cls(_config("eager", **overrides)).double().eval()
    ours = cls(_config("ptfast", **overrides)).double().eval()
    assert ours.config._attn_implementation == "ptfast"
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _mask(kind: str, batch: int, length: int) -> torch.Tensor:
    """HF attention_mask (1 = real token) with the padding pattern ``kind``."""
    m = torch.ones(batch, length, dtype=torch.long)
    if kind == "right":
        m[0, length - 4 :] = 0
        m[1, length - 1 :] = 0
    elif kind == "left":
        m[0, :3] = 0
        m[2, :1] = 0
    elif kind == "holes":
        m[0, 2:5] = 0
        m[1, 0] = 0
        m[1, length - 2 :] = 0
        m[2, length // 2] = 0
    else:
        assert kind == "none"
    return m


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_create_mask_leaves_packed_sequences_to_the_attention_function(batch: int, is_causal: bool) -> None:
    # Given position_ids and no 2-D mask, transformers composes `base AND same packed sequence` (5.17 for causal
    # masks, 5.25 for bidirectional ones too). One packed row must not become a T x T mask: the attention function
    # splits it at cu_seq_lens / restarting positions. Larger batches keep the exact 4-D mask.
    mu = sys.modules["transformers"].masking_utils
    total = sum(LENGTHS)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None].expand(batch, -1)
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    rows = seq[None].expand(batch, -1)
    base = mu.causal_mask_function if is_causal else mu.bidirectional_mask_function
    packed = mu.and_masks(base, mu.packed_sequence_mask_function(rows))
    assert ptfast_hf.packed_sequence_base(packed) is base
    if hasattr(mu, "remap_positions_for_packed_sequence"):  # the 5.25 form
        remapped = mu.and_masks(
            mu.remap_positions_for_packed_sequence(base, pos), mu.packed_sequence_mask_function(rows)
        )
        assert ptfast_hf.packed_sequence_base(remapped) is base
    kw = dict(batch_size=batch, q_length=total, kv_length=total, q_offset=0, kv_offset=0, device="cpu")
    got = ptfast_hf.create_mask(mask_function=packed, attention_mask=None, allow_is_causal_skip=False, **kw)
    if batch == 1:
        assert got is None
    else:
        expected = (seq[:, None] == seq[None, :]) & (
            torch.ones(total, total, dtype=torch.bool).tril() if is_causal else True
        )
        assert got.shape == (batch, 1, total, total) and torch.equal(got[1, 0], expected)
    # What transformers itself composes on this release reaches the same answer (the recognition engages).
    config = _config("ptfast", is_decoder=is_causal)
    embeds = torch.zeros(batch, total, HIDDEN)
    if is_causal:
        built = mu.create_causal_mask(config, embeds, None, None, position_ids=pos)
        assert (built is None) == (batch == 1)
    # Not the packed pattern: other compositions are built in full, never dropped.
    window = mu.and_masks(base, mu.sliding_window_overlay(2))
    assert ptfast_hf.packed_sequence_base(window) is None
    assert ptfast_hf.packed_sequence_base(mu.or_masks(base, mu.packed_sequence_mask_function(rows))) is None
    three = mu.and_masks(base, mu.packed_sequence_mask_function(rows), mu.sliding_window_overlay(2))
    assert ptfast_hf.packed_sequence_base(three) is None
    got = ptfast_hf.create_mask(mask_function=three, attention_mask=None, allow_is_causal_skip=False, **kw)
    assert got is not None and got.shape == (batch, 1, total, total)


def _assert_same_grads(ours: torch.nn.Module | dict, ref: torch.nn.Module | dict) -> None:
    """Every parameter gradient matches to TOL relative to its own norm, with a floor at 1e-6 of the whole
    gradient's norm: some gradients are zero up to rounding (a key bias cannot change a softmax)."""
    g_ours = ours if isinstance(ours, dict) else _grads(ours)
    g_ref = ref if isinstance(ref, dict) else _grads(ref)
    assert g_ours.keys() == g_ref.keys()
    assert len(g_ref) > 10
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in g_ref.values()])).item()
    for name, g in g_ref.items():
        err = torch.linalg.vector_norm(g_ours[name] - g).item()
        bound = TOL * max(torch.linalg.vector_norm(g).item(), 1e-6 * total)
        assert err <= bound, f"grad {name}: error {err:.3e} > {bound:.3e}"


def _run(model, ids, mask, weight=None, **kw):
    """Forward, a loss on real tokens only, backward; returns (hidden states, loss)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    if isinstance(model, transformers.BertForMaskedLM):
        hidden, loss = out.logits, out.loss
    else:
        hidden = out.last_hidden_state
        real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
        loss = (hidden * weight * real[..., None]).sum()
    loss.backward()
    return hidden.detach(), loss.detach()


# --- import and registration ------------------------------------------------------------------------------


def test_import_ptfast_does_not_import_transformers() -> None:
    code = (
        "import sys, ptfast, ptfast.integrations, ptfast.integrations.transformers as m\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "assert not m.is_registered()\n"
        "assert 'transformers' not in sys.modules, 'is_registered imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_is_idempotent_and_visible() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    ptfast_hf.register()
    ptfast_hf.register("ptfast")
    assert ptfast_hf.is_registered()
    assert AttentionInterface()["ptfast"] is ptfast_hf.attention_forward
    assert AttentionMaskInterface()["ptfast"] is ptfast_hf.create_mask
    assert not ptfast_hf.is_registered("ptfast_not_registered_name")
    ptfast_hf.register("ptfast_second_name")
    assert ptfast_hf.is_registered("ptfast_second_name") and ptfast_hf.is_registered()
    with pytest.raises(ValueError, match="non-empty str"):
        ptfast_hf.register("")


def test_old_transformers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # The module ptfast imports: transformers 5.25 replaces its sys.modules entry once a lazy attribute loads, so
    # this file's `transformers` may be an older object by now.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"transformers >= 5\.0"):
        ptfast_hf.register()


# --- whole models against eager ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
@pytest.mark.parametrize("length", [13, 16])
def test_bert_model_matches_eager(padding: str, length: int) -> None:
    ref, ours = _pair(transformers.BertModel)
    ids = torch.randint(1, VOCAB, (3, length))
    mask = _mask(padding, 3, length)
    weight = torch.randn(3, length, HIDDEN, dtype=torch.float64)
    with ptfast.use_backend("torch"), record_dispatch() as events:
        h_ours, loss_ours = _run(ours, ids, mask, weight)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    h_ref, loss_ref = _run(ref, ids, mask, weight)
    real = mask.bool()
    assert_close64(h_ours[real], h_ref[real], "last_hidden_state on real tokens", TOL)
    assert_close64(loss_ours, loss_ref, "loss", TOL)
    _assert_same_grads(ours, ref)


@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
def test_bert_mlm_matches_eager(padding: str) -> None:
    ref, ours = _pair(transformers.BertForMaskedLM)
    ids = torch.randint(1, VOCAB, (3, 13))
    mask = _mask(padding, 3, 13)
    labels = torch.where(mask.bool() & (torch.rand(3, 13) < 0.5), ids, -100)
    labels[0, 0] = ids[0, 0] if mask[0, 0] else -100
    with ptfast.use_backend("torch"), record_dispatch() as events:
        # output_hidden_states reaches the attention function as a kwarg: it must be accepted
        logits_ours, loss_ours = _run(ours, ids, mask, labels=labels, output_hidden_states=True)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    logits_ref, loss_ref = _run(ref, ids, mask, labels=labels, output_hidden_states=True)
    real = mask.bool()
    assert_close64(logits_ours[real], logits_ref[real], "logits on real tokens", TOL)
    assert_close64(loss_ours, loss_ref, "mlm loss", TOL)
    _assert_same_grads(ours, ref)


def test_no_attention_mask_argument_matches_eager() -> None:
    ref, ours = _pair(transformers.BertModel)
    ids = torch.randint(1, VOCAB, (2, 11))
    weight = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    with ptfast.use_backend("torch"):
        h_ours, _ = _run(ours, ids, None, weight)
    h_ref, _ = _run(ref, ids, None, weight)
    assert_close64(h_ours, h_ref, "last_hidden_state", TOL)
    _assert_same_grads(ours, ref)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_causal_decoder_matches_eager(padding: str) -> None:
    # is_decoder=True: causal self-attention (module.is_causal) combined with the key mask.
    ref, ours = _pair(transformers.BertModel, is_decoder=True)
    ids = torch.randint(1, VOCAB, (3, 13))
    mask = _mask(padding, 3, 13)
    weight = torch.randn(3, 13, HIDDEN, dtype=torch.float64)
    with ptfast.use_backend("torch"), record_dispatch() as events:
        h_ours, _ = _run(ours, ids, mask, weight, use_cache=False)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    h_ref, _ = _run(ref, ids, mask, weight, use_cache=False)
    real = mask.bool()
    # Left-padded query rows see no key at all: ptfast returns 0 there, eager a uniform average. Only real
    # tokens are compared and only they feed the loss (pads are never attended to as keys).
    assert_close64(h_ours[real], h_ref[real], "last_hidden_state on real tokens", TOL)
    _assert_same_grads(ours, ref)


def test_kv_cache_decoding_aligns_causal_bottom_right() -> None:
    ref, ours = _pair(transformers.BertModel, is_decoder=True)
    ids = torch.randint(1, VOCAB, (2, 12))
    # transformers 5.25 renamed past_key_values to cache (input and output; the old name warns until 5.40).
    name = "cache" if "cache" in inspect.signature(transformers.BertModel.forward).parameters else "past_key_values"
    results = []
    for model in (ours, ref):
        with torch.no_grad(), ptfast.use_backend("torch"):
            first = model(input_ids=ids[:, :7], use_cache=True)
            chunk = model(input_ids=ids[:, 7:11], **{name: getattr(first, name)}, use_cache=True)  # Lq=4, Lk=11
            step = model(input_ids=ids[:, 11:], **{name: getattr(chunk, name)}, use_cache=True)  # Lq=1, Lk=12
        results.append([first.last_hidden_state, chunk.last_hidden_state, step.last_hidden_state])
    for name, a, b in zip(("prefill", "chunk", "step"), *results, strict=True):
        assert_close64(a, b, f"{name} with KV cache", TOL)
    # and the cached pieces equal one full causal pass
    with torch.no_grad(), ptfast.use_backend("torch"):
        full = ours(input_ids=ids, use_cache=False).last_hidden_state
    assert_close64(torch.cat(results[0], dim=1), full, "cached decoding vs full pass", TOL)


def test_cross_attention_decoder_matches_eager() -> None:
    # Decoder with cross-attention: the encoder padding mask arrives as a (B, L_enc) key mask, Lq != Lk.
    ref, ours = _pair(transformers.BertModel, is_decoder=True, add_cross_attention=True)
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = _mask("right", 2, 9)
    enc = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    enc_mask = torch.ones(2, 6, dtype=torch.long)
    enc_mask[1, 4:] = 0
    weight = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=False)
    with ptfast.use_backend("torch"):
        h_ours, _ = _run(ours, ids, mask, weight, **kw)
    h_ref, _ = _run(ref, ids, mask, weight, **kw)
    assert_close64(h_ours[mask.bool()], h_ref[mask.bool()], "decoder with cross-attention", TOL)
    _assert_same_grads(ours, ref)


@pytest.mark.parametrize("window", [128, 4])
def test_modernbert_local_attention_matches_sdpa(window: int) -> None:
    # ModernBERT alternates global and sliding-window layers and passes `sliding_window` and `deterministic`.
    # The window layers' mask cannot be a key mask: create_mask falls back to a 4-D mask (window 4 < length).
    # Compared with "sdpa" (eager ModernBERT itself differs from sdpa by ~1e-9 and gives NaN on rows whose
    # window holds no real token).
    kw = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1,
        global_attn_every_n_layers=2, local_attention=window,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.ModernBertModel(transformers.ModernBertConfig(**kw, attn_implementation="sdpa")).double()
    ours = transformers.ModernBertModel(transformers.ModernBertConfig(**kw, attn_implementation="ptfast")).double()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(3, VOCAB, (3, 13))
    mask = _mask("holes", 3, 13)
    weight = torch.randn(3, 13, HIDDEN, dtype=torch.float64)
    with ptfast.use_backend("torch"), record_dispatch() as events:
        h_ours, _ = _run(ours.eval(), ids, mask, weight)
    assert_ran(events, "attention", "torch", ("forward", "backward"))
    h_ref, _ = _run(ref.eval(), ids, mask, weight)
    assert_close64(h_ours[mask.bool()], h_ref[mask.bool()], f"ModernBERT window {window}", TOL)
    _assert_same_grads(ours, ref)


# --- dropout ----------------------------------------------------------------------------------------------


def test_training_dropout_happens_and_is_reproducible() -> None:
    # Hidden dropout off: any randomness comes from the attention dropout inside ptfast.
    _, ours = _pair(transformers.BertModel, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    ids = torch.randint(1, VOCAB, (2, 13))
    mask = _mask("right", 2, 13)
    with ptfast.use_backend("torch"):
        with torch.no_grad():
            h_eval = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        ours.train()
        runs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            with record_dispatch() as events:
                out = ours(input_ids=ids, attention_mask=mask).last_hidden_state
                out.sum().backward()
            assert_ran(events, "attention", "torch", ("forward", "backward"))
            runs.append(out.detach())
    assert torch.equal(runs[0], runs[1]), "same torch seed must give the same dropout"
    assert not torch.allclose(runs[0], runs[2]), "different seeds must drop differently"
    assert not torch.allclose(runs[0], h_eval), "training mode must apply attention dropout"


# --- the attention function called directly ---------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, is_causal: bool = False) -> None:
        super().__init__()
        self.is_causal = is_causal


def _qkv(batch: int, length: int, heads: int = HEADS, kv_heads: int | None = None, dim: int = HEAD_DIM):
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    return q, k, v


def _oracle(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive float64 attention, (B, S, H, D) output; ``allowed`` (B|1, 1, Lq, Lk) bool; empty rows give 0."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _call(module, q, k, v, mask, **kw):
    with ptfast.use_backend("torch"):
        out, weights = ptfast_hf.attention_forward(module, q, k, v, mask, scaling=0.3, **kw)
    assert weights is None
    assert out.is_contiguous()
    return out


@pytest.mark.parametrize("is_causal", [False, True])
def test_mask_forms_match_oracle(is_causal: bool) -> None:
    q, k, v = _qkv(3, 9)
    key_mask = _mask("holes", 3, 9).bool()
    allowed = key_mask[:, None, None, :].expand(3, 1, 9, 9)
    if is_causal:
        allowed = allowed & torch.ones(9, 9, dtype=torch.bool).tril()
    expected = _oracle(q, k, v, allowed, 0.3)
    m = _Module(is_causal)
    assert_close64(_call(m, q, k, v, key_mask), expected, "bool key mask", TOL)
    assert_close64(_call(m, q, k, v, key_mask.long()), expected, "int key mask", TOL)
    # 4-D masks already hold the causal pattern (transformers' SDPA convention): no extra causal flag
    assert_close64(_call(m, q, k, v, allowed), expected, "4-D bool mask", TOL)
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    got = _call(m, q, k, v, additive)
    real = key_mask[:, :, None].expand(3, 9, HEADS)  # rows with no allowed key differ for additive masks
    if is_causal:
        real = real & allowed.any(-1).squeeze(1)[..., None]
    assert_close64(got[real], expected[real], "4-D additive mask", TOL)
    # is_causal passed as a kwarg wins over module.is_causal
    assert_close64(_call(_Module(not is_causal), q, k, v, key_mask, is_causal=is_causal), expected, "kwarg", TOL)


def test_bad_masks_raise() -> None:
    q, k, v = _qkv(2, 5)
    m = _Module()
    with pytest.raises(ValueError, match="2-D attention_mask must be bool or integer"):
        _call(m, q, k, v, torch.ones(2, 5))
    with pytest.raises(ValueError, match="key mask has shape"):
        _call(m, q, k, v, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="neither a"):
        _call(m, q, k, v, torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D attention_mask must be bool"):
        _call(m, q, k, v, torch.ones(2, 1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unsupported attention_mask of type"):
        _call(m, q, k, v, [[1, 1, 1, 1, 1]] * 2)


def test_grouped_query_attention_repeats_kv_heads() -> None:
    q, k, v = _qkv(2, 7, heads=4, kv_heads=2)
    got = _call(_Module(), q, k, v, None)
    expected = _oracle(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), torch.ones(1, 1, 7, 7, dtype=bool), 0.3)
    assert_close64(got, expected, "GQA", TOL)
    with pytest.raises(ValueError, match="cannot share"):
        _call(_Module(), *_qkv(2, 7, heads=3, kv_heads=2), None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sliding_window", 4),
        ("softcap", 1.0),
        ("s_aux", torch.zeros(HEADS)),
        ("head_mask", torch.ones(HEADS)),
        ("position_bias", torch.zeros(1, HEADS, 9, 9)),
        ("output_attentions", True),
        ("some_future_kwarg", 3),
    ],
)
def test_unimplemented_kwargs_raise(name: str, value: object) -> None:
    q, k, v = _qkv(2, 9)
    with pytest.raises(NotImplementedError, match=f"`{name}`"):
        _call(_Module(), q, k, v, None, **{name: value})


def test_harmless_kwargs_are_accepted() -> None:
    q, k, v = _qkv(2, 9)
    expected = _call(_Module(), q, k, v, None)
    extra = dict(
        encoder_hidden_states=None, output_hidden_states=True, output_attentions=False,
        num_items_in_batch=torch.tensor(7), position_ids=torch.arange(9).expand(2, 9), is_causal=False,
        softcap=None, s_aux=None, head_mask=None,
        sliding_window=9,  # no key is farther than the window
    )  # fmt: skip
    assert torch.equal(_call(_Module(), q, k, v, None, **extra), expected)
    # with a 4-D mask the window is the mask's business (as in transformers' SDPA path)
    full = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    assert torch.equal(_call(_Module(), q, k, v, full, sliding_window=2), expected)


# --- padding-free (varlen) --------------------------------------------------------------------------------

LENGTHS = (5, 3, 7)


def _packed_and_padded():
    total, longest = sum(LENGTHS), max(LENGTHS)
    q, k, v = _qkv(1, total)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    pad = [torch.zeros(len(LENGTHS), HEADS, longest, HEAD_DIM, dtype=torch.float64) for _ in range(3)]
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        for dst, src in zip(pad, (q, k, v), strict=True):
            dst[b, :, : e - s] = src[0, :, s:e]
    key_mask = torch.arange(longest)[None, :] < torch.tensor(LENGTHS)[:, None]
    return (q, k, v), pad, cu, key_mask


def _unpad(out_padded: torch.Tensor) -> torch.Tensor:
    return torch.cat([out_padded[b, :n] for b, n in enumerate(LENGTHS)])[None]


@pytest.mark.parametrize("is_causal", [False, True])
def test_padding_free_kwargs_route_to_varlen(is_causal: bool) -> None:
    (q, k, v), (qp, kp, vp), cu, key_mask = _packed_and_padded()
    m = _Module(is_causal)
    expected = _unpad(_call(m, qp, kp, vp, key_mask))
    # int64 cu_seq_lens, a tensor max_length_q and an int max_length_k, as collators / users may pass them
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=torch.tensor(max(LENGTHS)), max_length_k=max(LENGTHS))
    with record_dispatch() as events:
        got = _call(m, q, k, v, None, **kw)
    assert_ran(events, "attention_varlen", "torch", ("forward",))
    assert not [e for e in events if e[0] == "attention"], "the padded op must not run for a packed batch"
    assert got.shape == (1, sum(LENGTHS), HEADS, HEAD_DIM)
    assert_close64(got, expected, "varlen via cu_seq_lens", TOL)
    # max lengths are optional (derived from cu_seq_lens)
    assert_close64(_call(m, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu), expected, "no max_length", TOL)
    # packing told only by restarting position_ids (DataCollatorWithFlattening without flash kwargs)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    with record_dispatch() as events:
        got = _call(m, q, k, v, None, position_ids=pos)
    assert_ran(events, "attention_varlen", "torch", ("forward",))
    assert_close64(got, expected, "varlen via position_ids", TOL)


def test_padding_free_errors() -> None:
    (q, k, v), _, cu, _ = _packed_and_padded()
    m = _Module()
    with pytest.raises(ValueError, match="both cu_seq_lens_q and cu_seq_lens_k"):
        _call(m, q, k, v, None, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="both a padding mask and cu_seq_lens"):
        _call(m, q, k, v, torch.ones(1, q.shape[2], dtype=torch.bool), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    holes = torch.ones(1, q.shape[2], dtype=torch.bool)
    holes[0, 2] = False
    with pytest.raises(NotImplementedError, match="packed into one row together with a padding mask"):
        _call(m, q, k, v, holes, position_ids=pos)
    with pytest.raises(NotImplementedError, match="`seq_idx`"):
        _call(m, q, k, v, None, seq_idx=torch.zeros(1, q.shape[2], dtype=torch.int32))


def test_padding_free_bert_matches_padded_eager() -> None:
    # A flattened batch (DataCollatorWithFlattening layout) through the ptfast model equals the padded batch
    # through the eager model, forward and gradients.
    ref, ours = _pair(transformers.BertModel)
    longest = max(LENGTHS)
    ids_pad = torch.randint(1, VOCAB, (len(LENGTHS), longest))
    mask_pad = (torch.arange(longest)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    weight_pad = torch.randn(len(LENGTHS), longest, HIDDEN, dtype=torch.float64)
    real = mask_pad.bool()
    ids_flat, weight_flat = ids_pad[real][None], weight_pad[real][None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    h_ref, _ = _run(ref, ids_pad, mask_pad, weight_pad)
    g_ref = _grads(ref)
    flash_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    for kwargs in (flash_kwargs, {}):  # with the collator's flash kwargs, and from position_ids alone
        with ptfast.use_backend("torch"), record_dispatch() as events:
            h_ours, _ = _run(ours, ids_flat, None, weight_flat, position_ids=pos, **kwargs)
        assert_ran(events, "attention_varlen", "torch", ("forward", "backward"))
        assert_close64(h_ours[0], h_ref[real], f"packed hidden states {sorted(kwargs)}", TOL)
        _assert_same_grads(ours, g_ref)


# --- the mask builder -------------------------------------------------------------------------------------


def test_create_mask_delivers_key_mask_or_4d_fallback() -> None:
    mu = transformers.masking_utils
    kw = dict(batch_size=2, q_length=6, kv_length=6, q_offset=0, kv_offset=0, device="cpu", dtype=torch.float32)
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[1, 4:] = False
    got = ptfast_hf.create_mask(mask_function=mu.bidirectional_mask_function, attention_mask=padded, **kw)
    assert got.dtype == torch.bool and torch.equal(got, padded)
    full = torch.ones(2, 6, dtype=torch.bool)
    assert ptfast_hf.create_mask(mask_function=mu.bidirectional_mask_function, attention_mask=full, **kw) is None
    assert ptfast_hf.create_mask(mask_function=mu.causal_mask_function, attention_mask=None, **kw) is None
    # a pattern a key mask cannot express (sliding window) becomes a 4-D bool mask instead of being dropped
    window = mu.sliding_window_causal_mask_function(2)
    got = ptfast_hf.create_mask(mask_function=window, attention_mask=padded, allow_is_causal_skip=False, **kw)
    assert got.shape == (2, 1, 6, 6) and got.dtype == torch.bool
    expected = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-2)
    assert torch.equal(got[0, 0], expected)
    assert torch.equal(got[1, 0], expected & padded[1])
