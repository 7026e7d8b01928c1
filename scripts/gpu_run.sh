#!/usr/bin/env bash
# The one script a lent GPU machine runs.
#
#   bash scripts/gpu_run.sh first-contact         # FIRST on a bare GPU (under 9 minutes): install (csrc/ for this
#                                                 #   GPU's arch only), GPU correctness smoke, headline benchmarks,
#                                                 #   verification record (ptfast/verified.json: commit it), and
#                                                 #   the order of the GPU test slices to run next. On a machine
#                                                 #   without a GPU: the CPU rehearsal (CI runs it), under 3 minutes
#   bash scripts/gpu_run.sh tests-slice NAME      # one slice of the GPU test tier (first-contact prints the order;
#                                                 #   python -m benchmarks.first_contact tier lists them)
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
# PTFAST_TESTS_TIMEOUT, PTFAST_BENCH_TIMEOUT, PTFAST_BENCH_REPORT_MARGIN, PTFAST_SMOKE_TIMEOUT,
# PTFAST_HEADLINE_TIMEOUT, PTFAST_FC_TAIL_RESERVE, PTFAST_REINSTALL=1, PYTHON, OUT.
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
  first-contact|tests-slice|setup|tests|bench|convergence|all) ;;
  -h|--help|help) sed -n '2,28p' "$0"; exit 0 ;;
  *) echo "usage: bash scripts/gpu_run.sh [first-contact|tests-slice NAME|setup|tests|bench|convergence|all] [args]" >&2
     exit 2 ;;
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
left() {  # left WANTED [RESERVE]: seconds a phase may use (WANTED, or what remains of CMD_BUDGET minus packing
          # time and RESERVE, the seconds kept for the phases after it)
  local rest=$(( CMD_BUDGET - SECONDS - 15 - ${2:-0} ))
  (( rest < $1 )) && echo "$rest" || echo "$1"
}
note() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$LOGS/status.log"; }
record() {  # record PHASE RC
  note "phase $1 finished with exit code $2"
  if [[ "$2" -ne 0 && "$WORST" -eq 0 ]]; then WORST="$2"; fi
}

pack() {
  local archive="$OUT/ptfast_gpu_results.tar.gz"
  note "packing logs, benchmarks/results and ptfast/verified.json into $archive"
  tar -czf "$archive" -C "$WORK" logs -C "$ROOT" benchmarks/results ptfast/verified.json \
    || echo "[gpu_run] tar failed" >&2
  # Copies of the small logs (the archive + these stay under the 8-file limit of \$OUT).
  local f
  for f in status.log first_contact.md env.log install.log tests.log bench.log; do
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
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    # Build csrc/ for this machine's GPU only (a third of the default three-arch build time).
    local arch
    arch="$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")' 2>/dev/null)"
    [[ -n "$arch" ]] && export TORCH_CUDA_ARCH_LIST="$arch"
  fi
  note "install: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default} $PY -m pip install --no-build-isolation --no-deps -e . (timeout ${t}s)"
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

gpu_visible() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

phase_first_contact() {
  # Steps and budgets (seconds; the command must end inside CMD_BUDGET): smoke 160; headline up to 390 (the sum
  # of its invocations' --time-limit, 300, plus process start-ups), never more than what is left of CMD_BUDGET
  # after keeping TAIL_RESERVE for record + summary + tier (~40): the headline gets --budget, starts no
  # invocation that would not fit, and cuts the last ones' --time-limit (the ResNet steps come last: they feed
  # no record row).
  local dev=cuda jobs=8 fc="$WORK/first_contact" rc
  if ! gpu_visible; then
    dev=cpu; jobs=2
    note "first-contact: no CUDA GPU visible: CPU REHEARSAL (Triton interpreter, fp16, tiny shapes; nothing is committed)"
  fi
  rm -rf "$fc"; mkdir -p "$fc/bench"
  local t; t="$(left "${PTFAST_SMOKE_TIMEOUT:-200}")"
  note "first-contact: smoke ($dev, $jobs processes at a time, timeout ${t}s)"
  timeout "$t" "$PY" -m benchmarks.first_contact smoke --device "$dev" --jobs "$jobs" --timeout 150 \
    --out "$fc/smoke.json" 2>&1 | tee "$LOGS/smoke.log"
  rc=${PIPESTATUS[0]}; record smoke "$rc"
  local tail_reserve="${PTFAST_FC_TAIL_RESERVE:-60}"
  t="$(left "${PTFAST_HEADLINE_TIMEOUT:-390}" "$tail_reserve")"
  if (( t < 60 )); then
    note "first-contact: headline not started, only ${t}s left (keeping ${tail_reserve}s for record, summary, tier)"
    record headline 124
  else
    note "first-contact: headline benchmarks (timeout ${t}s, --budget $(( t - 10 ))s)"
    timeout "$t" "$PY" -m benchmarks.first_contact headline --device "$dev" --out-dir "$fc/bench" \
      --budget "$(( t - 10 ))" 2>&1 | tee "$LOGS/headline.log"
    rc=${PIPESTATUS[0]}; record headline "$rc"
  fi
  local package=() name=verified.json
  # On a GPU a failure is a finding (recorded, summarized); in the rehearsal it means the script is broken.
  if [[ "$dev" == cuda ]]; then package=(--package); else package=(--strict); name=verified.rehearsal.json; fi
  timeout 120 "$PY" -m benchmarks.first_contact record --device "$dev" --smoke "$fc/smoke.json" \
    --results "$fc/bench" --out "$fc/$name" "${package[@]}" 2>&1 | tee "$LOGS/record.log"
  rc=${PIPESTATUS[0]}; record record "$rc"
  timeout 60 "$PY" -m benchmarks.first_contact summary --device "$dev" --smoke "$fc/smoke.json" \
    --results "$fc/bench" --record "$fc/$name" --out "$LOGS/first_contact.md" 2>&1 | tail -n 2
  if [[ "$dev" == cuda ]]; then
    # Into the repository tree, so the archive carries them and a session commits them as they are.
    local dest; dest="$ROOT/benchmarks/results/$("$PY" -c 'import torch; from benchmarks import env; print(env.device_slug(torch.device("cuda")))')/first_contact"
    mkdir -p "$dest" && cp -r "$fc"/smoke.json "$fc"/bench "$fc/$name" "$LOGS/first_contact.md" "$dest"/
  else
    cp "$fc/$name" "$LOGS/$name"
  fi
  note "first-contact: the rest of the GPU tier, in this order (one command each):"
  # (That the slices hold every GPU test exactly once is checked by CI: python -m benchmarks.first_contact tier --check.)
  timeout 120 "$PY" -m benchmarks.first_contact tier --out "$fc/tier_plan.json" 2>&1 | tee -a "$LOGS/status.log"
}

phase_tests_slice() {
  local name="${1:?tests-slice needs a slice name (python -m benchmarks.first_contact tier lists them)}"
  local args t
  args="$("$PY" -c 'import sys; from benchmarks.first_contact import tier; print("\n".join(tier.slice_args(sys.argv[1])))' "$name")" \
    || { note "tests-slice: unknown slice $name"; record tests 2; return; }
  mapfile -t args <<< "$args"
  t="$(left "$TESTS_TIMEOUT")"
  note "tests-slice $name: $PY tests/run.py --gpu -m gpu ${args[*]} (timeout ${t}s)"
  timeout "$t" "$PY" tests/run.py --gpu -m gpu "${args[@]}" --junitxml="$LOGS/junit-$name.xml" 2>&1 \
    | tee -a "$LOGS/tests.log"
  record tests "${PIPESTATUS[0]}"
  # Measured durations, for the next plan (python -m benchmarks.first_contact tier reads them when committed).
  "$PY" - "$LOGS/junit-$name.xml" "$ROOT/benchmarks/results" <<'PYEOF' 2>&1 | tail -n 1
import json, sys, torch
from pathlib import Path
from benchmarks import env
from benchmarks.first_contact import tier
xml = Path(sys.argv[1])
if xml.is_file():
    dest = Path(sys.argv[2]) / env.device_slug(torch.device("cuda")) / "tier_durations.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(dest.read_text()) if dest.is_file() else {}
    old.update(tier.durations_from_junit(xml.read_text()))
    dest.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    print(f"durations of {len(old)} tests in {dest}")
PYEOF
}

phase_env
phase_install
phase_wheels
case "$PHASE" in
  first-contact) phase_first_contact ;;
  tests-slice) phase_tests_slice "$@" ;;
  setup) ;;
  tests) phase_tests "$@" ;;
  bench) phase_bench "$@" ;;
  convergence) phase_convergence "$@" ;;
  all) phase_tests; phase_bench "$@" ;;
esac
exit "$WORST"
