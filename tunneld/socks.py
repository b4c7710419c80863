"""SOCKS5 and SOCKS4/4a server handshakes as a sans-I/O parser.  Pure: no I/O, no asyncio.

Supported (what browsers, curl and ``ssh -D`` clients use): SOCKS5 (RFC 1928) with the
"no authentication" method and the CONNECT command, addresses as IPv4, IPv6 or a domain name;
SOCKS4 CONNECT with an IPv4 address and SOCKS4a with a domain name.  A domain name is passed on
unresolved: the SSH server resolves it (so a compute node's name works).

Use::

    hs = Handshake()
    for ev in hs.feed(data):          # bytes read from the client, in any pieces
        Send(data)     → write ev.data to the client
        Request(...)   → open a connection to ev.host:ev.port, then write
                         hs.success() or hs.failure(code) to the client; bytes the client
                         sent after its request are in hs.rest (they belong to the stream)
        Failed(...)    → write ev.reply (if any) to the client, then close it; ev.message says
                         what was wrong, for the log

After a ``Request`` or ``Failed`` the handshake is over: ``feed`` must not be called again.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: a security limit: bytes a client may send before its request is complete (the longest
#: legal SOCKS5 greeting plus request is 257 + 262 bytes; SOCKS4a with our limits ~520)
MAX_HANDSHAKE = 1024
#: a security limit: seconds a client may take to complete its request
HANDSHAKE_TIMEOUT = 10.0
#: a limit: the longest SOCKS4 user id and SOCKS4a domain name accepted
MAX_SOCKS4_FIELD = 255

SOCKS4, SOCKS5 = 4, 5

# SOCKS5 reply codes (RFC 1928 §6)
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# SOCKS4 reply codes
SOCKS4_GRANTED = 0x5A
SOCKS4_REJECTED = 0x5B

_NO_AUTH = 0x00
_NO_ACCEPTABLE = 0xFF
_CONNECT = 0x01
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 0x01, 0x03, 0x04
_COMMANDS = {0x01: "CONNECT", 0x02: "BIND", 0x03: "UDP ASSOCIATE"}


@dataclass(frozen=True)
class Send:
    """Bytes to write to the client now (the SOCKS5 method selection)."""
    data: bytes


@dataclass(frozen=True)
class Request:
    """The client asks for a connection to ``host:port`` (``host`` is an IP literal or a
    domain name, not resolved here)."""
    version: int
    host: str
    port: int

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Failed:
    """The handshake failed: write ``reply`` (if not None), then close the client."""
    message: str
    reply: bytes | None = None


Event = Send | Request | Failed


def reply(version: int, code: int) -> bytes:
    """A reply to a CONNECT request: SOCKS5 ``VER REP RSV ATYP BND.ADDR BND.PORT`` with the
    bound address 0.0.0.0:0 (as OpenSSH sends: the server's socket is not known here), or
    SOCKS4 ``VN CD DSTPORT DSTIP``."""
    if version == SOCKS5:
        return bytes((SOCKS5, code, 0, _ATYP_IPV4, 0, 0, 0, 0, 0, 0))
    return bytes((0, code, 0, 0, 0, 0, 0, 0))


def code_for_open_error(code: int, reason: str) -> int:
    """The SOCKS5 reply code for an SSH channel-open failure (RFC 4254 code and the server's
    reason text, e.g. OpenSSH's "Connection refused" or a resolver message)."""
    text = (reason or "").lower()
    if code == 1:  # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED (PermitOpen, AllowTcpForwarding)
        return NOT_ALLOWED
    if code == 4:  # SSH_OPEN_RESOURCE_SHORTAGE
        return GENERAL_FAILURE
    if "refused" in text:
        return CONNECTION_REFUSED
    if "network" in text and "unreachable" in text:
        return NETWORK_UNREACHABLE
    if "timed out" in text or "timeout" in text:
        return TTL_EXPIRED
    # name resolution failures ("Name or service not known", "nodename nor servname",
    # "Temporary failure in name resolution"), "No route to host", anything else
    return HOST_UNREACHABLE


class Handshake:
    """The server side of one client's SOCKS handshake, fed with the bytes it sends."""

    def __init__(self) -> None:
        self._buf = bytearray()
        #: SOCKS5 only: True once the method selection has been answered
        self._greeted = False
        #: True once a Request or Failed was returned
        self.done = False
        #: the request, once known (for ``success``/``failure``)
        self.request: Request | None = None
        #: bytes the client sent after its request (the start of its stream)
        self.rest = b""
        #: bytes consumed so far (greeting and request), for the size limit
        self._used = 0

    def feed(self, data: bytes) -> list[Event]:
        """Take bytes from the client; return the events they completed (see the module
        docstring for what to do with each)."""
        if self.done:
            raise RuntimeError("the SOCKS handshake is over; feed the stream elsewhere")
        self._buf += data
        events: list[Event] = []
        while not self.done:
            ev = self._step()
            if ev is None:
                break
            events.append(ev)
        if not self.done and self._used + len(self._buf) > MAX_HANDSHAKE:
            events.append(self._fail(f"no complete SOCKS request within {MAX_HANDSHAKE} "
                                     "bytes"))
        return events

    def success(self) -> bytes:
        """The reply that grants the request (send it once the connection is open)."""
        assert self.request is not None
        return reply(self.request.version,
                     SUCCEEDED if self.request.version == SOCKS5 else SOCKS4_GRANTED)

    def failure(self, code: int = GENERAL_FAILURE) -> bytes:
        """The reply that refuses the request: SOCKS5 ``code``; SOCKS4 has one code."""
        assert self.request is not None
        if self.request.version == SOCKS5:
            return reply(SOCKS5, code)
        return reply(SOCKS4, SOCKS4_REJECTED)

    # -- parsing ------------------------------------------------------------------------------

    def _fail(self, message: str, reply_: bytes | None = None) -> Failed:
        self.done = True
        return Failed(message, reply_)

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._used += n
        return out

    def _step(self) -> Event | None:
        buf = self._buf
        if not buf:
            return None
        ver = buf[0]
        if self._greeted:
            if ver != SOCKS5:
                return self._fail(f"bad SOCKS5 request: version byte {ver:#04x}",
                                  reply(SOCKS5, GENERAL_FAILURE))
            return self._socks5_request()
        if ver == SOCKS5:
            return self._socks5_greeting()
        if ver == SOCKS4:
            return self._socks4()
        first = bytes(buf[:16])
        hint = ""
        if first[:1].isalpha():
            hint = " (it looks like HTTP: set the client's proxy type to SOCKS, not HTTP)"
        return self._fail(f"not a SOCKS request: it starts with {first!r}{hint}")

    def _socks5_greeting(self) -> Event | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        n = buf[1]
        if len(buf) < 2 + n:
            return None
        methods = self._take(2 + n)[2:]
        if _NO_AUTH not in methods:
            return self._fail("SOCKS5 client offers no method without authentication "
                              f"(offered: {', '.join(f'{m:#04x}' for m in methods) or 'none'}); "
                              "tunneld's proxy only serves its own user on loopback and asks "
                              "for none", bytes((SOCKS5, _NO_ACCEPTABLE)))
        self._greeted = True
        return Send(bytes((SOCKS5, _NO_AUTH)))

    def _socks5_request(self) -> Event | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        cmd, rsv, atyp = buf[1], buf[2], buf[3]
        if atyp == _ATYP_IPV4:
            size = 4 + 4 + 2
        elif atyp == _ATYP_IPV6:
            size = 4 + 16 + 2
        elif atyp == _ATYP_DOMAIN:
            size = 4 + 1 + buf[4] + 2
        else:
            return self._fail(f"SOCKS5 address type {atyp:#04x} is not supported",
                              reply(SOCKS5, ADDRESS_TYPE_NOT_SUPPORTED))
        if len(buf) < size:
            return None
        msg = self._take(size)
        if cmd != _CONNECT:
            what = _COMMANDS.get(cmd, f"{cmd:#04x}")
            return self._fail(f"SOCKS5 command {what} is not supported (only CONNECT)",
                              reply(SOCKS5, COMMAND_NOT_SUPPORTED))
        if rsv != 0:
            return self._fail("bad SOCKS5 request: reserved byte is not zero",
                              reply(SOCKS5, GENERAL_FAILURE))
        port = int.from_bytes(msg[-2:], "big")
        if atyp == _ATYP_IPV4:
            host = str(ipaddress.IPv4Address(msg[4:8]))
        elif atyp == _ATYP_IPV6:
            host = str(ipaddress.IPv6Address(msg[4:20]))
        else:
            raw = msg[5:-2]
            name = _domain(raw)
            if name is None:
                return self._fail(f"SOCKS5 request names a bad host name {raw[:64]!r}",
                                  reply(SOCKS5, HOST_UNREACHABLE))
            host = name
        return self._finish(Request(SOCKS5, host, port))

    def _socks4(self) -> Event | None:
        buf = self._buf
        if len(buf) < 9:
            return None
        end = buf.find(b"\0", 8)
        if end < 0:
            if len(buf) - 8 > MAX_SOCKS4_FIELD:
                return self._fail(f"SOCKS4 user id longer than {MAX_SOCKS4_FIELD} bytes",
                                  reply(SOCKS4, SOCKS4_REJECTED))
            return None
        cmd = buf[1]
        port = int.from_bytes(buf[2:4], "big")
        ip = bytes(buf[4:8])
        socks4a = ip[:3] == b"\0\0\0" and ip[3] != 0
        host: str | None
        if socks4a:
            dend = buf.find(b"\0", end + 1)
            if dend < 0:
                if len(buf) - end - 1 > MAX_SOCKS4_FIELD:
                    return self._fail(f"SOCKS4a host name longer than {MAX_SOCKS4_FIELD} "
                                      "bytes", reply(SOCKS4, SOCKS4_REJECTED))
                return None
            raw = bytes(buf[end + 1:dend])
            self._take(dend + 1)
            host = _domain(raw)
            if host is None:
                return self._fail(f"SOCKS4a request names a bad host name {raw[:64]!r}",
                                  reply(SOCKS4, SOCKS4_REJECTED))
        else:
            self._take(end + 1)
            host = str(ipaddress.IPv4Address(ip))
        if cmd != _CONNECT:
            name = _COMMANDS.get(cmd, f"{cmd:#04x}")
            return self._fail(f"SOCKS4 command {name} is not supported (only CONNECT)",
                              reply(SOCKS4, SOCKS4_REJECTED))
        if port == 0:
            return self._fail("SOCKS4 request for port 0", reply(SOCKS4, SOCKS4_REJECTED))
        return self._finish(Request(SOCKS4, host, port))

    def _finish(self, req: Request) -> Request:
        self.done = True
        self.request = req
        self.rest = bytes(self._buf)
        self._buf.clear()
        return req


def _domain(raw: bytes) -> str | None:
    """A host name from a request, or None if it is empty or not printable ASCII."""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not name or len(name) > MAX_SOCKS4_FIELD or not name.isprintable() or " " in name:
        return None
    return name
