#!/usr/bin/env bash
# Train on this host: start NSERVERS memory servers, wait until each answers a ping, run torchrun
# with NPROC ranks against them (MEMTRANS_SERVERS), and stop the servers on exit, also after
# Ctrl-C or a failed run. Arguments go to memtrans-train:
#
#   NPROC=2 NSERVERS=2 launch/local.sh --steps 500 --out runs/local
#
# Environment: NPROC (ranks, default 2), NSERVERS (default 1), BASE_PORT (server i listens on
# BASE_PORT + i, default 5555), THREADS (per server, default cores / NSERVERS), PYTHON (default
# python), LOG_DIR (server logs, default a new temporary directory).
set -euo pipefail

NPROC=${NPROC:-2}
NSERVERS=${NSERVERS:-1}
BASE_PORT=${BASE_PORT:-5555}
THREADS=${THREADS:-$(( $(nproc) / NSERVERS > 0 ? $(nproc) / NSERVERS : 1 ))}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t memtrans-servers.XXXXXX)}

pids=()
stop_servers() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

endpoints=()
for ((i = 0; i < NSERVERS; i++)); do
    endpoint="tcp://127.0.0.1:$((BASE_PORT + i))"
    "$PYTHON" -m memory_server --bind "$endpoint" --threads "$THREADS" \
        >"$LOG_DIR/memory-server-$i.log" 2>&1 &
    pids+=("$!")
    endpoints+=("$endpoint")
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
echo "launch/local.sh: memory servers $servers (logs in $LOG_DIR)"

MEMTRANS_SERVERS="$servers" "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node="$NPROC" -m memtrans.train "$@"
