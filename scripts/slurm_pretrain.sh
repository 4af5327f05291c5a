#!/bin/bash
# Pre-train Pixel-BERT on a SLURM cluster: 8 nodes x 8 GPUs, the paper's 64 processes.
#
#   cd pixel-bert && RUN_DIR=/shared/runs/pretrain-x152 sbatch scripts/slurm_pretrain.sh \
#       --config pretrain-x152 --backbone_weights /shared/weights/X-152-32x8d-IN5k.pkl \
#       --coco-karpathy /shared/data/dataset_coco.json --coco-images /shared/data/coco ...
#
# Every argument is passed on to train.py. One SLURM task per node runs one torchrun, which starts
# one training process per GPU; the torchruns meet at a c10d rendezvous on the allocation's first
# node. The run folder must be on storage that every node sees: checkpoints are written there, and
# `--resume auto` makes a requeued job continue from the newest valid checkpoint (work since the
# last one, at most --ckpt_every steps, is redone).
#
# Requeueing:
#   - time limit: SLURM sends SIGUSR1 to this script 5 minutes before it (--signal); the script
#     requeues the job, SLURM stops it and starts it again later;
#   - preemption: a cluster that preempts by requeueing restarts the job itself (--requeue); one
#     that sends a notice signal can send SIGUSR1, handled as above;
#   - by hand: `scancel --batch --signal=USR1 JOBID`. A plain scancel ends the job for good.
#
# Settings (environment variables, all optional):
#   RUN_DIR         run folder on shared storage (default: $SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME)
#   PIXEL_BERT_DIR  the checkout holding train.py (default: $SLURM_SUBMIT_DIR, i.e. submit from it)
#   NPROC_PER_NODE  training processes per node (default: the GPUs SLURM gives each node)
#   RDZV_PORT       port of the c10d rendezvous on the first node (default 29500)
#   TORCHRUN        the launcher command (default: torchrun)
#   TORCHRUN_ARGS   extra launcher flags, e.g. "--local-addr=$(hostname -i)"
#
#SBATCH --job-name=pixelbert-pretrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

: "${SLURM_JOB_ID:?submit this script with sbatch (it reads the SLURM_* variables of an allocation)}"
REPO=${PIXEL_BERT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
RUN_DIR=${RUN_DIR:-$REPO/runs/${SLURM_JOB_NAME:-pixelbert-pretrain}}
NNODES=${SLURM_NNODES:-$SLURM_JOB_NUM_NODES}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE##*:}}  # "a100:8" -> 8
RDZV_PORT=${RDZV_PORT:-29500}
if [[ ! -f "$REPO/train.py" ]]; then
    echo "error: no train.py in $REPO; submit from the pixel-bert checkout or set PIXEL_BERT_DIR" >&2
    exit 2
fi
# The rendezvous host is the allocation's first node. (Not `| head -n1`: under pipefail, head closing
# the pipe early can fail the whole line with scontrol's SIGPIPE.)
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES%%$'\n'*}
read -r -a launcher <<< "${TORCHRUN:-torchrun}"
read -r -a launcher_args <<< "${TORCHRUN_ARGS:-}"
mkdir -p "$RUN_DIR"
cd "$REPO"
echo "$(date '+%F %T') job $SLURM_JOB_ID, start ${SLURM_RESTART_COUNT:-0}: $NNODES nodes x $NPROC_PER_NODE" \
     "processes, rendezvous $HEAD_NODE:$RDZV_PORT, run folder $RUN_DIR"

requeue() {
    echo "$(date '+%F %T') SIGUSR1: requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

# One torchrun per node; --kill-on-bad-exit ends every node when one fails instead of leaving the
# others waiting in a collective. The script waits in the background so that a signal is handled.
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
    "${launcher[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
    ${launcher_args[@]+"${launcher_args[@]}"} \
    train.py --output-dir "$RUN_DIR" --resume auto "$@" &
srun_pid=$!
while true; do
    status=0
    wait "$srun_pid" || status=$?
    # a handled signal interrupts `wait`; keep waiting while training runs (SLURM stops it on requeue)
    kill -0 "$srun_pid" 2>/dev/null || break
done
exit "$status"
