"""SOCKS5 / SOCKS4a handshake parser: tables of client bytes and what they mean."""

import ipaddress
import struct

import pytest

from tunneld import socks
from tunneld.socks import Failed, Handshake, Request, Send

GREET = b"\x05\x01\x00"
OK_METHOD = Send(b"\x05\x00")


def s5_request(atyp: int, addr: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack(">H", port)


def s5_domain(name: bytes, port: int, cmd: int = 1) -> bytes:
    return s5_request(3, bytes((len(name),)) + name, port, cmd)


def s4(ip: str, port: int, user: bytes = b"", domain: bytes | None = None, cmd: int = 1) -> bytes:
    msg = bytes((4, cmd)) + struct.pack(">H", port) + ipaddress.IPv4Address(ip).packed
    msg += user + b"\0"
    if domain is not None:
        msg += domain + b"\0"
    return msg


def feed_all(data: bytes, chunk: int | None = None) -> tuple[Handshake, list]:
    hs = Handshake()
    events = []
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        events += hs.feed(data[i:i + step])
        if hs.done:
            break
    return hs, events


@pytest.mark.parametrize("data,events", [
    pytest.param(GREET + s5_request(1, bytes([10, 0, 0, 7]), 8080),
                 [OK_METHOD, Request(5, "10.0.0.7", 8080)], id="socks5-ipv4"),
    pytest.param(GREET + s5_request(4, ipaddress.IPv6Address("::1").packed, 443),
                 [OK_METHOD, Request(5, "::1", 443)], id="socks5-ipv6"),
    pytest.param(GREET + s5_domain(b"node42", 8888),
                 [OK_METHOD, Request(5, "node42", 8888)], id="socks5-domain"),
    pytest.param(b"\x05\x03\x02\x01\x00" + s5_domain(b"localhost", 1),
                 [OK_METHOD, Request(5, "localhost", 1)], id="socks5-several-methods"),
    pytest.param(s4("10.1.2.3", 80), [Request(4, "10.1.2.3", 80)], id="socks4"),
    pytest.param(s4("10.1.2.3", 80, user=b"alice"), [Request(4, "10.1.2.3", 80)],
                 id="socks4-userid"),
    pytest.param(s4("0.0.0.1", 8888, domain=b"node42.cluster"),
                 [Request(4, "node42.cluster", 8888)], id="socks4a"),
    pytest.param(s4("0.0.0.255", 8888, user=b"bob", domain=b"x"),
                 [Request(4, "x", 8888)], id="socks4a-userid"),
])
@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["whole", "bytewise", "by3"])
def test_requests(data, events, chunk):
    hs, got = feed_all(data, chunk)
    assert got == events
    assert hs.done and hs.request == events[-1]
    assert hs.rest == b""


@pytest.mark.parametrize("data,fragment,reply", [
    pytest.param(b"\x05\x01\x02", "no method without authentication", b"\x05\xff",
                 id="socks5-auth-only"),
    pytest.param(b"\x05\x00", "no method without authentication", b"\x05\xff",
                 id="socks5-no-methods"),
    pytest.param(GREET + s5_domain(b"x", 1, cmd=2), "BIND is not supported",
                 socks.reply(5, socks.COMMAND_NOT_SUPPORTED), id="socks5-bind"),
    pytest.param(GREET + s5_domain(b"x", 1, cmd=3), "UDP ASSOCIATE is not supported",
                 socks.reply(5, socks.COMMAND_NOT_SUPPORTED), id="socks5-udp"),
    pytest.param(GREET + b"\x05\x01\x00\x09\x00", "address type 0x09",
                 socks.reply(5, socks.ADDRESS_TYPE_NOT_SUPPORTED), id="socks5-atyp"),
    pytest.param(GREET + b"\x04\x01\x00\x01", "version byte 0x04",
                 socks.reply(5, socks.GENERAL_FAILURE), id="socks5-then-v4"),
    pytest.param(GREET + b"\x05\x01\x01\x01" + bytes(6), "reserved byte",
                 socks.reply(5, socks.GENERAL_FAILURE), id="socks5-rsv"),
    pytest.param(GREET + s5_domain(b"", 80), "bad host name",
                 socks.reply(5, socks.HOST_UNREACHABLE), id="socks5-empty-name"),
    pytest.param(GREET + s5_domain(b"a b", 80), "bad host name",
                 socks.reply(5, socks.HOST_UNREACHABLE), id="socks5-space"),
    pytest.param(GREET + s5_domain(b"\xff\xfe", 80), "bad host name",
                 socks.reply(5, socks.HOST_UNREACHABLE), id="socks5-binary-name"),
    pytest.param(s4("10.1.2.3", 80, cmd=2), "BIND is not supported",
                 socks.reply(4, socks.SOCKS4_REJECTED), id="socks4-bind"),
    pytest.param(s4("10.1.2.3", 0), "port 0", socks.reply(4, socks.SOCKS4_REJECTED),
                 id="socks4-port0"),
    pytest.param(b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 300, "user id longer",
                 socks.reply(4, socks.SOCKS4_REJECTED), id="socks4-long-user"),
    pytest.param(s4("0.0.0.1", 80) + b"n" * 300, "host name longer",
                 socks.reply(4, socks.SOCKS4_REJECTED), id="socks4a-long-name"),
    pytest.param(b"GET http://x/ HTTP/1.1\r\n", "looks like HTTP", None, id="http"),
    pytest.param(b"\x16\x03\x01\x02\x00", "not a SOCKS request", None, id="tls"),
])
def test_failures(data, fragment, reply):
    hs, events = feed_all(data)
    assert isinstance(events[-1], Failed), events
    assert fragment in events[-1].message
    assert events[-1].reply == reply
    assert hs.done and hs.request is None


def test_bytes_after_the_request_belong_to_the_stream():
    hs, events = feed_all(GREET + s5_domain(b"web", 80) + b"GET / HTTP/1.0\r\n\r\n")
    assert events[-1] == Request(5, "web", 80)
    assert hs.rest == b"GET / HTTP/1.0\r\n\r\n"
    hs4, _ = feed_all(s4("0.0.0.1", 80, domain=b"web") + b"hello")
    assert hs4.rest == b"hello"


def test_incomplete_input_waits():
    hs = Handshake()
    assert hs.feed(b"\x05") == []
    assert hs.feed(b"\x01") == []
    assert hs.feed(b"\x00") == [OK_METHOD]
    assert hs.feed(b"\x05\x01\x00\x03\x05ab") == []
    assert not hs.done
    assert hs.feed(b"cde\x00\x50") == [Request(5, "abcde", 80)]


def test_size_limits():
    # a SOCKS4 user id that never ends is cut off at the field limit
    hs = Handshake()
    assert hs.feed(b"\x04\x01\x00\x50\x01\x02\x03\x04") == []
    events: list = []
    for _ in range(100):
        events += hs.feed(b"u" * 10)
        if hs.done:
            break
    assert hs.done and isinstance(events[-1], Failed)
    assert socks.MAX_SOCKS4_FIELD < len(hs._buf) + hs._used <= socks.MAX_SOCKS4_FIELD + 20
    # the longest legal handshakes fit in MAX_HANDSHAKE, and the parser does not over-read
    longest5 = b"\x05\xff" + bytes(range(255)) + s5_domain(b"a" * 255, 80)
    hs, events = feed_all(longest5 + b"x" * 2000)
    assert events[-1] == Request(5, "a" * 255, 80)
    assert hs.rest == b"x" * 2000
    longest4a = s4("0.0.0.1", 80, user=b"u" * 255, domain=b"d" * 255)
    assert len(longest4a) <= socks.MAX_HANDSHAKE and len(longest5) <= socks.MAX_HANDSHAKE
    assert feed_all(longest4a)[1] == [Request(4, "d" * 255, 80)]


def test_feed_after_done_is_a_bug():
    hs, _ = feed_all(s4("1.2.3.4", 80))
    with pytest.raises(RuntimeError):
        hs.feed(b"x")


@pytest.mark.parametrize("version,code,expected", [
    (5, socks.SUCCEEDED, b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
    (5, socks.CONNECTION_REFUSED, b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
    (4, socks.SOCKS4_GRANTED, b"\x00\x5a\x00\x00\x00\x00\x00\x00"),
    (4, socks.SOCKS4_REJECTED, b"\x00\x5b\x00\x00\x00\x00\x00\x00"),
])
def test_replies(version, code, expected):
    assert socks.reply(version, code) == expected


def test_success_and_failure_follow_the_version():
    hs5, _ = feed_all(GREET + s5_domain(b"x", 1))
    assert hs5.success() == socks.reply(5, 0)
    assert hs5.failure(socks.HOST_UNREACHABLE) == socks.reply(5, socks.HOST_UNREACHABLE)
    hs4, _ = feed_all(s4("0.0.0.1", 1, domain=b"x"))
    assert hs4.success() == socks.reply(4, socks.SOCKS4_GRANTED)
    assert hs4.failure(socks.CONNECTION_REFUSED) == socks.reply(4, socks.SOCKS4_REJECTED)


@pytest.mark.parametrize("code,reason,expected", [
    (2, "Connection refused", socks.CONNECTION_REFUSED),
    (2, "connect failed: Connection refused", socks.CONNECTION_REFUSED),
    (2, "Name or service not known", socks.HOST_UNREACHABLE),
    (2, "Temporary failure in name resolution", socks.HOST_UNREACHABLE),
    (2, "No route to host", socks.HOST_UNREACHABLE),
    (2, "Network is unreachable", socks.NETWORK_UNREACHABLE),
    (2, "Connection timed out", socks.TTL_EXPIRED),
    (2, "", socks.HOST_UNREACHABLE),
    (1, "open failed", socks.NOT_ALLOWED),
    (4, "too many channels", socks.GENERAL_FAILURE),
])
def test_code_for_open_error(code, reason, expected):
    assert socks.code_for_open_error(code, reason) == expected


def test_pure_module_imports_no_io():
    import sys
    import subprocess
    r = subprocess.run([sys.executable, "-c", "import sys, tunneld.socks, tunneld.spec; "
                        "bad = {'asyncio', 'asyncssh', 'pydantic'} & set(sys.modules); "
                        "print(sorted(bad)); sys.exit(1 if bad else 0)"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


# -- under hypothesis: any bytes, in any pieces ----------------------------------------------------

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_grammarish = st.binary(max_size=600) | st.lists(
    st.sampled_from([b"\x05", b"\x04", b"\x01", b"\x00", b"\x03", b"\xff", b"\x02",
                     b"localhost", b"\x09node42.x", b"\x00\x50", GREET]),
    max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=_grammarish, cuts=st.lists(st.integers(1, 64), max_size=20))
@example(data=b"\x04\x01\x00\x01\x00\x00\x00\x00\x00\x00", cuts=[9])  # a byte after the request
def test_any_bytes_give_events_never_exceptions_and_pieces_do_not_matter(data, cuts):
    whole = Handshake()
    expected = whole.feed(data)
    assert all(isinstance(e, (Send, Request, Failed)) for e in expected)
    assert sum(isinstance(e, (Request, Failed)) for e in expected) <= 1
    if expected and isinstance(expected[-1], (Request, Failed)):
        assert whole.done
    # the same bytes in pieces give the same events and the same rest
    hs, got, i = Handshake(), [], 0
    for n in cuts + [len(data)]:
        if hs.done or i >= len(data):
            break
        got += hs.feed(data[i:i + n])
        i += n
    if not hs.done and i < len(data):
        got += hs.feed(data[i:])
    def same(events: list) -> list:  # a failure's message quotes what had arrived so far
        return [("failed", e.reply) if isinstance(e, Failed) else e for e in events]
    assert same(got) == same(expected)
    assert hs.done == whole.done
    if whole.request is not None:
        # the bytes after the request: what the last piece left over, then the pieces not fed
        # once the handshake was done (as socks_forward passes them on)
        assert hs.request == whole.request and hs.rest + data[i:] == whole.rest
        assert len(whole.request.host) <= socks.MAX_SOCKS4_FIELD
        assert 0 <= whole.request.port <= 65535
    assert whole._used <= socks.MAX_HANDSHAKE + 1
