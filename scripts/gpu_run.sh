#!/usr/bin/env bash
# The one script a lent GPU machine runs.
#
#   bash scripts/gpu_run.sh setup                 # environment report + in-place install (builds csrc/ if nvcc)
#   bash scripts/gpu_run.sh tests [PYTEST_ARGS]   # + GPU test tier (python3 tests/run.py --gpu [PYTEST_ARGS]);
#                                                 #   split it over commands with e.g. -m gpu -k "faults or opcheck"
#                                                 #   (a later -m replaces the default "gpu or not interpreter")
#   bash scripts/gpu_run.sh bench [ARGS...]       # + python3 -m benchmarks.run --all --device cuda [ARGS...]
#   bash scripts/gpu_run.sh convergence [ARGS...] # + python3 -m benchmarks.convergence --device cuda [ARGS...]
#                                                 #   (e.g. --runs stock ptfast, then --runs stock-seed2: finished
#                                                 #   runs are kept under benchmarks/results/ and reused)
#   bash scripts/gpu_run.sh all [ARGS...]         # setup + tests + bench (may exceed one 10-minute command)
#
# Every phase prints nvidia-smi and the env report, installs only when setup.py/pyproject/csrc changed since
# the last install on this machine, and finishes by packing ALL logs so far plus benchmarks/results/ into ONE
# archive $OUT/ptfast_gpu_results.tar.gz (small logs are also copied next to it). Each phase has its own
# `timeout`, so one command stays inside the workplace's 10-minute limit; run the phases as separate commands.
# Extra bench args go to benchmarks.run (e.g. --op attention, --cuda-graphs, --full); when they name --op,
# --all is not added. Tunables: PTFAST_CMD_BUDGET (575 s for the whole command), PTFAST_INSTALL_TIMEOUT,
# PTFAST_TESTS_TIMEOUT, PTFAST_BENCH_TIMEOUT, PTFAST_BENCH_REPORT_MARGIN, PTFAST_REINSTALL=1, PYTHON, OUT.
# Benchmark baselines (Liger-Kernel, cut-cross-entropy): wheels/*.whl, fetched here by
# scripts/fetch_bench_wheels.sh and carried with carry: ["wheels"], are installed by every phase with
# pip --no-deps --no-index (appended to install.log; a failure is logged, never fatal).

set -uo pipefail  # no -e: a failing phase is logged and the results are still packed
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PHASE="${1:-all}"
[[ $# -gt 0 ]] && shift
case "$PHASE" in
  setup|tests|bench|convergence|all) ;;
  -h|--help|help) sed -n '2,18p' "$0"; exit 0 ;;
  *) echo "usage: bash scripts/gpu_run.sh [setup|tests|bench|convergence|all] [extra args]" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu_out}"
WORK="${PTFAST_GPU_WORK:-${TMPDIR:-/tmp}/ptfast_gpu}"
LOGS="$WORK/logs"
mkdir -p "$OUT" "$LOGS" "$ROOT/benchmarks/results"
# The source tree is importable even if the editable install fails (then without the CUDA extension).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The whole command must end (packing included) inside the workplace's 10-minute limit, and a machine left
# idle is handed back, so every call may start bare and reinstall: phases get what is left of CMD_BUDGET.
CMD_BUDGET="${PTFAST_CMD_BUDGET:-575}"
INSTALL_TIMEOUT="${PTFAST_INSTALL_TIMEOUT:-300}"
TESTS_TIMEOUT="${PTFAST_TESTS_TIMEOUT:-540}"
BENCH_TIMEOUT="${PTFAST_BENCH_TIMEOUT:-540}"
# The runner stops starting new measurements this many seconds before its timeout, then writes its reports.
BENCH_REPORT_MARGIN="${PTFAST_BENCH_REPORT_MARGIN:-45}"

WORST=0
left() {  # left WANTED: seconds a phase may use (WANTED, or what remains of CMD_BUDGET minus packing time)
  local rest=$(( CMD_BUDGET - SECONDS - 15 ))
  (( rest < $1 )) && echo "$rest" || echo "$1"
}
note() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$LOGS/status.log"; }
record() {  # record PHASE RC
  note "phase $1 finished with exit code $2"
  if [[ "$2" -ne 0 && "$WORST" -eq 0 ]]; then WORST="$2"; fi
}

pack() {
  local archive="$OUT/ptfast_gpu_results.tar.gz"
  note "packing logs and benchmarks/results into $archive"
  tar -czf "$archive" -C "$WORK" logs -C "$ROOT" benchmarks/results \
    || echo "[gpu_run] tar failed" >&2
  # Copies of the small logs (the archive + these stay under the 8-file limit of \$OUT).
  local f
  for f in status.log env.log install.log tests.log bench.log convergence.log; do
    if [[ -f "$LOGS/$f" && $(stat -c %s "$LOGS/$f") -lt 4000000 ]]; then cp "$LOGS/$f" "$OUT/$f"; fi
  done
}
trap pack EXIT

phase_env() {
  note "phase env ($PHASE)"
  {
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) phase $PHASE on $(hostname) =="
    nvidia-smi || echo "nvidia-smi failed (exit $?)"
    timeout 120 "$PY" -m ptfast.env_report || echo "python3 -m ptfast.env_report failed (exit $?)"
  } 2>&1 | tee "$LOGS/env.log"
}

install_key() {
  { cat setup.py pyproject.toml 2>/dev/null
    find csrc -type f -print0 2>/dev/null | sort -z | xargs -0 -r cat
  } | sha1sum | cut -d' ' -f1
}

phase_install() {
  local key stamp="$WORK/install.stamp"
  key="$(install_key)"
  if [[ "${PTFAST_REINSTALL:-0}" != 1 && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    note "install: up to date (setup.py/pyproject.toml/csrc unchanged since the last install here)"
    return 0
  fi
  local t; t="$(left "$INSTALL_TIMEOUT")"
  note "install: $PY -m pip install --no-build-isolation --no-deps -e . (timeout ${t}s)"
  timeout "$t" "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$LOGS/install.log"
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "$key" > "$stamp"
  else
    # Not fatal: the pure-Python package still runs from the tree (PYTHONPATH) without the CUDA extension.
    note "install FAILED (exit $rc): continuing from the source tree without the CUDA extension; see install.log"
  fi
  "$PY" -c "import ptfast, sys; print('ptfast imported from', ptfast.__file__)" 2>&1 | tee -a "$LOGS/install.log"
}

phase_wheels() {  # optional third-party wheels for the benchmark baselines; never fatal
  local whls=() w
  for w in "$ROOT"/wheels/*.whl; do [[ -f "$w" ]] && whls+=("$w"); done
  if (( ${#whls[@]} == 0 )); then
    note "wheels: none in wheels/ (bash scripts/fetch_bench_wheels.sh here, then carry [\"wheels\"])"
    return 0
  fi
  note "wheels: $PY -m pip install --no-deps --no-index ${whls[*]##*/}"
  {
    echo "== wheels/ install $(date -u +%Y-%m-%dT%H:%M:%SZ) =="
    timeout 120 "$PY" -m pip install --disable-pip-version-check --no-deps --no-index "${whls[@]}"
  } 2>&1 | tee -a "$LOGS/install.log"
  local rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then
    note "wheels: install FAILED (exit $rc); the providers that need them will be skipped; see install.log"
  fi
  for w in "${whls[@]}"; do
    w="${w##*/}"
    "$PY" -c "import importlib.metadata as m, sys; print('wheels:', sys.argv[1], m.version(sys.argv[1]))" \
      "${w%%-*}" 2>&1 | tail -n 1 | tee -a "$LOGS/install.log"
  done
  return 0
}

phase_tests() {
  local t; t="$(left "$TESTS_TIMEOUT")"
  if (( t < 30 )); then note "tests: not started, only ${t}s left of this command"; record tests 124; return; fi
  note "tests: $PY tests/run.py --gpu $* (timeout ${t}s)"
  # Appends, so a session that splits the tier over several commands keeps every part's log.
  timeout "$t" "$PY" tests/run.py --gpu "$@" 2>&1 | tee -a "$LOGS/tests.log"
  record tests $?
}

phase_bench() {
  local args=("$@") have_op=0 a
  for a in "${args[@]}"; do [[ "$a" == "--op" || "$a" == --op=* ]] && have_op=1; done
  [[ $have_op -eq 0 ]] && args=(--all "${args[@]}")
  local t; t="$(left "$BENCH_TIMEOUT")"
  if (( t < 90 )); then note "bench: not started, only ${t}s left of this command"; record bench 124; return; fi
  # The script's --time-limit comes first so one given in ARGS wins (argparse keeps the last).
  local cmd=("$PY" -m benchmarks.run --device cuda --time-limit "$(( t - BENCH_REPORT_MARGIN ))" "${args[@]}")
  note "bench: ${cmd[*]} (timeout ${t}s)"
  # Appends, so a session that runs one op per command keeps every op's log.
  timeout "$t" "${cmd[@]}" 2>&1 | tee -a "$LOGS/bench.log"
  record bench $?
}

phase_convergence() {
  local t; t="$(left "$BENCH_TIMEOUT")"
  if (( t < 90 )); then note "convergence: not started, only ${t}s left of this command"; record convergence 124; return; fi
  local cmd=("$PY" -m benchmarks.convergence --device cuda "$@")
  note "convergence: ${cmd[*]} (timeout ${t}s)"
  timeout "$t" "${cmd[@]}" 2>&1 | tee -a "$LOGS/convergence.log"
  record convergence $?
}

phase_env
phase_install
phase_wheels
case "$PHASE" in
  setup) ;;
  tests) phase_tests "$@" ;;
  bench) phase_bench "$@" ;;
  convergence) phase_convergence "$@" ;;
  all) phase_tests; phase_bench "$@" ;;
esac
exit "$WORST"
