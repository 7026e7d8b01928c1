"""The attention-dropout keep decision: THE specification every backend reproduces bit for bit.

Why a counter-based hash: the keep decision for score element (b, h, i, j) must depend only on a per-call seed and
that element's absolute position, never on block sizes, chunking, Lq/Lk or launch configuration. Then backward
(and any kernel, any tiling) regenerates exactly the mask forward used, nothing L x L is stored, and the padded
and the varlen form of one batch drop identically.

Specification (all arithmetic on unsigned 32-bit words, i.e. modulo 2**32; ``>>`` is a logical shift)::

    fmix32(x):                      # MurmurHash3's 32-bit finalizer, a bijection on uint32
        x ^= x >> 16
        x *= 0x85EBCA6B
        x ^= x >> 13
        x *= 0xC2B2AE35
        x ^= x >> 16
        return x

    seed = (s0, s1)                  # two words, each in [0, 2**31), drawn per call (see below)
    k_b   = fmix32(s0 + b * 0x9E3779B1)
    k_bh  = fmix32(k_b ^ (h * 0x85EBCA77))
    k_row = fmix32(k_bh ^ (s1 + i * 0xC2B2AE3D))
    u     = fmix32(k_row + j * 0x27D4EB2F)
    keep(b, h, i, j)  <=>  u >= T,   T = floor(p * 2**32)

* ``b``: batch index (for varlen: the sequence index, ``0 <= b < len(cu_seqlens) - 1``); ``h``: head index;
  ``i``: query position and ``j``: key position, both counted from 0 at the start of their sequence (for varlen,
  *within* the sequence), so a padded batch and its varlen packing drop the same elements.
* ``T`` is computed on the host in float64 (exact: ``p * 2**32`` only shifts the exponent), ``0 <= T < 2**32``
  for ``0 <= p < 1``. ``p == 1`` drops everything (``T = 2**32``, which no uint32 reaches; a uint32 kernel must
  special-case it). Kept probabilities are scaled by ``1 / (1 - p)`` after the softmax.
* Cost per score element in a kernel: one multiply-add and one ``fmix32``; ``k_row`` is per query row and
  ``k_b``/``k_bh`` per (batch, head) program.

The seed is an int64 tensor of shape ``(2,)`` on the query's device, drawn per call with
``torch.randint(0, 2**31, (2,), device=q.device)`` from torch's default generator by the functional wrapper
(so ``torch.manual_seed`` reproduces a call, ``torch.compile`` traces it, and CUDA-graph replays draw fresh
words); ops take it as an input and autograd saves it for backward.

The torch implementation below computes in int32 tensors holding the uint32 bit patterns: int32 adds and
multiplies wrap modulo 2**32 (two's complement, on CPU and CUDA), right shifts are made logical by masking off the
sign-extended bits, and the final ``u >= T`` is an unsigned comparison done in signed arithmetic by flipping both
sides' top bit: four bytes per element and one op per spec step, where the int64 emulation it replaced needed
16-bit split multiplies and a mask after every step.
"""

from __future__ import annotations

import torch

FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
C_BATCH = 0x9E3779B1
C_HEAD = 0x85EBCA77
C_ROW = 0xC2B2AE3D
C_COL = 0x27D4EB2F
SEED_BOUND = 2**31


def threshold(p: float) -> int:
    """``T = floor(p * 2**32)``: an element is kept iff its hash ``u >= T``."""
    return int(float(p) * 4294967296.0)


def draw_seed(device: torch.device) -> torch.Tensor:
    """The per-call seed: int64 ``(2,)`` on ``device``, each word in [0, 2**31), from torch's default generator."""
    return torch.randint(0, SEED_BOUND, (2,), device=device, dtype=torch.int64)


_I32 = torch.int32
_TOP_BIT = -(2**31)  # 0x80000000 as an int32


def _signed(c: int) -> int:
    """The int32 with the bit pattern of the uint32 ``c``."""
    return c - 2**32 if c >= 2**31 else c


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    return x * _signed(c)  # int32 products wrap modulo 2**32: the low word of the uint32 product


def _xor_srl_(x: torch.Tensor, s: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``x ^= x >> s`` with a logical shift (the arithmetic shift's sign copies masked off), in place; ``scratch``
    (x's shape, int32) holds the shifted word, so a large hash allocates nothing per step."""
    shifted = torch.bitwise_right_shift(x, s, out=scratch) if scratch is not None else x >> s
    return x.bitwise_xor_(shifted.bitwise_and_((1 << (32 - s)) - 1))


def _fmix32_(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    _xor_srl_(x, 16, scratch)
    x.mul_(_signed(FMIX_C1))
    _xor_srl_(x, 13, scratch)
    x.mul_(_signed(FMIX_C2))
    return _xor_srl_(x, 16, scratch)


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer on int32 tensors holding uint32 bit patterns (returns a new tensor)."""
    return _fmix32_(x.clone())


def _index32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_I32)  # indices and seed words are < 2**31: the same bit pattern


def row_keys(seed: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``k_row`` (int32 bit patterns) for broadcastable integer index tensors ``b``, ``h``, ``i`` (no host sync:
    the seed stays on its device)."""
    s = _index32(seed)
    k = fmix32(s[0] + _mul32(_index32(b), C_BATCH))
    k = fmix32(k ^ _mul32(_index32(h), C_HEAD))
    return fmix32(k ^ (s[1] + _mul32(_index32(i), C_ROW)))


def col_terms(j: torch.Tensor) -> torch.Tensor:
    """``j * C_COL mod 2**32`` (int32 bit patterns) for an integer index tensor ``j`` (computed once per call,
    reused by every row)."""
    return _mul32(_index32(j), C_COL)


def _element_hash(k_row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``u`` of every element, shifted by 2**31 into int32 (``u ^ 0x80000000``), so that the unsigned ``u >= T``
    is the signed ``result >= T - 2**31``."""
    u = k_row + col
    _fmix32_(u, torch.empty_like(u))
    return u.bitwise_xor_(_TOP_BIT)


def keep_from_keys(k_row: torch.Tensor, col: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep mask, the broadcast of ``k_row`` (``(..., R, 1)``) against ``col`` (``(C,)``)."""
    t = threshold(p)
    if t >= 2**32:  # p == 1: no uint32 reaches T
        return torch.zeros(torch.broadcast_shapes(k_row.shape, col.shape), dtype=torch.bool, device=k_row.device)
    return _element_hash(k_row, col) >= t - 2**31


def keep_scale_from_keys(k_row: torch.Tensor, col: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``keep * (1 / (1 - p))`` in ``dtype`` (0 where dropped; all 0 for ``p == 1``): the factor the dropout path
    multiplies the probabilities (and their gradient) by, for the same broadcast as :func:`keep_from_keys`.

    For fp32 it is built in the hash's own int32 buffer, without a bool mask: on a CPU, comparing to a scalar and
    converting a bool mask to float each cost several times one vectorised integer pass. Clamping the shifted hash
    to ``[T' - 1, T']`` and subtracting ``T' - 1`` gives exactly 0 (dropped) or 1 (kept); times the bit pattern of
    the fp32 scale, that int32 word *is* the fp32 factor.
    """
    t = threshold(p)
    scale = 0.0 if t >= 2**32 else 1.0 / (1.0 - p)
    if dtype != torch.float32 or t == 0 or t >= 2**32:
        return keep_from_keys(k_row, col, p).to(dtype).mul_(scale)
    lo = t - 2**31 - 1  # T' - 1 >= -2**31 because T >= 1 here
    word = _element_hash(k_row, col).clamp_(lo, lo + 1).sub_(lo)
    scale_bits = int(torch.tensor(scale, dtype=torch.float32).view(torch.int32))
    return word.mul_(scale_bits).view(torch.float32)


def keep_mask(
    seed: torch.Tensor, p: float, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """``keep(b, h, i, j)`` for broadcastable int64 index tensors, e.g. b ``(B,1,1,1)``, h ``(1,H,1,1)``,
    i ``(1,1,R,1)``, j ``(C,)``: a bool tensor of the broadcast shape."""
    return keep_from_keys(row_keys(seed, b, h, i), col_terms(j), p)
