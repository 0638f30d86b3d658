#!/usr/bin/env bash
# The GPU check: every CUDA path of the project, run unattended on one CUDA machine in under ten
# minutes, one line per figure (`name: value unit`), a summary line at the end.
#
#   benchmarks/gpu_check.sh [--cpu] [--work DIR] [--keep]
#
#   1. the device tests (tests/test_devices.py, and the option checks whose cases depend on CUDA) on
#      this machine: on a CUDA machine they include the GPU-only test (the demo model on the GPU, in
#      memory and layer-streamed, against the CPU within the float32 bound);
#   2. `abliterate demo --device cuda --dtype float32` against `abliterate demo --device cpu`: refusal
#      rates and KL of both, the same selected position, directions and first-token figures within
#      tests/numerics.py's float32 bounds (benchmarks/gpu_check_figures.py says how);
#   3. benchmarks/bench_run_streamed.py --device cuda at GLM-4.5-Air's widths: one MoE layer's read and
#      tokens/s on the GPU, and the full GLM-4.5-Air run projected from those measured rates;
#   4. a model loaded with --device auto and a small --memory-budget, spread over the GPU, host memory
#      and disk by accelerate's device map, against the same model on the CPU;
#   5. benchmarks/bench_search.py --device cuda with a few trials: the search's trials per minute.
#
# --cpu (or GPU_CHECK_CPU=1): the same steps on the CPU with tiny sizes (what CI runs,
# tests/test_gpu_check.py): the device run of step 2 is then the CPU with another batch size, so the
# comparison still compares two different float32 computations.
#
# Each step runs under `timeout` (GPU bounds: 60 + 210 + 140 + 60 + 90 = 560 s, and 5 s more each
# for a step that ignores the signal); a step that fails or times out is reported, the others still
# run, and the exit code is 1 when any step failed.
# Offline (HF_HUB_OFFLINE, no telemetry), installs nothing: the python is $PYTHON, else .venv/bin/python
# (the README's install command). Chatter goes to WORK/step-N.log (WORK: a temporary folder, deleted
# at the end unless --keep or --work is given).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MODE=gpu
[[ "${GPU_CHECK_CPU:-0}" == 1 ]] && MODE=cpu
WORK=""
KEEP=0
STEP=""
while (($#)); do
  case "$1" in
    --cpu) MODE=cpu ;;
    --work) WORK="$2"; KEEP=1; shift ;;
    --keep) KEEP=1 ;;
    --step) STEP="$2"; shift ;;  # internal: run one step (under timeout)
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1': use --cpu, --work DIR or --keep" >&2; exit 2 ;;
  esac
  shift
done
if [[ ! -x "$PY" ]]; then
  echo "gpu_check.sh: no python at $PY: run the README's install command, or set PYTHON" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_ENABLE_TELEMETRY=false
MODE_ARGS=()
if [[ "$MODE" == gpu ]]; then
  DEVICE=cuda
  BOUNDS=(60 210 140 60 90)
else
  DEVICE=cpu
  MODE_ARGS=(--cpu)
  BOUNDS=(300 900 900 180 900)  # a busy 2-core machine
fi

abliterate() { "$PY" -c 'import sys; from abliterate.cli import main; sys.exit(main())' "$@"; }
figures() { "$PY" benchmarks/gpu_check_figures.py "$@"; }

step_1() {  # the device tests
  local began=$SECONDS
  local status=0
  "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py \
    "tests/test_cli_options.py::test_bad_settings_are_one_line_errors" >"$WORK/pytest.log" 2>&1 || status=$?
  tail -n 30 "$WORK/pytest.log" >&2
  figures tests "$WORK/pytest.log" "$((SECONDS - began))"
  return "$status"
}

step_2() {  # the demo on the device against the demo on the CPU
  local run
  for run in cpu device; do
    local options=(--device cpu --dtype float32)
    if [[ "$run" == device ]]; then
      options=(--device "$DEVICE" --dtype float32)
      [[ "$MODE" == cpu ]] && options+=(--batch-size 7)
    fi
    # each run its own project folder: no cached stage of the other run is reused
    ABLITERATE_HOME="$WORK/demo-$run-home" abliterate demo "${options[@]}" --json --quiet --overwrite \
      --out "$WORK/demo-$run" --work-dir "$WORK/demo-$run-home/results" >"$WORK/demo-$run.json"
  done
  figures demo "$WORK/demo-cpu" "$WORK/demo-cpu.json" "$WORK/demo-device" "$WORK/demo-device.json"
}

step_3() {  # GLM-4.5-Air widths, streamed on the device
  local began=$SECONDS
  local sizes=(--moe-layers 1 --experts 32 --prompts 8 --layer-tokens 4096)
  [[ "$MODE" == cpu ]] && sizes=(--moe-layers 1 --experts 8 --prompts 4 --layer-tokens 64)
  ABLITERATE_HOME="$WORK/streamed-home" "$PY" benchmarks/bench_run_streamed.py "${sizes[@]}" \
    --device "$DEVICE" --dir "$WORK/streamed" --figures "$WORK/streamed.json" >&2
  figures streamed "$WORK/streamed.json" "$((SECONDS - began))"
}

step_4() {  # --device auto over the GPU, host memory and disk
  figures auto "$WORK" --device "$DEVICE"
}

step_5() {  # the search's trials per minute
  local began=$SECONDS
  local trials=8
  [[ "$MODE" == cpu ]] && trials=3
  "$PY" benchmarks/bench_search.py --trials "$trials" --device "$DEVICE" --json "$WORK/search.json" >&2
  figures search "$WORK/search.json" "$((SECONDS - began))"
}

if [[ -n "$STEP" ]]; then  # one step, run by the loop below under its time bound
  "step_$STEP"
  exit
fi
if [[ "$MODE" == gpu ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check.sh: torch sees no CUDA device: run it on a CUDA machine, or with --cpu for the CPU steps" >&2
  exit 2
fi

if [[ -z "$WORK" ]]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
export ABLITERATE_HOME="$WORK/home"  # MLflow runs and results of every step: none in the checkout
NAMES=("device tests" "demo on $DEVICE against cpu" "real-width streamed benchmark" "--device auto spread" "search trials per minute")
began=$SECONDS
passed=0
failed=()
for step in 1 2 3 4 5; do
  bound=${BOUNDS[$((step - 1))]}
  start=$SECONDS
  status=0
  timeout -k 5 "$bound" bash "${BASH_SOURCE[0]}" --step "$step" --work "$WORK" "${MODE_ARGS[@]}" \
    2>"$WORK/step-$step.log" || status=$?
  if ((status == 0)); then
    passed=$((passed + 1))
    echo "step_${step}_seconds: $((SECONDS - start)) s"
  else
    why="exit code $status"
    ((status == 124 || status == 137)) && why="timed out after $bound s"
    failed+=("$step")
    echo "step_${step}_seconds: $((SECONDS - start)) s"
    echo "step $step (${NAMES[$((step - 1))]}) FAILED: $why; the end of $WORK/step-$step.log:" >&2
    tail -n 15 "$WORK/step-$step.log" >&2
  fi
done
echo "gpu_check: ${passed} of 5 steps passed (mode $MODE, device $DEVICE)${failed:+, failed: ${failed[*]}}, $((SECONDS - began)) s"
if ((KEEP == 0)); then
  rm -rf "$WORK"
fi
((${#failed[@]} == 0))
