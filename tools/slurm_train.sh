#!/bin/bash
# Multi-node mmvl training under SLURM: one torchrun per node (srun, one task per node), which starts one
# training process per GPU; the nodes meet through a c10d rendezvous on the first node. The job is requeued at
# its time limit (and on pre-emption, where the partition requeues pre-empted jobs), and each requeued run
# continues from the newest checkpoint in the work dir.
#
#   sbatch tools/slurm_train.sh [CONFIG] [WORK_DIR] [more tools/train.py arguments]
#   sbatch --nodes=4 --time=2-00:00:00 tools/slurm_train.sh configs/cxr_clip.py work_dirs/cxr_clip \
#       --cfg-options train.batch_size=128
#
# Submit from the repository root with the project's environment active (the job inherits it). WORK_DIR must be
# on a file system every node sees: rank 0 writes the checkpoints, every rank reads the one it resumes from.
#
# Stopping: 120 s before the time limit SLURM sends SIGTERM to this batch shell alone (--signal=B:TERM@120). The
# trap below passes it on with `scancel --signal=TERM`, which delivers it to every process of the job's steps on
# every node (not to srun: srun turns a SIGTERM of its own into SIGKILL for its tasks). Each training process
# finishes its step, rank 0 writes a checkpoint, all exit 0, and this script requeues the job. On pre-emption
# SLURM signals the step's processes itself, kills them after the partition's GraceTime, and requeues the job
# when its PreemptMode is REQUEUE.
#
#SBATCH --job-name=mmvl-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --ntasks-per-node=1: the task is torchrun, which starts the node's GPU processes itself.
# --cpus-per-task: all of a node's cores for its ranks' DataLoader workers and threads; adapt to your nodes.
# --mem=0: all of each node's memory.
# --signal=B:TERM@120: "B:" signals the batch shell only, so that exactly one SIGTERM reaches each trainer (see
#   the trap); 120 s must cover the rest of a step plus writing a checkpoint: raise it for large models.
# --requeue, --open-mode=append, --output=%x-%j.out: a requeued run keeps its job id and appends to the same log.

set -euo pipefail

CONFIG=${1:-configs/cxr_clip.py}
WORK_DIR=${2:-work_dirs/$(basename "$CONFIG" .py)}
shift $(( $# < 2 ? $# : 2 ))  # what follows CONFIG and WORK_DIR goes to tools/train.py as is
EXTRA_ARGS=("$@")

cd "${SLURM_SUBMIT_DIR:-.}"  # SLURM runs a copy of this script from its spool folder: paths are the repository's
GPUS=${SLURM_GPUS_ON_NODE:-8}
# The first node of the allocation hosts the rendezvous (the c10d store of torchrun's agents). pipefail is off
# in this subshell: head exits after one line, and scontrol, still writing, may die of SIGPIPE.
MASTER_ADDR=$(set +o pipefail; scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if [[ -z $MASTER_ADDR ]]; then
    echo "no host name in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST}'" >&2
    exit 1
fi
MASTER_PORT=${MASTER_PORT:-29500}  # export another one before sbatch if two jobs may share a first node
# Intra-op threads per training process: the node's cores shared by its ranks (torchrun would set 1).
THREADS=$(( ${SLURM_CPUS_PER_TASK:-$GPUS} / GPUS ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}
export MMVL_NO_PROGRESS=1  # no tqdm bars in the log file

# A requeued run (or a second submission) continues from the newest checkpoint that verifies; --resume fails
# when there is none, so it is passed only when the work dir has checkpoints.
RESUME_ARGS=()
START="from scratch"
if ls "$WORK_DIR"/checkpoints/*.pt > /dev/null 2>&1; then
    RESUME_ARGS=(--resume)
    START="resuming from ${WORK_DIR}/checkpoints"
fi
echo "$(date '+%F %T') job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES} nodes x ${GPUS}" \
     "GPUs, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}, work dir ${WORK_DIR}, ${START}"

STOP_REQUESTED=0
# shellcheck disable=SC2329  # called by the trap below
forward_sigterm() {
    if (( STOP_REQUESTED )); then  # once: a second SIGTERM makes the trainers stop without a checkpoint
        return
    fi
    STOP_REQUESTED=1
    echo "$(date '+%F %T') SIGTERM: the trainers finish their step, checkpoint and exit; then the job is requeued"
    # To the processes of the job's steps on every node; without --full, not to this batch shell again.
    scancel --signal=TERM "$SLURM_JOB_ID" || echo "scancel --signal=TERM failed: the trainers were not told to stop"
}
trap forward_sigterm TERM

# Each node's torchrun ignores SIGTERM ('trap "" TERM' before exec; an ignored signal stays ignored across
# exec) and does not handle it (--signals-to-handle without SIGTERM; torch 2.13 has the option): SLURM signals
# every process of a step, the training processes included, so a torchrun that passed SIGTERM on as well would
# give each trainer a second one, which the trainer takes as "stop now, without a checkpoint". The trainers
# install their own SIGTERM handler when training starts; torchrun exits 0 once they have exited 0.
# --kill-on-bad-exit=1: a node whose torchrun fails ends the step at once instead of leaving the others waiting
# in a collective until the NCCL timeout.
srun --kill-on-bad-exit=1 \
    bash -c 'trap "" TERM; exec "$@"' torchrun-ignoring-sigterm \
    torchrun \
        --nnodes "$SLURM_NNODES" \
        --nproc-per-node "$GPUS" \
        --rdzv-id "$SLURM_JOB_ID" \
        --rdzv-backend c10d \
        --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
        --signals-to-handle SIGINT,SIGHUP,SIGQUIT \
        tools/train.py "$CONFIG" --work-dir "$WORK_DIR" \
        ${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"} ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} &
SRUN_PID=$!

# bash runs a trap only between commands, so srun runs in the background and the shell waits for it; the trap
# ends a wait early (status > 128) while srun is still running (the trainers checkpointing): wait again.
while kill -0 "$SRUN_PID" 2> /dev/null; do
    wait "$SRUN_PID" || true
done
if wait "$SRUN_PID"; then STATUS=0; else STATUS=$?; fi  # srun's own exit status, kept by bash
echo "$(date '+%F %T') srun exited with status ${STATUS}"

if (( STOP_REQUESTED )); then
    # The time limit was near: continue in a new run of this job (same id and log), from the checkpoint.
    scontrol requeue "$SLURM_JOB_ID" || echo "requeue refused (was the job cancelled?)"
    exit 0
fi
exit "$STATUS"
