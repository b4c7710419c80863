"""OpenSSH's multiplexing protocol, the master's side (``PROTOCOL.mux``, version 4, as
OpenSSH's ``mux.c`` speaks it): the messages a client sends, parsed; the replies, built.

Every message is a ``uint32`` length and a body; a body is a ``uint32`` type, a ``uint32``
request id (but HELLO) and the fields of the type.  Strings are a ``uint32`` length and the
bytes.  The file descriptors of a session (three) or of a stdio forward (two) follow their
request on the socket, each as SCM_RIGHTS with one byte: ``muxserver`` receives them.

Pure: fed bytes, returns values; ``MuxError`` for a message that is not one (the client is
then dropped, as OpenSSH's master drops it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION = 4

HELLO = 0x00000001
C_NEW_SESSION = 0x10000002
C_ALIVE_CHECK = 0x10000004
C_TERMINATE = 0x10000005
C_OPEN_FWD = 0x10000006
C_CLOSE_FWD = 0x10000007
C_NEW_STDIO_FWD = 0x10000008
C_STOP_LISTENING = 0x10000009
C_PROXY = 0x1000000F
S_OK = 0x80000001
S_PERMISSION_DENIED = 0x80000002
S_FAILURE = 0x80000003
S_EXIT_MESSAGE = 0x80000004
S_ALIVE = 0x80000005
S_SESSION_OPENED = 0x80000006
S_REMOTE_PORT = 0x80000007
S_TTY_ALLOC_FAIL = 0x80000008

#: forward types of OPEN_FWD / CLOSE_FWD
FWD_LOCAL, FWD_REMOTE, FWD_DYNAMIC = 1, 2, 3
#: the port field of a forward to or from a Unix socket path
PORT_STREAMLOCAL = 0xFFFFFFFE
#: the escape character field when there is none
NO_ESCAPE = 0xFFFFFFFF

#: a limit: the longest message body accepted (OpenSSH's CHANNEL_MUX_MAX_PACKET)
MAX_MESSAGE = 256 * 1024
#: a limit: environment strings kept of one session request (OpenSSH's MUX_MAX_ENV_VARS)
MAX_ENV = 4096

#: names of the request types, for logs and refusals
NAMES = {HELLO: "HELLO", C_NEW_SESSION: "NEW_SESSION", C_ALIVE_CHECK: "ALIVE_CHECK",
         C_TERMINATE: "TERMINATE", C_OPEN_FWD: "OPEN_FWD", C_CLOSE_FWD: "CLOSE_FWD",
         C_NEW_STDIO_FWD: "NEW_STDIO_FWD", C_STOP_LISTENING: "STOP_LISTENING",
         C_PROXY: "PROXY"}


class MuxError(ValueError):
    """Bytes that are not a valid message of the protocol."""


@dataclass(frozen=True)
class Request:
    """A request with no fields of its own (ALIVE_CHECK, TERMINATE, STOP_LISTENING, PROXY,
    and any type this master does not know)."""

    type: int
    rid: int


@dataclass(frozen=True)
class Hello:
    version: int
    type: int = HELLO
    rid: int = 0


@dataclass(frozen=True)
class NewSession:
    rid: int
    want_tty: bool
    want_x11: bool
    want_agent: bool
    subsystem: bool
    escape: int
    term: str
    #: the command (the subsystem's name when ``subsystem``); empty: a login shell
    command: bytes
    #: ``NAME=VALUE`` strings (SendEnv, SetEnv)
    env: list[str] = field(default_factory=list)
    type: int = C_NEW_SESSION

    def environment(self) -> dict[str, str]:
        """The environment strings as a mapping (a string without ``=`` is left out, as
        OpenSSH's master leaves it out)."""
        out: dict[str, str] = {}
        for item in self.env:
            name, eq, value = item.partition("=")
            if eq and name:
                out[name] = value
        return out


@dataclass(frozen=True)
class StdioForward:
    rid: int
    host: str
    port: int
    type: int = C_NEW_STDIO_FWD


@dataclass(frozen=True)
class Forward:
    """OPEN_FWD or CLOSE_FWD: ``ssh -O forward|cancel -L/-R/-D …``."""

    type: int
    rid: int
    kind: int
    listen_host: str
    listen_port: int
    connect_host: str
    connect_port: int


class _Reader:
    def __init__(self, body: bytes) -> None:
        self.body, self.pos = body, 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.body):
            raise MuxError("message too short")
        (value,) = struct.unpack_from(">I", self.body, self.pos)
        self.pos += 4
        return value

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.body):
            raise MuxError("string longer than its message")
        value = self.body[self.pos:self.pos + n]
        self.pos += n
        return value

    def text(self) -> str:
        raw = self.string()
        if b"\0" in raw:
            raise MuxError("a NUL inside a string")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise MuxError("a string that is not UTF-8") from None

    def left(self) -> int:
        return len(self.body) - self.pos


def parse(body: bytes) -> Request | Hello | NewSession | StdioForward | Forward:
    """The request in a message body.  Raises MuxError."""
    r = _Reader(body)
    kind = r.u32()
    if kind == HELLO:
        version = r.u32()
        while r.left():       # extensions: name and value; none is defined
            r.string()
            r.string()
        return Hello(version)
    rid = r.u32()
    if kind == C_NEW_SESSION:
        r.string()            # reserved
        tty, x11, agent, subsys, escape = r.u32(), r.u32(), r.u32(), r.u32(), r.u32()
        term = r.text()
        command = r.string()
        if b"\0" in command:
            raise MuxError("a NUL inside the command")
        env: list[str] = []
        while r.left():
            item = r.text()
            if len(env) < MAX_ENV:
                env.append(item)
        return NewSession(rid, bool(tty), bool(x11), bool(agent), bool(subsys), escape, term,
                          command, env)
    if kind == C_NEW_STDIO_FWD:
        r.string()            # reserved
        host = r.text()
        port = r.u32()
        if port != PORT_STREAMLOCAL and port > 65535:
            raise MuxError(f"port {port} out of range")
        return StdioForward(rid, host, port)
    if kind in (C_OPEN_FWD, C_CLOSE_FWD):
        ftype, lhost, lport, chost, cport = r.u32(), r.text(), r.u32(), r.text(), r.u32()
        for port in (lport, cport):
            if port != PORT_STREAMLOCAL and port > 65535:
                raise MuxError(f"port {port} out of range")
        return Forward(kind, rid, ftype, lhost, lport, chost, cport)
    return Request(kind, rid)


# -- replies -------------------------------------------------------------------------------

def _s(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def hello() -> bytes:
    return frame(struct.pack(">II", HELLO, VERSION))


def ok(rid: int) -> bytes:
    return frame(struct.pack(">II", S_OK, rid))


def failure(rid: int, why: str) -> bytes:
    return frame(struct.pack(">II", S_FAILURE, rid) + _s(why))


def denied(rid: int, why: str) -> bytes:
    return frame(struct.pack(">II", S_PERMISSION_DENIED, rid) + _s(why))


def alive(rid: int, pid: int) -> bytes:
    return frame(struct.pack(">III", S_ALIVE, rid, pid))


def session_opened(rid: int, sid: int) -> bytes:
    return frame(struct.pack(">III", S_SESSION_OPENED, rid, sid))


def remote_port(rid: int, port: int) -> bytes:
    return frame(struct.pack(">III", S_REMOTE_PORT, rid, port))


def exit_message(sid: int, status: int) -> bytes:
    return frame(struct.pack(">III", S_EXIT_MESSAGE, sid, status & 0xFFFFFFFF))


def tty_alloc_fail(sid: int) -> bytes:
    return frame(struct.pack(">II", S_TTY_ALLOC_FAIL, sid))


def body_length(header: bytes) -> int:
    """The body length a message's 4-byte header announces.  Raises MuxError past
    ``MAX_MESSAGE``."""
    (n,) = struct.unpack(">I", header)
    if n > MAX_MESSAGE:
        raise MuxError(f"a message of {n} bytes (the limit is {MAX_MESSAGE})")
    if n < 4:
        raise MuxError(f"a message of {n} bytes has no type")
    return n


# -- what a request means ------------------------------------------------------------------

def describe(req: NewSession) -> str:
    """The session as ``list`` shows it: its command, ``sftp`` (a subsystem) or
    ``(login shell)``."""
    text = req.command.decode(errors="replace")
    if req.subsystem:
        return f"subsystem {text}"
    return text if text else "(login shell)"


def spec_of(req: Forward) -> str:
    """The tunneld forward spec of an OPEN_FWD/CLOSE_FWD (``spec.parse_any``'s grammar), as
    ``ssh -L/-R/-D`` meant it: an empty listen host is the loopback default, ``*`` every
    address.  Raises MuxError for what tunneld cannot forward (Unix socket listeners)."""
    if req.kind not in (FWD_LOCAL, FWD_REMOTE, FWD_DYNAMIC):
        raise MuxError(f"unknown forward type {req.kind}")
    if req.listen_port == PORT_STREAMLOCAL:
        raise MuxError("forwards that listen on a Unix socket are not supported by tunneld")
    if req.listen_port == 0:
        raise MuxError("tunneld forwards a port you name: port 0 (the server's or the "
                       "system's choice) is not supported; give a port number")
    bind = {"": "", "*": "0.0.0.0", "localhost": "127.0.0.1"}.get(req.listen_host,
                                                                 req.listen_host)
    head = f"{_host(bind)}:" if bind else ""
    if req.kind == FWD_DYNAMIC:
        return f"-D {head}{req.listen_port}"
    if req.connect_port == PORT_STREAMLOCAL:
        if req.kind == FWD_REMOTE:
            raise MuxError("remote forwards to a local Unix socket are not supported by "
                           "tunneld")
        target = req.connect_host
    else:
        if not req.connect_host or (req.kind == FWD_LOCAL and req.connect_port == 0):
            raise MuxError("a forward needs a target host and port")
        target = f"{_host(req.connect_host)}:{req.connect_port}"
    if req.kind == FWD_REMOTE:
        return f"-R {head}{req.listen_port}:{target}"
    return f"{head}{req.listen_port}:{target}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- terminal modes ------------------------------------------------------------------------

#: RFC 4254 section 8's opcodes: (opcode, termios flag word or "cc", the termios name)
TTY_MODES: tuple[tuple[int, str, str], ...] = (
    (1, "cc", "VINTR"), (2, "cc", "VQUIT"), (3, "cc", "VERASE"), (4, "cc", "VKILL"),
    (5, "cc", "VEOF"), (6, "cc", "VEOL"), (7, "cc", "VEOL2"), (8, "cc", "VSTART"),
    (9, "cc", "VSTOP"), (10, "cc", "VSUSP"), (11, "cc", "VDSUSP"), (12, "cc", "VREPRINT"),
    (13, "cc", "VWERASE"), (14, "cc", "VLNEXT"), (15, "cc", "VFLUSH"), (16, "cc", "VSWTCH"),
    (17, "cc", "VSTATUS"), (18, "cc", "VDISCARD"),
    (30, "iflag", "IGNPAR"), (31, "iflag", "PARMRK"), (32, "iflag", "INPCK"),
    (33, "iflag", "ISTRIP"), (34, "iflag", "INLCR"), (35, "iflag", "IGNCR"),
    (36, "iflag", "ICRNL"), (37, "iflag", "IUCLC"), (38, "iflag", "IXON"),
    (39, "iflag", "IXANY"), (40, "iflag", "IXOFF"), (41, "iflag", "IMAXBEL"),
    (42, "iflag", "IUTF8"),
    (50, "lflag", "ISIG"), (51, "lflag", "ICANON"), (52, "lflag", "XCASE"),
    (53, "lflag", "ECHO"), (54, "lflag", "ECHOE"), (55, "lflag", "ECHOK"),
    (56, "lflag", "ECHONL"), (57, "lflag", "NOFLSH"), (58, "lflag", "TOSTOP"),
    (59, "lflag", "IEXTEN"), (60, "lflag", "ECHOCTL"), (61, "lflag", "ECHOKE"),
    (62, "lflag", "PENDIN"),
    (70, "oflag", "OPOST"), (71, "oflag", "OLCUC"), (72, "oflag", "ONLCR"),
    (73, "oflag", "OCRNL"), (74, "oflag", "ONOCR"), (75, "oflag", "ONLRET"),
    (90, "cflag", "CS7"), (91, "cflag", "CS8"), (92, "cflag", "PARENB"),
    (93, "cflag", "PARODD"),
)
#: the opcodes of the input and output speeds
TTY_OP_ISPEED, TTY_OP_OSPEED = 128, 129
#: a special character that is switched off (OpenSSH sends _POSIX_VDISABLE as 255)
VDISABLE = 255


def tty_modes(attrs: list, consts: dict[str, int], speeds: dict[int, int]) -> dict[int, int]:
    """The pty-req modes of a terminal: ``attrs`` as ``termios.tcgetattr`` returns them
    (iflag, oflag, cflag, lflag, ispeed, ospeed, cc), ``consts`` the termios constants this
    system has (name → value), ``speeds`` termios speed constants → baud."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    words = {"iflag": iflag, "oflag": oflag, "cflag": cflag, "lflag": lflag}
    modes: dict[int, int] = {}
    for op, where, name in TTY_MODES:
        value = consts.get(name)
        if value is None:
            continue
        if where == "cc":
            if value >= len(cc):
                continue
            ch = cc[value]
            ch = ch[0] if isinstance(ch, bytes) else ch
            modes[op] = VDISABLE if ch == 0 else ch
        elif name in ("CS7", "CS8"):
            modes[op] = int((cflag & consts.get("CSIZE", 0)) == value)
        else:
            modes[op] = int(bool(words[where] & value))
    for op, speed in ((TTY_OP_ISPEED, ispeed), (TTY_OP_OSPEED, ospeed)):
        if speed in speeds:
            modes[op] = speeds[speed]
    return modes


def join_target(host: str, port: int) -> str:
    """``HOST:PORT`` of a stdio forward (a Unix socket path alone)."""
    return host if port == PORT_STREAMLOCAL else f"{_host(host)}:{port}"
