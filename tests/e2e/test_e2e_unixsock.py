"""Local forwards to a Unix-domain socket on the server (issue 17), end to end against the
real sshd: ``LPORT:/abs/path.sock`` and ``LPORT:~/rel.sock`` carry bytes like any forward;
a socket sshd cannot reach (missing, another uid's, ``AllowStreamLocalForwarding no``) is a
reset for the client and a clear error naming the path and the server setting.

What OpenSSH 9.2 answers: CONNECT_FAILED "open failed" in every refused case; its log says
"connect to PATH port -2 failed: No such file or directory" / "Permission denied", or
"refused streamlocal port forward" for ``AllowStreamLocalForwarding no``.  It does not expand
``~`` (tunneld does, from the server's ``$HOME``: the fixture's server-home)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import Daemon
from netutil import roundtrip

from tunneld.fastpath import gate

pytestmark = pytest.mark.timeout(120)

PATHS = ["fastpath", "stock"] if gate.current.active else ["stock"]

HELD = """
[defaults]
keepalive_interval = 1
keepalive_count_max = 2
connect_timeout = 5
hold_timeout = 40
"""


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.accepted += 1  # type: ignore[attr-defined]
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class UnixEcho:
    """A threaded echo server on the Unix socket ``path`` (its directory must exist)."""

    def __init__(self, path: Path, mode: int | None = None) -> None:
        assert len(str(path).encode()) <= 107, f"socket path too long for the test: {path}"
        self.path = path
        self.server = socketserver.ThreadingUnixStreamServer(str(path), _Echo)
        self.server.daemon_threads = True
        self.server.accepted = 0  # type: ignore[attr-defined]
        if mode is not None:
            os.chmod(path, mode)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def accepted(self) -> int:
        return self.server.accepted  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def unix_echo():
    servers: list[UnixEcho] = []

    def factory(path: Path, mode: int | None = None) -> UnixEcho:
        servers.append(UnixEcho(path, mode))
        return servers[-1]
    yield factory
    for s in servers:
        s.close()


@pytest.fixture
def private_dir():
    """A 0700 directory of root's under /tmp (short: a socket path has at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="td-s", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _home_sockdir(sshd) -> Path:
    """A 0700 directory under the server's HOME (the fixture's server-home, not the real
    one): where ``~/s/…`` points."""
    d = sshd.server_home / "s"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _transfer(port: int, payload: bytes, timeout: float = 60) -> bytes:
    """Send ``payload`` (from a thread: the echo comes back while it is sent), half-close,
    return all that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=send)
        t.start()
        got = bytearray()
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += data
        t.join(timeout)
    return bytes(got)


def _reset(port: int) -> bool:
    """True if a client of ``port`` is reset (not served, not closed with a FIN)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
    except ConnectionResetError:
        # the reset came before connect() returned (a connect with a timeout is a
        # non-blocking one: its SO_ERROR is then ECONNRESET) — reset all the same
        return True
    with s:
        try:
            s.sendall(b"hello\n")
            data = s.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return True
    assert data == b"", f"the client was served: {data!r}"
    return False


def _start(sshd, path: str = "stock") -> Daemon:
    d = Daemon(sshd, extra_env={"TUNNELD_STOCK_ASYNCSSH": "1"} if path == "stock" else {})
    d.start()
    return d


@pytest.fixture(params=PATHS)
def data_daemon(request, sshd):
    d = _start(sshd, request.param)
    try:
        yield d
    finally:
        d.close()


# -- the data path --------------------------------------------------------------------------


def test_absolute_and_home_paths_carry_bytes_exactly(data_daemon, sshd, private_dir,
                                                     unix_echo, free_port):
    d = data_daemon
    abs_srv = unix_echo(private_dir / "a.sock")
    home_srv = unix_echo(_home_sockdir(sshd) / "h.sock")
    p_abs, p_home = free_port(), free_port()
    r = d.ctl("add", sshd.host, f"{p_abs}:{abs_srv.path}", f"127.0.0.1:{p_home}:~/s/h.sock")
    assert f"{p_abs}:{abs_srv.path}" in r.stdout and f"{p_home}:~/s/h.sock" in r.stdout
    payload = os.urandom(3 * 1024 * 1024 + 7)
    for port in (p_abs, p_home):
        got = _transfer(port, payload)
        assert len(got) == len(payload)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert roundtrip(p_home, b"again") == b"again"   # the home is known: no second question
    assert (abs_srv.accepted, home_srv.accepted) == (1, 2)
    d.wait_for(lambda: all(d.forward(p)["active"] == 0 for p in (p_abs, p_home)),
               what="the connections to close")
    fa, fh = d.forward(p_abs), d.forward(p_home)
    assert (fa["spec"], fa["kind"], fa["target"], fa["target_path"]) == \
        (f"{p_abs}:{abs_srv.path}", "local", str(abs_srv.path), str(abs_srv.path))
    assert (fh["spec"], fh["target"], fh["target_path"]) == \
        (f"{p_home}:~/s/h.sock", "~/s/h.sock", "~/s/h.sock")
    assert fa["bytes_out"] == fa["bytes_in"] == len(payload) and fa["total"] == 1
    assert fh["bytes_out"] == fh["bytes_in"] == len(payload) + 5 and fh["total"] == 2
    assert fa["last_error"] is None and fh["last_error"] is None
    assert fa["listen"] == f"127.0.0.1:{p_abs}" and fa["state"] == "listening"
    table = d.ctl("list").stdout
    assert f"{p_home}:~/s/h.sock" in table and str(abs_srv.path) in table


def test_held_client_reaches_the_socket_once_the_host_is_back(sshd, fault_proxy, private_dir,
                                                              unix_echo, free_port):
    d = Daemon(sshd)
    d.config_file.parent.mkdir(parents=True, exist_ok=True)
    d.config_file.write_text(HELD)
    d.start()
    try:
        srv = unix_echo(_home_sockdir(sshd) / "held.sock")
        port = free_port()
        d.ctl("add", "flaky", f"{port}:~/s/held.sock")
        assert roundtrip(port, b"before") == b"before"
        fault_proxy.close_listener()
        fault_proxy.reset()
        d.wait_for(lambda: d.host("flaky")["state"] != "connected", what="the outage")
        served: list[bytes] = []
        client = threading.Thread(target=lambda: served.append(
            roundtrip(port, b"held", timeout=60)))
        client.start()
        d.wait_for(lambda: d.forward(port, "flaky")["active"] == 1, what="a held client")
        fault_proxy.open_listener()
        client.join(60)
        assert served == [b"held"]
        assert srv.accepted == 2
        assert d.forward(port, "flaky")["last_error"] is None
    finally:
        d.close()


def test_specs_survive_the_state_file_and_the_config(sshd, daemon, private_dir, unix_echo,
                                                     free_port):
    d = daemon
    srv = unix_echo(private_dir / "st.sock")
    unix_echo(_home_sockdir(sshd) / "st.sock")
    p1, p2, p3 = free_port(), free_port(), free_port()
    d.ctl("add", sshd.host, f"{p1}:{srv.path}", f"{p2}:~/s/st.sock")
    saved = json.loads(d.state_file.read_text())["hosts"][sshd.host]
    assert sorted(saved) == sorted([f"{p1}:{srv.path}", f"{p2}:~/s/st.sock"])
    assert d.stop() == 0
    d.config_file.parent.mkdir(parents=True, exist_ok=True)
    d.config_file.write_text(f'[hosts.{sshd.host}]\nforwards = ["{p3}:~/s/st.sock"]\n')
    d.start()
    by_spec = {f["spec"]: f for f in d.host()["forwards"]}
    assert set(by_spec) == {f"{p1}:{srv.path}", f"{p2}:~/s/st.sock", f"{p3}:~/s/st.sock"}
    assert by_spec[f"{p3}:~/s/st.sock"]["origin"] == "config"
    for port in (p1, p2, p3):   # a new connection: ~ is learnt again
        assert roundtrip(port, b"back %d" % port) == b"back %d" % port
    d.ctl("remove", sshd.host, f"{p1}:{srv.path}", f"{p2}:~/s/st.sock")
    assert json.loads(d.state_file.read_text())["hosts"] == {}


def test_a_spec_with_a_range_is_refused_before_anything_is_added(sshd, daemon, free_port):
    p = free_port()
    r = daemon.ctl("add", sshd.host, f"{p}-{p + 2}:/x.sock", check=False)
    assert r.returncode == 1 and "listens on one port" in r.stderr, r.stderr
    r = daemon.ctl("add", sshd.host, f"{p}:run/x.sock", check=False)
    assert r.returncode == 1 and "starts with / or ~/" in r.stderr, r.stderr
    assert daemon.list()["hosts"] == []


# -- refused opens --------------------------------------------------------------------------


def _refused(d: Daemon, host: str, port: int, path: str) -> str:
    """A client of the forward ``port`` is reset; returns the forward's error (also in the
    log), after checking it names ``path`` and the server setting."""
    assert _reset(port)
    d.wait_for(lambda: d.forward(port, host)["last_error"] is not None, what="the error")
    err = d.forward(port, host)["last_error"]
    assert path in err, err
    assert "`AllowStreamLocalForwarding no` (sshd_config)" in err, err
    assert "no such socket on the server" in err and "open failed" in err, err
    d.wait_for(lambda: err in d.log(tail=None), what="the error in the log")
    d.wait_for(lambda: d.forward(port, host)["active"] == 0, what="the client to be closed")
    assert d.forward(port, host)["state"] == "listening"
    return err


def test_a_missing_socket_is_a_reset_and_a_clear_error(sshd, daemon, private_dir, free_port):
    port, hport = free_port(), free_port()
    missing = private_dir / "missing.sock"
    daemon.ctl("add", sshd.host, f"{port}:{missing}", f"{hport}:~/s/none.sock")
    _refused(daemon, sshd.host, port, str(missing))
    err = _refused(daemon, sshd.host, hport, "~/s/none.sock")
    assert f"({sshd.server_home}/s/none.sock)" in err, err   # the path sshd was asked for
    assert "No such file or directory" in sshd.sshd_log.read_text()


def test_allow_stream_local_forwarding_no(sshd, private_dir, unix_echo, free_port):
    text = sshd.sshd_config.read_text()
    assert "AllowStreamLocalForwarding yes" in text
    sshd.sshd_config.write_text(text.replace("AllowStreamLocalForwarding yes",
                                             "AllowStreamLocalForwarding no"))
    sshd.start()
    srv = unix_echo(private_dir / "ok.sock")
    d = _start(sshd)
    try:
        port = free_port()
        d.ctl("add", sshd.host, f"{port}:{srv.path}")
        _refused(d, sshd.host, port, str(srv.path))
        assert srv.accepted == 0
        assert "refused streamlocal port forward" in sshd.sshd_log.read_text()
    finally:
        d.close()


@pytest.fixture
def other_user(sshd):
    """A throw-away user (removed at teardown) who may log in to ``sshd`` with the fixture's
    key, as the alias ``otheruid``: its authorized_keys are where that user can read them."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("another uid on the server needs root and useradd")
    name = f"tdsock{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True, timeout=30)  # a leftover
    # password "*": no password login, but not a locked account (sshd refuses those)
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", "-p", "*", name],
                   check=True, capture_output=True, timeout=30)
    keys = Path(tempfile.mkdtemp(prefix="td-k", dir="/tmp"))
    try:
        keys.chmod(0o755)
        shutil.copyfile(sshd.authorized_keys, keys / "authorized_keys")
        (keys / "authorized_keys").chmod(0o644)
        with sshd.sshd_config.open("a") as f:
            f.write(f"Match User {name}\n    AuthorizedKeysFile {keys}/authorized_keys\n")
        sshd.start()
        sshd.add_host_alias("otheruid", User=name)
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        shutil.rmtree(keys, ignore_errors=True)


def test_another_uid_cannot_reach_a_socket_in_a_private_directory(sshd, other_user,
                                                                  private_dir, unix_echo,
                                                                  free_port):
    """root's socket in root's 0700 directory is out of reach of another login on the server;
    the same socket in an open directory is not (the refusal is the directory's doing)."""
    private = unix_echo(private_dir / "p.sock", mode=0o777)
    public_dir = Path(tempfile.mkdtemp(prefix="td-o", dir="/tmp"))
    try:
        public_dir.chmod(0o755)
        public = unix_echo(public_dir / "o.sock", mode=0o777)
        d = _start(sshd)
        try:
            p_priv, p_pub = free_port(), free_port()
            d.ctl("add", "otheruid", f"{p_priv}:{private.path}", f"{p_pub}:{public.path}")
            assert roundtrip(p_pub, b"open dir") == b"open dir"
            err = _refused(d, "otheruid", p_priv, str(private.path))
            assert "not yours to reach" in err, err
            assert private.accepted == 0 and public.accepted == 1
            assert "Permission denied" in sshd.sshd_log.read_text()
        finally:
            d.close()
    finally:
        shutil.rmtree(public_dir, ignore_errors=True)


def test_a_home_the_server_does_not_say_is_a_clear_error(sshd, private_dir, unix_echo,
                                                         free_port):
    """A server that runs no command of ours (``ForceCommand``) cannot say its home: a ``~/``
    path is a reset and an error that says to write the absolute path; an absolute path to
    the same server works (streamlocal channels are not commands)."""
    sshd.add_sshd_options(ForceCommand="/bin/false")
    sshd.start()
    srv = unix_echo(private_dir / "f.sock")
    d = _start(sshd)
    try:
        p_home, p_abs = free_port(), free_port()
        d.ctl("add", sshd.host, f"{p_home}:~/s/f.sock", f"{p_abs}:{srv.path}")
        assert roundtrip(p_abs, b"absolute") == b"absolute"
        assert _reset(p_home)
        d.wait_for(lambda: d.forward(p_home)["last_error"] is not None, what="the error")
        err = d.forward(p_home)["last_error"]
        assert "~/s/f.sock" in err and "could not learn the home directory" in err, err
        assert "exited with status 1" in err and "absolute path" in err, err
        assert _reset(p_home)   # asked again: a failed answer is not kept
        assert roundtrip(p_abs, b"still") == b"still"
    finally:
        d.close()
