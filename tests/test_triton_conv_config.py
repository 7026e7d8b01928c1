"""The Triton conv configuration (ptfast.backends.triton.conv_config): tables, K-walk rule, algorithm choice."""

from __future__ import annotations

import pytest
import torch

from ptfast.backends.triton import GPU_CLASSES, conv_config

CPU = torch.device("cpu")


def test_every_gpu_class_has_every_table_entry() -> None:
    for arch in GPU_CLASSES:
        table = conv_config.TABLES[arch]
        assert set(table) == {(e, b) for e in (2, 4) for b in conv_config.COUT_BUCKETS}, arch
        for blocks in table.values():
            for v in (blocks.block_m, blocks.block_n, blocks.block_k):
                assert v >= 16 and v & (v - 1) == 0, blocks  # tl.dot minimum, powers of two
            # Window-ordered GEMM rows: a tile must hold whole 2x2 pooling windows.
            assert blocks.block_m % 4 == 0
        assert arch in conv_config.LAYER_ALGOS


@pytest.mark.parametrize(
    ("cin", "flat", "block_k"),
    [(3, True, 16), (5, True, 16), (24, True, 16), (16, False, 16), (48, False, 16), (64, False, 16), (96, False, 16)],
)
def test_k_walk_never_has_partial_channel_chunks(cin, flat, block_k) -> None:
    got_flat, got_k = conv_config.k_walk(cin, conv_config.INTERPRETER_BLOCKS, CPU)
    assert (got_flat, got_k) == (flat, block_k)
    if not got_flat:
        assert cin % got_k == 0


def test_k_walk_takes_largest_dividing_chunk() -> None:
    blocks = conv_config.TABLES[90][(2, 128)]  # BLOCK_K 64
    assert conv_config.k_walk(512, blocks, torch.device("cuda")) == (False, 64)
    assert conv_config.k_walk(96, blocks, torch.device("cuda")) == (False, 32)
    assert conv_config.k_walk(3, blocks, torch.device("cuda")) == (True, 32)


def test_algorithms_default_hook_and_environment(monkeypatch) -> None:
    monkeypatch.delenv("PTFAST_CONV_FORWARD", raising=False)
    monkeypatch.delenv("PTFAST_CONV_DGRAD", raising=False)
    monkeypatch.delenv("PTFAST_CONV_WGRAD", raising=False)
    assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224) == conv_config.DEFAULT_ALGOS
    with conv_config.use_algos(dgrad="triton"):
        expected = conv_config.Algos("implicit_gemm", "triton", "cudnn")
        assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224) == expected
        with conv_config.use_algos(forward="cudnn", wgrad="triton"):
            expected = conv_config.Algos("cudnn", "triton", "triton")
            assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224) == expected
    assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224) == conv_config.DEFAULT_ALGOS
    # NCHW activations default to cuDNN + epilogue (the GEMM's loads would be gathers); hooks still apply.
    assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224, channels_last=False) == conv_config.NCHW_ALGOS
    with conv_config.use_algos(forward="implicit_gemm"):
        assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224, channels_last=False).forward == "implicit_gemm"
    monkeypatch.setenv("PTFAST_CONV_FORWARD", "cudnn")
    assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224).forward == "cudnn"
    with conv_config.use_algos(forward="implicit_gemm"):  # the hook wins over the environment
        assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224).forward == "implicit_gemm"
    monkeypatch.setenv("PTFAST_CONV_WGRAD", "triton")
    assert conv_config.algos_for(CPU, torch.float32, 3, 64, 224).wgrad == "triton"
    monkeypatch.setenv("PTFAST_CONV_FORWARD", "winograd")
    with pytest.raises(ValueError, match="PTFAST_CONV_FORWARD"):
        conv_config.algos_for(CPU, torch.float32, 3, 64, 224)


def test_hooks_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="forward"):
        with conv_config.use_algos(forward="fft"):
            pass
    with pytest.raises(ValueError, match="dgrad"):
        with conv_config.use_algos(dgrad="cublas"):
            pass
    with pytest.raises(ValueError, match="wgrad"):
        with conv_config.use_algos(wgrad="implicit_gemm"):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with conv_config.use_blocks(48, 16, 16):
            pass
    with conv_config.use_blocks(64, 32, 16):
        assert conv_config.blocks_for(CPU, torch.float32, 7) == conv_config.ConvBlocks(64, 32, 16, 4, 1)
    assert conv_config.blocks_for(CPU, torch.float32, 7) == conv_config.INTERPRETER_BLOCKS


def test_cout_buckets() -> None:
    assert [conv_config.cout_bucket(c) for c in (1, 64, 65, 512, 4096)] == [64, 64, 128, 128, 128]
