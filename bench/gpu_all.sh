#!/usr/bin/env bash
# Every check the open issues owe a GPU, for one lent machine in one call (about 9.5 minutes at most):
# #12's int8 kernels and engine (gpu_int8.py), #13's quantizer device path (gpu_quant.py) and #14's
# engine memory at equal service (gpu_memory.py). Each part runs under its own time cap, so a part
# that fails or overruns loses only itself (each writes its files as its parts finish); results go
# to $OUT (8 files: the device returns no more).
# Perplexity text: $TEXT (a file carried along; make it here with `make gpu-text`).
set -u
OUT=${OUT:-bench/results}
PY=${PY:-python}
status=0
part() {
  local cap=$1
  shift
  echo "== $* (at most ${cap} s)"
  timeout -k 10 "$cap" "$PY" "$@" || { echo "== failed or over its cap (exit $?): $*"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
part 230 bench/gpu_int8.py --out "$OUT"
part 180 bench/gpu_quant.py --out "$OUT" ${TEXT:+--text "$TEXT"}
part 150 bench/gpu_memory.py --out "$OUT" --no-plot ${TEXT:+--text "$TEXT"}
find "$OUT" -maxdepth 1 -type f -name '.*' -delete  # a temp file of a write a cap cut short
ls -l "$OUT"
exit $status
