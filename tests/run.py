"""Run the test suite: the main process, then the Triton-interpreter tier in its own process.

    python tests/run.py            # default tier (what CI runs)
    python tests/run.py --slow     # also the slow tier
    python tests/run.py --gpu      # GPU machine: only tests marked gpu (plus the rest of the default tier)

Extra arguments go to both pytest invocations. The interpreter tier needs TRITON_INTERPRET=1 set before
triton is imported, which is why it cannot share a process with the rest.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    extra = [a for a in argv if a != "--gpu"]
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    if "--gpu" in argv:
        base += ["-m", "gpu or not interpreter"]
    codes = []
    print("== ptfast tests: main process ==", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    codes.append(subprocess.call([*base, "tests", *extra], cwd=ROOT, env=env))
    interp_dir = ROOT / "tests" / "interpreter"
    if importlib.util.find_spec("triton") is None:
        print("== triton is not installed: interpreter tier skipped ==", flush=True)
    elif interp_dir.is_dir() and "--gpu" not in argv:
        print("== ptfast tests: Triton interpreter process (TRITON_INTERPRET=1) ==", flush=True)
        env_i = {**os.environ, "TRITON_INTERPRET": "1"}
        codes.append(subprocess.call([*base, str(interp_dir), *extra], cwd=ROOT, env=env_i))
    # pytest exits 5 when a process collected nothing; that is not a failure of the suite.
    failed = [c for c in codes if c not in (0, 5)]
    print(f"== ptfast tests: {'FAILED' if failed else 'OK'} (pytest exit codes {codes}) ==", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
