#!/usr/bin/env bash
# Slurm, one task per GPU:   sbatch --nodes=4 launchers/multinode.sh ppo_20b trainer.num_nodes=4
#
# Environment knobs (export before sbatch, or pass with --export):
#   CONTAINER_IMAGE   pyxis/enroot image (e.g. an NGC NeMo/PyTorch image with nemo_rlhf installed);
#                     unset = run in the current Python environment
#   CONTAINER_MOUNTS  extra pyxis mounts, e.g. /lustre/data:/data (the repo is mounted at /workspace)
#   RUN_DIR           run directory (default runs/<config>/<job id>); the same directory on requeue,
#                     so `resume=auto` picks up the latest complete checkpoint
#SBATCH --job-name=nemo_rlhf
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail
CONFIG=${1:?usage: sbatch launchers/multinode.sh CONFIG [overrides...]}
shift
mkdir -p logs
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
RUN_DIR=${RUN_DIR:-runs/${CONFIG}/${SLURM_JOB_ID}}
CMD=(python -m nemo_rlhf.train --config-name "$CONFIG" "hydra.run.dir=${RUN_DIR}" resume=auto "$@")
SRUN_ARGS=(--kill-on-bad-exit=1)
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-workdir=/workspace
              --container-mounts="$(pwd):/workspace${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi
# Pre-emption / time limit: Slurm sends USR1 120 s early; requeue the job (the new run resumes
# from the latest complete checkpoint; writes are atomic, so a kill mid-save is harmless).
trap 'echo "nemo_rlhf: USR1 received, requeueing ${SLURM_JOB_ID}"; scontrol requeue "$SLURM_JOB_ID"' USR1
srun "${SRUN_ARGS[@]}" "${CMD[@]}" &
wait $!
