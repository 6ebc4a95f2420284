# Sourced by slurm/*.sbatch. Runs a job step so that Slurm's warning signal becomes checkpoint -> requeue -> resume.
#
# `#SBATCH --signal=B:USR1@120` sends USR1 to this batch shell only, 120 s before the time limit; scancel and
# preemption send TERM. A shell runs its traps only between commands, so the step runs in the background while
# the shell waits, and the trap forwards USR1 to srun, which passes it on to every task. The training loop then
# checkpoints at its next step boundary and exits with EXIT_PREEMPTED; on that status the job requeues itself
# (same job id, same log file), and the next start finds the checkpoint and adds --resume.

EXIT_PREEMPTED=75  # realm_hpc/preempt.py

log() { echo "[$(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?}] $*" >&2; }

# The CLI: REALM_HPC if set, else realm-hpc on PATH, else the checkout's venv.
if [ -z "${REALM_HPC:-}" ]; then
    REALM_HPC=realm-hpc
    command -v realm-hpc >/dev/null || REALM_HPC="${REALM_HPC_HOME:-$SLURM_SUBMIT_DIR}/.venv/bin/realm-hpc"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# run_step CMD...: run CMD, forward USR1/TERM to it, requeue the job if it exits with EXIT_PREEMPTED.
run_step() {
    log "running: $*"
    "$@" &
    local pid=$! rc=0
    trap 'log "preemption signal: forwarding USR1 to the step"; kill -USR1 '"$pid"' 2>/dev/null' USR1 TERM
    wait "$pid" || rc=$?
    while kill -0 "$pid" 2>/dev/null; do  # wait returns early when a trap ran
        rc=0
        wait "$pid" || rc=$?
    done
    trap - USR1 TERM
    if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
        if [ "${REQUEUE:-1}" = 1 ]; then
            log "step checkpointed and exited $rc: requeueing"
            # Fails harmlessly where Slurm requeues the job itself (PreemptMode=REQUEUE).
            scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit with the same run dir to resume"
        else
            log "step checkpointed and exited $rc: REQUEUE=0, resubmit to resume"
        fi
    else
        log "step exited $rc"
    fi
    return "$rc"
}
