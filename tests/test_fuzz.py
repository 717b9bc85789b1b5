"""Fuzzing a live server over a raw DEALER socket.

100,000 generated malformed requests. Every request is broken on purpose (so none may change
anything): random bytes, truncated headers, a wrong type in each header field and each argument,
missing and extra fields, bad array specs, huge declared shapes, frame-count and frame-size
mismatches, messages of many frames, oversized messages, well-formed requests with out-of-range
values, well-formed requests refused for what they would cost (a huge k, a reply past the message
limit, new memories past --max-bytes, repeated layers, configs past their caps), and snapshots and
restores that must fail (unknown names, bad tags, corrupt, renamed, refused or too-large
snapshots). Requests are pipelined in windows; each must get an error reply within a bounded
wait, carrying its request's id whenever its header has a readable one (and nil otherwise), the
server must stay up, and every memory (stats and the full search results of a pre-filled
namespace) must be the same before and after.

10,000 random namespace configs, by ``open`` and by ``restore`` of a snapshot holding them: each
is refused with a clean error or works for an add and a search. The server is the child process
that would crash (hnsw_m=1 once made faiss segfault), so a crash fails the test with its output.
"""

import itertools
import random
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from memory_server import MemoryClient, NamespaceConfig
from memory_server.errors import ERRORS_BY_CODE
from memory_server.protocol import (MAX_HEADER_BYTES, MAX_HEADER_ITEMS, OPS, PROTOCOL_VERSION,
                                    decode_reply, encode_request)
from memory_server.snapshot import snapshot_path
from snapshots import forge_snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REQUESTS = 100_000
WINDOW = 256
REPLY_TIMEOUT_MS = 10_000
MAX_MESSAGE = 64 << 10
NS = "fuzz"
CONFIG = NamespaceConfig(dim=8, max_memories=32, num_layers=2, num_rows=4)
WIDE_NS = "wide"  # rows enough for an add that creates more memories than --max-bytes holds
WIDE = NamespaceConfig(dim=1, max_memories=16, num_layers=1, num_rows=1 << 17)
MAX_BYTES = 1 << 20
K_CAP = 2048  # the documented cap on k (README, Limits)
BROKEN_SNAPSHOTS = ["flipped", "truncated", "renamed", "refused-config", "other-dim", "too-large"]

# Values of each wire type, to put where another type belongs.
VALUES = {
    "nil": None, "bool": True, "float": 1.5, "negative": -7, "huge": 2**64 - 1, "str": "x",
    "bin": b"\x00\xff", "list": [1, "a"], "map": {"a": 1}, "empty list": [], "empty map": {},
}
WRONG_FOR = {  # for each expected type, the values that are not of it
    "int": ["nil", "bool", "float", "str", "bin", "list", "map", "empty list", "empty map"],
    "str": ["nil", "bool", "float", "negative", "bin", "list", "map", "empty list"],
    "map": ["nil", "bool", "float", "negative", "str", "bin", "list", "empty list"],
    "int list": ["nil", "bool", "float", "negative", "str", "bin", "map", "empty map", "list"],
}


def _arg_type(expected: str) -> str:
    return {"a string": "str", "an integer": "int", "a map": "map",
            "a list of integers": "int list"}[expected]


class Fuzzer:
    """Makes malformed requests; ``kind`` names what is broken (for failure messages)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.kinds = [getattr(self, name) for name in dir(self) if name.startswith("k_")]
        self.ids = itertools.count(1)  # unique, so that each reply can be matched to its request

    def request(self) -> tuple[str, list[bytes]]:
        if self.rng.random() < 0.0005:
            return "oversized", self.oversized()
        kind = self.rng.choice(self.kinds)
        return kind.__name__[2:], kind()

    # a valid request to break

    def valid(self, op: str | None = None) -> tuple[dict, list[bytes]]:
        op = op or self.rng.choice(["add", "search", "clear"])
        rows = np.array(self.rng.sample(range(CONFIG.num_rows), self.rng.randint(1, 3)))
        n, d = self.rng.randint(1, 4), CONFIG.dim
        args, arrays = {"namespace": NS}, {"rows": rows}
        if op in ("add", "search"):
            args["layer"] = self.rng.randrange(CONFIG.num_layers)
        if op == "add":
            arrays["keys"] = arrays["values"] = self.np.standard_normal((len(rows), n, d),
                                                                        dtype=np.float32)
        elif op == "search":
            args["k"] = self.rng.randint(1, CONFIG.max_memories)
            arrays["queries"] = self.np.standard_normal((len(rows), n, d), dtype=np.float32)
        elif op == "clear" and self.rng.random() < 0.5:
            args["layers"] = [0]
        specs = [[name, a.dtype.name, list(a.shape)] for name, a in arrays.items()]
        header = {"v": PROTOCOL_VERSION, "id": next(self.ids), "op": op, "args": args,
                  "arrays": specs}
        return header, [a.tobytes() for a in arrays.values()]

    def message(self, op: str, args: dict, arrays: dict | None = None) -> list[bytes]:
        """A well-formed request (whatever its values ask for)."""
        return [bytes(f) for f in encode_request(next(self.ids), op, args, arrays)]

    def wrong(self, expected: str):
        return VALUES[self.rng.choice(WRONG_FOR[expected])]

    @staticmethod
    def pack(header) -> bytes:
        return msgpack.packb(header, use_bin_type=True)

    # kinds of breakage: each guarantees the request is invalid

    def k_random_bytes(self):
        return [self.rng.randbytes(self.rng.choice([0, 1, 7, 64, 2000]))
                for _ in range(self.rng.randint(1, 4))]

    def k_truncated_header(self):
        header, frames = self.valid()
        packed = self.pack(header)
        return [packed[: self.rng.randrange(len(packed))], *frames]

    def k_header_not_a_map(self):
        value = self.rng.choice([v for k, v in VALUES.items() if "map" not in k])
        return [self.pack(value), *self.valid()[1]]

    def k_wrong_top_level_type(self):
        header, frames = self.valid()
        field = self.rng.choice(["v", "id", "op", "args", "arrays"])
        header[field] = {"v": self.wrong("int"), "id": self.wrong("int"),
                         "op": self.wrong("str"), "args": self.wrong("map"),
                         "arrays": self.wrong("int list")}[field]
        if field == "v" and self.rng.random() < 0.3:
            header["v"] = PROTOCOL_VERSION + self.rng.randint(1, 5)
        return [self.pack(header), *frames]

    def k_missing_or_extra_top_level_field(self):
        header, frames = self.valid()
        if self.rng.random() < 0.5:
            del header[self.rng.choice(list(header))]
        else:
            header[self.rng.choice(["x", "ok", "result", "ID", ""])] = 1
        return [self.pack(header), *frames]

    def k_unknown_op(self):
        header, frames = self.valid()
        header["op"] = self.rng.choice(["", "Add", "snapshot!", "shutdown ", "x" * 300, "pin"])
        return [self.pack(header), *frames]

    def k_wrong_arg_type(self):
        op = self.rng.choice(["add", "search", "clear", "open", "drop"])
        header, frames = self.valid(op if op in ("add", "search", "clear") else None)
        header["op"] = op
        if op in ("open", "drop"):
            header["arrays"], frames = [], []
            header["args"] = {"namespace": NS, **({"config": CONFIG.to_dict()} if op == "open"
                                                  else {})}
        name, (_, _, expected) = self.rng.choice(list(OPS[op].args.items()))
        header["args"][name] = self.wrong(_arg_type(expected))
        return [self.pack(header), *frames]

    def k_missing_or_extra_arg(self):
        header, frames = self.valid()
        required = [n for n, (req, _, _) in OPS[header["op"]].args.items() if req]
        if self.rng.random() < 0.5:
            del header["args"][self.rng.choice(required)]
        else:
            header["args"][self.rng.choice(["extra", "rows", "keys", "k2"])] = 1
        return [self.pack(header), *frames]

    def k_args_on_argless_ops(self):
        op = self.rng.choice(["ping", "stats", "shutdown"])
        header = {"v": PROTOCOL_VERSION, "id": next(self.ids), "op": op,
                  "args": {"namespace": NS}, "arrays": []}
        if self.rng.random() < 0.5:  # or an array it does not take
            header["args"] = {}
            header["arrays"] = [["rows", "int64", [1]]]
            return [self.pack(header), np.zeros(1, np.int64).tobytes()]
        return [self.pack(header)]

    def k_bad_array_spec(self):
        header, frames = self.valid()
        i = self.rng.randrange(len(header["arrays"]))
        spec = header["arrays"][i]
        choice = self.rng.randrange(8)
        if choice == 0:
            header["arrays"][i] = self.rng.choice([None, "rows", 3, spec[:2], spec + [1], {}])
        elif choice == 1:
            spec[1] = self.rng.choice(["float64", "object", "<f4", "", 5, None, "complex64"])
        elif choice == 2:
            spec[2] = self.rng.choice([None, 3, "3", {"a": 1}, [1.5], [-1], [True], [1] * 9])
        elif choice == 3:
            spec[0] = self.wrong("str")
        elif choice == 4:
            header["arrays"].append(list(spec))  # declared twice
            frames.append(frames[i])
        elif choice == 5:
            del header["arrays"][i]  # a required array missing
            del frames[i]
        elif choice == 6:
            header["arrays"].append(["extra", "int32", [1]])
            frames.append(b"\0" * 4)
        else:
            header["arrays"] = [list(spec)] * 17  # over MAX_ARRAYS
            frames = [frames[i]] * 17
        return [self.pack(header), *frames]

    def k_huge_declared_shape(self):
        header, frames = self.valid()
        spec = self.rng.choice(header["arrays"])
        spec[2] = self.rng.choice([[1 << 39, 1 << 39], [1 << 40], [2**31, 2**31, 8],
                                   [1, 1 << 39, 8], [1 << 20] * 8])
        return [self.pack(header), *frames]

    def k_frame_count_mismatch(self):
        header, frames = self.valid()
        if self.rng.random() < 0.5:
            frames = frames[: self.rng.randrange(len(frames))]
        else:
            frames = frames + [self.rng.randbytes(8)] * self.rng.randint(1, 3)
        return [self.pack(header), *frames]

    def k_wrong_frame_size(self):
        header, frames = self.valid()
        i = self.rng.randrange(len(frames))
        delta = self.rng.choice([-4, -1, 1, 3, 4, 100])
        frames[i] = frames[i][:delta] if delta < 0 else frames[i] + b"\0" * delta
        return [self.pack(header), *frames]

    def k_nan_or_inf(self):
        header, frames = self.valid(self.rng.choice(["add", "search"]))
        array = np.frombuffer(frames[1], np.float32).copy()
        array[self.rng.randrange(array.size)] = self.rng.choice([np.nan, np.inf, -np.inf])
        frames[1] = array.tobytes()
        return [self.pack(header), *frames]

    def k_out_of_range_values(self):
        header, frames = self.valid()
        args, op = header["args"], header["op"]
        choice = self.rng.randrange(6)
        if choice == 0:
            args["namespace"] = self.rng.choice(["nope", "", "fuzz ", "x" * 1000])
        elif choice == 1 and op != "clear":
            args["layer"] = self.rng.choice([-1, CONFIG.num_layers, 2**40])
        elif choice == 2 and op == "search":
            args["k"] = self.rng.choice([0, -3, CONFIG.max_memories + 1])
        elif choice == 3 and op == "clear":
            args["layers"] = [0, self.rng.choice([-1, CONFIG.num_layers, 99])]
        elif choice == 4:  # rows out of range, repeated, or not integers
            rows = self.rng.choice([np.array([0, CONFIG.num_rows]), np.array([-1]),
                                    np.array([1, 1]), np.array([0.0], np.float32)])
            header["arrays"][0] = ["rows", rows.dtype.name, list(rows.shape)]
            frames[0] = rows.tobytes()
        else:  # width other than the namespace's dim
            if op == "clear":
                return self.k_frame_count_mismatch()
            b, n = header["arrays"][1][2][:2]
            bad = np.ones((b, n, CONFIG.dim + 1), np.float32)
            for j in range(1, len(frames)):
                header["arrays"][j][2] = list(bad.shape)
                frames[j] = bad.tobytes()
        return [self.pack(header), *frames]

    def k_bad_open_or_drop(self):
        config = CONFIG.to_dict()
        choice = self.rng.randrange(4)
        if choice == 0:
            config[self.rng.choice(list(config))] = self.rng.choice([0, -1, "flat?", None, 1.5])
            if config == CONFIG.to_dict():
                config["dim"] = 0
        elif choice == 1:
            config["unknown"] = 1
        elif choice == 2:
            config["dim"] = CONFIG.dim * 2  # the namespace exists with another config
        else:
            header = {"v": PROTOCOL_VERSION, "id": next(self.ids), "op": "drop",
                      "args": {"namespace": "never-opened"}, "arrays": []}
            return [self.pack(header)]
        header = {"v": PROTOCOL_VERSION, "id": next(self.ids), "op": "open",
                  "args": {"namespace": NS, "config": config}, "arrays": []}
        return [self.pack(header)]

    def k_bool_array_with_bad_bytes(self):
        header, frames = self.valid()
        header["arrays"][0][1] = "bool"
        header["arrays"][0][2] = [len(frames[0])]
        frames[0] = bytes([2]) * len(frames[0])
        return [self.pack(header), *frames]

    def k_hostile_msgpack(self):
        choice = self.rng.randrange(4)
        if choice == 0:  # deep nesting
            return [b"\x91" * self.rng.choice([100, 5000]) + b"\x00"]
        if choice == 1:  # non-string map keys
            return [self.pack({1: 2, 3: 4})]
        if choice == 2:  # an ext type, and a declared length past the end
            return [self.rng.choice([b"\xd4\x01\x00", b"\xdb\xff\xff\xff\xff", b"\xdd\x00\x01"])]
        return [self.pack({"v": 1, "id": next(self.ids), "op": "search",
                           "args": {"namespace": "a" * 70000}, "arrays": []})]

    def k_many_frames(self):
        """More frames than any request has (a header and 16 arrays): skipped as they come."""
        header, frames = self.valid()
        count = 10**5 if self.rng.random() < 0.003 else self.rng.choice([18, 19, 64, 1000])
        return [self.pack(header), *frames, *[b""] * (count - 1 - len(frames))]

    def k_expensive(self):
        """Well formed, and refused for what it would cost before any of it is spent."""
        choice = self.rng.randrange(5)
        rows = np.arange(CONFIG.num_rows)
        if choice == 0:  # k far past MAX_K
            header, frames = self.valid("search")
            header["args"]["k"] = self.rng.choice([K_CAP + 1, 2**26, 2**40])
            return [self.pack(header), *frames]
        if choice == 1:  # a reply (rows x queries x k) larger than --max-message-bytes
            queries = self.np.standard_normal((CONFIG.num_rows, 128, CONFIG.dim),
                                              dtype=np.float32)
            return self.message("search", {"namespace": NS, "layer": 0,
                                           "k": CONFIG.max_memories},
                                {"rows": rows, "queries": queries})
        if choice == 2:  # 2,000 new memories, past --max-bytes
            new = np.array(self.rng.sample(range(WIDE.num_rows), 2000))
            keys = self.np.standard_normal((len(new), 1, WIDE.dim), dtype=np.float32)
            return self.message("add", {"namespace": WIDE_NS, "layer": 0},
                                {"rows": new, "keys": keys, "values": keys})
        if choice == 3:  # a layer named many times
            layers = [0] * self.rng.choice([2, 100, MAX_HEADER_ITEMS])
            return self.message("clear", {"namespace": NS, "layers": layers}, {"rows": rows})
        field = self.rng.choice(["dim", "max_memories", "num_layers", "num_rows", "hnsw_m",
                                 "hnsw_segments", "ef_search", "nlist"])
        config = CONFIG.to_dict() | {field: self.rng.choice([10**15, 2**40, 2**63 - 1])}
        return self.message("open", {"namespace": "huge", "config": config})

    def k_snapshot_or_restore(self):
        """Snapshots that cannot be taken, snapshots that must not be restored."""
        choice = self.rng.randrange(4)
        if choice == 0:
            return self.message(self.rng.choice(["snapshot", "restore"]),
                                {"namespace": "never-opened", "tag": "t"})
        if choice == 1:
            tag = self.rng.choice(["", "../up", "a/b", "x" * 300, "t\x00", ".", "t@u"])
            return self.message(self.rng.choice(["snapshot", "restore"]),
                                {"namespace": NS, "tag": tag})
        tag = "missing" if choice == 2 else self.rng.choice(BROKEN_SNAPSHOTS)
        return self.message("restore", {"namespace": NS, "tag": tag})

    def oversized(self):
        header, frames = self.valid("add")
        return [self.pack(header), *frames, b"\0" * (MAX_MESSAGE + 1)]


def fingerprint(client: MemoryClient) -> tuple:
    """Everything the memories hold: totals, per-namespace stats and full search results."""
    stats = client.stats()[0]
    totals = {k: stats[k] for k in ("namespaces", "memories", "entries", "bytes",
                                    "per_namespace")}
    queries = np.random.default_rng(7).standard_normal((CONFIG.num_rows, 5, CONFIG.dim),
                                                       dtype=np.float32)
    found = []
    for layer in range(CONFIG.num_layers):
        r = client.search(NS, layer, np.arange(CONFIG.num_rows), queries, CONFIG.max_memories)
        found.append((r.keys.tobytes(), r.values.tobytes(), r.positions.tobytes()))
    return totals, found


def readable_id(header: bytes) -> int | None:
    """The id a reply must carry, by the protocol's rule: a header frame of at most
    MAX_HEADER_BYTES that is a msgpack map within the header limits, with an integer id in
    [0, 2**64); None (nil) for any other."""
    if len(header) > MAX_HEADER_BYTES:
        return None
    try:
        value = msgpack.unpackb(header, raw=False, strict_map_key=True, max_ext_len=0,
                                max_array_len=MAX_HEADER_ITEMS, max_map_len=256)
    except Exception:  # anything msgpack refuses: no id to read
        return None
    request_id = value.get("id") if isinstance(value, dict) else None
    ok = type(request_id) is int and 0 <= request_id < 1 << 64
    return request_id if ok else None


def break_snapshots(data_dir, client: MemoryClient) -> None:
    """Snapshots of NS that a restore must refuse whole, leaving NS as it was."""
    (written,) = client.snapshot(NS, "good")
    good = Path(written["path"]).read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    for tag, data in (("flipped", bytes(flipped)), ("truncated", good[: len(good) // 2]),
                      ("renamed", good)):  # its header names another tag
        snapshot_path(data_dir, NS, tag).write_bytes(data)
    forge_snapshot(data_dir, NS, "refused-config", CONFIG.to_dict() | {"index": "hnsw",
                                                                       "hnsw_m": 1})
    forge_snapshot(data_dir, NS, "other-dim", CONFIG.to_dict() | {"dim": CONFIG.dim * 2})
    rows, keys = 600, np.ones((CONFIG.max_memories, CONFIG.dim), np.float32)
    wide = CONFIG.to_dict() | {"num_rows": rows}  # 600 memories of 32 entries: over MAX_BYTES
    forge_snapshot(data_dir, NS, "too-large", wide,
                   [(0, row, CONFIG.max_memories, keys, keys) for row in range(rows)])


def test_100k_malformed_requests_all_answered_and_nothing_changes(memory_server, tmp_path):
    (server,) = memory_server(1, "--max-message-bytes", str(MAX_MESSAGE), "--max-bytes",
                              str(MAX_BYTES), "--data-dir", str(tmp_path), "--log-level",
                              "WARNING")
    rng = np.random.default_rng(0)
    with MemoryClient(server.endpoint, timeout=20) as client:
        client.open(NS, CONFIG)
        client.open(WIDE_NS, WIDE)
        for layer in range(CONFIG.num_layers):
            keys = rng.standard_normal((CONFIG.num_rows, 40, CONFIG.dim), dtype=np.float32)
            client.add(NS, layer, np.arange(CONFIG.num_rows), keys, -keys)
        break_snapshots(tmp_path, client)
        before = fingerprint(client)

        fuzzer = Fuzzer(seed=1234)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        codes: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        try:
            sent = 0
            while sent < REQUESTS:
                window = [fuzzer.request() for _ in range(min(WINDOW, REQUESTS - sent))]
                ids = [readable_id(frames[0]) for _, frames in window]
                answered: Counter[int | None] = Counter()
                for kind, frames in window:
                    sock.send_multipart(frames)
                    kinds[kind] += 1
                for i in range(len(window)):
                    assert sock.poll(REPLY_TIMEOUT_MS), (
                        f"no reply within {REPLY_TIMEOUT_MS} ms after {sent + i} replies; this "
                        f"window sent {[k for k, _ in window]}; alive: "
                        f"{server.proc.poll() is None}\n{server.output()[-3000:]}")
                    reply = decode_reply(sock.recv_multipart())
                    assert not reply.ok and reply.code in ERRORS_BY_CODE, reply
                    assert reply.code != "internal", reply.message
                    codes[reply.code] += 1
                    answered[reply.id] += 1
                # Each request answered once, under its own id (or nil when it had none).
                expected = Counter(ids)
                if answered != expected:
                    missing = expected - answered
                    unanswered = [(kind, i) for (kind, _), i in zip(window, ids) if i in missing]
                    pytest.fail(f"replies under ids not sent, or too many: "
                                f"{dict(answered - expected)}; unanswered (kind, id): "
                                f"{unanswered[:10]}")
                sent += len(window)
        finally:
            sock.close()

        assert server.proc.poll() is None, server.output()[-3000:]
        assert codes.total() == REQUESTS
        assert {"protocol_error", "invalid_request", "unknown_namespace", "config_mismatch",
                "limit_exceeded", "snapshot_error"} <= set(codes), codes
        assert min(kinds[k.__name__[2:]] for k in fuzzer.kinds) > REQUESTS // (
            2 * len(fuzzer.kinds)), kinds
        assert fingerprint(client) == before
        assert client.stats()[0]["requests"]["malformed"]["count"] >= REQUESTS // 2


CONFIGS = 10_000
RESTORE_EVERY = 10  # every tenth config comes in by restore instead of open
# Typical valid values of each integer field, then edges and values of other types.
TYPICAL = {"dim": (1, 65), "max_memories": (1, 500), "num_layers": (1, 5), "num_rows": (1, 9),
           "hnsw_m": (2, 49), "hnsw_segments": (1, 9), "ef_search": (1, 257),
           "ef_construction": (1, 257), "nlist": (0, 9), "nprobe": (0, 9)}
EDGES = [0, 1, 2, 3, 4, 63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096,
         4097, 2**16, 2**16 + 1, 2**20, 2**20 + 1, 2**24, 2**24 + 1, 2**28, 2**31, 2**32,
         2**63 - 1, 2**64 - 1, -1, -(2**63)]
ODD = [True, False, None, 1.0, 2.5, float("inf"), float("nan"), "4", [], {}]


def random_config(rng: random.Random) -> dict:
    config = {}
    for name, (lo, hi) in TYPICAL.items():
        required = name in ("dim", "max_memories", "num_layers", "num_rows")
        if rng.random() < (0.01 if required else 0.3):
            continue  # missing: refused if required, the default if not
        u = rng.random()
        config[name] = (rng.randrange(lo, hi) if u < 0.85 else rng.choice(EDGES) if u < 0.97
                        else rng.choice(ODD))
    if rng.random() < 0.9:
        config["index"] = rng.choice(["hnsw"] * 7 + ["ivf"] * 6 + ["flat"] * 6 + ["pq", 1])
    if rng.random() < 0.9:
        config["value_dtype"] = rng.choice(["float16"] * 9 + ["float32"] * 9 + ["bfloat16", None])
    if rng.random() < 0.01:
        config["colour"] = "blue"
    return config


def _fits(value, lo: int = 1, hi: int = 4096) -> bool:
    return type(value) is int and lo <= value <= hi


class ConfigCaller:
    """One request at a time to a server that may die: fails at once, with its output, if so."""

    def __init__(self, server):
        self.server = server
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(server.endpoint)
        self.id = 0

    def __call__(self, what: str, op: str, args: dict, arrays: dict | None = None):
        self.id += 1
        self.sock.send_multipart(encode_request(self.id, op, args, arrays))
        deadline = time.monotonic() + 30
        while not self.sock.poll(100):
            code = self.server.proc.poll()
            assert code is None, (f"the server died (exit {code}) on {op} of {what}:\n"
                                  f"{self.server.output()[-3000:]}")
            assert time.monotonic() < deadline, f"no reply within 30 s to {op} of {what}"
        reply = decode_reply(self.sock.recv_multipart())
        assert reply.id == self.id and reply.code != "internal", (what, op, reply)
        return reply

    def close(self):
        self.sock.close()


def exercise(call, rng: np.random.Generator, what: str, namespace: str, config: dict) -> None:
    """An accepted config must take two adds (the second may wrap the ring) and a search."""
    dim, max_memories = config["dim"], config["max_memories"]
    layer, rows = config["num_layers"] - 1, np.array([config["num_rows"] - 1])
    for n in rng.integers(1, 41, size=2):
        keys = rng.standard_normal((1, n, dim), dtype=np.float32)
        reply = call(what, "add", {"namespace": namespace, "layer": layer},
                     {"rows": rows, "keys": keys, "values": keys})
        assert reply.ok, (what, reply)
    k = int(rng.choice([1, min(max_memories, K_CAP), max_memories, rng.integers(1, 65)]))
    reply = call(what, "search", {"namespace": namespace, "layer": layer, "k": k},
                 {"rows": rows, "queries": rng.standard_normal((1, 2, dim), dtype=np.float32)})
    if k > min(max_memories, K_CAP):
        assert reply.code == "invalid_request" and "k must be" in reply.message, (what, reply)
    else:
        assert reply.ok and reply.arrays["positions"].shape == (1, 2, k), (what, reply)
        assert (reply.arrays["positions"][..., 0] > 0).all(), (what, reply)


def test_10k_random_configs_by_open_and_restore_never_crash(memory_server, tmp_path):
    (server,) = memory_server(1, "--data-dir", str(tmp_path), "--log-level", "WARNING")
    rng, nprng = random.Random(4321), np.random.default_rng(4321)
    call = ConfigCaller(server)
    outcomes: dict[str, int] = {}
    try:
        for i in range(CONFIGS):
            config, namespace = random_config(rng), f"c{i}"
            restoring = i % RESTORE_EVERY == 0
            what = f"config #{i} {config} by {'restore' if restoring else 'open'}"
            if restoring:
                memories = []
                if _fits(config.get("dim")) and _fits(config.get("max_memories"), hi=2**64):
                    n = min(5, config["max_memories"])
                    keys = nprng.standard_normal((n, config["dim"]), dtype=np.float32)
                    dtype = config.get("value_dtype", "float32")
                    values = keys.astype(dtype) if dtype in ("float16", "float32") else keys
                    memories = [(0, 0, n, keys, values)]
                forge_snapshot(tmp_path, namespace, "t", config, memories)
                reply = call(what, "restore", {"namespace": namespace, "tag": "t"})
                refused = "snapshot_error"
            else:
                reply = call(what, "open", {"namespace": namespace, "config": config})
                refused = "invalid_request"
            if reply.ok:
                exercise(call, nprng, what, namespace, config)
                assert call(what, "drop", {"namespace": namespace}).ok
            else:
                assert reply.code == refused and "namespace config" in reply.message, (what,
                                                                                     reply)
            key = f"{'restore' if restoring else 'open'} {'ok' if reply.ok else 'refused'}"
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        call.close()
    assert server.proc.poll() is None
    # Enough of each kind to mean something: accepted and refused, by both ops.
    assert min(outcomes.values()) >= 100 and len(outcomes) == 4, outcomes
