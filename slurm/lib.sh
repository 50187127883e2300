# Shared by the sbatch scripts (sourced, not run). Preemption and time limits, one way for every torch:
#
#   #SBATCH --signal=B:USR1@<s>  Slurm signals only this batch shell, <s> seconds before the limit.
#   trap                         the shell forwards SIGTERM to torchrun (or srun -> torchrun): every torch
#                                version forwards SIGTERM to its workers, which checkpoint at the next step
#                                and exit 143 (launcher/distributed/signals.py). USR1 never reaches torchrun (older
#                                agents die on it) or the workers (NCCL may own SIGUSR1).
#   scontrol requeue             after a USR1 stop the job requeues itself; the requeued job keeps its
#                                SLURM_JOB_ID, hence its run directory, and resumes from the checkpoint.
#
# SIGTERM to the batch shell (scancel, the hard time limit, preemption with PreemptMode=REQUEUE) stops the
# run the same way but does not requeue: Slurm decides that itself.

LAUNCHER_PYTHON=${LAUNCHER_PYTHON:-python}
REQUEUE_SIGNAL=${REQUEUE_SIGNAL:-USR1}                       # must match --signal=B:<sig>@<s>
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}  # s torchrun waits for the checkpoint
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

stop_reason=""
child=""

_forward() {
    stop_reason=$1
    echo "launcher-sbatch: SIG$1 at $(date +%T): stopping training at the next step" >&2
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}

# run_and_requeue CMD...: run CMD in the background with the traps set; requeue after a REQUEUE_SIGNAL stop.
run_and_requeue() {
    trap "_forward $REQUEUE_SIGNAL" "$REQUEUE_SIGNAL"
    trap '_forward TERM' TERM
    echo "launcher-sbatch: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s): $*" >&2
    "$@" &
    child=$!
    local status
    while :; do
        wait "$child"; status=$?
        kill -0 "$child" 2>/dev/null || break   # a trapped signal interrupted wait; the child still runs
    done
    if [ "$stop_reason" = "$REQUEUE_SIGNAL" ] && [ "$status" -ne 0 ]; then
        local job=${SLURM_JOB_ID}
        [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"  # this task only
        echo "launcher-sbatch: checkpointed; requeueing job $job" >&2
        scontrol requeue "$job" && exit 0
        echo "launcher-sbatch: scontrol requeue $job failed; resubmit to resume" >&2
    fi
    exit "$status"
}
