# ---- launch/job_body.sh: runs inside the allocation (appended to every sbatch script) ----
# Needs the settings above: PARCAE_* and, for this array task, RUN_DIR, CKPT_DIR, TRAIN_ARGS.
#
# 1. one srun task per GPU (or CPU rank) on every node; launch.rank turns SLURM's variables
#    into torch.distributed's; one log per rank in RUN_DIR/logs/attempt-N/rank-R.log;
# 2. on the warning signal (#SBATCH --signal, sent before the time limit) every rank gets
#    SIGTERM: Megatron's --exit-signal-handler saves a checkpoint and exits; the job requeues
#    itself and the next attempt resumes from that checkpoint (same --save/--load);
# 3. crashes, and stops that wrote no new checkpoint, are requeued at most
#    PARCAE_MAX_CRASH_RESTARTS times in a row; the reason goes to RUN_DIR/launch.log; a rank
#    that exits 2 (invalid configuration) or 3 (diverged) is not restarted at all;
# 4. SIGTERM to the batch shell (scancel, preemption) is not requeued here: SLURM requeues
#    preempted jobs itself where the cluster is set up so.
# RUN_DIR/state/status says running, requeued, completed, cancelled or failed.
set -uo pipefail

STATE_DIR=$RUN_DIR/state
mkdir -p "$STATE_DIR"

read_count() {  # read_count FILE: the number in FILE, 0 if none
    local value
    value=$(cat "$1" 2>/dev/null) || value=0
    [[ $value =~ ^[0-9]+$ ]] || value=0
    echo "$value"
}

ATTEMPT=$(($(read_count "$STATE_DIR/attempts") + 1))
echo "$ATTEMPT" >"$STATE_DIR/attempts"
export PARCAE_ATTEMPT=$ATTEMPT  # PARCAE_FAULT=...,attempt=N (training/faults.py)
LOG_DIR=$RUN_DIR/logs/attempt-$ATTEMPT
mkdir -p "$LOG_DIR"

log() {
    printf '[launch %s] job %s attempt %s: %s\n' "$(date '+%F %T')" "${SLURM_JOB_ID:-?}" \
        "$ATTEMPT" "$*" | tee -a "$RUN_DIR/launch.log" >&2
}
set_status() { echo "$1" >"$STATE_DIR/status"; }
checkpoint_iteration() {
    local it
    it=$(cat "$CKPT_DIR/latest_checkpointed_iteration.txt" 2>/dev/null) || it=none
    echo "${it:-none}"
}

requeue() {
    set_status requeued
    trap - TERM
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0  # SLURM ends this attempt and starts the job again
    fi
    set_status failed
    log "scontrol requeue failed (is requeueing allowed on this cluster? JobRequeue, --requeue)"
    exit 1
}

crash_reason() {  # the error line of the rank that failed first (srun names it), or any
    local line task
    # srun reports the first task that ended badly first; the others follow from it.
    line=$(grep -m 1 -E 'task [0-9]+: (Exited with exit code|Killed|Terminated|Segmentation)' \
        "$LOG_DIR/srun.log" 2>/dev/null)
    task=$(sed -nE 's/.*task ([0-9]+): .*/\1/p' <<<"$line")
    if [ -n "$task" ]; then  # its first error: line (failfast's summary, a config error,
        # divergence) or exception
        line=$(grep -m 1 -HE \
            '^error: |(^|: )[A-Za-z_][A-Za-z0-9_.]*(Error|Exception):' \
            "$LOG_DIR/rank-$task.log" 2>/dev/null || echo "rank $task: ${line#*task $task: }")
    else
        line=$(grep -m 1 -HE '(^|: )([A-Za-z_][A-Za-z0-9_.]*(Error|Exception)|error):|Killed' \
            "$LOG_DIR"/rank-*.log "$LOG_DIR/srun.log" 2>/dev/null | head -n 1)
    fi
    echo "${line:-no error line in $LOG_DIR}"
}

# --- environment of the ranks ---
cd "$PARCAE_REPO" || { log "cannot enter $PARCAE_REPO"; set_status failed; exit 1; }
export PYTHONPATH="$PARCAE_REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [ "$PARCAE_GPUS_PER_NODE" -gt 0 ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A rank that finds no usable CUDA stops with one error line instead of falling back to
    # the CPU backend (parcae_megatron/platform/gpu_check.py).
    export PARCAE_EXPECT_GPU=1
else
    export CUDA_VISIBLE_DEVICES=""  # a CPU job: the trainer switches to gloo
fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The rendezvous port, below the kernel's ephemeral range (ip_local_port_range), where no
# outgoing connection is given it by chance: in [10000, low), fixed by the job id and moved by
# the attempt, so a requeued attempt does not meet its predecessor's socket in TIME_WAIT.
read -r EPHEMERAL_LOW _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || EPHEMERAL_LOW=32768
PORT_BASE=10000
[ "$EPHEMERAL_LOW" -gt $((PORT_BASE + 64)) ] 2>/dev/null || PORT_BASE=1024
PORT_SLOTS=$(((EPHEMERAL_LOW - PORT_BASE) / 4))
MASTER_PORT=${PARCAE_MASTER_PORT:-$((PORT_BASE + (SLURM_JOB_ID % PORT_SLOTS) * 4 + ATTEMPT % 4))}
export MASTER_ADDR MASTER_PORT

# --- signals ---
STOP=""
# shellcheck disable=SC2317  # trap handlers
on_warning() {
    [ -n "$STOP" ] && return
    STOP=warning
    log "got SIG$PARCAE_WARNING_SIGNAL (time limit or preemption ahead): the ranks checkpoint and stop"
    scancel --signal=TERM "$SLURM_JOB_ID" || log "scancel --signal=TERM failed"
}
# shellcheck disable=SC2317
on_term() {
    STOP=${STOP:-terminated}
    log "got SIGTERM: the job is being cancelled or preempted"
}
trap on_warning "$PARCAE_WARNING_SIGNAL"
trap on_term TERM

# --- the training step ---
log "start on ${SLURM_JOB_NUM_NODES} node(s) ($SLURM_JOB_NODELIST) x $PARCAE_PROCS_PER_NODE" \
    "process(es); rendezvous $MASTER_ADDR:$MASTER_PORT; newest checkpoint: iteration" \
    "$(checkpoint_iteration)"
set_status running
STEP_FLAGS=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node="$PARCAE_PROCS_PER_NODE"
    --kill-on-bad-exit=1 --output="$LOG_DIR/rank-%t.log")
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then  # srun of SLURM 22.05 does not inherit it
    STEP_FLAGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
srun "${STEP_FLAGS[@]}" "${PARCAE_SRUN_FLAGS[@]}" \
    "$PARCAE_PYTHON" -m launch.rank --module "$PARCAE_MODULE" -- "${TRAIN_ARGS[@]}" \
    2>"$LOG_DIR/srun.log" &
STEP=$!
while :; do
    wait "$STEP"
    RC=$?
    [ "$RC" -le 128 ] && break
    kill -0 "$STEP" 2>/dev/null && continue  # wait was interrupted by a trapped signal
    wait "$STEP"  # the step ended meanwhile: collect its status (127 if already collected)
    NEXT=$?
    [ "$NEXT" -ne 127 ] && RC=$NEXT
    break
done
CKPT=$(checkpoint_iteration)

# --- what next ---
if [ "$STOP" = terminated ]; then
    set_status cancelled
    log "training ended by SIGTERM (exit code $RC); not requeued by the launcher"
    exit "$RC"
elif [ "$STOP" != warning ] && [ "$RC" -eq 0 ]; then
    set_status completed
    log "training finished; newest checkpoint: iteration $CKPT"
    exit 0
fi
# The trainer exits 2 for an invalid configuration and 3 after too many non-finite steps:
# running it again would repeat that.
FINAL=$(grep -oE 'Exited with exit code [23]$' "$LOG_DIR/srun.log" 2>/dev/null | head -n 1)
if [ "$STOP" != warning ] && [ -n "$FINAL" ]; then
    set_status failed
    log "training stopped (exit code $RC): $(crash_reason); a rank ${FINAL,}" \
        "(2: invalid configuration, 3: diverged); not restarting"
    exit "$RC"
fi
# Stopped by the warning, or crashed. Count the attempts in a row that failed to move the run:
# a crash, or a stop without a new checkpoint since the previous attempt ended.
FAILURES=$(read_count "$STATE_DIR/failures")
if [ "$(cat "$STATE_DIR/checkpoint" 2>/dev/null)" != "$CKPT" ]; then
    FAILURES=0  # a new checkpoint: the run is making progress
    [ "$STOP" = warning ] || FAILURES=1
else
    FAILURES=$((FAILURES + 1))
fi
echo "$FAILURES" >"$STATE_DIR/failures"
echo "$CKPT" >"$STATE_DIR/checkpoint"
if [ "$STOP" = warning ]; then
    WHAT="training stopped (exit code $RC) with its newest checkpoint at iteration $CKPT"
else
    WHAT="training crashed (exit code $RC): $(crash_reason)"
fi
if [ "$FAILURES" -eq 0 ]; then
    log "$WHAT; requeueing"
    requeue
elif [ "$FAILURES" -le "$PARCAE_MAX_CRASH_RESTARTS" ]; then
    log "$WHAT; restart $FAILURES of $PARCAE_MAX_CRASH_RESTARTS; requeueing"
    requeue
fi
set_status failed
log "$WHAT; giving up: $FAILURES attempts in a row ended by a crash or without a new" \
    "checkpoint (at most $PARCAE_MAX_CRASH_RESTARTS restarts, --max-crash-restarts)"
exit $((RC == 0 ? 1 : RC))
