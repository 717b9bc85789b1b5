"""The wire format of the memory service: the one module that knows how messages are framed.

Every request and every reply is one ZeroMQ multipart message::

    frame 0        msgpack header (a map, schema below)
    frame 1..n     one raw array per entry of header["arrays"], in that order: C-contiguous,
                   little-endian bytes, exactly itemsize * prod(shape) long

    request header {"v": PROTOCOL_VERSION, "id": int >= 0, "op": str, "args": map,
                    "arrays": [[name, dtype, shape], ...], ["session": bin, "seq": int >= 1],
                    ["token": str]}
    ok reply       {"v": PROTOCOL_VERSION, "id": int, "ok": true, "result": map,
                    "arrays": [[name, dtype, shape], ...], "instance": str | nil}
    error reply    {"v": PROTOCOL_VERSION, "id": int | nil, "ok": false, "code": str,
                    "message": str, "instance": str | nil}

(the server's socket tells peers apart by an identity of its own; that is the server's
business, not the protocol's). A reply carries the id of its request, or nil when the request was
too broken for its id to be read. ``code`` is one of ``errors.ERRORS_BY_CODE``.

``session`` (8 to 64 random bytes, one per client object) and ``seq`` (that client's count of
requests to this server) are optional, both or neither: with them the server answers a request
sent again after a reconnect once, with the original's reply, instead of running it twice, and
orders a session's requests across its connections (see server.py). ``instance`` names the server
process that answered, so a client can tell a restarted server from the one it opened its
namespaces on.

``token`` (version 3) is the client's credential on a server started with ``--token-file``
(``tenants.py``); with CURVE the connection's key is the credential instead.

Versions: 2 added ``session``, ``seq`` and ``instance``; 3 added ``token``. A server reads requests
of versions 1 and 2 too (version 1 without a session: never de-duplicated; neither can carry a
token) and answers each in the version it was asked in; a client reads replies of every version,
so an old server's refusal of a newer version reaches the user.

    op        args                     request arrays          ok reply
    ping      -                        -                       {version, protocol}
    open      namespace, config (map   -                       {}
              of NamespaceConfig)
    add       namespace, layer         rows int (b,), keys and {}
                                       values float32 (b,n,d)
    search    namespace, layer, k      rows int (b,), queries  arrays keys key_dtype (u+1,d),
                                       float32 (b,q,d)         values (u+1,d), positions int32
                                                               (b,q,k): a store.Retrieval
    clear     namespace, [layers]      rows int (b,)           {}
    drop      namespace                -                       {}
    stats     -                        -                       store.stats() + requests, uptime
                                                               (an admin's; a tenant's: its own
                                                               namespaces, tenant, config)
    snapshot  namespace, tag           -                       {path, bytes, memories}
    restore   namespace, tag,          -                       {restored, [memories]}
              [if_missing]
    snapshots -                        -                       {snapshots: [{namespace, tag,
                                                               path, bytes, mtime}, ...]}
    shutdown  -                        -                       {}, then the server stops (admin)

Arrays travel without copies: senders hand the arrays themselves to ZeroMQ (``copy=False``) and
receivers view the received frames with ``np.frombuffer``. dtypes are limited to ``DTYPES``.

Nothing but msgpack maps, lists, strings, integers, floats, booleans and nil is ever decoded (no
pickle, no msgpack extension types), with explicit size limits, and a request must match the
schema of its op in ``OPS`` exactly (no missing, extra or mistyped field, no missing or extra
array) before anyone acts on it: the server is safe to expose to any bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

from .errors import LimitExceeded, ProtocolError

__all__ = [
    "DTYPES", "MAX_MESSAGE_BYTES", "OPS", "PROTOCOL_VERSION", "MessageTooLarge", "ProtocolError",
    "Reply", "Request", "decode_reply", "decode_request", "encode_error", "encode_reply",
    "encode_request",
]

PROTOCOL_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
_SESSION_FIELDS = ("session", "seq")
"""Optional request header fields from version 2 on."""
_TOKEN_FIELD = "token"
"""Optional request header field from version 3 on."""
TOKEN_CHARS = (1, 1024)
"""Length range of a token on the wire (the server's files allow fewer, see tenants.py)."""
SESSION_BYTES = (8, 64)
"""Length range of a session id."""

HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
"""ZeroMQ heartbeats (ZMTP PING and PONG, libzmq >= 4.2) on both ends of every connection: a
peer that sends nothing for HEARTBEAT_TIMEOUT_MS after a PING has its connection closed, so a
dead host or a frozen process is noticed within 2 s whatever the requests' time-outs. libzmq's
own I/O thread answers them, so a server busy with a long request still does."""

MAX_MESSAGE_BYTES = 256 << 20
"""Default cap on a request's total size (all frames). A batch-8 search of 4096 queries of width
64 is 8 MiB; adds are smaller. The server's ``--max-message-bytes`` overrides it."""

MAX_HEADER_BYTES = 16 << 10
"""Cap on the header frame of a request. Real headers are a few hundred bytes (at most: a
namespace name of 256 characters, a token of 1024, a clear's 1024 layers in 3 KB), and the I/O
thread decodes every header it receives, at a few hundred ns per msgpack object: a 1 MiB header
of empty lists cost it 0.5 s; a 16 KiB one costs at most a few ms."""
MAX_HEADER_ITEMS = 4096
"""Cap on the items of any list in a request header (a clear's layers are at most 1024)."""

_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
"""First bytes of a msgpack map (fixmap, map 16, map 32): a header starting otherwise is refused
before it is decoded."""

MAX_NDIM = 8
MAX_ARRAYS = 16
MAX_FRAMES = 1 + MAX_ARRAYS
"""Frames of a request: its header and its arrays. The server keeps none of a longer message."""

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "int32", "int64", "bool")
}
"""Array dtypes the wire carries, by name; always little-endian."""

Frame = bytes | bytearray | memoryview
"""A received frame: any object exporting the buffer protocol (``zmq.Frame`` does)."""


# Per-op request schema: the args it takes (name -> (required, check)) and the arrays it carries.

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_map(value) -> bool:
    return isinstance(value, dict)


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


@dataclass(frozen=True, slots=True)
class OpSchema:
    args: Mapping[str, tuple[bool, Callable[[object], bool], str]] = field(default_factory=dict)
    """Argument name -> (required, type check, the expected type in words)."""
    arrays: tuple[str, ...] = ()
    """Names of the arrays the op carries, all required."""


_NAMESPACE = {"namespace": (True, _is_str, "a string")}
_LAYER = {"layer": (True, _is_int, "an integer")}

OPS: dict[str, OpSchema] = {
    "ping": OpSchema(),
    "open": OpSchema(args={**_NAMESPACE, "config": (True, _is_map, "a map")}),
    "add": OpSchema(args={**_NAMESPACE, **_LAYER}, arrays=("rows", "keys", "values")),
    "search": OpSchema(args={**_NAMESPACE, **_LAYER, "k": (True, _is_int, "an integer")},
                       arrays=("rows", "queries")),
    "clear": OpSchema(args={**_NAMESPACE, "layers": (False, _is_int_list, "a list of integers")},
                      arrays=("rows",)),
    "drop": OpSchema(args=_NAMESPACE),
    "stats": OpSchema(),
    "snapshot": OpSchema(args={**_NAMESPACE, "tag": (True, _is_str, "a string")}),
    "restore": OpSchema(args={**_NAMESPACE, "tag": (True, _is_str, "a string"),
                              "if_missing": (False, lambda v: isinstance(v, bool), "a boolean")}),
    "snapshots": OpSchema(),
    "shutdown": OpSchema(),
}


class MessageTooLarge(ProtocolError, LimitExceeded):
    """A request was over the server's message size limit (reported with code limit_exceeded)."""

    code = LimitExceeded.code


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict
    arrays: dict[str, np.ndarray]
    version: int = PROTOCOL_VERSION
    """The version it was sent in, which its reply must use."""
    session: bytes | None = None
    seq: int | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Reply:
    id: int | None
    ok: bool
    result: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    code: str = ""
    message: str = ""
    instance: str | None = None
    """The answering server process (None from a version 1 server)."""


# encoding

def encode_request(request_id: int, op: str, args: dict | None = None,
                   arrays: Mapping[str, np.ndarray] | None = None, *,
                   session: bytes | None = None, seq: int | None = None,
                   token: str | None = None) -> list:
    """Frames of a request; the arrays are passed through uncopied when already contiguous."""
    header = {"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args or {}}
    if session is not None:
        header.update(session=session, seq=seq)
    if token is not None:
        header[_TOKEN_FIELD] = token
    return _encode(header, arrays or {})


def encode_reply(request_id: int, result: dict | None = None,
                 arrays: Mapping[str, np.ndarray] | None = None, *,
                 version: int = PROTOCOL_VERSION, instance: str | None = None) -> list:
    header = {"v": version, "id": request_id, "ok": True, "result": result or {}}
    return _encode(_with_instance(header, instance), arrays or {})


def encode_error(request_id: int | None, code: str, message: str, *,
                 version: int = PROTOCOL_VERSION, instance: str | None = None) -> list:
    header = {"v": version, "id": request_id, "ok": False, "code": code, "message": message}
    return [msgpack.packb(_with_instance(header, instance), use_bin_type=True)]


def _with_instance(header: dict, instance: str | None) -> dict:
    if header["v"] >= 2:
        header["instance"] = instance
    return header


def _encode(header: dict, arrays: Mapping[str, np.ndarray]) -> list:
    specs, frames = [], []
    for name, array in arrays.items():
        array = np.asarray(array)
        dtype = DTYPES.get(array.dtype.name)
        if dtype is None:
            raise ProtocolError(f"array {name!r} has dtype {array.dtype}, which the wire does not "
                                f"carry; use one of {sorted(DTYPES)}")
        if array.dtype != dtype or not array.flags.c_contiguous:
            array = np.asarray(array, dtype=dtype, order="C")
        specs.append([name, array.dtype.name, list(array.shape)])
        frames.append(array)
    header["arrays"] = specs
    return [msgpack.packb(header, use_bin_type=True), *frames]


# decoding

def _unpack(frame: Frame, *, max_str_len: int, max_array_len: int, max_map_len: int):
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=max_str_len, max_bin_len=max_str_len,
                               max_array_len=max_array_len, max_map_len=max_map_len,
                               max_ext_len=0)
    except Exception as exc:  # msgpack raises ValueError subclasses, UnicodeDecodeError, ...
        raise ProtocolError(f"header frame is not valid msgpack within the limits: "
                            f"{type(exc).__name__}: {exc}") from None


def decode_request(frames: Sequence[Frame], *, max_message_bytes: int = MAX_MESSAGE_BYTES,
                   size: int | None = None, count: int | None = None) -> Request:
    """Parse and check a request; raises ``ProtocolError`` (``MessageTooLarge`` for size).

    ``size`` and ``count`` are the message's bytes and frames when ``frames`` holds only its
    start (a message refused while it arrived keeps its header, or nothing when that alone was
    too large). The error carries the request's id whenever the header could be read that far.
    """
    if size is None:
        size = sum(memoryview(f).nbytes for f in frames)
    if count is None:
        count = len(frames)
    if not frames:
        if size > max_message_bytes:
            raise _too_large(size, max_message_bytes)
        if count > MAX_FRAMES:
            raise _too_many_frames(count)
        raise ProtocolError("empty message: expected a msgpack header frame")
    head = frames[0]
    if memoryview(head).nbytes > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"header frame is {memoryview(head).nbytes} bytes, over the limit "
                              f"of {MAX_HEADER_BYTES}")
    first = memoryview(head)[:1].tobytes()
    if not first or first[0] not in _MAP_MARKERS:
        raise ProtocolError(f"request header must be a msgpack map, got a frame starting with "
                            f"{first!r}")
    header = _unpack(head, max_str_len=MAX_HEADER_BYTES, max_array_len=MAX_HEADER_ITEMS,
                     max_map_len=256)
    request_id = _read_id(header)
    version = _read_version(header)
    if size > max_message_bytes:
        raise _too_large(size, max_message_bytes, request_id, version)
    if count > MAX_FRAMES:
        raise _too_many_frames(count, request_id, version)
    try:
        _check_keys(header, ("v", "id", "op", "args", "arrays"), "request header",
                    optional=(_SESSION_FIELDS if version >= 2 else ())
                    + ((_TOKEN_FIELD,) if version >= 3 else ()))
        _check_version(header["v"])
        session, seq = _check_session(header)
        token = header.get(_TOKEN_FIELD)
        if token is not None and not (_is_str(token)
                                      and TOKEN_CHARS[0] <= len(token) <= TOKEN_CHARS[1]):
            raise ProtocolError(f"token must be a string of {TOKEN_CHARS[0]} to "
                                f"{TOKEN_CHARS[1]} characters")
        if request_id is None:
            raise ProtocolError(f"request id must be an integer in [0, 2**64), "
                                f"got {header['id']!r}")
        op = header["op"]
        if not isinstance(op, str) or op not in OPS:
            raise ProtocolError(f"unknown op {op!r}; known ops: {sorted(OPS)}")
        schema = OPS[op]
        args = header["args"]
        _check_args(op, args, schema)
        arrays = _decode_arrays(header["arrays"], frames[1:])
        if sorted(arrays) != sorted(schema.arrays):
            raise ProtocolError(f"op {op!r} takes arrays {sorted(schema.arrays)}, "
                                f"got {sorted(arrays)}")
    except ProtocolError as exc:
        exc.request_id, exc.version = request_id, version
        raise
    return Request(request_id, op, args, arrays, header["v"], session, seq, token)


def _too_many_frames(count: int, request_id: int | None = None,
                     version: int | None = None) -> ProtocolError:
    return ProtocolError(f"message of {count} frames: a request is a header and at most "
                         f"{MAX_FRAMES - 1} array frames", request_id, version)


def _too_large(size: int, max_message_bytes: int, request_id: int | None = None,
               version: int | None = None) -> MessageTooLarge:
    return MessageTooLarge(f"message is {size} bytes, over the server's limit "
                           f"max_message_bytes={max_message_bytes} (--max-message-bytes); send "
                           f"smaller batches", request_id, version)


def decode_reply(frames: Sequence[Frame]) -> Reply:
    """Parse and check a reply; raises ``ProtocolError`` if the server broke the format."""
    if not frames:
        raise ProtocolError("empty reply: expected a msgpack header frame")
    header = _unpack(frames[0], max_str_len=1 << 24, max_array_len=1 << 24, max_map_len=1 << 20)
    if not isinstance(header, dict) or "ok" not in header:
        raise ProtocolError(f"reply header must be a map with an 'ok' field, got {header!r:.200}")
    _check_version(header.get("v"))
    extra = ("instance",) if header["v"] >= 2 else ()
    if header["ok"] is True:
        _check_keys(header, ("v", "id", "ok", "result", "arrays", *extra), "reply header")
    else:
        _check_keys(header, ("v", "id", "ok", "code", "message", *extra), "error reply header")
    instance = header.get("instance")
    if not (instance is None or _is_str(instance)):
        raise ProtocolError(f"reply instance must be a string or nil, got {instance!r:.100}")
    request_id = header["id"]
    if not (request_id is None or (_is_int(request_id) and request_id >= 0)):
        raise ProtocolError(f"reply id must be a non-negative integer or nil, got {request_id!r}")
    if header["ok"] is not True:
        if header["ok"] is not False or not (_is_str(header["code"])
                                             and _is_str(header["message"])):
            raise ProtocolError("error reply must have ok=false and string code and message")
        if len(frames) != 1:
            raise ProtocolError(f"error reply must be one frame, got {len(frames)}")
        return Reply(request_id, False, code=header["code"], message=header["message"],
                     instance=instance)
    if not _is_map(header["result"]):
        raise ProtocolError(f"reply result must be a map, got {type(header['result']).__name__}")
    if request_id is None:
        raise ProtocolError("ok reply must carry its request's id")
    return Reply(request_id, True, header["result"], _decode_arrays(header["arrays"], frames[1:]),
                 instance=instance)


def _read_id(header) -> int | None:
    """The request id if the header has a valid one, so even a rejected request gets its reply."""
    if isinstance(header, dict):
        request_id = header.get("id")
        if _is_int(request_id) and 0 <= request_id < 1 << 64:
            return request_id
    return None


def _read_version(header) -> int:
    """The version to answer in: the request's, when this side speaks it."""
    version = header.get("v") if isinstance(header, dict) else None
    return version if _is_int(version) and version in SUPPORTED_VERSIONS else PROTOCOL_VERSION


def _check_keys(header, expected: tuple[str, ...], what: str,
                optional: tuple[str, ...] = ()) -> None:
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(header).__name__}")
    missing = [k for k in expected if k not in header]
    extra = sorted(str(k) for k in header if k not in expected and k not in optional)
    if missing or extra:
        also = f" (and optionally {list(optional)})" if optional else ""
        raise ProtocolError(f"{what} must have exactly the fields {list(expected)}{also}; "
                            f"missing {missing}, unexpected {extra}")


def _check_version(version) -> None:
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"protocol version {version!r} is not supported; this side speaks "
                            f"versions {list(SUPPORTED_VERSIONS)}: upgrade the older of client "
                            f"and server")


def _check_session(header: dict) -> tuple[bytes | None, int | None]:
    if not any(name in header for name in _SESSION_FIELDS):
        return None, None
    session, seq = header.get("session"), header.get("seq")
    lo, hi = SESSION_BYTES
    if not (isinstance(session, bytes) and lo <= len(session) <= hi):
        raise ProtocolError(f"session must be {lo} to {hi} bytes (with a seq), got "
                            f"{session!r:.100}")
    if not (_is_int(seq) and 1 <= seq < 1 << 64):
        raise ProtocolError(f"seq must be an integer in [1, 2**64) (with a session), got "
                            f"{seq!r:.100}")
    return session, seq


def _check_args(op: str, args, schema: OpSchema) -> None:
    if not isinstance(args, dict):
        raise ProtocolError(f"args of op {op!r} must be a map, got {type(args).__name__}")
    extra = sorted(k for k in args if k not in schema.args)
    if extra:
        raise ProtocolError(f"op {op!r} got unexpected args {extra}; it takes "
                            f"{sorted(schema.args)}")
    for name, (required, check, expected) in schema.args.items():
        if name not in args:
            if required:
                raise ProtocolError(f"op {op!r} requires arg {name!r} ({expected})")
        elif not check(args[name]):
            raise ProtocolError(f"arg {name!r} of op {op!r} must be {expected}, "
                                f"got {args[name]!r:.200}")


def _decode_arrays(specs, frames: Sequence[Frame]) -> dict[str, np.ndarray]:
    if not isinstance(specs, list) or len(specs) > MAX_ARRAYS:
        raise ProtocolError(f"'arrays' must be a list of at most {MAX_ARRAYS} "
                            f"[name, dtype, shape] entries, got {specs!r:.200}")
    if len(frames) != len(specs):
        raise ProtocolError(f"header declares {len(specs)} arrays but {len(frames)} array frames "
                            f"followed it")
    arrays = {}
    for spec, frame in zip(specs, frames):
        name, dtype, shape = _check_spec(spec)
        if name in arrays:
            raise ProtocolError(f"array {name!r} is declared twice")
        nbytes = dtype.itemsize * math.prod(shape)
        size = memoryview(frame).nbytes
        if size != nbytes:
            raise ProtocolError(f"array {name!r} declared {dtype.name} {tuple(shape)} = {nbytes} "
                                f"bytes, but its frame has {size} bytes")
        array = np.frombuffer(frame, dtype=dtype).reshape(tuple(shape))
        if not array.flags.aligned:  # tiny frames can be stored unaligned inside a zmq message
            array = array.copy()
        if dtype.kind == "b" and array.view(np.uint8).max(initial=0) > 1:
            raise ProtocolError(f"bool array {name!r} has bytes other than 0 and 1")
        arrays[name] = array
    return arrays


def _check_spec(spec) -> tuple[str, np.dtype, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3 and _is_str(spec[0])
            and isinstance(spec[2], list)):
        raise ProtocolError(f"each array spec must be [name, dtype, shape], got {spec!r:.200}")
    name, dtype_name, shape = spec
    dtype = DTYPES.get(dtype_name) if _is_str(dtype_name) else None
    if dtype is None:
        raise ProtocolError(f"array {name!r} has unsupported dtype {dtype_name!r}; "
                            f"supported: {sorted(DTYPES)}")
    if len(shape) > MAX_NDIM or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
        raise ProtocolError(f"array {name!r} shape must be at most {MAX_NDIM} integers in "
                            f"[0, 2**40), got {shape!r:.200}")
    return name, dtype, shape
