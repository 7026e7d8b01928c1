"""Block-size tables and hooks of the Triton attention backend (plain Python: no triton, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from ptfast.backends.triton import attention_config as ac


@pytest.mark.parametrize(
    ("capability", "optin", "expected"),
    [((8, 0), None, 80), ((9, 0), None, 90), ((8, 9), None, 89), ((8, 6), None, 89), ((8, 7), None, 89),
     ((10, 0), 232448, 90), ((12, 0), 101376, 89), ((11, 0), 167936, 80), ((12, 1), None, 89)],
)  # fmt: skip
def test_gpu_class(capability, optin, expected) -> None:
    assert ac.gpu_class(capability, optin) == expected


@pytest.mark.parametrize(
    ("d", "padded", "bucket"),
    [(1, 16, 64), (16, 16, 64), (24, 32, 64), (64, 64, 64), (72, 128, 128), (96, 128, 128), (129, 256, 256),
     (256, 256, 256)],
)  # fmt: skip
def test_head_dim_padding(d, padded, bucket) -> None:
    assert ac.padded_head_dim(d) == padded
    assert ac.head_dim_bucket(d) == bucket


def test_every_table_has_every_entry_and_valid_tiles() -> None:
    keys = {(n, d) for n in (2, 4) for d in ac.HEAD_DIM_BUCKETS}
    assert set(ac.TABLES) == set(ac.GPU_CLASSES)
    for table in ac.TABLES.values():
        assert set(table) == keys
        for blocks in table.values():
            for cfg in (blocks.forward, blocks.backward_kv, blocks.backward_q):
                for v in (cfg.block_m, cfg.block_n):
                    assert v >= 16 and v & (v - 1) == 0
                assert cfg.num_warps in (1, 2, 4, 8) and cfg.num_stages >= 1


def test_use_blocks_overrides_and_restores() -> None:
    cpu = torch.device("cpu")
    base = ac.blocks_for(cpu, torch.float32, 64)
    with ac.use_blocks(forward=(16, 64)):
        b = ac.blocks_for(cpu, torch.float32, 64)
        assert (b.forward.block_m, b.forward.block_n) == (16, 64) and b.backward_kv == base.backward_kv
        with ac.use_blocks(backward=(64, 16)):
            b = ac.blocks_for(cpu, torch.float32, 64)
            assert (b.forward.block_m, b.backward_q.block_m, b.backward_kv.block_n) == (16, 64, 16)
    assert ac.blocks_for(cpu, torch.float32, 64) == base
    for bad in ((8, 32), (48, 32), (32, 0)):
        with pytest.raises(ValueError, match="powers of two"), ac.use_blocks(forward=bad):
            pass


def test_atomic_dq_switches(monkeypatch) -> None:
    monkeypatch.delenv("PTFAST_ATTENTION_ATOMIC_DQ", raising=False)
    assert not ac.atomic_dq_enabled()
    assert not ac.backward_uses_atomic_dq()
    monkeypatch.setenv("PTFAST_ATTENTION_ATOMIC_DQ", "1")
    assert ac.atomic_dq_enabled()
    with ac.use_atomic_dq(False):
        assert not ac.atomic_dq_enabled()
    monkeypatch.delenv("PTFAST_ATTENTION_ATOMIC_DQ")
    with ac.use_atomic_dq(True):
        assert ac.backward_uses_atomic_dq()
    assert not ac.atomic_dq_enabled()


def test_atomic_dq_is_refused_under_deterministic_algorithms() -> None:
    """The opt-in non-deterministic backward meets PyTorch's usual refusal (a warning with warn_only, then it
    runs); the default backward is deterministic, so deterministic mode changes nothing for it."""
    try:
        torch.use_deterministic_algorithms(True)
        assert not ac.backward_uses_atomic_dq()
        with ac.use_atomic_dq(True), pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            ac.backward_uses_atomic_dq()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with ac.use_atomic_dq(True), pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            assert ac.backward_uses_atomic_dq()
    finally:
        torch.use_deterministic_algorithms(False)


def test_supports_reasons_without_a_gpu() -> None:
    """On a CPU machine without the interpreter, the backend refuses and says why; auto falls back to torch."""
    import ptfast
    from ptfast.backends.triton import attention as triton_attention

    q = torch.randn(1, 2, 5, 8)
    reason = triton_attention.supports(q=q)
    if reason is None:
        pytest.skip("triton kernels can run in this process")
    assert reason.startswith("triton:")
    with ptfast.use_backend("triton"), pytest.raises(ptfast.BackendNotSupportedError, match="triton"):
        ptfast.attention(q, q, q)
