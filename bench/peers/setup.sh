#!/usr/bin/env bash
# Creates the peers' virtual environments under .peers/ (git-ignored), each with pinned versions.
# Idempotent: a venv whose stamp matches its pins is left as it is. torch goes first and exactly
# (a CPU wheel); a looser spec would let pip pull a multi-GB CUDA build.
#   .peers/llmc      llmcompressor 0.14.0.1 + compressed-tensors 0.19.0 (caps transformers <= 5.17.0)
#   .peers/torchao   torchao 0.18.0
#   .peers/gptqmodel gptqmodel 7.6.0 (7.7.0 needs a newer torch)
#   .peers/lmeval    lm-eval 0.4.13 with its API client (bench/lm_eval_served.py; not in the default set)
# Usage: bench/peers/setup.sh [llmc|torchao|gptqmodel ...]   (default: all three)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS="${HAQ_PEERS_DIR:-$ROOT/.peers}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRANSFORMERS_SPEC="transformers==5.17.0"  # the version haq's own venv runs (requirements.lock)

declare -A PINS=(
  [llmc]="llmcompressor==0.14.0.1 compressed-tensors==0.19.0 $TRANSFORMERS_SPEC"
  [torchao]="torchao==0.18.0 $TRANSFORMERS_SPEC accelerate==1.15.0 safetensors==0.8.0"
  [gptqmodel]="gptqmodel==7.6.0 $TRANSFORMERS_SPEC"
  [lmeval]="lm-eval[api]==0.4.13 $TRANSFORMERS_SPEC"
)

make_venv() {
  local name="$1" venv="$PEERS/$1" spec="$TORCH_SPEC ${PINS[$1]}"
  if [[ -f "$venv/.stamp" && "$(cat "$venv/.stamp")" == "$spec" ]]; then
    echo "peers: $name up to date ($spec)"
    return
  fi
  echo "peers: creating $venv ($spec)"
  [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q $spec
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('${TORCH_SPEC#torch==}'), torch.__version__"
  "$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
  echo "$spec" > "$venv/.stamp"
}

mkdir -p "$PEERS"
for name in "${@:-llmc torchao gptqmodel}"; do
  for one in $name; do
    [[ -n "${PINS[$one]+x}" ]] || { echo "peers: unknown venv $one (llmc, torchao, gptqmodel, lmeval)" >&2; exit 2; }
    make_venv "$one"
  done
done
