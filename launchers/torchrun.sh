#!/usr/bin/env bash
# Single node, N processes:  launchers/torchrun.sh NPROC CONFIG [hydra overrides...]
#   launchers/torchrun.sh 2 sft_tiny parallel=tp2 hydra.run.dir=runs/tp2
# Every rank must write to the same run directory: pass hydra.run.dir explicitly (the default
# contains a timestamp, which ranks starting a second apart would not share).
set -euo pipefail
NPROC=${1:?usage: launchers/torchrun.sh NPROC CONFIG [overrides...]}
CONFIG=${2:?usage: launchers/torchrun.sh NPROC CONFIG [overrides...]}
shift 2
if ! printf '%s\n' "$@" | grep -q '^hydra.run.dir='; then
  set -- "$@" "hydra.run.dir=runs/${CONFIG}/$(date +%Y-%m-%d_%H-%M-%S)"
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m nemo_rlhf.train --config-name "$CONFIG" "$@"
