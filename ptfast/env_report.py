"""Environment report for bug reports and CI logs: ``python -m ptfast.env_report`` (or ``ptfast-env-report``).

Prints the versions of Python and the libraries ptfast uses, the visible GPUs with their compute capability,
whether the optional CUDA extension loads, whether each backend can run in this process (and why not), and
for each op which backends implement it. Every probe is independent: an exception in one prints that line's
error and the report goes on, so the report itself always exits 0.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from collections.abc import Callable, Iterable

# op name -> candidate (module, backend table attribute) pairs, first found wins. The tables map backend name
# -> implementation module (or ptfast.backends.Unimplemented) exactly as the op modules dispatch on them.
OP_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "conv_relu": (("ptfast.ops.conv", "_IMPLS"),),
    "conv_relu_pool": (("ptfast.ops.conv", "_IMPLS"),),
    "attention": (("ptfast.ops.attention", "_IMPLS"),),
    "attention_varlen": (
        ("ptfast.ops.attention", "_VARLEN_IMPLS"),
        ("ptfast.ops.attention_varlen", "_IMPLS"),
    ),
    "masked_lm_loss": (("ptfast.ops.masked_lm_loss", "_IMPLS"),),
    "add_relu": (("ptfast.ops.add_relu", "_IMPLS"),),
}

LIBRARIES: tuple[str, ...] = ("numpy", "triton", "transformers", "torchvision")

_WIDTH = 16


def _line(label: str, probe: Callable[[], str]) -> None:
    """Print ``label: probe()``; an exception in the probe becomes that line's text."""
    try:
        text = probe()
    except Exception as exc:  # robustness is the point of this module
        text = f"ERROR ({type(exc).__name__}: {exc})"
    print(f"{label:<{_WIDTH}} {text}", flush=True)


def _lines(probe: Callable[[], Iterable[str]]) -> None:
    """Print each line ``probe`` yields, indented; an exception in the probe becomes an ERROR line."""
    try:
        for text in probe():
            print(f"  {text}", flush=True)
    except Exception as exc:  # robustness is the point of this module
        print(f"  ERROR ({type(exc).__name__}: {exc})", flush=True)


def _version(dist: str) -> str:
    # Package metadata, not an import: reading triton's version must not import triton (or set it up before
    # TRITON_INTERPRET is decided), and a broken package still reports its version.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _python() -> str:
    return f"{platform.python_version()} ({sys.executable}) on {platform.platform()}"


def _ptfast() -> str:
    import ptfast

    return f"{ptfast.__version__} ({ptfast.__file__})"


def _torch() -> str:
    try:
        import torch
    except ImportError:
        return "not installed"
    cuda = torch.version.cuda or "none (CPU-only build)"
    cudnn = "n/a"
    if torch.version.cuda:
        version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        cudnn = str(version) if version is not None else "not available"
    return f"{torch.__version__} (CUDA {cuda}, cuDNN {cudnn})"


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["none visible (torch.cuda.is_available() is False)"]
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    return lines


def _extension() -> str:
    from ptfast.backends import cuda as cuda_backend

    ext = cuda_backend.extension()
    if ext is None:
        return f"not loadable: {cuda_backend.extension_reason()}"
    return f"loaded ({getattr(ext, '__file__', '?')})"


def _backend_status(name: str) -> str:
    if name == "torch":
        return "usable (runs everywhere)"
    if name == "triton":
        from ptfast.backends import triton as triton_backend

        reason = triton_backend.usable_reason()
        if reason is None and triton_backend.interpreter_enabled():
            return "usable (TRITON_INTERPRET=1: CPU tensors through the interpreter)"
    elif name == "cuda":
        from ptfast.backends import cuda as cuda_backend

        reason = cuda_backend.unavailable_reason()
    else:
        return "unknown backend"
    return "usable" if reason is None else f"not usable: {reason}"


def _op_table(op: str) -> dict[str, object]:
    looked = []
    for module_name, attr in OP_TABLES[op]:
        looked.append(f"{module_name}.{attr}")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        table = getattr(module, attr, None)
        if isinstance(table, dict):
            return table
    raise LookupError(f"no backend table found (looked for {', '.join(looked)})")


def _implementation_status(op: str, impl: object) -> str:
    from ptfast.backends import Unimplemented

    if isinstance(impl, Unimplemented):
        return f"not implemented ({impl.reason})"
    # A backend module shared by several ops (conv_relu / conv_relu_pool) lists the ones it lacks a kernel for.
    missing = getattr(impl, "NOT_IMPLEMENTED", {}).get(op)
    if missing:
        return f"not implemented ({missing})"
    return f"implemented ({getattr(impl, '__name__', type(impl).__name__)})"


def _verification_lines() -> list[str]:
    """Per op and GPU backend: what the verification record lets ``auto`` pick on this machine's GPU."""
    import torch

    from ptfast import verification

    record = verification.load_record()
    lines = []
    if verification.allow_unverified():
        lines.append(f"{verification.ALLOW_UNVERIFIED_ENV}=1: auto also picks unverified kernels")
    gpus = []
    if torch.cuda.is_available():
        gpus = sorted({verification.gpu_class_name(torch.cuda.get_device_capability(i))
                       for i in range(torch.cuda.device_count())})  # fmt: skip
    else:
        lines.append("no CUDA GPU here: the gate applies to CUDA devices; the record's entries follow")
    classes = gpus or sorted({e.gpu_class for e in record.entries})
    for gpu in classes:
        for op in OP_TABLES:
            for backend in ("triton", "cuda"):
                mine = [e for e in record.entries if (e.gpu_class, e.op, e.backend) == (gpu, op, backend)]
                good = [e for e in mine if e.verdict() is None]
                if not mine:
                    state = "unverified (no record): auto runs the torch backend"
                else:
                    state = f"verified and faster at {len(good)} of {len(mine)} recorded shape classes"
                    state += "; auto runs the torch backend at every other class"
                lines.append(f"{gpu} {op:<16} {backend:<6} {state}")
        lines += [f"  {line}" for line in verification.status_lines(record, gpu)]
    if not record.entries:
        lines.append("the record has no entries: on a GPU, auto runs the torch backend for every op")
    return lines


def main(argv: list[str] | None = None) -> int:
    from ptfast._dispatch import BACKENDS

    print("ptfast environment report", flush=True)
    _line("ptfast", _ptfast)
    _line("Python", _python)
    _line("torch", _torch)
    for lib in LIBRARIES:
        _line(lib, lambda lib=lib: _version(lib))

    print("\nGPUs", flush=True)
    _lines(_gpus)

    print("", flush=True)
    _line("CUDA extension", _extension)

    print("\nBackends (can they run in this process?)", flush=True)
    for name in BACKENDS:
        _line(f"  {name}", lambda name=name: _backend_status(name))

    print("\nOps (which backends implement them)", flush=True)
    for op in OP_TABLES:
        print(f"  {op}", flush=True)
        try:
            table = _op_table(op)
        except Exception as exc:
            print(f"    ERROR ({type(exc).__name__}: {exc})", flush=True)
            continue
        for name in BACKENDS:
            if name not in table:
                _line(f"    {name}", lambda: "no entry in the op's backend table")
            else:
                _line(f"    {name}", lambda op=op, impl=table[name]: _implementation_status(op, impl))

    print("\nVerified or off (what auto may pick on a GPU; ptfast/verified.json)", flush=True)
    _lines(_verification_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
