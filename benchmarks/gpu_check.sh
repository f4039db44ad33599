#!/usr/bin/env bash
# Every GPU test and GPU benchmark of nf4lora in one run, with all results written into one folder. Budget: the
# steps' time caps add up to 18.5 minutes on one H200-class GPU; a 15-minute device slot runs `--only tests,decode`
# (at most 9 minutes with the installs) or `--only bench-kernels,bench-qlora-step` (at most 8). GPU time comes in
# short slots: run this, then commit what it wrote under benchmarks/results/ (see docs/benchmarking.md).
#
#   benchmarks/gpu_check.sh RESULTS_DIR [--bnb-wheels DIR] [--python PY] [--only STEPS] [--dry-run]
#
#   RESULTS_DIR       created if missing; gets summary.txt, env.txt, one log per step, test reports, benchmark files
#   --bnb-wheels DIR  install bitsandbytes 0.50.* from the wheels in DIR over any installed version (pip --no-index
#                     --force-reinstall --no-deps: nothing from the network), and build nf4lora with a setuptools
#                     wheel from DIR if nf4lora needs installing; without it an installed bitsandbytes is used, and
#                     without one the peer columns stay empty
#   --python PY       interpreter to use (default: .venv/bin/python if present, else python3)
#   --only STEPS      comma-separated subset of: tests, decode, bench-kernels, bench-qlora-step,
#                     triton-tests-compiled (default all, in that order); the others are named SKIPPED in
#                     summary.txt. decode (6 minutes at most): the memory-bound kernels against bitsandbytes and a
#                     device copy of as many bytes (dequantize, GEMV at M = 1, 2, 4, 8), the host cost per call with
#                     its profile, greedy generation of a LLaMA-7B-shaped model against transformers +
#                     bitsandbytes (bench_generate.py), then the GEMV's candidate launches (kernel_versions.py)
#   --dry-run         on the CPU: check the script and its steps work (GPU tests are collected, not run; the
#                     kernel benchmark runs with tiny shapes on the CPU); installs nothing. CI runs this.
#
# Set NF4LORA_COMMIT to the commit being checked when the checkout's git metadata may be stale (a copied tree).
# Installs nothing from the network. If nf4lora is not importable it is installed from this checkout (pip --no-deps
# --no-index; with --bnb-wheels the build runs isolated, with DIR's setuptools). Every skipped step is named in
# summary.txt. Exit status is 1 if any step that ran failed.
set -uo pipefail

usage() { sed -n '7,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

STEPS="tests,decode,bench-kernels,bench-qlora-step,triton-tests-compiled"
OUT="" WHEELS="" PY="" DRY=0 ONLY="$STEPS"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bnb-wheels) WHEELS="${2:?--bnb-wheels needs a directory}"; shift 2 ;;
        --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
        --only) ONLY="${2:?--only needs a comma-separated list of steps}"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [[ -z "$OUT" ]] || { echo "one RESULTS_DIR only, got '$OUT' and '$1'" >&2; usage; }; OUT="$1"; shift ;;
    esac
done
[[ -n "$OUT" ]] || usage
for s in ${ONLY//,/ }; do
    [[ ",$STEPS," == *",$s,"* ]] || { echo "unknown step '$s' in --only: the steps are $STEPS" >&2; usage; }
done
# wanted STEP: whether --only selected it (the default selects every step); names it SKIPPED otherwise.
wanted() { [[ ",$ONLY," == *",$1,"* ]] && return 0; skip "$1" "not in --only $ONLY"; return 1; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "$PY" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# Never put the checkout on sys.path: its kernels/ and models/ folders shadow unrelated packages (docs/architecture.md).
# Benchmark scripts run without it (they import harness.py from their own folder, which is safe).
export PYTHONSAFEPATH=1
cd "$REPO"

say() { echo "$*" | tee -a "$SUMMARY"; }
skip() { say "SKIPPED  $1: $2"; }

# step NAME TIMEOUT_S CMD...: run with a time cap, log to NAME.log, record status and duration in the summary.
step() {
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    if [[ $rc -eq 0 ]]; then
        say "OK       $name (${took}s)"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        say "TIMEOUT  $name after ${limit}s (see $name.log)"; FAILED=1
    else
        say "FAILED   $name (exit $rc, ${took}s; see $name.log)"; FAILED=1
    fi
    tail -n 5 "$OUT/$name.log"
    return $rc
}

say "nf4lora gpu_check $( ((DRY)) && echo '(dry run, CPU)' ) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "python: $PY"

# record_env: date, commit, GPU and the versions in use (called after the installs, so it names what ran).
record_env() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        # A copied working tree may carry stale git metadata (the device tool's copy did): NF4LORA_COMMIT overrides.
        echo "git: ${NF4LORA_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
        if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
        "$PY" - <<'EOF'
import importlib.metadata as md, platform
import torch
print("python", platform.python_version())
for name in ("torch", "triton", "bitsandbytes", "nf4lora", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
print("cuda available:", torch.cuda.is_available(), "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if ((DRY == 0)) && [[ "$HAS_CUDA" != 1 ]]; then
    record_env
    say "FAILED   no CUDA device visible to $PY: nothing to check (use --dry-run on a CPU machine)"
    exit 1
fi

# -- installs (local files only) -----------------------------------------------------------------------------------
if ! "$PY" -c "import nf4lora.kernels" 2> /dev/null; then
    if ((DRY)); then
        skip "install nf4lora" "dry run installs nothing, and nf4lora is not importable"; record_env; exit 1
    fi
    if [[ -n "$WHEELS" ]]; then  # build in isolation with the setuptools wheel from DIR (pyproject needs >= 77)
        step install-nf4lora 300 "$PY" -m pip install --no-deps --no-index --find-links "$WHEELS" -e "$REPO" \
            || { record_env; exit 1; }
    else
        step install-nf4lora 300 "$PY" -m pip install --no-deps --no-index --no-build-isolation -e "$REPO" \
            || { record_env; exit 1; }
    fi
fi
# The wheel's bitsandbytes even where another version is installed (a plain pip install keeps that one);
# --no-deps: its dependencies (torch, numpy) stay as they are.
BNB_INSTALL=("$PY" -m pip install --no-index --find-links "$WHEELS" --force-reinstall --no-deps "bitsandbytes==0.50.*")
if [[ -n "$WHEELS" ]]; then
    if ((DRY)); then
        skip "install bitsandbytes" "dry run: would run ${BNB_INSTALL[*]:1}"
    else
        step install-bitsandbytes 300 "${BNB_INSTALL[@]}"
    fi
fi
record_env  # after the installs: the versions the steps below use
BNB_OK=$("$PY" -c "import bitsandbytes" > /dev/null 2>&1 && echo 1 || echo 0)
PYTEST_OK=$("$PY" -c "import pytest" > /dev/null 2>&1 && echo 1 || echo 0)
((BNB_OK)) || skip "bitsandbytes peer" "not importable: benchmark peer columns are n/a and its GPU test is deselected"

# -- tests ----------------------------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -p no:cacheprovider -q)
DESELECT=()
# pytest-xdist (if installed) compiles the kernel variants of different tests on several cores at once
XDIST=()
"$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n 8)
((BNB_OK)) || DESELECT=(-k "not bitsandbytes")
if ! wanted tests; then
    :
elif ((PYTEST_OK == 0)); then
    skip "tests" "pytest is not installed for $PY"
elif ((DRY)); then
    step gpu-tests-collect 120 "${PYTEST[@]}" -m gpu --collect-only tests/
    skip "gpu tests" "dry run: collected above, not run (no GPU)"
else
    step gpu-tests 150 "${PYTEST[@]}" "${XDIST[@]}" -m gpu "${DESELECT[@]}" --junitxml="$OUT/gpu-tests.xml" tests/
fi

# -- decode: the memory-bound kernels and generation, each part capped so that the next still runs -----------------
# (run by bash -c so that one step reports them; a part that fails or times out fails the step, the others run)
DECODE_PARTS=(
    "140|benchmarks/bench_kernels.py --device cuda --only dequant,decode,host|--device cpu --quick --repeat 1 --only dequant"
    "110|benchmarks/bench_generate.py --device cuda --model 7b|--device cpu --model tiny --prompt-len 8 --new 4 --rounds 1"
    "40|benchmarks/bench_generate.py --device cuda --model builtin|--help"
    "70|benchmarks/kernel_versions.py --device cuda|--device cpu"
)
if wanted decode; then
    parts="rc=0"
    for part in "${DECODE_PARTS[@]}"; do
        IFS='|' read -r limit cmd dry_args <<< "$part"
        script=${cmd%% *}
        if ((DRY)); then
            parts+="; echo '== $script $dry_args'; TRITON_INTERPRET=1 timeout $limit '$PY' $script $dry_args --out '$OUT' || rc=1"
        else
            parts+="; echo '== $cmd'; timeout $limit '$PY' $cmd --out '$OUT' || rc=1"
        fi
    done
    step "decode$( ((DRY)) && echo -dry)" 370 env -u PYTHONSAFEPATH bash -c "$parts; exit \$rc"
fi

# -- benchmarks -----------------------------------------------------------------------------------------------------
# One entry per GPU benchmark: "name|timeout|script and GPU arguments|arguments of the CPU dry run" (the results
# folder is appended as --out). The dry run is a quick CPU run of the same script: it proves it imports and writes
# its files (with TRITON_INTERPRET=1, for the scripts that run Triton kernels on CPU tensors).
BENCHES=(
    "bench-kernels|150|benchmarks/bench_kernels.py --device cuda|--device cpu --quick --repeat 1"
    "bench-qlora-step|300|benchmarks/bench_qlora_step.py --device cuda --synthetic 1b --seq-len 2048 --batch 1 --tokens-per-step 2048,4096,8192 --grad-ckpt on --steps 4 --warmup 2 --rounds 1|--device cpu --synthetic tiny --seq-len 32 --batch 2 --tokens-per-step 64 --steps 1 --warmup 1 --rounds 1"
)
for entry in "${BENCHES[@]}"; do
    IFS='|' read -r name limit cmd dry_args <<< "$entry"
    script=${cmd%% *}
    if ! wanted "$name"; then
        continue
    elif ((DRY)); then
        step "$name-dry" 240 env -u PYTHONSAFEPATH TRITON_INTERPRET=1 "$PY" $script $dry_args --out "$OUT"
    else
        step "$name" "$limit" env -u PYTHONSAFEPATH "$PY" $cmd --out "$OUT"
    fi
done

# -- the CPU-interpreter kernel tests, compiled this time (they run on CUDA tensors when a GPU exists) -------------
if ! wanted triton-tests-compiled; then
    :
elif ((DRY)); then
    skip "compiled kernel tests" "dry run: tests/test_kernels_triton.py runs in CI under the interpreter"
elif ((PYTEST_OK)); then
    step triton-tests-compiled 80 "${PYTEST[@]}" "${XDIST[@]}" --junitxml="$OUT/triton-tests.xml" tests/test_kernels_triton.py \
        tests/test_kernels_model_ops.py
fi

say "total ${SECONDS}s; results in $OUT"
((FAILED == 0)) && say "ALL STEPS THAT RAN PASSED" || say "SOME STEPS FAILED"
exit $FAILED
