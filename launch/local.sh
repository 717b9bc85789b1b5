#!/usr/bin/env bash
# Train on this host: start NSERVERS memory servers, wait until each answers a ping, run torchrun
# with NPROC ranks against them (MEMTRANS_SERVERS), and stop the servers on exit, also after
# Ctrl-C or a failed run. A supervisor restarts a server that dies during the run, on the same
# port, with --restore of the newest snapshot of its shard in DATA_DIR (the memories of the last
# checkpoint), so a run with --on-memory-failure wait or skip goes on. Arguments go to
# memtrans-train:
#
#   NPROC=2 NSERVERS=2 launch/local.sh --steps 500 --out runs/local
#
# Environment: NPROC (ranks, default 2), NSERVERS (default 1), BASE_PORT (server i listens on
# BASE_PORT + i, default 5555), THREADS (per server, default cores / NSERVERS), PYTHON (default
# python), LOG_DIR (server logs, default a new temporary directory), DATA_DIR (the servers'
# --data-dir, where checkpoints snapshot the memories; default LOG_DIR/memory-data; --resume
# needs the same DATA_DIR), TOKEN_FILE (the run's token, a 'NAME TOKEN' line from `memory-server
# token`; default LOG_DIR/local.token, made if missing): the servers admit only it (--token-file),
# and the ranks present it (MEMTRANS_TOKEN_FILE), so other local users get nothing. Snapshots are
# named by the token's tenant (local.NAMESPACE@TAG), so a resume with the same TOKEN_FILE's name
# finds them.
set -euo pipefail

NPROC=${NPROC:-2}
NSERVERS=${NSERVERS:-1}
BASE_PORT=${BASE_PORT:-5555}
THREADS=${THREADS:-$(( $(nproc) / NSERVERS > 0 ? $(nproc) / NSERVERS : 1 ))}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t memtrans-servers.XXXXXX)}
DATA_DIR=${DATA_DIR:-$LOG_DIR/memory-data}
mkdir -p "$DATA_DIR"
TOKEN_FILE=${TOKEN_FILE:-$LOG_DIR/local.token}
if [[ ! -f $TOKEN_FILE ]]; then
    "$PYTHON" -m memory_server token --name local --out "$TOKEN_FILE" >/dev/null
fi
export MEMTRANS_TOKEN_FILE=$TOKEN_FILE

pids=()
supervisor=
stop_servers() {
    # The supervisor first (it stops the servers it restarted), so it restarts none of these.
    if [[ -n $supervisor ]]; then
        kill -TERM "$supervisor" 2>/dev/null || true
        wait "$supervisor" 2>/dev/null || true
    fi
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server I [FLAGS...]: server I in the background, its log appended to.
start_server() {
    local i=$1
    shift
    "$PYTHON" -m memory_server --bind "tcp://127.0.0.1:$((BASE_PORT + i))" --threads "$THREADS" \
        --data-dir "$DATA_DIR" --token-file "$TOKEN_FILE" "$@" \
        >>"$LOG_DIR/memory-server-$i.log" 2>&1 &
}

# newest_snapshot I: NAMESPACE:TAG of the newest snapshot of server I's shard in DATA_DIR (file
# NAMESPACE@TAG.snapshot, TAG ending in .shard-I-of-NSERVERS), or nothing.
newest_snapshot() {
    local newest= file name
    for file in "$DATA_DIR"/*@*".shard-$1-of-$NSERVERS.snapshot"; do
        [[ -f $file ]] || continue
        if [[ -z $newest || $file -nt $newest ]]; then newest=$file; fi
    done
    [[ -n $newest ]] || return 0
    name=${newest##*/}
    name=${name%.snapshot}
    echo "${name%%@*}:${name#*@}"
}

# supervise: every second, restart each server that is gone (kill -0 fails), from its newest
# snapshot; on TERM, stop the servers it restarted. Runs as a background subshell.
supervise() {
    local i snapshot flags
    local -a mine=("${pids[@]}") restarted=()
    trap 'for pid in "${restarted[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
          for pid in "${restarted[@]}"; do wait "$pid" 2>/dev/null || true; done
          exit 0' TERM
    while true; do
        sleep 1
        kill -0 $$ 2>/dev/null || kill -TERM "$BASHPID"  # the script is gone (e.g. SIGKILL)
        for ((i = 0; i < NSERVERS; i++)); do
            if kill -0 "${mine[i]}" 2>/dev/null; then continue; fi
            snapshot=$(newest_snapshot "$i")
            flags=()
            if [[ -n $snapshot ]]; then flags=(--restore "$snapshot"); fi
            echo "launch/local.sh: memory server tcp://127.0.0.1:$((BASE_PORT + i)) exited;" \
                "restarting it${snapshot:+ from snapshot $snapshot}" >&2
            start_server "$i" "${flags[@]}"
            mine[i]=$!
            restarted[i]=$!  # the one to stop; an earlier restart of server i is gone
        done
    done
}

endpoints=()
for ((i = 0; i < NSERVERS; i++)); do
    : >"$LOG_DIR/memory-server-$i.log"
    start_server "$i"
    pids+=("$!")
    endpoints+=("tcp://127.0.0.1:$((BASE_PORT + i))")
done
servers=$(IFS=,; echo "${endpoints[*]}")

"$PYTHON" - "$servers" "$LOG_DIR" <<'PY'
import sys, time
from memory_server import ServerUnavailable
from memory_server.client import MemoryClient

deadline = time.monotonic() + 30
for i, endpoint in enumerate(sys.argv[1].split(",")):
    with MemoryClient(endpoint, timeout=0.5) as client:
        while True:
            try:
                client.ping()
                break
            except ServerUnavailable:
                if time.monotonic() > deadline:
                    sys.exit(f"launch/local.sh: memory server {endpoint} did not answer a ping "
                             f"within 30 s; see {sys.argv[2]}/memory-server-{i}.log")
PY
echo "launch/local.sh: memory servers $servers (logs in $LOG_DIR, data in $DATA_DIR)"
supervise &
supervisor=$!

MEMTRANS_SERVERS="$servers" "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node="$NPROC" -m memtrans.train "$@"
