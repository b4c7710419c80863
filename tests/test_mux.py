"""The mux protocol codec (``tunneld.mux``): requests as OpenSSH 9.x clients build them
(``mux.c``'s ``mux_client_*``), the master's replies byte for byte, and what a request means
for tunneld (the forward spec of ``ssh -O forward``, a session's command, terminal modes)."""

from __future__ import annotations

import struct

import pytest

from tunneld import mux
from tunneld.spec import parse_any


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def s(b: bytes | str) -> bytes:
    raw = b.encode() if isinstance(b, str) else b
    return u32(len(raw)) + raw


def session(rid=1, tty=0, subsys=0, term="xterm", cmd=b"echo hi", env=()) -> bytes:
    body = u32(mux.C_NEW_SESSION) + u32(rid) + s(b"") + u32(tty) + u32(0) + u32(0) + \
        u32(subsys) + u32(0x7E) + s(term) + s(cmd)
    return body + b"".join(s(e) for e in env)


def fwd(kind, lhost, lport, chost, cport, close=False, rid=2) -> bytes:
    return u32(mux.C_CLOSE_FWD if close else mux.C_OPEN_FWD) + u32(rid) + u32(kind) + \
        s(lhost) + u32(lport) + s(chost) + u32(cport)


def test_hello_with_and_without_extensions():
    assert mux.parse(u32(mux.HELLO) + u32(4)) == mux.Hello(4)
    assert mux.parse(u32(mux.HELLO) + u32(4) + s("ext@x") + s(b"\x00\x01")) == mux.Hello(4)
    assert mux.hello() == u32(8) + u32(1) + u32(4)


def test_a_session_request_as_ssh_sends_it():
    req = mux.parse(session(rid=7, tty=1, cmd=b"ls -l", env=["LANG=C", "TD_X=a=b", "junk"]))
    assert isinstance(req, mux.NewSession)
    assert (req.rid, req.want_tty, req.subsystem, req.term, req.command) == \
        (7, True, False, "xterm", b"ls -l")
    assert req.environment() == {"LANG": "C", "TD_X": "a=b"}     # "junk" has no "=": left out
    assert mux.describe(req) == "ls -l"
    assert mux.describe(mux.parse(session(cmd=b""))) == "(login shell)"
    assert mux.describe(mux.parse(session(cmd=b"sftp", subsys=1))) == "subsystem sftp"
    # a command that is not UTF-8 is kept as bytes
    assert mux.parse(session(cmd=b"echo \xff")).command == b"echo \xff"


def test_a_stdio_forward_and_the_control_requests():
    body = u32(mux.C_NEW_STDIO_FWD) + u32(3) + s(b"") + s("node042") + u32(22)
    assert mux.parse(body) == mux.StdioForward(3, "node042", 22)
    assert mux.join_target("node042", 22) == "node042:22"
    assert mux.join_target("::1", 22) == "[::1]:22"
    assert mux.join_target("/run/x.sock", mux.PORT_STREAMLOCAL) == "/run/x.sock"
    for kind in (mux.C_ALIVE_CHECK, mux.C_TERMINATE, mux.C_STOP_LISTENING, mux.C_PROXY,
                 0x10000077):
        assert mux.parse(u32(kind) + u32(9)) == mux.Request(kind, 9)


@pytest.mark.parametrize("body,why", [
    (b"", "too short"),
    (u32(mux.C_ALIVE_CHECK), "too short"),                       # no request id
    (u32(mux.HELLO), "too short"),                               # no version
    (session()[:-3], "longer than its message"),                 # the command cut
    (u32(mux.C_NEW_SESSION) + u32(1) + s(b"") + u32(0), "too short"),
    (session(term="x\0y"), "NUL"),
    (session(cmd=b"a\0b"), "NUL"),
    (session(env=[b"\xff=1"]), "UTF-8"),
    (u32(mux.C_NEW_STDIO_FWD) + u32(3) + s(b"") + s("h") + u32(70000), "out of range"),
    (fwd(mux.FWD_LOCAL, "", 70000, "h", 1), "out of range"),
    (u32(mux.HELLO) + u32(4) + s("ext"), "too short"),            # an extension without value
])
def test_malformed_messages_are_refused(body, why):
    with pytest.raises(mux.MuxError, match=why):
        mux.parse(body)


def test_message_lengths():
    assert mux.body_length(u32(8)) == 8
    with pytest.raises(mux.MuxError, match="limit"):
        mux.body_length(u32(mux.MAX_MESSAGE + 1))
    with pytest.raises(mux.MuxError, match="no type"):
        mux.body_length(u32(3))


def test_replies_byte_for_byte():
    assert mux.ok(5) == u32(8) + u32(mux.S_OK) + u32(5)
    assert mux.failure(5, "no") == u32(14) + u32(mux.S_FAILURE) + u32(5) + s("no")
    assert mux.denied(5, "no")[4:8] == u32(mux.S_PERMISSION_DENIED)
    assert mux.alive(1, 4242) == u32(12) + u32(mux.S_ALIVE) + u32(1) + u32(4242)
    assert mux.session_opened(1, 9) == u32(12) + u32(mux.S_SESSION_OPENED) + u32(1) + u32(9)
    assert mux.exit_message(9, 3) == u32(12) + u32(mux.S_EXIT_MESSAGE) + u32(9) + u32(3)
    assert mux.tty_alloc_fail(9) == u32(8) + u32(mux.S_TTY_ALLOC_FAIL) + u32(9)
    assert mux.remote_port(2, 40001) == u32(12) + u32(mux.S_REMOTE_PORT) + u32(2) + u32(40001)


@pytest.mark.parametrize("req,spec", [
    # ssh -O forward -L 8090:localhost:8090 (no bind address: "" — the loopback default)
    ((mux.FWD_LOCAL, "", 8090, "localhost", 8090), "8090:localhost:8090"),
    ((mux.FWD_LOCAL, "127.0.0.1", 8090, "node7", 8888), "127.0.0.1:8090:node7:8888"),
    ((mux.FWD_LOCAL, "localhost", 8090, "node7", 8888), "127.0.0.1:8090:node7:8888"),
    ((mux.FWD_LOCAL, "", 8090, "::1", 80), "8090:[::1]:80"),
    ((mux.FWD_LOCAL, "", 8090, "/run/user/1/app.sock", mux.PORT_STREAMLOCAL),
     "8090:/run/user/1/app.sock"),
    # -L *:8090:… (an empty bind address on ssh's command line): every address
    ((mux.FWD_LOCAL, "*", 8090, "h", 80), "0.0.0.0:8090:h:80"),
    ((mux.FWD_DYNAMIC, "", 1080, "", 0), "-D 1080"),
    ((mux.FWD_DYNAMIC, "127.0.0.1", 1080, "", 0), "-D 127.0.0.1:1080"),
    ((mux.FWD_REMOTE, "", 9000, "localhost", 8000), "-R 9000:localhost:8000"),
    ((mux.FWD_REMOTE, "127.0.0.1", 9000, "localhost", 8000),
     "-R 127.0.0.1:9000:localhost:8000"),
])
def test_the_tunneld_spec_of_ssh_dash_o_forward(req, spec):
    got = mux.spec_of(mux.Forward(mux.C_OPEN_FWD, 1, *req))
    assert got == spec
    parse_any(got)     # and tunneld reads it back


@pytest.mark.parametrize("req,why", [
    ((7, "", 8090, "h", 80), "unknown forward type"),
    ((mux.FWD_LOCAL, "/tmp/l.sock", mux.PORT_STREAMLOCAL, "h", 80), "Unix socket"),
    ((mux.FWD_REMOTE, "", 9000, "/tmp/x.sock", mux.PORT_STREAMLOCAL), "Unix socket"),
    ((mux.FWD_LOCAL, "", 8090, "", 80), "target"),
    ((mux.FWD_LOCAL, "", 8090, "h", 0), "target"),
    ((mux.FWD_REMOTE, "", 0, "localhost", 80), "port 0"),
])
def test_forwards_tunneld_cannot_make(req, why):
    with pytest.raises(mux.MuxError, match=why):
        mux.spec_of(mux.Forward(mux.C_OPEN_FWD, 1, *req))


def test_terminal_modes_from_termios_attributes():
    consts = {"VINTR": 0, "VEOF": 1, "VSUSP": 2, "ICRNL": 0o400, "ISIG": 1, "ECHO": 0o10,
              "ICANON": 2, "OPOST": 1, "CS8": 0o60, "CS7": 0o40, "CSIZE": 0o60}
    attrs = [0o400, 1, 0o60, 1 | 0o10, 13, 15, [b"\x03", b"\x04", b"\x00"]]
    modes = mux.tty_modes(attrs, consts, {13: 9600, 15: 38400})
    assert modes[1] == 3 and modes[5] == 4
    assert modes[10] == mux.VDISABLE          # a switched-off character
    assert (modes[36], modes[50], modes[53], modes[51]) == (1, 1, 1, 0)   # ICRNL ISIG ECHO
    assert (modes[70], modes[91], modes[90]) == (1, 1, 0)                 # OPOST CS8 !CS7
    assert (modes[mux.TTY_OP_ISPEED], modes[mux.TTY_OP_OSPEED]) == (9600, 38400)
    assert 11 not in modes    # VDSUSP: not on this system
