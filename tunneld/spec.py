"""Forward-spec grammar → frozen ``ForwardSpec`` values.  Pure: no I/O.

The grammar follows OpenSSH's ``-L`` order, plus port ranges::

    PORT                      127.0.0.1:PORT        → localhost:PORT
    A-B                       each port of the range, as above
    LPORT:RPORT               127.0.0.1:LPORT       → localhost:RPORT
    LPORT:RHOST:RPORT         127.0.0.1:LPORT       → RHOST:RPORT
    BIND:LPORT:RHOST:RPORT    BIND:LPORT            → RHOST:RPORT

``BIND`` is an IP literal (``[::1]`` for IPv6), ``localhost`` or ``*`` (all interfaces).
``RHOST`` is resolved by the server, so it may be a name only the server knows (a compute
node).  Ranges are allowed on both sides when their lengths match (``18090-18092:8090-8092``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import SpecError

DEFAULT_BIND = "127.0.0.1"
DEFAULT_TARGET = "localhost"
#: a security limit: one spec may not open more listeners than this
MAX_RANGE = 1024
#: longest host name accepted (DNS limit)
MAX_HOST_LEN = 253

_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


@dataclass(frozen=True, order=True)
class ForwardSpec:
    """One forward: what the user asked for (its state lives elsewhere)."""

    bind_host: str
    bind_port: int
    target_host: str
    target_port: int
    kind: str = "local"

    @property
    def listen(self) -> str:
        """``HOST:PORT`` of the local listener, IPv6 in brackets."""
        return join_host_port(self.bind_host, self.bind_port)

    @property
    def target(self) -> str:
        """``HOST:PORT`` the server connects to."""
        return join_host_port(self.target_host, self.target_port)

    @property
    def is_public(self) -> bool:
        """True when the listener is reachable from other machines."""
        return not is_loopback(self.bind_host)

    def __str__(self) -> str:
        """The shortest spec that parses back to this value."""
        if self.bind_host != DEFAULT_BIND:
            return f"{_fmt_host(self.bind_host)}:{self.bind_port}:{self.target}"
        if self.target_host != DEFAULT_TARGET:
            return f"{self.bind_port}:{self.target}"
        if self.bind_port != self.target_port:
            return f"{self.bind_port}:{self.target_port}"
        return str(self.bind_port)


def join_host_port(host: str, port: int) -> str:
    return f"{_fmt_host(host)}:{port}"


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    """True for loopback addresses and names (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(text: str) -> list[str]:
    """Split on ``:`` outside brackets; a bracketed field keeps its brackets."""
    fields: list[str] = []
    cur = ""
    depth = 0
    for ch in text:
        if ch == "[":
            if depth or cur:
                raise SpecError(f"unexpected '[' in forward spec {text!r}")
            depth = 1
            cur += ch
        elif ch == "]":
            if not depth:
                raise SpecError(f"unexpected ']' in forward spec {text!r}")
            depth = 0
            cur += ch
        elif ch == ":" and not depth:
            fields.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise SpecError(f"missing ']' in forward spec {text!r}")
    fields.append(cur)
    return fields


def _ports(field: str, text: str, what: str) -> list[int]:
    m = _PORT_RE.match(field)
    if not m:
        raise SpecError(f"{what} {field!r} in forward spec {text!r} is not a port number or a "
                        "range like 8090-8092")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise SpecError(f"{what} {p} in forward spec {text!r} is out of range (1-65535)")
    if hi < lo:
        raise SpecError(f"range {field!r} in forward spec {text!r} runs backwards; "
                        f"write {hi}-{lo}")
    if hi - lo + 1 > MAX_RANGE:
        raise SpecError(f"range {field!r} in forward spec {text!r} has {hi - lo + 1} ports; "
                        f"at most {MAX_RANGE} are allowed in one spec")
    return list(range(lo, hi + 1))


def _host(field: str, text: str, what: str) -> str:
    if field.startswith("["):
        inner = field[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise SpecError(f"{what} {field!r} in forward spec {text!r} is not an IPv6 "
                            "address") from None
    if not field:
        raise SpecError(f"empty {what} in forward spec {text!r}")
    if ":" in field:
        raise SpecError(f"{what} {field!r} in forward spec {text!r}: write IPv6 addresses in "
                        "brackets, e.g. [::1]")
    if len(field) > MAX_HOST_LEN or not _HOST_RE.match(field):
        raise SpecError(f"{what} {field!r} in forward spec {text!r} is not a valid host name "
                        "or address")
    return field


def parse_bind(field: str, text: str | None = None) -> str:
    """A bind address (``*``, ``localhost``, an IP literal, IPv6 with or without brackets)."""
    text = field if text is None else text
    if ":" in field and not field.startswith("["):
        field = f"[{field}]"
    if field in ("*", ""):
        return "0.0.0.0"
    if field.lower() == "localhost":
        return DEFAULT_BIND
    host = _host(field, text, "bind address")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise SpecError(f"bind address {field!r} in forward spec {text!r} must be an IP "
                        "address, 'localhost' or '*'") from None


def parse(text: str, default_bind: str = DEFAULT_BIND) -> list[ForwardSpec]:
    """Parse one local-forward spec into the forwards it names (a range gives several).

    Raises ``SpecError`` with a message naming the bad part.
    """
    text = text.strip()
    if not text:
        raise SpecError("empty forward spec; expected e.g. 8090, 8090-8092 or 18090:node42:8090")
    fields = _split(text)
    bind = default_bind
    if len(fields) == 1:
        lports = rports = _ports(fields[0], text, "port")
        target = DEFAULT_TARGET
    elif len(fields) == 2:
        lports = _ports(fields[0], text, "local port")
        rports = _ports(fields[1], text, "remote port")
        target = DEFAULT_TARGET
    elif len(fields) == 3:
        lports = _ports(fields[0], text, "local port")
        target = _host(fields[1], text, "remote host")
        rports = _ports(fields[2], text, "remote port")
    elif len(fields) == 4:
        bind = parse_bind(fields[0], text)
        lports = _ports(fields[1], text, "local port")
        target = _host(fields[2], text, "remote host")
        rports = _ports(fields[3], text, "remote port")
    else:
        raise SpecError(f"forward spec {text!r} has {len(fields)} fields; expected "
                        "[BIND:]LPORT[:RHOST]:RPORT or PORT")
    if len(lports) != len(rports):
        raise SpecError(f"forward spec {text!r} maps {len(lports)} local ports to "
                        f"{len(rports)} remote ports; ranges on both sides must have the same "
                        "length")
    return [ForwardSpec(bind, lp, target, rp) for lp, rp in zip(lports, rports)]


def parse_all(texts: list[str], default_bind: str = DEFAULT_BIND) -> list[ForwardSpec]:
    """Parse several specs; duplicates (same spec twice) are kept once, in order."""
    out: dict[ForwardSpec, None] = {}
    for t in texts:
        for s in parse(t, default_bind):
            out.setdefault(s, None)
    return list(out)
