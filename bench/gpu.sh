#!/usr/bin/env bash
# The GPU benchmark in one run (issue: measure the trainer on a real GPU), for a machine with no package index:
#   ../shared/tools/gpu-wheels.sh        # here, first: diffusers and pydantic wheels into .whl/
#   bench/gpu.sh [--cpu]                 # there: install .whl/, time each model, largest first
# Each stack runs in its own process under its own time limit (BENCH_BUDGET_<STACK> seconds), so the whole run
# stays under 8 minutes; every measurement is written to bench/results/<gpu>.json as it is made, so a stack cut
# short keeps what it measured, and running the script again measures only the stacks not yet complete.
# $OUT, when set (the device tool's output folder), receives a copy of the results. --cpu rehearses the same
# run on the tiny models.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STACKS=${BENCH_STACKS:-"flux-h100 sdxl-4090 sd15-3090"}  # largest first: a short budget loses the small ones
declare -A BUDGET=([flux-h100]=${BENCH_BUDGET_FLUX:-180} [sdxl-4090]=${BENCH_BUDGET_SDXL:-150}
                   [sd15-3090]=${BENCH_BUDGET_SD15:-90} [sd35-4090]=${BENCH_BUDGET_SD35:-120}
                   [ldm256-local]=${BENCH_BUDGET_LDM:-60})
DEVICE_ARGS=(--no-per-image-flops)  # the FLOP counts are the CPU's work (bench/results/flops.json is committed)
if [ "${1:-}" = "--cpu" ]; then
  DEVICE_ARGS+=(--device cpu --size tiny)
  for stack in "${!BUDGET[@]}"; do BUDGET[$stack]=60; done
fi

if [ -d .whl ] && ! "$PYTHON" -c "import diffusers, pydantic" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

status=0
for stack in $STACKS; do
  limit=${BUDGET[$stack]:-120}
  echo "== $stack (at most ${limit}s)"
  timeout --signal=TERM --kill-after=15 "$limit" \
    "$PYTHON" -m bench --stacks "$stack" --skip-completed "${DEVICE_ARGS[@]}"
  code=$?
  if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    echo "== $stack: time limit reached; its measurements so far are kept, run again to finish it"
    status=3
  elif [ "$code" -ne 0 ]; then
    echo "== $stack: failed (exit $code)"
    status=1
  fi
done

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp bench/results/*.json bench/README.md "$OUT"/
fi
exit $status
