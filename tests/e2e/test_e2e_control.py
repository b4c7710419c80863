"""The control socket against a running tunneld: raw protocol abuse, permissions, one daemon
per user, stale sockets, stop, autostart and config errors.

Raw tests talk to ``daemon.socket`` with the standard ``socket`` module, as any client could.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunneld import __version__, wire

RECV_TIMEOUT = 10.0


# -- helpers -------------------------------------------------------------------------------------

def connect(path: Path, timeout: float = RECV_TIMEOUT) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


class Lines:
    """Read newline-terminated replies from a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self) -> dict | None:
        """The next final reply (progress lines skipped), or None on EOF."""
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            assert isinstance(msg, dict), msg
            if "ok" in msg:
                return msg
            assert "message" in msg, msg  # a progress line


def exchange(sock: socket.socket, lines: Lines, payload: bytes) -> dict | None:
    sock.sendall(payload)
    return lines.read()


def status_request() -> bytes:
    return json.dumps({"cmd": "status", "proto": 1, "args": {}}).encode() + b"\n"


def assert_status_ok(reply: dict | None) -> dict:
    assert reply is not None, "daemon closed the connection instead of answering"
    assert reply["ok"] is True, reply
    assert reply["version"] == __version__
    assert reply["result"]["version"] == __version__
    return reply["result"]


def raw_status(daemon) -> dict:
    with connect(daemon.socket) as s:
        return assert_status_ok(exchange(s, Lines(s), status_request()))


def assert_error(reply: dict | None, type_: str | None = None) -> dict:
    assert reply is not None, "daemon closed the connection instead of answering"
    assert reply["ok"] is False, reply
    assert reply["version"] == __version__, reply
    err = reply["error"]
    assert isinstance(err["message"], str) and err["message"], reply
    if type_:
        assert err["type"] == type_, reply
    return err


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited: it only waits for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return proc_state(pid) not in (None, "Z")


def wait_gone(pid: int, timeout: float = 15) -> bool:
    """Wait until ``os.kill(pid, 0)`` raises ProcessLookupError (exited and reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` from /proc (``Z`` for a zombie), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def run_tunneld(env: dict, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunneld", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def run_ctl(env: dict, *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnelctl", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


# -- raw protocol --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_malformed_json_then_valid_request_on_same_connection(daemon):
    with connect(daemon.socket) as s:
        lines = Lines(s)
        err = assert_error(exchange(s, lines, b"{this is not json\n"), "ProtocolError")
        assert "JSON" in err["message"]
        assert_status_ok(exchange(s, lines, status_request()))
        # and more garbage, then a good one again: the connection stays usable
        assert_error(exchange(s, lines, b"\xff\xfe\n"), "ProtocolError")
        assert_error(exchange(s, lines, b"[1, 2, 3]\n"), "ProtocolError")
        assert_error(exchange(s, lines, b"\n"), "ProtocolError")
        assert_status_ok(exchange(s, lines, status_request()))


@pytest.mark.timeout(60)
def test_several_requests_in_one_write(daemon):
    with connect(daemon.socket) as s:
        lines = Lines(s)
        s.sendall(status_request() + b"nonsense\n" + status_request())
        assert_status_ok(lines.read())
        assert_error(lines.read(), "ProtocolError")
        assert_status_ok(lines.read())


@pytest.mark.timeout(60)
def test_unknown_command_names_known_commands(daemon):
    with connect(daemon.socket) as s:
        lines = Lines(s)
        req = json.dumps({"cmd": "frobnicate", "proto": 1, "args": {}}).encode() + b"\n"
        err = assert_error(exchange(s, lines, req), "ProtocolError")
        assert "frobnicate" in err["message"]
        for cmd in ("add", "list", "status", "stop"):
            assert cmd in err["message"], err
        assert_status_ok(exchange(s, lines, status_request()))


BAD_REQUESTS = {
    "add-types": {"cmd": "add", "proto": 1, "args": {"host": 5, "specs": "x"}},
    "add-specs-string": {"cmd": "add", "proto": 1, "args": {"host": "testhost", "specs": "8090"}},
    "add-spec-int": {"cmd": "add", "proto": 1, "args": {"host": "testhost", "specs": [5]}},
    "add-nulls": {"cmd": "add", "proto": 1, "args": {"host": None, "specs": None}},
    "add-no-args": {"cmd": "add", "proto": 1, "args": {}},
    "args-list": {"cmd": "add", "proto": 1, "args": ["testhost", "8090"]},
    "args-string": {"cmd": "status", "proto": 1, "args": "x"},
    "remove-types": {"cmd": "remove", "proto": 1, "args": {"host": ["a"], "specs": 3}},
    "remove-unknown-host": {"cmd": "remove", "proto": 1, "args": {"host": "nosuchhost"}},
    "reconnect-int": {"cmd": "reconnect", "proto": 1, "args": {"host": 7}},
    "cmd-int": {"cmd": 5, "proto": 1, "args": {}},
    "no-cmd": {"proto": 1, "args": {}},
    "proto-99": {"cmd": "status", "proto": 99, "args": {}},
}


@pytest.mark.timeout(60)
def test_wrong_types_get_error_replies(daemon):
    """Each bad request gets one error reply (not an internal error) on a connection that stays
    usable, and the daemon neither crashes nor logs a traceback."""
    problems = []
    with connect(daemon.socket) as s:
        lines = Lines(s)
        for name, request_ in BAD_REQUESTS.items():
            reply = exchange(s, lines, json.dumps(request_).encode() + b"\n")
            if reply is None:
                pytest.fail(f"{name}: the daemon closed the connection\n{daemon.log()}")
            err = assert_error(reply)
            if "internal error" in err["message"]:
                problems.append(f"{name}: reported as an internal error: {err}")
            assert_status_ok(exchange(s, lines, status_request()))
    assert daemon.proc.poll() is None
    assert not problems, "\n".join(problems)
    assert "Traceback" not in daemon.log(), daemon.log()
    # nothing was added by the bad requests
    assert daemon.list()["hosts"] == []


@pytest.mark.timeout(60)
def test_every_reply_carries_version(daemon):
    requests = [
        status_request(),
        b'{"cmd":"list","proto":1,"args":{}}\n',
        b"garbage\n",
        b'{"cmd":"nope"}\n',
        b'{"cmd":"remove","proto":1,"args":{"host":"nosuchhost"}}\n',
    ]
    with connect(daemon.socket) as s:
        lines = Lines(s)
        for req in requests:
            reply = exchange(s, lines, req)
            assert reply is not None
            assert reply.get("version") == __version__, (req, reply)


@pytest.mark.timeout(60)
def test_oversized_line_is_refused_and_daemon_survives(daemon):
    s = connect(daemon.socket, timeout=20)
    try:
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent <= wire.MAX_LINE + len(chunk):
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon gave up on us mid-stream: allowed
        try:
            reply = Lines(s).read()
        except (ConnectionResetError, BrokenPipeError):
            reply = None
        if reply is not None:
            err = assert_error(reply, "ProtocolError")
            assert str(wire.MAX_LINE) in err["message"] or "long" in err["message"], err
    finally:
        s.close()
    assert daemon.proc.poll() is None, daemon.log()
    raw_status(daemon)
    daemon.ctl("status")


@pytest.mark.timeout(60)
def test_oversized_line_with_newline(daemon):
    with connect(daemon.socket, timeout=20) as s:
        try:
            s.sendall(b'{"cmd":"status","pad":"' + b"y" * (wire.MAX_LINE + 10) + b'"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = Lines(s).read()
        except (ConnectionResetError, BrokenPipeError):
            reply = None
        if reply is not None:
            assert_error(reply, "ProtocolError")
    raw_status(daemon)


@pytest.mark.timeout(60)
def test_half_written_line_then_close(daemon):
    for partial in (b'{"cmd":"stat', b'{"cmd":"status","proto":1,"args":{}}', b"\xff"):
        s = connect(daemon.socket)
        s.sendall(partial)
        s.close()
    s = connect(daemon.socket)
    s.sendall(b'{"cmd":"add","proto":1,"args":{"host":"testhost","specs":["80')
    s.shutdown(socket.SHUT_WR)
    # the line that ends without its newline is answered as such, then the connection closes
    lines = Lines(s)
    err = assert_error(lines.read(), "ProtocolError")
    assert "incomplete line" in err["message"], err
    assert lines.read() is None
    s.close()
    raw_status(daemon)   # the daemon serves on
    assert daemon.proc.poll() is None, daemon.log()
    daemon.ctl("status")
    assert daemon.list()["hosts"] == []


@pytest.mark.timeout(60)
def test_silent_client_does_not_block_others(daemon):
    silent = [connect(daemon.socket) for _ in range(3)]
    half = connect(daemon.socket)
    half.sendall(b'{"cmd":"sta')  # a partial line that never completes
    try:
        for _ in range(3):
            t0 = time.monotonic()
            r = daemon.ctl("status", timeout=10)
            assert r.returncode == 0
            assert time.monotonic() - t0 < 5
            raw_status(daemon)
    finally:
        for s in silent + [half]:
            s.close()


@pytest.mark.timeout(60)
def test_socket_and_directory_permissions(daemon):
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.getuid()
    dst = os.stat(daemon.socket.parent)
    assert stat.S_IMODE(dst.st_mode) == 0o700, oct(dst.st_mode)
    assert dst.st_uid == os.getuid()


# -- one daemon per user, stale sockets, stop ----------------------------------------------------

@pytest.mark.timeout(60)
def test_second_daemon_refuses_to_start(daemon):
    before = raw_status(daemon)
    r = run_tunneld(daemon.env, timeout=20)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "another tunneld" in r.stderr and "running" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    # the first one is untouched and still owns its socket
    assert daemon.proc.poll() is None
    after = raw_status(daemon)
    assert after["pid"] == before["pid"] == daemon.pid
    daemon.ctl("status")


@pytest.mark.timeout(60)
def test_stale_socket_after_kill9_is_cleared(daemon):
    old_pid = daemon.pid
    daemon.kill9()
    assert daemon.socket.exists(), "a SIGKILLed daemon cannot remove its socket"
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)
    r = daemon.ctl("status", check=False, timeout=10)
    assert r.returncode == 3, (r.stdout, r.stderr)
    daemon.start()
    assert daemon.pid != old_pid
    st = daemon.ctl("status", "--json")
    assert json.loads(st.stdout)["pid"] == daemon.pid
    assert raw_status(daemon)["pid"] == daemon.pid
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


@pytest.mark.timeout(60)
def test_stop_then_status_exits_3(daemon):
    """`tunnelctl stop` returns once the daemon has exited, even while the daemon's parent (here:
    this test, as a supervisor or a container's pid 1 would be) has not reaped it yet."""
    pid = daemon.pid
    t0 = time.monotonic()
    ctl = subprocess.Popen([sys.executable, "-m", "tunnelctl", "stop"], env=daemon.env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    exited_after = "?"  # seconds until the daemon had exited (a zombie, not yet reaped)
    while ctl.poll() is None and time.monotonic() - t0 < 40:
        if exited_after == "?" and proc_state(pid) == "Z":
            exited_after = f"{time.monotonic() - t0:.2f}"
        time.sleep(0.02)
    out, err = ctl.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert daemon.proc.wait(timeout=20) == 0, daemon.log()
    assert ctl.returncode == 0, (
        f"tunnelctl stop exited {ctl.returncode} after {elapsed:.1f}s although tunneld "
        f"(pid {pid}) had exited after {exited_after}s (a zombie until its parent reaps it)"
        f"\nstdout: {out}\nstderr: {err}")
    assert str(pid) in out
    assert elapsed < 10
    assert not alive(pid)
    assert not daemon.socket.exists(), "a cleanly stopped daemon removes its socket"
    r = daemon.ctl("status", check=False, timeout=10)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "not running" in r.stderr
    # stopping again is not an error
    assert daemon.ctl("stop", check=False, timeout=10).returncode == 0


@pytest.mark.timeout(60)
def test_stop_with_open_connections_logs_no_traceback(daemon):
    """Clients still connected when the daemon stops (the `stop` caller itself, an idle one) are
    an expected situation: no traceback in the log (house rule 12)."""
    idle = connect(daemon.socket)
    s = connect(daemon.socket)
    try:
        reply = exchange(s, Lines(s), b'{"cmd":"stop","proto":1,"args":{}}\n')
        assert reply is not None and reply["ok"] is True, reply
        assert daemon.proc.wait(timeout=20) == 0, daemon.log()
    finally:
        s.close()
        idle.close()
    log = daemon.log()
    assert "stopped" in log
    assert "Traceback" not in log and "CancelledError" not in log, log


# -- autostart ----------------------------------------------------------------------------------

def _autostart_env(daemon) -> dict:
    env = dict(daemon.env)
    env.pop("TUNNELD_NO_AUTOSTART", None)
    return env


def tunneld_pids(env: dict) -> list[int]:
    """Live (non-zombie) `python -m tunneld` processes whose XDG_RUNTIME_DIR is ``env``'s.

    That directory is unique to the test, so these are exactly the daemons it started,
    directly or through tunnelctl's autostart.
    """
    marker = f"XDG_RUNTIME_DIR={env['XDG_RUNTIME_DIR']}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"tunneld" not in argv:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if marker in environ and proc_state(int(entry)) not in (None, "Z"):
            found.append(int(entry))
    return found


def _stop_autostarted(env: dict) -> None:
    """Teardown: stop every daemon this test's env started; none may be left running."""
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        pids = tunneld_pids(env)
        if not pids:
            return
        if run_ctl(env, "status", timeout=10).returncode == 0:
            run_ctl(env, "stop", timeout=30)
        time.sleep(0.1)
    for pid in tunneld_pids(env):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_autostart(daemon):
    assert daemon.stop() == 0, daemon.log()
    env = _autostart_env(daemon)
    try:
        r = run_ctl(env, "list")
        assert r.returncode == 0, (r.stdout, r.stderr)
        st = run_ctl(env, "status", "--json", timeout=10)
        assert st.returncode == 0, st.stderr
        pid = json.loads(st.stdout)["pid"]
        assert pid != daemon.pid
        assert alive(pid)
        r = run_ctl(env, "list", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["hosts"] == []
        r = run_ctl(env, "stop", timeout=30)
        assert r.returncode == 0, (r.stdout, r.stderr)
        running = alive(pid)
        t0 = time.monotonic()
        while alive(pid) and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        assert not running, (
            f"tunnelctl stop returned while tunneld (pid {pid}) was still running; it ran on "
            f"for {time.monotonic() - t0:.3f}s more (it frees its lock before it exits)")
        r = run_ctl(env, "status", timeout=10)
        assert r.returncode == 3
        # an autostarted daemon is detached from tunnelctl: init reaps it
        assert wait_gone(pid), f"tunneld pid {pid} still exists"
    finally:
        _stop_autostarted(env)


@pytest.mark.timeout(60)
def test_concurrent_autostart_gives_one_daemon(daemon):
    assert daemon.stop() == 0, daemon.log()
    env = _autostart_env(daemon)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "tunnelctl", "list"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for p in procs:
            out, err = p.communicate(timeout=40)
            assert p.returncode == 0, (out, err)
        st = run_ctl(env, "status", "--json", timeout=10)
        pid = json.loads(st.stdout)["pid"]
        lock = daemon.socket.with_name(daemon.socket.name + ".lock")
        assert lock.read_text().strip() == str(pid)
        # the losers of the start race give up by themselves while the winner runs
        deadline = time.monotonic() + 20
        while tunneld_pids(env) != [pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tunneld_pids(env) == [pid]
    finally:
        _stop_autostarted(env)


SLOW_START = """\
import os, time
if os.environ.get("TUNNELD_TEST_SLOW_START"):
    with open("/proc/self/cmdline", "rb") as f:
        if b"tunneld" in f.read().split(b"\\0"):
            time.sleep(float(os.environ["TUNNELD_TEST_SLOW_START"]))
"""


@pytest.mark.timeout(60)
def test_autostart_leaves_no_straggler_daemon(daemon, tmp_path):
    """`tunnelctl` autostarts a daemon, but another daemon comes up first and answers; once the
    command returned and that daemon is stopped, no daemon may start up by itself later.

    The spawned daemon is made slow to start (a sitecustomize sleeping 3 s in `tunneld`
    processes only), as on a loaded machine with a cold disk cache.
    """
    assert daemon.stop() == 0, daemon.log()
    slow = tmp_path / "slowstart"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_START)
    env = _autostart_env(daemon)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(slow), env.get("PYTHONPATH")]))
    env["TUNNELD_TEST_SLOW_START"] = "3"
    try:
        client = subprocess.Popen([sys.executable, "-m", "tunnelctl", "list"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not tunneld_pids(env) and time.monotonic() < deadline:
            time.sleep(0.02)
        spawned = tunneld_pids(env)
        assert len(spawned) == 1, "tunnelctl did not start a daemon"
        daemon.start()  # the regular daemon wins the race while the spawned one is starting
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, (out, err)
        assert daemon.stop() == 0, daemon.log()
        # give the spawned daemon time to finish starting (3 s sleep + imports)
        deadline = time.monotonic() + 10
        while tunneld_pids(env) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = tunneld_pids(env)
        r = run_ctl(env, "status", timeout=10)
        assert not left and r.returncode == 3, (
            f"a daemon spawned by `tunnelctl list` (pid {spawned[0]}) was still starting when "
            f"tunnelctl returned (it had connected to another daemon, pid {daemon.pid}); after "
            f"that daemon stopped, it is still running (pids {left}) and `tunnelctl status` "
            f"exits {r.returncode}: {r.stdout.strip()}")
    finally:
        _stop_autostarted(env)


# -- config errors ------------------------------------------------------------------------------

BAD_CONFIG = "[defaults]\nkeepalive_interval = 5\nbogus_key = 1\n"


@pytest.mark.timeout(60)
def test_bad_config_tunneld_exits_1(daemon):
    assert daemon.stop() == 0, daemon.log()
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(BAD_CONFIG)
    r = run_tunneld(daemon.env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"{daemon.config_file}:3" in r.stderr, r.stderr
    assert "bogus_key" in r.stderr
    assert "Traceback" not in r.stderr
    assert not daemon.socket.exists()


@pytest.mark.timeout(60)
def test_bad_config_autostart_reports_it(daemon):
    assert daemon.stop() == 0, daemon.log()
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(BAD_CONFIG)
    env = _autostart_env(daemon)
    try:
        t0 = time.monotonic()
        r = run_ctl(env, "list")
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert f"{daemon.config_file}:3" in r.stderr, r.stderr
        assert "bogus_key" in r.stderr
        assert "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 10, "a daemon that exits at once must be reported fast"
        assert run_ctl(env, "status", timeout=10).returncode == 3
        # fixed config: autostart works again
        daemon.config_file.write_text("[defaults]\nkeepalive_interval = 5\n")
        r = run_ctl(env, "list")
        assert r.returncode == 0, (r.stdout, r.stderr)
    finally:
        _stop_autostarted(env)
