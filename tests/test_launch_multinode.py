"""``launch/multinode.sh`` across two hosts made on this machine with network namespaces.

Two namespaces joined by a veth pair (10.231.0.1/24 and 10.231.0.2/24, on that pair only) stand
for two hosts. Each runs the real launcher with one rank: it starts its own memory server on its
veth address, both meet at a c10d rendezvous on host A, and every rank reaches both servers. Needs
root and iproute2's ``ip``; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "multinode.sh"
ADDRS = ("10.231.0.1", "10.231.0.2")
SERVER_PORT = 5555
RUN_TIMEOUT = 90.0
TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16",
        "--memorizing-layers", "2", "--seq-len", "64", "--batch-size", "1", "--max-memories", "96",
        "--num-retrieved", "8", "--xl-max-memories", "64", "--warmup-steps", "0",
        "--eval-batches", "2", "--log-every", "1", "--val-fraction", "0.25",
        "--documents", "file"]  # a flat directory of modules: one document each

# Runs inside host A's namespace for the whole job: every row each server's stats has shown (the
# trainer drops its namespace at the end, so the rows must be caught while it runs).
POLL = r"""
import json, sys, time
from memory_server import MemoryServerError
from memory_server.client import MemoryClient
endpoints, deadline = sys.argv[1:-1], time.monotonic() + float(sys.argv[-1])
seen = {e: set() for e in endpoints}
clients = [MemoryClient(e, timeout=0.5) for e in endpoints]
while time.monotonic() < deadline:
    for endpoint, client in zip(endpoints, clients):
        try:
            stats = client.stats()[0]
        except MemoryServerError:
            continue
        rows = set().union(*(set(ns["rows"]) for ns in stats["per_namespace"].values()))
        if not rows <= seen[endpoint]:
            seen[endpoint] |= rows
            print(json.dumps({e: sorted(r) for e, r in seen.items()}), flush=True)
    time.sleep(0.05)
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair; yields their names. Always removed, with
    every process still inside them."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` binary (apt-get install -y iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"{os.getpid() % 100000}"
    names = (f"memtrans-a-{tag}", f"memtrans-b-{tag}")
    links = (f"mtva{tag}", f"mtvb{tag}")
    made: list[str] = []
    try:
        for name in names:
            result = ip("netns", "add", name, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {result.stderr.strip()}")
            made.append(name)
        result = ip("link", "add", links[0], "type", "veth", "peer", "name", links[1], check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {result.stderr.strip()}")
        for name, link, addr in zip(names, links, ADDRS):
            ip("link", "set", link, "netns", name)
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
            ip("-n", name, "link", "set", link, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in made:
            pids = ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        ip("link", "del", links[0], check=False)  # only left in this namespace if setup failed
        for name in made:
            ip("netns", "del", name, check=False)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:30]:
        shutil.copy(path, root / path.name)
    return root


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL it if it does not go."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_multinode_two_hosts_one_rank_and_server_each(two_hosts, corpus, tmp_path):
    out = tmp_path / "run"
    servers = [f"tcp://{addr}:{SERVER_PORT}" for addr in ADDRS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRANS_")}
    env.update(HOSTS=",".join(ADDRS), NPROC="1", THREADS="1", SERVER_PORT=str(SERVER_PORT),
               PYTHON=sys.executable, READY_TIMEOUT="60", RDZV_ID="memtrans-test",
               OMP_NUM_THREADS="1")
    poller = subprocess.Popen(
        ["ip", "netns", "exec", two_hosts[0], sys.executable, "-c", POLL, *servers,
         str(RUN_TIMEOUT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True, env=env)
    launchers = []
    logs = []
    try:
        for rank, name in enumerate(two_hosts):
            log = open(tmp_path / f"node{rank}.log", "w+")
            logs.append(log)
            launchers.append(subprocess.Popen(
                ["ip", "netns", "exec", name, "bash", str(LAUNCHER), "--data", str(corpus),
                 "--steps", "3", "--eval-every", "0", "--out", str(out), *TINY],
                env={**env, "NODE_RANK": str(rank), "LOG_DIR": str(tmp_path),
                     "SERVER_DATA_DIR": str(tmp_path / f"memory-data-node{rank}")},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
        # Both must finish; one failing leaves the other waiting at the rendezvous, so stop then.
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in launchers]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in [*launchers, poller]:
            _stop(proc)
    output = []
    for rank, log in enumerate(logs):
        log.seek(0)
        output.append(f"--- node {rank} ---\n{log.read()}")
        log.close()
    for rank in range(2):
        server_log = tmp_path / f"memory-server-node{rank}.log"
        if server_log.exists():
            output.append(f"--- memory server {rank} ---\n{server_log.read_text()}")
    report = "\n".join(output)
    print(report)
    assert codes == [0, 0], report

    lines = poller.stdout.read().splitlines()
    seen = json.loads(lines[-1]) if lines else {}
    # batch 1 per rank: global rows 0 and 1; row r lives on server r % 2, host r's server.
    assert seen == {servers[0]: [0], servers[1]: [1]}, report
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3], report
    assert all(math.isfinite(r["train_bpb"]) for r in train)
    assert "all memory servers answer" in report
    # The end-of-run checkpoint has each host's server write its own shard into its data dir.
    for rank in range(2):
        assert list((tmp_path / f"memory-data-node{rank}").glob("*.snapshot")), report
