"""Input validation of ``ptfast.attention`` / ``ptfast.attention_varlen`` and explicit backend requests."""

from __future__ import annotations

import pytest
import torch

import ptfast

B, H, LQ, LK, D = 2, 3, 7, 5, 8


def qkv(dtype=torch.float32):
    return torch.randn(B, H, LQ, D, dtype=dtype), torch.randn(B, H, LK, D), torch.randn(B, H, LK, D)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: {**a, "query": a["query"][0]}, ValueError, "query must have 4 dimensions"),
        (lambda a: {**a, "key": a["key"].double()}, TypeError, "dtype"),
        (lambda a: {**a, "query": a["query"].int()}, TypeError, "query must have dtype"),
        (lambda a: {**a, "key": torch.randn(B, H, LK, D + 1)}, ValueError, "key head dim"),
        (lambda a: {**a, "value": torch.randn(B, H, LK, D + 2)}, ValueError, "value head dim"),
        (lambda a: {**a, "value": torch.randn(B, H, LK + 1, D)}, ValueError, "must match"),
        (lambda a: {**a, "key": torch.randn(B, H + 1, LK, D)}, ValueError, "batch and head"),
        (lambda a: {**a, "key": torch.randn(B, H, LK, D, device="meta")}, ValueError, "meta"),
        (lambda a: {**a, "attn_mask": torch.ones(B, H, LQ, LK + 1, dtype=torch.bool)}, ValueError, "broadcastable"),
        (lambda a: {**a, "attn_mask": torch.ones(3, 1, 1, LK, dtype=torch.bool)}, ValueError, "broadcastable"),
        (lambda a: {**a, "attn_mask": torch.ones(1, B, H, LQ, LK, dtype=torch.bool)}, ValueError, "broadcastable"),
        (lambda a: {**a, "attn_mask": torch.ones(LQ, LK, dtype=torch.int64)}, TypeError, r"\.bool\(\)"),
        (lambda a: {**a, "attn_mask": torch.zeros(LQ, LK, requires_grad=True)}, ValueError, "requires grad"),
        (lambda a: {**a, "key_mask": torch.ones(B, LK, dtype=torch.int64)}, TypeError, r"key_mask\.bool\(\)"),
        (lambda a: {**a, "key_mask": torch.ones(B, LQ, dtype=torch.bool)}, ValueError, r"\(B, Lk\)"),
        (lambda a: {**a, "dropout_p": 1.5}, ValueError, "dropout_p"),
        (lambda a: {**a, "dropout_p": -0.1}, ValueError, "dropout_p"),
        (lambda a: {**a, "is_causal": 1}, TypeError, "is_causal"),
        (lambda a: {**a, "scale": float("nan")}, ValueError, "scale"),
        (lambda a: {**a, "query": torch.randn(B, H, LQ, 0), "key": torch.randn(B, H, LK, 0)}, ValueError, "head dim"),
    ],
)
def test_attention_validation(change, exc, match):
    q, k, v = qkv()
    args = change({"query": q, "key": k, "value": v})
    with pytest.raises(exc, match=match):
        ptfast.attention(**args)


def test_mask_of_lower_rank_broadcasts():
    q, k, v = qkv()
    assert ptfast.attention(q, k, v, torch.rand(LK) > 0.5).shape == (B, H, LQ, D)
    assert ptfast.attention(q, k, v, torch.randn(LQ, 1)).shape == (B, H, LQ, D)


def test_explicit_triton_backend_refuses_with_reason():
    q, k, v = qkv()
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="triton"):
        ptfast.attention(q, k, v)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    x = torch.randn(4, H, D)
    with ptfast.use_backend("cuda"), pytest.raises(ptfast.BackendNotSupportedError, match="cuda"):
        ptfast.attention_varlen(x, x, x, cu, cu, 4, 4)
    with ptfast.use_backend("torch"):
        assert ptfast.attention(q, k, v).shape == (B, H, LQ, D)


def _varlen_args():
    x = torch.randn(9, H, D)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    return {
        "query": x, "key": x, "value": x, "cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": 5,
        "max_seqlen_k": 5,
    }  # fmt: skip


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: {**a, "query": a["query"][None]}, ValueError, "3 dimensions"),
        (lambda a: {**a, "key": torch.randn(9, H + 1, D)}, ValueError, "heads"),
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q must have dtype"),
        (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][None]}, ValueError, "1 dimensions"),
        (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 9], dtype=torch.int32)}, ValueError, "entries"),
        (lambda a: {**a, "cu_seqlens_q": torch.tensor([1, 4, 9], dtype=torch.int32)}, ValueError, r"\[0\] must be 0"),
        (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 6, 5, 9], dtype=torch.int32),
                    "cu_seqlens_k": torch.tensor([0, 1, 2, 9], dtype=torch.int32)}, ValueError, "non-decreasing"),
        (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 4, 8], dtype=torch.int32)}, ValueError, "9 tokens"),
        (lambda a: {**a, "max_seqlen_q": 4}, ValueError, "max_seqlen_q"),
        (lambda a: {**a, "max_seqlen_k": -1}, ValueError, "max_seqlen_k"),
        (lambda a: {**a, "max_seqlen_k": 5.0}, ValueError, "max_seqlen_k"),
        (lambda a: {**a, "value": a["value"].double()}, TypeError, "dtype"),
    ],
)  # fmt: skip
def test_varlen_validation(change, exc, match):
    with pytest.raises(exc, match=match):
        ptfast.attention_varlen(**change(_varlen_args()))


def test_varlen_value_checks_can_be_disabled(monkeypatch):
    args = {**_varlen_args(), "cu_seqlens_q": torch.tensor([1, 4, 9], dtype=torch.int32)}
    monkeypatch.setenv("PTFAST_CHECKS", "0")
    assert ptfast.attention_varlen(**args).shape == (9, H, D)
