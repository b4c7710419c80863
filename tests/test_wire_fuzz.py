"""Control-line framing under hypothesis (issue 7): encode/decode round-trips any JSON-like
message, and decoding anything else raises ``ProtocolError`` and nothing but."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld import wire
from tunneld.errors import ProtocolError, TunneldError

# any text, lone surrogates included (a path decoded with surrogateescape can hold them)
texts = st.text(st.characters(), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(texts, children, max_size=5),
    max_leaves=12)
messages = st.dictionaries(texts, json_values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_encode_decode_round_trip(msg):
    line = wire.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1   # one message, one line
    line.decode("utf-8")                                      # always valid UTF-8
    assert wire.decode(line) == msg


def _decode_only_protocol_errors(line: bytes):
    try:
        return wire.decode(line)
    except ProtocolError:
        return None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_random_bytes_raises_only_protocol_error(data):
    _decode_only_protocol_errors(data)
    _decode_only_protocol_errors(data + b"\n")


@settings(max_examples=400, deadline=None)
@given(json_values, st.booleans())
def test_any_json_value_as_a_request_raises_only_protocol_error(value, ascii_only):
    """Random JSON (objects or not, with lone-surrogate escapes when ``ascii_only``) through
    decode and the envelope check: a request or a ProtocolError."""
    line = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n"
    msg = _decode_only_protocol_errors(line)
    if msg is None:
        return
    try:
        cmd, args = wire.parse_request(msg)
    except ProtocolError:
        return
    assert cmd in wire.COMMANDS and isinstance(args, dict)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(wire.COMMANDS)), st.dictionaries(st.sampled_from(
    ["host", "specs", "name", "url", "command", "port"]), json_values, max_size=4),
       st.sampled_from([1, 0, 2, "1", None, 1.5]))
def test_envelopes_with_random_arguments(cmd, args, proto):
    line = json.dumps({"cmd": cmd, "proto": proto, "args": args},
                      ensure_ascii=True).encode() + b"\n"
    try:
        assert wire.parse_request(wire.decode(line)) == (cmd, args)
    except ProtocolError:
        pass


@pytest.mark.parametrize("unit", [b"[", b'{"a":', b'{"cmd":"add","args":{"x":['])
def test_deep_nesting_is_a_protocol_error(unit):
    """Found by fuzzing the live daemon: json.loads raises RecursionError (not ValueError) on a
    deeply nested line, which the daemon logged as an internal error with a traceback."""
    line = unit * (wire.MAX_LINE // len(unit) - 1) + b"\n"
    with pytest.raises(ProtocolError, match="nested too deeply"):
        wire.decode(line)


def test_lone_surrogates_in_a_request_are_refused():
    """A ``\\ud800`` escape decodes to a lone surrogate; one kept in a session's command made
    every later `sessions` reply fail to encode.  Requests holding one are refused."""
    line = b'{"cmd":"run","proto":1,"args":{"host":"h","command":["echo","\\ud800"]}}\n'
    with pytest.raises(ProtocolError, match="lone surrogate"):
        wire.parse_request(wire.decode(line))
    # a valid pair is fine
    ok = b'{"cmd":"run","proto":1,"args":{"host":"h","command":["echo","\\ud83d\\ude00"]}}\n'
    assert wire.parse_request(wire.decode(ok))[1]["command"] == ["echo", "\U0001f600"]


def test_replies_with_lone_surrogates_still_encode():
    line = wire.encode(wire.ok("0", {"log": "/home/u/caf\udce9.log"}))
    assert wire.decode(line)["result"]["log"] == "/home/u/caf\udce9.log"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, wire.MAX_LINE), st.sampled_from(["x", "é", "\x01", "\udcff"]))
def test_an_error_reply_always_fits_on_the_wire(n, ch):
    """Error messages echo hostile input; the reply is cut to fit (found by fuzzing: a request
    just under MAX_LINE got a reply over it, and the daemon logged a traceback)."""
    reply = wire.error("0.1.0", TunneldError(f"unknown command {ch * n!r}"))
    assert len(reply["error"]["message"]) <= wire.MAX_ERROR_MESSAGE
    assert len(wire.encode(reply)) <= wire.MAX_LINE
