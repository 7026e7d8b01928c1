"""Peak memory of ``ptfast.masked_lm_loss``: the torch backend never materializes the full logits.

16384 rows x 32768 vocabulary in fp32 would be 2 GiB of logits (plus as much again for their gradient in plain
PyTorch). The chunked torch backend keeps one chunk of logits (``CHUNK_BYTES``, 128 MiB) alive at a time, so the
process's peak RSS grows by about one chunk, whatever the number of rows.
"""

from __future__ import annotations

import pytest
import torch

import ptfast
from ptfast.backends.torch import masked_lm_loss as torch_mlm
from tests.helpers import peak_rss_growth_bytes

MiB = 2**20
VOCAB, EMB = 32768, 64
FULL_LOGITS_BYTES = 16384 * VOCAB * 4  # 2 GiB


def _inputs(rows: int, dtype: torch.dtype = torch.float32, ignore_frac: float = 0.0):
    hidden = torch.randn(rows, EMB).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, EMB) * 0.1).to(dtype).requires_grad_()
    bias = (torch.randn(VOCAB) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (rows,))
    labels[torch.rand(rows) < ignore_frac] = -100
    return hidden, weight, labels, bias


def _growth(rows: int, dtype: torch.dtype = torch.float32, autocast: bool = False) -> int:
    hidden, weight, labels, bias = _inputs(rows, dtype)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ptfast.masked_lm_loss(hidden, weight, labels, bias)
        loss.backward()

    growth = peak_rss_growth_bytes(step)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    return growth


def _warm_up() -> None:
    """Let one-time allocations (thread pools, GEMM scratch) happen before anything is measured."""
    hidden, weight, labels, bias = _inputs(64)
    ptfast.masked_lm_loss(hidden, weight, labels, bias).backward()


def test_peak_memory_16384_rows_32768_vocab_fp32():
    assert torch_mlm.CHUNK_BYTES <= 128 * MiB
    _warm_up()
    small = _growth(4096)
    big = _growth(16384)
    print(
        f"\npeak RSS growth, forward+backward, fp32, vocab {VOCAB}: 4096 rows {small / MiB:.1f} MiB, "
        f"16384 rows {big / MiB:.1f} MiB (full logits would be {FULL_LOGITS_BYTES / MiB:.0f} MiB)"
    )
    assert big < 512 * MiB
    # Bounded by one chunk plus small O(rows * E + V * E) buffers, independent of the row count.
    assert big < torch_mlm.CHUNK_BYTES + 64 * MiB
    assert big - small < 32 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_peak_memory_low_precision(mode):
    _warm_up()
    if mode == "bf16":
        growth = _growth(16384, torch.bfloat16)
    else:
        growth = _growth(16384, torch.float32, autocast=True)
    print(f"\npeak RSS growth, forward+backward, {mode}, 16384 x {VOCAB}: {growth / MiB:.1f} MiB")
    assert growth < 512 * MiB
    assert growth < torch_mlm.CHUNK_BYTES * 2 + 64 * MiB
