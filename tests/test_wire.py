"""Control protocol framing, envelopes and limits."""

import pytest

from tunneld import wire
from tunneld.errors import BindError, ProtocolError


def test_round_trip():
    msg = wire.request("add", host="barhal", specs=["8090"])
    line = wire.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode(line) == msg
    assert wire.parse_request(wire.decode(line)) == ("add", {"host": "barhal", "specs": ["8090"]})


def test_non_ascii_survives():
    msg = {"message": "héllo ✓"}
    assert wire.decode(wire.encode(msg)) == msg


@pytest.mark.parametrize("line,fragment", [
    (b'{"cmd": "list"}', "incomplete line"),
    (b"not json\n", "malformed JSON"),
    (b"\xff\xfe\n", "malformed JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'"x"\n', "JSON object"),
    (b"x" * (wire.MAX_LINE + 1), "exceeds"),
])
def test_decode_rejects(line, fragment):
    with pytest.raises(ProtocolError) as ei:
        wire.decode(line)
    assert fragment in str(ei.value)


@pytest.mark.parametrize("msg,fragment", [
    ({}, "no 'cmd'"),
    ({"cmd": 3}, "no 'cmd'"),
    ({"cmd": "explode"}, "unknown command"),
    ({"cmd": "list", "proto": 99}, "protocol version"),
    ({"cmd": "list", "args": [1]}, "must be a JSON object"),
])
def test_parse_request_rejects(msg, fragment):
    with pytest.raises(ProtocolError) as ei:
        wire.parse_request(msg)
    assert fragment in str(ei.value)


def test_encode_refuses_oversized():
    with pytest.raises(ProtocolError):
        wire.encode({"message": "x" * wire.MAX_LINE})


def test_replies_carry_version_and_error_type():
    ok = wire.ok("9.9", {"a": 1})
    assert ok == {"ok": True, "version": "9.9", "result": {"a": 1}}
    assert wire.is_final(ok)
    err = wire.error("9.9", BindError("port 8090 in use"))
    assert err["error"] == {"type": "BindError", "message": "port 8090 in use"}
    assert wire.error("9.9", KeyError("x"))["error"]["type"] == "TunneldError"
    assert not wire.is_final(wire.progress("connecting"))
