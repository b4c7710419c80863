"""Control sockets under stress and abuse, with the real OpenSSH client: a terminal (its size,
a resize, ^C), no pty granted, 50 passengers at once, the SSH connection killed under them,
a login with a code asked on the passenger's terminal, the daemon stopped or killed, another
uid, and garbage on the socket."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import sys

import pytest
from _mux_tools import (
    CMD_TIMEOUT,
    PtySsh,
    mux_path,
    mux_ssh,
    ssh_opts,
    start_socket,
    wait_passengers,
)
from test_e2e_auth import ALIAS, CODE, PASSWORD, adaemon, authserver, notes  # noqa: F401

pytestmark = pytest.mark.timeout(180)


def test_a_terminal_its_size_a_resize_and_ctrl_c(daemon, sshd):
    start_socket(daemon)
    script = ("stty size; trap 'stty size' WINCH; trap 'echo got-INT; exit 7' INT; "
              "echo ready; while :; do sleep 0.1; done")
    p = PtySsh(daemon.env, [*ssh_opts(daemon), "-t", sshd.host, script], cols=123, rows=45)
    try:
        p.expect("45 123")
        p.expect("ready")
        p.resize(77, 19)
        p.expect("19 77")
        p.send(b"\x03")
        p.expect("got-INT")
        assert p.wait() == 7, p.text
    finally:
        p.kill()
    assert "Shared connection to" in p.text


def test_no_pty_granted_falls_back_without_one(daemon, sshd):
    sshd.add_sshd_options(PermitTTY="no")
    sshd.start()
    start_socket(daemon)
    r = mux_ssh(daemon, "-tt", sshd.host, "tty; echo done")
    assert r.returncode == 0, r
    assert b"not a tty" in r.stdout and b"done" in r.stdout


def test_fifty_passengers_at_once(daemon, sshd):
    start_socket(daemon)
    procs = [subprocess.Popen(["ssh", *ssh_opts(daemon), sshd.host, f"sleep 6; echo n{i}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=daemon.env) for i in range(50)]
    try:
        wait_passengers(daemon, 50, timeout=30)
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=CMD_TIMEOUT)
            assert (p.returncode, out) == (0, f"n{i}\n".encode()), err
    finally:
        for p in procs:
            p.kill()
    assert sshd.sshd_log.read_text().count("Accepted publickey") == 2


def test_the_connection_killed_under_passengers_then_the_next_one_rides(daemon, sshd):
    start_socket(daemon)
    procs = [subprocess.Popen(["ssh", *ssh_opts(daemon), sshd.host, "sleep 60"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=daemon.env) for _ in range(3)]
    try:
        wait_passengers(daemon, 3)
        sshd.kill_connections()
        for p in procs:
            _, err = p.communicate(timeout=CMD_TIMEOUT)
            assert p.returncode == 255, err
            assert b"tunneld: the connection to testhost was lost" in err, err
    finally:
        for p in procs:
            p.kill()
    # held while the host is in backoff, then riding the new connection
    r = mux_ssh(daemon, sshd.host, "echo again")
    assert (r.returncode, r.stdout) == (0, b"again\n"), r


def test_a_passenger_gone_ends_its_session(daemon, sshd):
    start_socket(daemon)
    p = subprocess.Popen(["ssh", *ssh_opts(daemon), sshd.host, "echo running; sleep 300"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=daemon.env)
    wait_passengers(daemon, 1)
    # its session is open and its command runs (a passenger is listed as soon as it asks,
    # before the server confirmed its session: an ssh gone then has nothing to end)
    assert p.stdout is not None and select.select([p.stdout], [], [], CMD_TIMEOUT)[0], \
        "the passenger's command did not start"
    assert p.stdout.readline() == b"running\n"
    p.kill()
    p.wait(10)
    wait_passengers(daemon, 0)
    daemon.wait_for(lambda: "ended (tunneld: its ssh went away): echo running; sleep 300"
                    in daemon.log(None),
                    10, "the passenger's end")


def test_stopped_then_killed_daemon_ssh_makes_its_own_connection(daemon, sshd):
    sock = start_socket(daemon)
    p = subprocess.Popen(["ssh", *ssh_opts(daemon), sshd.host, "sleep 60"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=daemon.env)
    wait_passengers(daemon, 1)
    assert daemon.stop() == 0
    _, err = p.communicate(timeout=CMD_TIMEOUT)
    assert p.returncode == 255 and b"tunneld: tunneld is stopping" in err, err
    assert not sock.exists()
    # tunneld down: ssh silently makes its own connection
    r = mux_ssh(daemon, sshd.host, "echo own")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"own\n", b""), r
    # killed: a stale socket costs one line, then ssh connects itself; the next daemon
    # clears it
    daemon.start()
    start_socket(daemon)
    daemon.kill9()
    r = mux_ssh(daemon, sshd.host, "echo own again")
    assert r.returncode == 0 and r.stdout == b"own again\n", r
    assert b"Connection refused" in r.stderr
    daemon.start()
    assert not sock.exists()


def test_a_passenger_answers_the_login_on_its_terminal(adaemon, authserver):  # noqa: F811
    r = adaemon.ctl("add", "--no-prompt", ALIAS, str(_free()), check=False)
    adaemon.wait_for(lambda: adaemon.host(ALIAS)["state"] == "needs-auth", 20, "needs-auth")
    sock = mux_path(adaemon, ALIAS)
    opts = ["-F", str(adaemon.server.ssh_config), "-o", f"ControlPath={sock}", "-o",
            "ControlMaster=no", "-o", "BatchMode=yes"]
    # without a terminal: refused, and ssh's own login fails as it would (BatchMode)
    r = subprocess.run(["ssh", *opts, ALIAS, "echo hi"], stdin=subprocess.DEVNULL,
                       capture_output=True, env=adaemon.env, timeout=CMD_TIMEOUT)
    assert r.returncode == 255 and b"needs" in r.stderr, r
    p = PtySsh(adaemon.env, [*opts, ALIAS, "echo hi"])
    try:
        p.expect("(authhost) Password: ")
        p.send(PASSWORD.encode() + b"\n")
        p.expect("Verification code: ")
        p.send(CODE.encode() + b"\n")
        p.expect("authserver ran: echo hi")
        assert p.wait() == 0, p.text
    finally:
        p.kill()
    assert PASSWORD not in p.text and CODE not in p.text, "a secret was echoed"
    assert adaemon.host(ALIAS)["state"] == "connected"


def _free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    assert s.recv(12) == struct.pack(">III", 8, 1, 4)     # the master's HELLO, version 4
    return s


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_garbage_on_the_socket_drops_only_that_client(daemon, sshd):
    sock = start_socket(daemon)
    hello = struct.pack(">III", 8, 1, 4)
    for junk in (b"\x00\x00\x00\x08garbage!",                     # not a HELLO
                 b"\xff\xff\xff\xff",                              # a 4 GiB message
                 hello + struct.pack(">II", 4, 0x10000004),       # no request id
                 struct.pack(">III", 8, 0x10000004, 0),            # a request before HELLO
                 hello + struct.pack(">IIIII", 16, 0x10000002, 1, 0, 0),  # a cut session
                 hello + struct.pack(">III", 8, 1, 3)):             # version 3
        s = _raw(sock)
        s.sendall(junk)
        assert _closed(s), junk
        s.close()
    # a session request without its descriptors
    s = _raw(sock)
    body = struct.pack(">III", 0x10000002, 1, 0) + struct.pack(">IIIII", 0, 0, 0, 0,
                                                               0xFFFFFFFF)
    body += struct.pack(">I", 0) + struct.pack(">I", 4) + b"true"
    s.sendall(hello + struct.pack(">I", len(body)) + body + b"\0")
    assert _closed(s)
    s.close()
    assert "dropped" in daemon.log(None)
    # an unknown request is answered, and the client may go on
    s = _raw(sock)
    s.sendall(hello + struct.pack(">III", 8, 0x10000077, 5))
    n, kind, rid = struct.unpack(">III", s.recv(12))
    assert (kind, rid) == (0x80000003, 5)
    assert b"does not support" in s.recv(n - 8)
    s.close()
    r = mux_ssh(daemon, sshd.host, "echo fine")
    assert (r.returncode, r.stdout) == (0, b"fine\n")
    assert daemon.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to connect as another uid")
def test_another_uid_is_refused(daemon, sshd):
    """A process of another uid that can reach the socket (here: with CAP_DAC_OVERRIDE) is
    dropped before the HELLO; ssh would then make its own connection."""
    sock = start_socket(daemon)
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10); "
            f"s.connect({str(sock)!r}); print(repr(s.recv(100)))")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
                        sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "b''", r.stdout
    assert "refused a client of uid 65534" in daemon.log(None)
