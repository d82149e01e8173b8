#!/usr/bin/env bash
# nemo_rlhf on Slurm: one srun task per GPU (default) or one torchrun per node.
#   sbatch --nodes=4 launchers/multinode.sh ppo_20b trainer.num_nodes=4
#   sbatch --nodes=2 --time=4:00:00 launchers/multinode.sh ppo_70b trainer.num_nodes=2 optim.lr=5e-7
#   NEMO_RLHF_IMAGE=nvcr.io/nvidia/nemo:25.04 sbatch --nodes=4 launchers/multinode.sh ppo_20b trainer.num_nodes=4
# Submit from the repository root (logs/ is there; Slurm opens --output before this script runs,
# so the directory must exist; elsewhere pass --output=... or mkdir -p logs first).
#
# Environment (export before sbatch; sbatch passes the environment on):
#   NEMO_RLHF_LAUNCH   srun (default): srun starts one task per GPU (--ntasks-per-node below) and
#                      every task runs `python -m nemo_rlhf.train`; ranks come from SLURM_PROCID /
#                      SLURM_LOCALID / SLURM_STEP_NUM_TASKS (nemo_rlhf.parallel.detect_launch_env).
#                      torchrun: srun starts one task per node, each runs torchrun with
#                      NEMO_RLHF_NPROC_PER_NODE (default: --ntasks-per-node) workers and a c10d
#                      rendezvous on the first node; use it where srun cannot bind GPUs per task.
#   NEMO_RLHF_IMAGE    container image for pyxis/enroot (srun --container-image); unset = run in the
#                      current environment (activate the venv before sbatch).
#   NEMO_RLHF_MOUNTS   extra container mounts, src:dst[,src:dst...] (the submit directory is
#                      mounted at the same path and is the working directory).
#   NEMO_RLHF_PYTHON   the Python to run (default: python).
#   RUN_DIR            run directory (default runs/<config>/slurm-<job id>). A requeued job keeps its
#                      job id, so the same directory: `resume=auto` continues from its latest
#                      complete checkpoint.
#   NEMO_RLHF_REQUEUE  1 (default): requeue when the time-limit signal stopped the run; 0: do not.
#
# Pre-emption and time limits (see nemo_rlhf/fault.py): Slurm sends USR1 to this script 120 s
# before the time limit (--signal=B:USR1@120); it is relayed to the tasks, which write a checkpoint
# at the next step boundary and exit with code 75 (a peer killed by --kill-on-bad-exit after the
# checkpoint shows 143); the script then requeues the job (--requeue), which resumes from that
# checkpoint (Slurm makes a requeued job eligible ~2 min later). Pre-emption and scancel send
# SIGTERM to the tasks: the same checkpoint and exit 75, no requeue by this script (a pre-empted
# --requeue job is requeued by Slurm itself). The checkpoint must fit in the cluster's KillWait /
# GraceTime (seconds between SIGTERM and SIGKILL). The job's exit code is the tasks'.
#SBATCH --job-name=nemo_rlhf
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

CONFIG=${1:?usage: sbatch [sbatch options] launchers/multinode.sh CONFIG [hydra overrides...]}
shift
: "${SLURM_JOB_ID:?launchers/multinode.sh is a batch script: submit it with sbatch}"
EXIT_PREEMPTED=75
mkdir -p logs

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
RUN_DIR=${RUN_DIR:-runs/${CONFIG}/slurm-${SLURM_JOB_ID}}
PY=${NEMO_RLHF_PYTHON:-python}
TRAIN=(-m nemo_rlhf.train --config-name "$CONFIG" "hydra.run.dir=${RUN_DIR}" resume=auto "$@")
echo "nemo_rlhf: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}, launch ${NEMO_RLHF_LAUNCH:-srun}"

SRUN=(srun --kill-on-bad-exit=1)
if [ -n "${NEMO_RLHF_IMAGE:-}" ]; then
  SRUN+=(--container-image="$NEMO_RLHF_IMAGE" --container-workdir="$PWD"
         --container-mounts="$PWD:$PWD${NEMO_RLHF_MOUNTS:+,$NEMO_RLHF_MOUNTS}")
fi
case "${NEMO_RLHF_LAUNCH:-srun}" in
  srun) CMD=("${SRUN[@]}" "$PY" "${TRAIN[@]}") ;;
  torchrun)
    NPROC=${NEMO_RLHF_NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
    # one task per node with all of the node's CPUs (else it would be bound to one core)
    # torchrun itself ignores USR1 (an ignored signal stays ignored across exec), its workers set
    # their own handler (nemo_rlhf.fault); srun relays USR1 to the node's processes.
    CMD=("${SRUN[@]}" --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
         bash -c 'trap "" USR1; exec "$@"' torchrun "$PY" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="${NPROC%%(*}"
         --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
         "${TRAIN[@]}") ;;
  *) echo "NEMO_RLHF_LAUNCH must be srun or torchrun, not '${NEMO_RLHF_LAUNCH}'" >&2; exit 2 ;;
esac

# The tasks run in the background so that the traps below run while they do (bash runs a trap only
# between commands). srun relays USR1 to the tasks; on TERM it would kill the step instead, so
# TERM (pre-emption, scancel) is also passed on as USR1 -- the tasks got Slurm's own TERM anyway.
TIME_LIMIT=0 SIGNALLED=0
forward() {  # forward SIGNAL: pass a stop signal on to the tasks
  echo "nemo_rlhf: $1 received; the tasks checkpoint at the next step boundary and exit"
  SIGNALLED=1
  if [ "$1" = USR1 ]; then TIME_LIMIT=1; fi
  kill -s USR1 "$PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
"${CMD[@]}" &
PID=$!
RC=127
set +e
while :; do  # wait again after a trap interrupted the wait; 127: already collected
  SIGNALLED=0
  wait "$PID"; rc=$?
  [ "$rc" = 127 ] && break
  RC=$rc
  [ "$SIGNALLED" = 1 ] || break
done
set -e

# Exit code 75 = checkpoint written; any other failure after the time-limit signal (a signal that
# came before the tasks installed their handlers) also resumes from the latest checkpoint.
if [ "$TIME_LIMIT" = 1 ] && [ "$RC" != 0 ] && [ "${NEMO_RLHF_REQUEUE:-1}" = 1 ]; then
  echo "nemo_rlhf: requeueing job ${SLURM_JOB_ID} (tasks exited with code ${RC}; ${EXIT_PREEMPTED} = checkpoint written)"
  scontrol requeue "$SLURM_JOB_ID"
fi
echo "nemo_rlhf: tasks exited with code ${RC}"
exit "$RC"
