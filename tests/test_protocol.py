"""The wire format at the pure-function level: round trips, zero-copy decoding, and every way a
request can be malformed being refused with a ProtocolError that keeps the id when it is known."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_server.errors import LimitExceeded, ProtocolError
from memory_server.protocol import (DTYPES, MAX_FRAMES, MAX_HEADER_BYTES, PROTOCOL_VERSION,
                                    MessageTooLarge, decode_reply, decode_request, encode_error,
                                    encode_reply, encode_request)

pytestmark = pytest.mark.timeout(60)


def _bytes(frames):
    return [bytes(memoryview(f)) for f in frames]


def _add_frames():
    rows = np.array([0, 3], np.int64)
    keys = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    return encode_request(7, "add", {"namespace": "ns", "layer": 1},
                          {"rows": rows, "keys": keys, "values": -keys})


def _header(**changes):
    header = {"v": PROTOCOL_VERSION, "id": 7, "op": "search",
              "args": {"namespace": "ns", "layer": 0, "k": 2},
              "arrays": [["rows", "int64", [1]], ["queries", "float32", [1, 1, 2]]]}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not ...}


ROW = np.zeros(1, np.int64).tobytes()


def _frames(header, *arrays):
    return [msgpack.packb(header), *(arrays or (ROW, np.zeros(2, np.float32).tobytes()))]


def _with_rows_spec(spec):
    return _frames(_header(arrays=[spec, ["queries", "float32", [1, 1, 2]]]))


# round trips

def test_reply_round_trip_every_dtype():
    arrays = {name: (np.arange(6).reshape(2, 3) % 2).astype(dtype)
              for name, dtype in DTYPES.items()}
    arrays["empty"] = np.zeros((0, 5), np.float32)
    arrays["scalar"] = np.array(3.5, np.float32)
    reply = decode_reply(_bytes(encode_reply(11, {"x": [1, "a"]}, arrays)))
    assert reply.id == 11 and reply.ok and reply.result == {"x": [1, "a"]}
    assert list(reply.arrays) == list(arrays)
    for name, array in arrays.items():
        assert reply.arrays[name].dtype == array.dtype
        assert np.array_equal(reply.arrays[name], array)


def test_add_request_round_trip():
    request = decode_request(_bytes(_add_frames()))
    assert (request.id, request.op, request.args) == (7, "add", {"namespace": "ns", "layer": 1})
    assert request.arrays["rows"].tolist() == [0, 3]
    assert request.arrays["keys"].shape == (2, 3, 4)
    assert np.array_equal(request.arrays["values"], -request.arrays["keys"])


def test_arrays_are_sent_and_received_without_copies():
    keys = np.ones((2, 3, 4), np.float32)
    frames = encode_request(1, "add", {"namespace": "ns", "layer": 0},
                            {"rows": np.arange(2), "keys": keys, "values": keys})
    assert frames[2] is keys  # handed to ZeroMQ as is
    received = [bytearray(memoryview(f)) for f in frames]
    decoded = decode_request(received).arrays["keys"]
    received[2][:4] = np.float32(9).tobytes()
    assert decoded[0, 0, 0] == 9  # a view of the frame, not a copy


def test_encode_makes_arrays_contiguous_and_little_endian():
    array = np.arange(12, dtype=">i8").reshape(3, 4).T
    frames = encode_request(1, "clear", {"namespace": "ns"}, {"rows": array})
    decoded = decode_request(_bytes(frames)).arrays["rows"]
    assert decoded.dtype == np.dtype("<i8") and np.array_equal(decoded, array)


def test_encode_refuses_unsupported_dtypes():
    with pytest.raises(ProtocolError, match="float64"):
        encode_request(1, "clear", {"namespace": "ns"}, {"rows": np.zeros(2)})


def test_session_and_seq_round_trip_and_version_1_is_read():
    request = decode_request(_bytes(encode_request(3, "ping", session=b"s" * 16, seq=5)))
    assert (request.version, request.session, request.seq) == (PROTOCOL_VERSION, b"s" * 16, 5)
    old = decode_request([msgpack.packb({"v": 1, "id": 3, "op": "ping", "args": {},
                                         "arrays": []})])
    assert (old.version, old.session, old.seq) == (1, None, None)
    assert decode_reply(encode_reply(3, version=1)).instance is None
    assert decode_reply(encode_error(3, "internal", "m", instance="ab12")).instance == "ab12"


def test_error_reply_round_trip():
    reply = decode_reply(encode_error(None, "protocol_error", "bad"))
    assert (reply.id, reply.ok, reply.code, reply.message) == (None, False, "protocol_error", "bad")


# malformed requests

MALFORMED = {
    "not msgpack": ([b"\xc1\x00garbage"], None),
    "trailing bytes": ([msgpack.packb(_header()) + b"x"], None),
    "not a map": ([msgpack.packb([1, 2])], None),
    "int map keys": ([msgpack.packb({1: 2})], None),
    "extension type": ([msgpack.packb(_header(args=msgpack.ExtType(5, b"x")))], None),
    "empty message": ([], None),
    "missing version": (_frames(_header(v=...)), 7),
    "wrong version": (_frames(_header(v=PROTOCOL_VERSION + 1)), 7),
    "bool version": (_frames(_header(v=True)), 7),
    "missing id": (_frames(_header(id=...)), None),
    "negative id": (_frames(_header(id=-1)), None),
    "string id": (_frames(_header(id="7")), None),
    "unknown op": (_frames(_header(op="frobnicate")), 7),
    "non-string op": (_frames(_header(op=3)), 7),
    "extra header field": (_frames(_header(extra=1)), 7),
    "args not a map": (_frames(_header(args=[1])), 7),
    "missing arg": (_frames(_header(args={"namespace": "ns", "layer": 0})), 7),
    "extra arg": (_frames(_header(args={"namespace": "ns", "layer": 0, "k": 2, "x": 1})), 7),
    "string layer": (_frames(_header(args={"namespace": "ns", "layer": "0", "k": 2})), 7),
    "bool layer": (_frames(_header(args={"namespace": "ns", "layer": True, "k": 2})), 7),
    "float k": (_frames(_header(args={"namespace": "ns", "layer": 0, "k": 2.0})), 7),
    "bytes namespace": (_frames(_header(args={"namespace": b"ns", "layer": 0, "k": 2})), 7),
    "arrays not a list": (_frames(_header(arrays={"rows": 1})), 7),
    "spec too short": (_with_rows_spec(["rows", "int64"]), 7),
    "spec name not a string": (_with_rows_spec([1, "int64", [1]]), 7),
    "unsupported dtype": (_with_rows_spec(["rows", "float64", [1]]), 7),
    "object dtype": (_with_rows_spec(["rows", "object", [1]]), 7),
    "negative dim": (_with_rows_spec(["rows", "int64", [-1]]), 7),
    "huge dim": (_with_rows_spec(["rows", "int64", [1 << 62]]), 7),
    "too many dims": (_with_rows_spec(["rows", "int64", [1] * 9]), 7),
    "float dim": (_with_rows_spec(["rows", "int64", [1.0]]), 7),
    "product overflows int64": (_with_rows_spec(["rows", "int64", [1 << 39] * 4]), 7),
    "frame too short": (_frames(_header(), ROW, b"\0" * 7), 7),
    "frame too long": (_frames(_header(), ROW, b"\0" * 9), 7),
    "missing frame": (_frames(_header(), ROW), 7),
    "extra frame": (_frames(_header(), ROW, b"\0" * 8, b"\0" * 8), 7),
    "missing array": (_frames(_header(arrays=[["rows", "int64", [1]]]), ROW), 7),
    "wrong array name": (_frames(_header(arrays=[["rows", "int64", [1]],
                                                 ["keys", "float32", [1, 1, 2]]])), 7),
    "duplicate array": (_frames(_header(arrays=[["rows", "int64", [1]]] * 2), ROW, ROW), 7),
    "bool array with byte 2": (_frames(_header(op="clear", args={"namespace": "ns"},
                                               arrays=[["rows", "bool", [2]]]), b"\1\2"), 7),
    "session without seq": (_frames(_header(session=b"s" * 16)), 7),
    "seq without session": (_frames(_header(seq=1)), 7),
    "session too short": (_frames(_header(session=b"s" * 7, seq=1)), 7),
    "string session": (_frames(_header(session="s" * 16, seq=1)), 7),
    "zero seq": (_frames(_header(session=b"s" * 16, seq=0)), 7),
    "session in version 1": (_frames(_header(v=1, session=b"s" * 16, seq=1)), 7),
    "deep nesting": ([b"\x91" * 100_000 + b"\xc0"], None),
    "header over the header limit": ([b"\0" * (MAX_HEADER_BYTES + 1)], None),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_refused(case):
    frames, request_id = MALFORMED[case]
    with pytest.raises(ProtocolError) as info:
        decode_request(frames)
    assert info.value.request_id == request_id
    assert info.value.code in ("protocol_error", "limit_exceeded")
    assert info.value.message  # says what was wrong


def test_message_over_the_limit_is_refused_with_its_id():
    frames = _bytes(_add_frames())
    size = sum(len(f) for f in frames)
    assert decode_request(frames, max_message_bytes=size).id == 7
    with pytest.raises(MessageTooLarge, match=f"max_message_bytes={size - 1}") as info:
        decode_request(frames, max_message_bytes=size - 1)
    assert isinstance(info.value, LimitExceeded) and info.value.code == "limit_exceeded"
    assert info.value.request_id == 7


def test_message_of_too_many_frames_is_refused_with_its_id():
    """A message refused as it arrived keeps only its header; its frame count says the rest."""
    frames = _bytes(_add_frames())
    with pytest.raises(ProtocolError, match="message of 18 frames") as info:
        decode_request(frames[:1], size=sum(len(f) for f in frames), count=MAX_FRAMES + 1)
    assert (info.value.code, info.value.request_id) == ("protocol_error", 7)
    with pytest.raises(ProtocolError, match="message of 18 frames") as info:
        decode_request([], size=0, count=MAX_FRAMES + 1)  # no header kept: no id
    assert info.value.request_id is None


def test_clear_layers_is_optional_but_typed():
    rows = {"rows": np.arange(2)}
    assert decode_request(_bytes(encode_request(1, "clear", {"namespace": "ns"}, rows))).args \
        == {"namespace": "ns"}
    assert decode_request(_bytes(encode_request(
        1, "clear", {"namespace": "ns", "layers": [0, 2]}, rows))).args["layers"] == [0, 2]
    with pytest.raises(ProtocolError, match="layers"):
        decode_request(_bytes(encode_request(1, "clear", {"namespace": "ns", "layers": ["0"]},
                                             rows)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_bytes_never_raise_anything_but_protocol_error(frames):
    try:
        decode_request(frames)
    except ProtocolError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["v", "id", "op", "args", "arrays", "namespace", "k"]),
                      children, max_size=6),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_values, st.lists(st.binary(max_size=16), max_size=3))
def test_random_headers_never_raise_anything_but_protocol_error(header, arrays):
    try:
        decode_request([msgpack.packb(header), *arrays])
    except ProtocolError:
        pass


@pytest.mark.parametrize("header", [
    [1],
    {"v": PROTOCOL_VERSION, "id": 1, "ok": True, "result": []},
    {"v": PROTOCOL_VERSION, "id": 1, "ok": True, "result": {}, "arrays": [], "x": 1},
    {"v": PROTOCOL_VERSION + 1, "id": 1, "ok": False, "code": "internal", "message": "m"},
    {"v": PROTOCOL_VERSION, "id": "1", "ok": False, "code": "internal", "message": "m"},
    {"v": PROTOCOL_VERSION, "id": None, "ok": True, "result": {}, "arrays": []},
    {"v": PROTOCOL_VERSION, "id": 1, "ok": 1, "code": "internal", "message": "m"},
])
def test_malformed_replies_are_refused(header):
    with pytest.raises(ProtocolError):
        decode_reply([msgpack.packb(header)])
