"""Attacks on a live memory server: each attack of issue 13 in turn, while a well-behaved client
pings it from another process; prints per attack the server's peak resident memory against
``--max-bytes``, the pinger's latency, and whether the server lived.

    python -m bench.attack [--max-bytes 64M] [--max-message-bytes 16M] [--threads 2]
                           [--max-connections-per-host 64] [--only TEXT ...]

Before the attacks the memories are filled to about three quarters of ``--max-bytes``, so that an
attack that made the server hold more than it may shows. "Idle" is the resident memory of the
server before it held anything (the interpreter, numpy, faiss, ZeroMQ): the fixed overhead, which
``--max-bytes`` does not count. The pinger runs in its own process, so that the attackers' work
(building a million frames, say) does not delay its pings here. Loopback addresses stand for
hosts (each 127.x.y.z is its own host to ``--max-connections-per-host``): the pinger and the
bench's client are 127.0.0.1, so connection attacks come from others. ``--only TEXT`` runs the
attacks whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zmq

from memory_server import LimitExceeded, MemoryClient, MemoryServerError, NamespaceConfig
from memory_server.cli import parse_bytes
from memory_server.client import shard_tag
from memory_server.local import start_servers
from memory_server.protocol import PROTOCOL_VERSION, encode_request
from memory_server.snapshot import write_snapshot

_PING_GAP = 0.01  # seconds between the pinger's pings
_SAMPLE_GAP = 0.005  # seconds between samples of the server's resident memory
_SETTLE = 0.5  # seconds measured after an attack, while the server catches up


@dataclass
class Outcome:
    attack: str
    sent: str
    start: float
    end: float
    peak_rss: int = 0
    start_rss: int = 0
    pings: tuple[float, ...] = ()
    survived: bool = False


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Samples a process's resident memory every ``_SAMPLE_GAP`` seconds."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.done = pid, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(_SAMPLE_GAP):
            try:
                self.samples.append((time.monotonic(), _rss(self.pid)))
            except OSError:  # the server died: the table says so
                return

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def at(self, when: float) -> int:
        """The last sample taken by ``when``."""
        return max(((t, rss) for t, rss in self.samples if t <= when), default=(0, 0))[1]


def pinger(endpoint: str, out: str) -> None:
    """Ping ``endpoint`` until SIGTERM, writing ``end_time latency`` lines (monotonic seconds)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with MemoryClient(endpoint, timeout=60) as client, open(out, "w") as f:
        while not stop.is_set():
            start = time.monotonic()
            try:
                client.ping()
                latency = time.monotonic() - start
            except MemoryServerError:
                latency = float("inf")
            f.write(f"{time.monotonic()} {latency}\n")
            f.flush()
            time.sleep(_PING_GAP)


def raw_socket(endpoint: str, **options) -> zmq.Socket:
    """A DEALER connected to ``endpoint`` with the given socket options (``RCVHWM=1``, ...), for
    sending hand-made frames; it lingers on nothing when closed."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


def _exchange(endpoint: str, messages: list[list], wait_ms: int = 60_000) -> None:
    """Send every message on one socket, then read as many replies (each an error)."""
    sock = raw_socket(endpoint)
    try:
        for frames in messages:
            sock.send_multipart(frames)
        for _ in messages:
            if not sock.poll(wait_ms):
                return
            sock.recv_multipart()
    finally:
        sock.close()


def _refused(call) -> None:
    try:
        call()
    except MemoryServerError:
        pass


# The attacks: each takes the endpoint and a client, and returns what it sent.

def huge_k(endpoint: str, client: MemoryClient) -> str:
    config = NamespaceConfig(dim=4, max_memories=2**22, num_layers=1, num_rows=1)
    client.open("k", config)
    keys = np.random.default_rng(0).standard_normal((1, 300, 4), dtype=np.float32)
    client.add("k", 0, [0], keys, keys)
    for _ in range(50):
        _refused(lambda: client.search("k", 0, [0], keys[:, :1], 2**26))
    for _ in range(20):  # the largest allowed: 300 queries x 2048 neighbours
        client.search("k", 0, [0], keys, 2048)
    client.drop("k")
    return "50 searches k=2^26, 20 of 300 queries x k=2048"


def many_rows(endpoint: str, client: MemoryClient) -> str:
    rows = 100_000
    client.open("rows", NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=rows))
    keys = np.ones((rows, 1, 4), np.float32)
    for _ in range(6):
        _refused(lambda: client.add("rows", 0, np.arange(rows), keys, keys))
    client.drop("rows")
    return "6 adds naming 100K new rows"


def repeated_layers(endpoint: str, client: MemoryClient) -> str:
    client.open("layers", NamespaceConfig(dim=4, max_memories=8, num_layers=1024, num_rows=1))
    rows = {"rows": np.zeros(1, np.int64)}
    _exchange(endpoint, [encode_request(i, "clear", {"namespace": "layers",
                                                     "layers": [0] * 65535}, rows)
                         for i in range(20)])
    for _ in range(20):
        client.clear("layers", [0])  # every one of the 1024 layers
    client.drop("layers")
    return "20 clears of layers [0] x 65535, 20 of all 1024 layers"


def many_frames(endpoint: str, client: MemoryClient) -> str:
    _exchange(endpoint, [[encode_request(7, "ping")[0], *([b""] * 1_000_000)]] * 3)
    return "3 messages of 10^6 empty frames"


def large_frames(endpoint: str, client: MemoryClient) -> str:
    frame = np.zeros(16 << 20, np.uint8)
    _exchange(endpoint, [[encode_request(7, "ping")[0], *([frame] * 60)]])
    return "1 message of 60 frames of 16 MiB"


def unread_replies(endpoint: str, client: MemoryClient) -> str:
    client.open("big", NamespaceConfig(dim=64, max_memories=4096, num_layers=1, num_rows=1))
    keys = np.random.default_rng(0).standard_normal((1, 4096, 64), dtype=np.float32)
    client.add("big", 0, [0], keys, keys)
    queries = keys[:, :16]
    before = client.stats()[0]["requests"].get("search", {}).get("count", 0)
    sock = raw_socket(endpoint, RCVHWM=1, RCVBUF=4096)
    try:
        for i in range(200):  # replies of about 2 MB each, never read
            sock.send_multipart(encode_request(i, "search", {"namespace": "big", "layer": 0,
                                                             "k": 2048},
                                               {"rows": np.zeros(1, np.int64),
                                                "queries": queries}))
        deadline = time.monotonic() + 60
        while (client.stats()[0]["requests"].get("search", {}).get("count", 0) < before + 200
               and time.monotonic() < deadline):
            time.sleep(0.05)
    finally:
        sock.close()
    client.drop("big")
    return "200 searches with 2 MB replies, none read"


def _connect_from(endpoint: str, hosts: list[str], count: int) -> list[socket.socket]:
    """``count`` raw TCP connections to ``endpoint``, from the loopback ``hosts`` in turn (each
    127.x.y.z address is its own host to the server's per-host cap)."""
    port = int(endpoint.rsplit(":", 1)[1])
    return [socket.create_connection(("127.0.0.1", port),
                                     source_address=(hosts[i % len(hosts)], 0))
            for i in range(count)]


def idle_connections(endpoint: str, client: MemoryClient) -> str:
    hosts = [f"127.0.1.{i}" for i in range(1, 21)]  # under --max-connections-per-host each
    socks = _connect_from(endpoint, hosts, 1100)
    try:
        time.sleep(1.0)
        written = client.snapshot("fill", "attack")[0]["bytes"]
    finally:
        for s in socks:
            s.close()
    return (f"1,100 idle TCP connections from {len(hosts)} hosts; a snapshot meanwhile wrote "
            f"{written >> 20} MiB")


def _settled_connections(client: MemoryClient, wait: float = 10.0) -> dict:
    """The server's connection stats once the closes of an earlier attack have reached its
    count (its open connections unchanged for half a second, or ``wait`` passed)."""
    stats = client.stats()[0]["connections"]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = client.stats()[0]["connections"]
        if now["open"] == stats["open"]:
            return now
        stats = now
    return stats


def one_host(endpoint: str, client: MemoryClient) -> str:
    """One host opens 1,100 ZeroMQ connections, which keep what they get (heartbeats) and, when
    refused, retry every 100 ms (ZeroMQ's default); a client of another host, arriving after
    them, is still let in (without the per-host cap it would wait for a free connection)."""
    before = _settled_connections(client)
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, 2048)
    socks = []
    try:
        for _ in range(1100):  # "tcp://SOURCE:0;ADDRESS" connects from SOURCE
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint.replace("tcp://", "tcp://127.0.0.2:0;"))
            socks.append(sock)
        time.sleep(2.0)
        held = client.stats()[0]["connections"]["open"] - before["open"]
        start = time.monotonic()
        with MemoryClient(endpoint, timeout=30) as newcomer:
            newcomer.ping()
        joined = time.monotonic() - start
        after = client.stats()[0]["connections"]
    finally:
        context.destroy(linger=0)
    refused = after["refused_per_host"] - before["refused_per_host"]
    return (f"1,100 ZeroMQ connections from one host, retrying: {held} held "
            f"(--max-connections-per-host {after['max_per_host']}), {refused:,} attempts refused; "
            f"a new client of another host meanwhile connected and pinged in "
            f"{joined * 1000:.0f} ms")


def oversized_restore(endpoint: str, client: MemoryClient) -> str:
    """A snapshot written for a larger server (here, by hand into this one's data directory)
    restored where it does not fit: refused before its arrays are read."""
    data_dir = Path(client.snapshot("fill", "attack")[0]["path"]).parent
    config = NamespaceConfig(dim=64, max_memories=8192, num_layers=1, num_rows=32)
    keys = np.zeros((config.max_memories, config.dim), np.float32)
    memories = ({"layer": 0, "row": row, "total": config.max_memories, "keys": keys,
                 "values": keys} for row in range(config.num_rows))
    info = write_snapshot(data_dir, "huge", shard_tag("t", 0, 1), config.to_dict(),
                          config.num_rows, memories)
    try:
        client.restore("huge", "t")
        outcome = "restored"
    except LimitExceeded as exc:
        outcome = f"refused ({exc.code})"
    finally:
        info.path.unlink()
    free = client.stats()[0]
    free = (free["config"]["max_bytes"] - free["bytes"]) >> 20
    return (f"restore of a {info.bytes >> 20} MiB snapshot with {free} MiB of --max-bytes free: "
            f"{outcome}")


def big_headers(endpoint: str, client: MemoryClient) -> str:
    lists = b"\xdc\xff\xff" + b"\x90" * 65535
    huge = [b"\xdc\x00\x10" + lists * 16]
    wide = [msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "ping", "args": {},
                           "arrays": [[]] * 65_000})]
    _exchange(endpoint, [huge] * 50 + [wide] * 200)
    return "50 headers of 1 MiB and 200 of 64 KiB, of empty lists"


ATTACKS = {
    "huge k search": huge_k,
    "many-rows add": many_rows,
    "repeated layers clear": repeated_layers,
    "10^6 frames": many_frames,
    "unread replies": unread_replies,
    "1,100 idle connections": idle_connections,
    "one host's connections": one_host,
    "big header": big_headers,
    "oversized restore": oversized_restore,
    "large frames": large_frames,  # last: what ZeroMQ buffers stays resident after it
}


def fill(client: MemoryClient, max_bytes: int) -> int:
    """Fill memories to about 3/4 of ``max_bytes``; returns the bytes they hold."""
    config = NamespaceConfig(dim=64, max_memories=1024, num_layers=1, num_rows=1024)
    client.open("fill", config)
    rng = np.random.default_rng(1)
    row = 0
    while client.stats()[0]["bytes"] < 0.75 * max_bytes and row < config.num_rows:
        keys = rng.standard_normal((8, 1024, 64), dtype=np.float32)
        client.add("fill", 0, np.arange(row, row + 8), keys, keys)
        row += 8
    return client.stats()[0]["bytes"]


def run(max_bytes: int, max_message_bytes: int, threads: int, per_host: int,
        attacks: dict = ATTACKS) -> tuple[list[Outcome], dict]:
    data_dir = tempfile.mkdtemp(prefix="attack-")
    (server,) = start_servers(1, "--threads", str(threads), "--max-bytes", str(max_bytes),
                              "--max-message-bytes", str(max_message_bytes),
                              "--max-connections-per-host", str(per_host), "--data-dir",
                              data_dir, "--log-level", "WARNING")
    pid = server.proc.pid
    facts = {"idle_rss": _rss(pid)}
    pings_file = f"{data_dir}/pings.txt"
    sampler = Sampler(pid)
    sampler.start()
    outcomes = []
    ping_proc = None
    try:
        with MemoryClient(server.endpoint, timeout=120) as client:
            facts["held"] = fill(client, max_bytes)
            facts["filled_rss"] = _rss(pid)
            ping_proc = subprocess.Popen([sys.executable, "-m", "bench.attack", "--pinger",
                                          server.endpoint, pings_file])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (os.path.exists(pings_file)
                                                       and os.path.getsize(pings_file)):
                time.sleep(0.1)  # until the pinger is up and pinging
            time.sleep(0.5)
            for name, attack in attacks.items():
                start = time.monotonic()
                try:
                    sent = attack(server.endpoint, client)
                except MemoryServerError as exc:
                    sent = f"failed: {exc}"
                time.sleep(_SETTLE)
                outcome = Outcome(name, sent, start, time.monotonic())
                outcome.survived = server.proc.poll() is None and _pings_ok(server.endpoint)
                outcomes.append(outcome)
                if not outcome.survived:
                    break
    finally:
        if ping_proc is not None:
            ping_proc.terminate()
            ping_proc.wait(30)
        sampler.done.set()
        facts["exit"] = server.stop()
        facts["log_bytes"] = len(server.output())
    with open(pings_file) as f:
        pings = [tuple(map(float, line.split())) for line in f]
    shutil.rmtree(data_dir)
    for outcome in outcomes:
        outcome.peak_rss = sampler.peak(outcome.start, outcome.end)
        outcome.start_rss = sampler.at(outcome.start)
        # A ping counts for the attack it ended in (a stalled one ends after the stall).
        outcome.pings = tuple(lat for t, lat in pings if outcome.start <= t <= outcome.end)
    return outcomes, facts


def _pings_ok(endpoint: str) -> bool:
    try:
        with MemoryClient(endpoint, timeout=30) as fresh:
            fresh.ping()
        return True
    except MemoryServerError:
        return False


def report(outcomes: list[Outcome], facts: dict, max_bytes: int, max_message_bytes: int,
           threads: int, per_host: int) -> str:
    from bench.common import machine_line, table

    mib = 1 << 20
    rows = []
    for o in outcomes:
        p50, p99 = (np.percentile(o.pings, [50, 99]) * 1000) if o.pings else (np.nan, np.nan)
        rows.append([o.attack, o.sent, f"{o.peak_rss / mib:.0f}",
                     f"{(o.peak_rss - o.start_rss) / mib:+.0f}",
                     f"{(o.peak_rss - facts['idle_rss'] - max_bytes) / mib:+.0f}",
                     len(o.pings), f"{p50:.1f}", f"{p99:.1f}",
                     f"{max(o.pings, default=np.nan) * 1000:.0f}",
                     "yes" if o.survived else "NO"])
    lines = [machine_line(f"1 server x {threads} threads, --max-bytes {max_bytes // mib}M, "
                          f"--max-message-bytes {max_message_bytes // mib}M, "
                          f"--max-connections-per-host {per_host}"), "",
             f"Server resident memory: {facts['idle_rss'] / mib:.0f} MiB idle (the fixed "
             f"overhead), {facts['filled_rss'] / mib:.0f} MiB with its memories holding "
             f"{facts['held'] / mib:.0f} MiB of the {max_bytes // mib} MiB allowed.", "",
             table(["attack", "sent", "peak RSS MiB", "growth MiB", "over idle + --max-bytes MiB",
                    "pings",
                    "ping p50 ms", "ping p99 ms", "ping max ms", "survived"], rows), "",
             f"Server exit status at SIGTERM: {facts['exit']}; its log: {facts['log_bytes']:,} "
             f"bytes."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=parse_bytes, default=parse_bytes("64M"))
    parser.add_argument("--max-message-bytes", type=parse_bytes, default=parse_bytes("16M"))
    parser.add_argument("--threads", type=int, default=2, help="worker threads of the server")
    parser.add_argument("--max-connections-per-host", type=int, default=64,
                        help="the server's cap of connections per host (default: %(default)s)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the attacks whose name contains TEXT (repeatable; "
                             f"names: {'; '.join(ATTACKS)})")
    parser.add_argument("--pinger", nargs=2, metavar=("ENDPOINT", "FILE"),
                        help=argparse.SUPPRESS)  # the pinging child process
    args = parser.parse_args()
    if args.pinger:
        pinger(*args.pinger)
        return
    attacks = {name: attack for name, attack in ATTACKS.items()
               if not args.only or any(text.lower() in name.lower() for text in args.only)}
    if not attacks:
        parser.error(f"--only {args.only} names no attack; the attacks: {'; '.join(ATTACKS)}")
    outcomes, facts = run(args.max_bytes, args.max_message_bytes, args.threads,
                          args.max_connections_per_host, attacks)
    print(report(outcomes, facts, args.max_bytes, args.max_message_bytes, args.threads,
                 args.max_connections_per_host))


if __name__ == "__main__":
    main()
