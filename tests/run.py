"""Run the test suite: the main process, then the Triton-interpreter tier in its own process.

    python tests/run.py            # default tier (what CI runs)
    python tests/run.py --slow     # also the slow tier
    python tests/run.py --gpu      # GPU machine: only tests marked gpu (plus the rest of the default tier)
    python tests/run.py --gpu -m gpu tests/test_gpu_faults.py   # only these files (a GPU tier slice)

Extra arguments go to both pytest invocations. Test files or node ids among them replace the default roots
(``tests`` and ``tests/interpreter``): each goes to the process its tier needs, and a process with nothing to run
is not started. The interpreter tier needs TRITON_INTERPRET=1 set before triton is imported, which is why it
cannot share a process with the rest.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERPRETER_DIR = ROOT / "tests" / "interpreter"
# pytest options whose value is the next argument (that value is never a test target, even if it is a path).
_VALUE_OPTIONS = {"-k", "-m", "-p", "-o", "-c", "--rootdir", "--junitxml", "--ignore", "--deselect", "--maxfail",
                  "--durations", "--timeout", "-n", "--basetemp", "--confcutdir", "-W"}  # fmt: skip


def split_targets(extra: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``(options, main targets, interpreter targets)``: the test files and node ids among ``extra`` (paths that
    exist under the repository, ``file.py::name`` included), sorted by the process they need."""
    options: list[str] = []
    main: list[str] = []
    interp: list[str] = []
    takes_value = False
    for arg in extra:
        is_target = not takes_value and not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()
        takes_value = arg in _VALUE_OPTIONS
        if not is_target:
            options.append(arg)
            continue
        path = (ROOT / arg.split("::")[0]).resolve()
        (interp if path.is_relative_to(INTERPRETER_DIR) else main).append(arg)
    return options, main, interp


def plan(argv: list[str]) -> list[tuple[str, list[str], bool]]:
    """The pytest runs ``argv`` asks for: ``(title, pytest arguments, needs TRITON_INTERPRET=1)`` each."""
    gpu = "--gpu" in argv
    options, main, interp = split_targets([a for a in argv if a != "--gpu"])
    base = ["-p", "no:cacheprovider"] + (["-m", "gpu or not interpreter"] if gpu else [])
    if not main and not interp:
        main, interp = ["tests"], [str(INTERPRETER_DIR)]
    runs = []
    if main:
        runs.append(("main process", [*base, *main, *options], False))
    if interp and not gpu:
        runs.append(("Triton interpreter process (TRITON_INTERPRET=1)", [*base, *interp, *options], True))
    return runs


def main(argv: list[str]) -> int:
    codes = []
    for title, args, interpreter in plan(argv):
        if interpreter and importlib.util.find_spec("triton") is None:
            print("== triton is not installed: interpreter tier skipped ==", flush=True)
            continue
        print(f"== ptfast tests: {title} ==", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpreter:
            env["TRITON_INTERPRET"] = "1"
        codes.append(subprocess.call([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env))
    # pytest exits 5 when a process collected nothing; that is not a failure of the suite.
    failed = [c for c in codes if c not in (0, 5)]
    print(f"== ptfast tests: {'FAILED' if failed else 'OK'} (pytest exit codes {codes}) ==", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
