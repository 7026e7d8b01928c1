"""Backend selection: use_backend, PTFAST_BACKEND, per-thread settings, forward choice reused by backward."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import ptfast
from ptfast import _dispatch
from ptfast.testing import record_dispatch


def _conv_inputs():
    x = torch.randn(1, 2, 5, 6, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    return x, w


def test_default_is_auto_and_use_backend_nests():
    assert ptfast.requested_backend() == "auto"
    with ptfast.use_backend("torch"):
        assert ptfast.requested_backend() == "torch"
        with ptfast.use_backend("triton"):
            assert ptfast.requested_backend() == "triton"
        assert ptfast.requested_backend() == "torch"
    assert ptfast.requested_backend() == "auto"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown ptfast backend"):
        with ptfast.use_backend("tpu"):
            pass


def test_env_var(monkeypatch):
    monkeypatch.setenv("PTFAST_BACKEND", "torch")
    assert ptfast.requested_backend() == "torch"
    monkeypatch.setenv("PTFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        ptfast.requested_backend()
    with ptfast.use_backend("auto"):  # the context manager wins over the environment
        assert ptfast.requested_backend() == "auto"


def test_setting_is_per_thread():
    seen = {}
    with ptfast.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.setdefault("other", ptfast.requested_backend()))
        t.start()
        t.join()
    assert seen["other"] == "auto"


def test_auto_falls_back_to_torch_and_explicit_refusal_says_why():
    x, w = _conv_inputs()
    with record_dispatch() as events:
        ptfast.conv_relu(x, w)
    assert events == [("conv_relu", "torch", "forward")]
    with ptfast.use_backend("cuda"), pytest.raises(ptfast.BackendNotSupportedError) as err:
        ptfast.conv_relu(x, w)
    assert "ptfast.conv_relu: backend 'cuda' cannot run these inputs: cuda" in str(err.value)


def test_backward_uses_the_forward_choice():
    x, w = _conv_inputs()
    with ptfast.use_backend("torch"):
        out = ptfast.conv_relu_pool(x, w)
    with record_dispatch() as events, ptfast.use_backend("triton"):
        out.sum().backward()  # would refuse on triton; backward must not re-choose
    assert events == [("conv_relu_pool", "torch", "backward")]


def test_explain_lists_every_backend():
    from ptfast.ops import conv

    x, w = _conv_inputs()
    reasons = _dispatch.explain("conv_relu", conv._IMPLS, x=x, weight=w, bias=None, padding=1, pool=True)
    assert set(reasons) == {"torch", "triton", "cuda"} and reasons["torch"] is None
    assert all(isinstance(reasons[b], str) for b in ("triton", "cuda"))


def test_import_is_light():
    code = (
        "import sys, torch, ptfast\n"
        "assert not torch.cuda.is_initialized(), 'import ptfast initialized CUDA'\n"
        "heavy = [m for m in ('triton', 'transformers', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constant_while_compiling_uses_torchs_own_mark():
    # ptfast sets the mark itself to keep `import ptfast` from importing torch._dynamo; fail loudly if torch
    # ever stops honouring it.
    def probe():
        return "x"

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert _dispatch.constant_while_compiling(lambda: None)._dynamo_marked_constant is True


def test_compile_caches_are_tagged_with_the_op_definitions(monkeypatch) -> None:
    """PyTorch's compile caches do not key on a custom op's fake kernel or autograd formula; the ops package adds a
    hash of their definitions to cache_key_tag, once, after any tag the user set, and the hash follows the files."""
    from torch.compiler import config as compiler_config

    import ptfast.ops as ops

    tag = f"ptfast-ops-{ops._definitions_digest()}"
    assert tag in compiler_config.cache_key_tag.split(",")
    monkeypatch.setattr(compiler_config, "cache_key_tag", "user-tag")
    ops._tag_compile_caches()
    ops._tag_compile_caches()
    assert compiler_config.cache_key_tag == f"user-tag,{tag}"
    real_read = ops.Path.read_bytes
    monkeypatch.setattr(ops.Path, "read_bytes", lambda self: real_read(self) + b"# changed")
    assert ops._definitions_digest() != tag.removeprefix("ptfast-ops-")
