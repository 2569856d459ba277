#!/bin/sh
# gpuscale GPU container entrypoint (visual and text images share this script).
#
# Runs under tini (PID 1), which hands SIGTERM to this script only.  The script supervises two
# processes and orders their shutdown:
#
#   1. start `ollama serve` in the background and wait (bounded) until it answers;
#   2. warm the pool's model so the first task does not pay the load time;
#   3. start the worker (`gpuscale worker --pool $GPUSCALE_POOL`, or this script's arguments);
#   4. on SIGTERM/SIGINT: forward it to the worker *first* and wait while it drains (it finishes or
#      hands back its tasks, then deregisters), and only then stop Ollama — the drain still needs
#      the model.  The exit status is the worker's.
#
# Why not `exec` the worker: after an exec nothing would be left to stop Ollama after the drain,
# and `tini -g` (signal the whole group) would kill Ollama while tasks still run on it.
#
# Settings (environment): GPUSCALE_POOL (visual|text), GPUSCALE_VISUAL_MODEL / GPUSCALE_TEXT_MODEL,
# GPUSCALE_KEEP_ALIVE (30m), GPUSCALE_OLLAMA_WAIT_S (120), GPUSCALE_OLLAMA_STOP_S (15),
# GPUSCALE_WARM (1; 0 skips the warm-up here, the worker still warms before claiming).
set -u

POOL="${GPUSCALE_POOL:-}"
WAIT_S="${GPUSCALE_OLLAMA_WAIT_S:-120}"
STOP_S="${GPUSCALE_OLLAMA_STOP_S:-15}"
KEEP_ALIVE="${GPUSCALE_KEEP_ALIVE:-30m}"

log() {
    printf '%s entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

# Poll in fifths of a second (GNU sleep takes fractions; a POSIX-only sleep falls back to 1 s,
# which only makes the bounded waits longer, never shorter).
TICKS_PER_S=5
nap() {
    sleep 0.2 2>/dev/null || sleep 1
}

case "$POOL" in
    visual) MODEL="${GPUSCALE_VISUAL_MODEL:-gemma3:12b}" ;;
    text) MODEL="${GPUSCALE_TEXT_MODEL:-gemma3:12b}" ;;
    *)
        log "GPUSCALE_POOL must be visual or text, not '${POOL}'"
        exit 2
        ;;
esac

OLLAMA_PID=""
WORKER_PID=""
STOPPING=0

on_signal() {
    STOPPING=1
    if [ -n "$WORKER_PID" ]; then
        log "stop signal: draining the worker (pid $WORKER_PID) before stopping Ollama"
        kill -TERM "$WORKER_PID" 2>/dev/null || true
    else
        log "stop signal before the worker started"
    fi
}
trap on_signal TERM INT

stop_ollama() {
    [ -n "$OLLAMA_PID" ] || return 0
    if kill -0 "$OLLAMA_PID" 2>/dev/null; then
        log "stopping Ollama (pid $OLLAMA_PID)"
        kill -TERM "$OLLAMA_PID" 2>/dev/null || true
        ticks=0
        while kill -0 "$OLLAMA_PID" 2>/dev/null; do
            if [ "$ticks" -ge $((STOP_S * TICKS_PER_S)) ]; then
                log "Ollama did not stop within ${STOP_S}s; killing it"
                kill -KILL "$OLLAMA_PID" 2>/dev/null || true
                break
            fi
            nap
            ticks=$((ticks + 1))
        done
    fi
    wait "$OLLAMA_PID" 2>/dev/null || true
    OLLAMA_PID=""
}

# 1. Ollama.
log "starting ollama serve (pool $POOL, model $MODEL)"
ollama serve &
OLLAMA_PID=$!

ticks=0
until ollama list >/dev/null 2>&1; do
    if [ "$STOPPING" -eq 1 ]; then
        stop_ollama
        exit 0
    fi
    if ! kill -0 "$OLLAMA_PID" 2>/dev/null; then
        log "ollama serve exited before answering"
        exit 1
    fi
    if [ "$ticks" -ge $((WAIT_S * TICKS_PER_S)) ]; then
        log "Ollama did not answer within ${WAIT_S}s"
        stop_ollama
        exit 1
    fi
    nap
    ticks=$((ticks + 1))
done
log "Ollama answers after $((ticks / TICKS_PER_S))s"

# 2. Warm the model (an empty prompt only loads it).  A failure here is not fatal: the worker
# warms again, reports not-ready on /api/health until it succeeds, and pulls a missing model.
# Run in the background and `wait`, so a stop signal is handled at once, not after a slow load.
if [ "${GPUSCALE_WARM:-1}" != "0" ] && [ "$STOPPING" -eq 0 ]; then
    ollama run "$MODEL" "" --keepalive "$KEEP_ALIVE" >/dev/null 2>&1 &
    WARM_PID=$!
    wait "$WARM_PID"
    warm_status=$?
    if [ "$STOPPING" -eq 1 ]; then
        kill -TERM "$WARM_PID" 2>/dev/null || true
    elif [ "$warm_status" -eq 0 ]; then
        log "model $MODEL loaded"
    else
        log "warming $MODEL failed (status $warm_status); the worker will retry"
    fi
fi
if [ "$STOPPING" -eq 1 ]; then
    stop_ollama
    exit 0
fi

# 3. The worker, in the background so this script can order the shutdown.
if [ "$#" -gt 0 ]; then
    "$@" &
else
    gpuscale worker --pool "$POOL" &
fi
WORKER_PID=$!
log "worker started (pid $WORKER_PID)"
# A stop signal that came after the check above but before WORKER_PID was set found no worker to
# forward to; forward it now, or the worker would run on until the platform's SIGKILL.
if [ "$STOPPING" -eq 1 ]; then
    log "stop signal came while the worker was starting: draining it"
    kill -TERM "$WORKER_PID" 2>/dev/null || true
fi

# `wait` returns early when a trapped signal arrives; keep waiting until the worker has exited.
status=0
while :; do
    wait "$WORKER_PID"
    status=$?
    if ! kill -0 "$WORKER_PID" 2>/dev/null; then
        break
    fi
done
log "worker exited with status $status"

# 4. Only now stop Ollama.
stop_ollama
exit "$status"
