"""Forward-spec grammar → frozen ``ForwardSpec`` values.  Pure: no I/O.

The grammar follows OpenSSH's ``-L`` order, plus port ranges::

    PORT                      127.0.0.1:PORT        → localhost:PORT
    A-B                       each port of the range, as above
    LPORT:RPORT               127.0.0.1:LPORT       → localhost:RPORT
    LPORT:RHOST:RPORT         127.0.0.1:LPORT       → RHOST:RPORT
    BIND:LPORT:RHOST:RPORT    BIND:LPORT            → RHOST:RPORT

Local forwards to a Unix-domain socket on the server (OpenSSH's ``direct-streamlocal``)::

    LPORT:PATH                127.0.0.1:LPORT       → the socket PATH on the server
    BIND:LPORT:PATH           BIND:LPORT            → the socket PATH on the server

A ``PATH`` is anything that starts with ``/`` or ``~/`` (``~`` is the home directory on the
server: tunneld expands it, sshd does not); it may contain ``:``.  ``target_host`` is then
``""`` and ``target_port`` 0.  No ranges: one listener per socket.

``BIND`` is an IP literal (``[::1]`` for IPv6), ``localhost`` or ``*`` (all interfaces).
``RHOST`` is resolved by the server, so it may be a name only the server knows (a compute
node).  Ranges are allowed on both sides when their lengths match (``18090-18092:8090-8092``).

Remote forwards (``kind="remote"``, OpenSSH's ``-R`` order; ``parse_remote``)::

    RPORT:LHOST:LPORT         the server listens on 127.0.0.1:RPORT → LHOST:LPORT from here
    RBIND:RPORT:LHOST:LPORT   the server listens on RBIND:RPORT

``bind_host``/``bind_port`` are then on the server and ``target_host``/``target_port`` are
resolved and reached from this machine.  ``RBIND`` defaults to ``127.0.0.1`` (not OpenSSH's
``localhost``, which makes sshd bind every loopback family and succeed when only one of them
is free, so "port in use" would not be all-or-nothing); ``localhost`` means 127.0.0.1 and
``*`` all interfaces (the server's sshd must allow it: ``GatewayPorts clientspecified``).

SOCKS proxies (``kind="socks"``, OpenSSH's ``-D``; ``parse_socks``): ``PORT`` or
``BIND:PORT``; the target of each connection comes from the SOCKS request (``target_host`` is
``*`` and ``target_port`` 0).

``str(spec)`` of a remote forward starts with ``-R ``, of a SOCKS proxy with ``-D ``, so one
list of strings (the state file, ``tunnelctl list``) holds all three kinds and ``parse_any``
reads each back.  A local forward's string is unchanged (``8090``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from .errors import SpecError
from .names import has_host_chars

DEFAULT_BIND = "127.0.0.1"
DEFAULT_TARGET = "localhost"
#: where the server listens for a remote forward written without RBIND
DEFAULT_REMOTE_BIND = "127.0.0.1"
#: target fields of a SOCKS proxy (each connection names its own target)
SOCKS_TARGET = ("*", 0)
#: the forward kinds and the option that introduces each in a spec string (local: none)
KIND_PREFIX = {"local": "", "remote": "-R", "socks": "-D", "resume": "--resume"}
#: a security limit: one spec may not open more listeners than this
MAX_RANGE = 1024
#: the longest Unix socket path the server can connect to, in bytes (Linux's ``sun_path`` is
#: 108 bytes with its NUL; sshd refuses a longer one with the same "open failed" as any other)
SUN_PATH_MAX = 107
#: the longest ``~/`` path accepted before it is expanded (the home directory is only known on
#: the server; the expanded path is checked against ``SUN_PATH_MAX`` when a client connects)
HOME_PATH_MAX = 255

_PORT_RE = re.compile(r"^([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
#: where the socket path of a local forward starts: the first ``:`` followed by ``/`` or ``~/``
#: (an IPv6 bind address in brackets holds no ``/``)
_PATH_START_RE = re.compile(r":(?=/|~/)")


@dataclass(frozen=True, order=True)
class ForwardSpec:
    """One forward: what the user asked for (its state lives elsewhere)."""

    bind_host: str
    bind_port: int
    target_host: str
    target_port: int
    kind: str = "local"
    #: a local forward to a Unix socket on the server: its path (``/…`` or ``~/…``, ``~`` not
    #: expanded); ``""`` for a TCP target
    target_path: str = ""

    @property
    def listen(self) -> str:
        """``HOST:PORT`` of the local listener, IPv6 in brackets."""
        return join_host_port(self.bind_host, self.bind_port)

    @property
    def target(self) -> str:
        """``HOST:PORT`` the server connects to (remote forward: that this machine connects
        to; SOCKS: ``*``, each client names its own)."""
        if self.kind == "socks":
            return "*"
        if self.target_path:
            return self.target_path
        return join_host_port(self.target_host, self.target_port)

    @property
    def is_public(self) -> bool:
        """True when the listener is reachable from other machines."""
        return not is_loopback(self.bind_host)

    def __str__(self) -> str:
        """The shortest spec that parses back to this value (with ``parse_any``)."""
        if self.kind == "remote":
            if self.bind_host != DEFAULT_REMOTE_BIND:
                return f"-R {_fmt_host(self.bind_host)}:{self.bind_port}:{self.target}"
            return f"-R {self.bind_port}:{self.target}"
        if self.kind == "socks":
            if self.bind_host != DEFAULT_BIND:
                return f"-D {_fmt_host(self.bind_host)}:{self.bind_port}"
            return f"-D {self.bind_port}"
        if self.kind == "resume":
            return f"--resume {replace(self, kind='local')}"
        if self.bind_host != DEFAULT_BIND:
            return f"{_fmt_host(self.bind_host)}:{self.bind_port}:{self.target}"
        if self.target_path:
            return f"{self.bind_port}:{self.target_path}"
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
    if not has_host_chars(field):
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
    m = _PATH_START_RE.search(text)
    if m is not None:
        return [_parse_path(text, text[:m.start()], text[m.end():], default_bind)]
    fields = _split(text)
    if any(f.startswith("~") or "/" in f or f.endswith(".sock") for f in fields):
        raise SpecError(f"forward spec {text!r}: a socket path on the server starts with / "
                        "or ~/ (e.g. 8090:/run/app.sock or 8090:~/app.sock)")
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


def _parse_path(text: str, head: str, path: str, default_bind: str) -> ForwardSpec:
    """``[BIND:]LPORT`` (``head``) to the socket ``path`` on the server."""
    fields = _split(head)
    split = _bind_and_port(fields, text, default_bind)
    if split is None:
        raise SpecError(f"forward spec {text!r} has {len(fields) + 1} fields; a forward to a "
                        "Unix socket is [BIND:]LPORT:PATH, e.g. 8090:/run/app.sock")
    bind, port_field = split
    ports = _ports(port_field, text, "local port")
    if len(ports) != 1:
        raise SpecError(f"forward spec {text!r} names a range of local ports for one socket "
                        "path; a forward to a Unix socket listens on one port (add one spec "
                        "per socket)")
    check_path(path, text)
    return ForwardSpec(bind, ports[0], "", 0, target_path=path)


def _bind_and_port(fields: list[str], shown: str, default_bind: str) -> tuple[str, str] | None:
    """``[BIND:]PORT`` fields → (bind address, the port field); None for more fields."""
    if len(fields) == 1:
        return default_bind, fields[0]
    if len(fields) == 2:
        return parse_bind(fields[0], shown), fields[1]
    return None


def check_path(path: str, text: str | None = None) -> None:
    """Raise ``SpecError`` unless ``path`` can name a Unix socket on the server: ``/…`` or
    ``~/…``, no control character, not a directory, not too long (``SUN_PATH_MAX`` bytes;
    ``HOME_PATH_MAX`` for a ``~/`` path, checked again once it is expanded)."""
    where = f" in forward spec {text!r}" if text is not None else ""
    if not (path.startswith("/") or path.startswith("~/")):
        raise SpecError(f"socket path {path!r}{where} must be absolute (/run/app.sock) or in "
                        "the home directory on the server (~/app.sock)")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        bad = "a NUL" if "\0" in path else "a newline" if "\n" in path else \
            "a control character"
        raise SpecError(f"socket path {path!r}{where} contains {bad}; no socket path can")
    if path.endswith("/") or path.rsplit("/", 1)[-1] in ("", ".", ".."):
        raise SpecError(f"socket path {path!r}{where} names a directory; name the socket "
                        "file in it (e.g. ~/run/app.sock)")
    size = len(path.encode("utf-8", "surrogateescape"))
    limit = HOME_PATH_MAX if path.startswith("~/") else SUN_PATH_MAX
    if size > limit:
        more = (f"; a Unix socket path may have at most {SUN_PATH_MAX} bytes"
                if limit == SUN_PATH_MAX else
                f"; at most {HOME_PATH_MAX} are accepted before ~ is expanded, and "
                f"{SUN_PATH_MAX} after")
        shown = path if len(path) <= 60 else path[:40] + "…"
        raise SpecError(f"socket path {shown!r} has {size} bytes{more}; use a shorter path "
                        "(e.g. a symlink to its directory)")


def expand_home(path: str, home: str) -> str:
    """``path`` with a leading ``~/`` replaced by the server's home directory ``home``; raises
    ``SpecError`` if the result is too long for a socket path."""
    if not path.startswith("~/"):
        return path
    full = home.rstrip("/") + path[1:]
    size = len(full.encode("utf-8", "surrogateescape"))
    if size > SUN_PATH_MAX:
        raise SpecError(f"socket path {path!r} is {full!r} on the server, {size} bytes; a Unix "
                        f"socket path may have at most {SUN_PATH_MAX}: use a shorter path")
    return full


def parse_remote(text: str) -> list[ForwardSpec]:
    """Parse one remote-forward spec, ``[RBIND:]RPORT:LHOST:LPORT`` (OpenSSH's ``-R``
    order), into the forwards it names (a range gives several).  Raises ``SpecError``."""
    text = text.strip()
    shown = f"-R {text}"
    if not text:
        raise SpecError("empty remote forward spec; expected e.g. -R 9000:localhost:8000 "
                        "([RBIND:]RPORT:LHOST:LPORT)")
    fields = _split(text)
    bind = DEFAULT_REMOTE_BIND
    if len(fields) == 3:
        rports = _ports(fields[0], shown, "remote port")
        target = _host(fields[1], shown, "local host")
        lports = _ports(fields[2], shown, "local port")
    elif len(fields) == 4:
        bind = parse_bind(fields[0], shown)
        rports = _ports(fields[1], shown, "remote port")
        target = _host(fields[2], shown, "local host")
        lports = _ports(fields[3], shown, "local port")
    elif len(fields) in (1, 2):
        raise SpecError(f"remote forward spec {shown!r} names no local target; write "
                        "[RBIND:]RPORT:LHOST:LPORT, e.g. -R 9000:localhost:8000 (a SOCKS "
                        "proxy on the server, OpenSSH's -R PORT, is not supported)")
    else:
        raise SpecError(f"remote forward spec {shown!r} has {len(fields)} fields; expected "
                        "[RBIND:]RPORT:LHOST:LPORT")
    if len(lports) != len(rports):
        raise SpecError(f"remote forward spec {shown!r} maps {len(rports)} remote ports to "
                        f"{len(lports)} local ports; ranges on both sides must have the same "
                        "length")
    return [ForwardSpec(bind, rp, target, lp, kind="remote") for rp, lp in zip(rports, lports)]


def parse_socks(text: str, default_bind: str = DEFAULT_BIND) -> list[ForwardSpec]:
    """Parse one SOCKS-proxy spec, ``[BIND:]PORT`` (OpenSSH's ``-D``).  Raises ``SpecError``.
    Returns a list (of one) like the other parsers."""
    text = text.strip()
    shown = f"-D {text}"
    if not text:
        raise SpecError("empty SOCKS spec; expected e.g. -D 1080 or -D 127.0.0.1:1080")
    fields = _split(text)
    split = _bind_and_port(fields, shown, default_bind)
    if split is None:
        raise SpecError(f"SOCKS spec {shown!r} has {len(fields)} fields; expected [BIND:]PORT")
    bind, port_field = split
    ports = _ports(port_field, shown, "port")
    if len(ports) != 1:
        raise SpecError(f"SOCKS spec {shown!r} names a range; one SOCKS proxy listens on one "
                        "port")
    return [ForwardSpec(bind, ports[0], *SOCKS_TARGET, kind="socks")]


def parse_any(text: str, default_bind: str = DEFAULT_BIND) -> list[ForwardSpec]:
    """Parse a spec of any kind: ``-R …`` a remote forward, ``-D …`` a SOCKS proxy (the
    option may be joined to its value, as ``-R9000:localhost:80``), anything else a local
    forward.  ``parse_any(str(s)) == [s]`` for every ``ForwardSpec`` ``s``."""
    stripped = text.strip()
    if stripped.startswith("-R"):
        return parse_remote(stripped[2:])
    if stripped.startswith("-D"):
        return parse_socks(stripped[2:], default_bind)
    if stripped.startswith("--resume") and stripped[8:9] in ("", " ", "="):
        return parse_resume(stripped[9:], default_bind)
    if stripped.startswith("-"):
        raise SpecError(f"forward spec {stripped!r}: unknown option {stripped.split()[0]!r}; "
                        "use -R for a remote forward, -D for a SOCKS proxy or --resume for "
                        "a resumable forward")
    return parse(text, default_bind)


def parse_resume(text: str, default_bind: str = DEFAULT_BIND) -> list[ForwardSpec]:
    """A resumable local forward (``--resume 8090``): a local spec to a TCP target whose
    connections survive a reconnect (``relay``)."""
    out = parse(text, default_bind)
    if any(s.target_path for s in out):
        raise SpecError(f"forward spec {text.strip()!r}: --resume carries TCP targets only, "
                        "not a socket path on the server")
    return [replace(s, kind="resume") for s in out]


def parse_all(texts: list[str], default_bind: str = DEFAULT_BIND) -> list[ForwardSpec]:
    """Parse several specs of any kind (``parse_any``); duplicates (same spec twice) are kept
    once, in order."""
    out: dict[ForwardSpec, None] = {}
    for t in texts:
        for s in parse_any(t, default_bind):
            out.setdefault(s, None)
    return list(out)
