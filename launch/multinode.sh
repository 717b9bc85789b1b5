#!/usr/bin/env bash
# Train across hosts: run this script once on every host, with the same HOSTS and a different
# NODE_RANK. Each host starts one memory server bound to its own address, waits until it answers a
# ping, then until every host's server answers, and runs torchrun, which meets the other hosts at a
# c10d rendezvous on the head host (HOSTS[0]). Every rank gets MEMTRANS_SERVERS listing all hosts'
# servers in host order, so row r lives on the server of host r % len(HOSTS). The server is stopped
# on exit, also after Ctrl-C, SIGTERM or a failed run. Arguments go to memtrans-train:
#
#   # on 10.0.0.1                                      # on 10.0.0.2
#   HOSTS=10.0.0.1,10.0.0.2 NODE_RANK=0 NPROC=8 \      HOSTS=10.0.0.1,10.0.0.2 NODE_RANK=1 NPROC=8 \
#       launch/multinode.sh --steps 500 --out runs/mn      launch/multinode.sh --steps 500 --out runs/mn
#
# Environment:
#   HOSTS          required: every host's address (IP or resolvable name) in node-rank order,
#                  comma-separated; HOSTS[0] is the rendezvous head
#   NODE_RANK      required: this host's index in HOSTS
#   NPROC          ranks on this host (default: the number of CUDA GPUs, else 1)
#   RDZV_PORT      rendezvous port on the head host (default 29500)
#   RDZV_ID        rendezvous id, the same on every host (default memtrans)
#   SERVER_PORT    memory server port on every host (default 5555)
#   SERVER_BIND    what this host's server binds (default tcp://HOSTS[NODE_RANK]:SERVER_PORT)
#   THREADS        memory server worker threads (default: this host's cores)
#   SERVER_DATA_DIR  where this host's server writes its shard of the memory snapshots that
#                  checkpoints name (default ./memory-data); keep it for --resume. Hosts may share
#                  one directory on a shared filesystem: each shard has its own file names
#   SERVER_ARGS    more memory-server flags, e.g. "--max-bytes 64G"
#   MEMTRANS_CURVE_SERVER_SECRET, MEMTRANS_CURVE_ALLOW, MEMTRANS_SERVER_KEY,
#   MEMTRANS_CLIENT_KEY   CURVE key files; see Security
#   RDZV_CONF      more torchrun --rdzv-conf settings, e.g. join_timeout=1200
#   READY_TIMEOUT  seconds to wait for every host's server to answer (default 300: hosts may start
#                  minutes apart; torchrun's own rendezvous waits up to 600 s)
#   PYTHON         (default python); LOG_DIR (server log, default a new temporary directory)
#
# torchrun's c10d rendezvous numbers hosts by sorting their addresses as strings (it ignores
# --node-rank), so global rank 0, which writes --out and checkpoints, runs on the host whose
# address sorts first; NODE_RANK only picks this host's server address and its place in
# MEMTRANS_SERVERS. Each host passes its own address to torchrun as --local-addr, and, when
# GLOO_SOCKET_IFNAME is unset and the address is an IPv4 address of a local interface, names that
# interface to gloo, so CPU ranks do not look themselves up by host name.
#
# Security: a server the other hosts can reach binds a non-loopback address, which memory-server
# refuses unless it has CURVE authentication or --insecure. With CURVE (key files from
# `memory-server keygen`, one server key pair and one client key pair for the whole cluster):
#   MEMTRANS_CURVE_SERVER_SECRET  the servers' secret key file  -> memory-server --curve-secret-key
#   MEMTRANS_CURVE_ALLOW          allowed client public key file or directory -> --curve-allow
#   MEMTRANS_SERVER_KEY     the servers' public key file, for clients
#   MEMTRANS_CLIENT_KEY     the clients' secret key file, for clients
# The launcher's own pings use the last two, and the ranks inherit them. Without
# MEMTRANS_CURVE_SERVER_SECRET the server runs with --insecure: requests and memories travel
# unencrypted, and anyone who can reach SERVER_PORT can read, change or drop the memories and shut
# the server down. Use that only on a private cluster network that untrusted hosts cannot reach.
set -euo pipefail

: "${HOSTS:?set HOSTS to every host address in node-rank order, comma-separated}"
: "${NODE_RANK:?set NODE_RANK to this host index in HOSTS (0 for the head)}"
IFS=, read -r -a hosts <<<"$HOSTS"
NNODES=${#hosts[@]}
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
    echo "launch/multinode.sh: NODE_RANK=$NODE_RANK is not an index into HOSTS=$HOSTS" >&2
    exit 2
fi
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
RDZV_PORT=${RDZV_PORT:-29500}
RDZV_ID=${RDZV_ID:-memtrans}
SERVER_PORT=${SERVER_PORT:-5555}
THREADS=${THREADS:-$(nproc)}
READY_TIMEOUT=${READY_TIMEOUT:-300}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t memtrans-node.XXXXXX)}
addr=${hosts[NODE_RANK]}
head=${hosts[0]}
SERVER_BIND=${SERVER_BIND:-tcp://$addr:$SERVER_PORT}
SERVER_DATA_DIR=${SERVER_DATA_DIR:-$PWD/memory-data}
server_log="$LOG_DIR/memory-server-node$NODE_RANK.log"

endpoints=()
for host in "${hosts[@]}"; do endpoints+=("tcp://$host:$SERVER_PORT"); done
servers=$(IFS=,; echo "${endpoints[*]}")

if [[ -n ${MEMTRANS_CURVE_SERVER_SECRET:-} ]]; then
    : "${MEMTRANS_CURVE_ALLOW:?CURVE: set MEMTRANS_CURVE_ALLOW to the client public key(s)}"
    : "${MEMTRANS_SERVER_KEY:?CURVE: set MEMTRANS_SERVER_KEY (server public key)}"
    : "${MEMTRANS_CLIENT_KEY:?CURVE: set MEMTRANS_CLIENT_KEY (client secret key)}"
    auth=(--curve-secret-key "$MEMTRANS_CURVE_SERVER_SECRET" --curve-allow "$MEMTRANS_CURVE_ALLOW")
else
    auth=(--insecure)  # unencrypted, unauthenticated: see Security above
fi
read -r -a extra <<<"${SERVER_ARGS:-}"

server_pid=
trainer_pid=
stop_all() {
    local pid
    for pid in $trainer_pid $server_pid; do
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$SERVER_DATA_DIR"
"$PYTHON" -m memory_server --bind "$SERVER_BIND" --threads "$THREADS" --data-dir "$SERVER_DATA_DIR" "${auth[@]}" \
    ${extra[@]+"${extra[@]}"} >"$server_log" 2>&1 &
server_pid=$!

# wait_for SECONDS WHAT ENDPOINT...: ping each endpoint until it answers, for SECONDS in all.
wait_for() {
    "$PYTHON" - "$@" <<'PY'
import os, sys, time
import logging
from memory_server import ServerUnavailable
from memory_server.client import MemoryClient

logging.getLogger("memory_server.client").setLevel(logging.ERROR)  # no warning per retry

timeout, what, endpoints = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
pid = int(os.environ["SERVER_PID"])
deadline = time.monotonic() + timeout
curve = {}
if os.environ.get("MEMTRANS_SERVER_KEY"):
    curve = dict(server_public_key=os.environ["MEMTRANS_SERVER_KEY"],
                 secret_key=os.environ["MEMTRANS_CLIENT_KEY"])
for endpoint in endpoints:
    with MemoryClient(endpoint, timeout=0.5, **curve) as client:
        while True:
            try:
                client.ping()
                break
            except ServerUnavailable:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    sys.exit(f"launch/multinode.sh: this host's memory server exited; "
                             f"see {os.environ['SERVER_LOG']}")
                if time.monotonic() > deadline:
                    sys.exit(f"launch/multinode.sh: {what} memory server {endpoint} did not "
                             f"answer a ping within {timeout:g} s")
PY
}
export SERVER_PID=$server_pid SERVER_LOG=$server_log
case $SERVER_BIND in  # a server bound to all interfaces answers on loopback
    tcp://\*:* | tcp://0.0.0.0:*) local_endpoint="tcp://127.0.0.1:${SERVER_BIND##*:}" ;;
    *) local_endpoint=$SERVER_BIND ;;
esac
wait_for 30 "this host's" "$local_endpoint" || { tail -n 5 "$server_log" >&2; exit 1; }
echo "launch/multinode.sh: node $NODE_RANK of $NNODES: memory server $SERVER_BIND (log $server_log)"
echo "launch/multinode.sh: waiting up to $READY_TIMEOUT s for every host's memory server"
wait_for "$READY_TIMEOUT" "a remote" "${endpoints[@]}"
echo "launch/multinode.sh: all memory servers answer: $servers"

if [[ -z ${GLOO_SOCKET_IFNAME:-} && $addr =~ ^[0-9.]+$ ]] && command -v ip >/dev/null; then
    ifname=$(ip -o -4 addr show to "$addr" | awk '{print $2; exit}')
    if [[ -n $ifname ]]; then export GLOO_SOCKET_IFNAME=$ifname; fi
fi

# The head hosts the rendezvous store: said outright (is_host), since c10d's own guess compares
# the endpoint with the addresses this host's name resolves to, which can miss the address in
# HOSTS (several interfaces, containers, network namespaces). --node-rank is ignored by c10d (see
# above) but kept for the logs.
is_host=$((NODE_RANK == 0 ? 1 : 0))
MEMTRANS_SERVERS="$servers" "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$head:$RDZV_PORT" --rdzv-id="$RDZV_ID" \
    --rdzv-conf="is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}" \
    --local-addr="$addr" -m memtrans.train "$@" &
trainer_pid=$!
status=0
wait "$trainer_pid" || status=$?
trainer_pid=
exit "$status"
