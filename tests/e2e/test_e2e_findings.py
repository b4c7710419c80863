"""What a new user and a fault soak found (issue 15), end to end against the real sshd: each
test failed before its fix.

- a client held during an outage keeps the retry schedule (no storm) and is served within
  about a second of the server's return; the log has one line per change, not per attempt;
- commands wait for the restore after a restart: the state file is never cut down;
- a transfer cut by the SSH connection ends with a reset, a normal end with a FIN;
- a state file that cannot be written (full disk) fails the command and changes nothing;
- autostart is not shadowed by a ``tunneld/`` folder in the current directory;
- a closed output pipe ends tunnelctl quietly;
- a forward's error is about its current state;
- `run` reports a command that cannot start; `add` refuses a host name that is a typo;
  `kill` of an ended session fails.
"""

from __future__ import annotations

import calendar
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from netutil import roundtrip

pytestmark = pytest.mark.timeout(150)

FAST = """
[defaults]
keepalive_interval = 1
keepalive_count_max = 2
connect_timeout = 5
hold_timeout = {hold}
"""


def restart_with(daemon, text: str) -> None:
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(text)
    assert daemon.stop() == 0
    daemon.start()


def attempts(daemon, host: str) -> int:
    return daemon.host(host)["attempts"]


def outage(d, fault_proxy, target: int, port: int, hold: float) -> None:
    """Restart ``d`` with short keepalives and ``hold_timeout = hold``, forward ``port`` to
    ``target`` through the ``flaky`` alias, then take the server away (its listener refuses,
    the live connection is reset) and wait until the daemon has noticed."""
    restart_with(d, FAST.format(hold=hold))
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{target}")
    fault_proxy.close_listener()
    fault_proxy.reset()
    d.wait_for(lambda: d.host("flaky")["state"] != "connected", what="the outage")


# -- 1. no retry storm --------------------------------------------------------------------------


def test_a_held_client_during_an_outage_keeps_to_the_schedule(sshd, daemon, fault_proxy,
                                                              echo_server, free_port):
    """A client held through a 20 s outage makes at most one attempt a second (the held
    cadence; 4,704 attempts before the fix), and is served about a second after the server
    is back; the log says once what failed, then how often."""
    d = daemon
    restart_with(d, FAST.format(hold=40))
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    assert roundtrip(port) == b"ping"
    fault_proxy.close_listener()
    fault_proxy.reset()
    d.wait_for(lambda: d.host("flaky")["state"] != "connected", what="the outage")
    before = attempts(d, "flaky")
    served: list[tuple[bytes, float]] = []
    client = threading.Thread(target=lambda: served.append(
        (roundtrip(port, b"held", timeout=60), time.monotonic())))
    client.start()
    d.wait_for(lambda: d.forward(port, "flaky")["active"] == 1, what="the client to be held")
    outage = 20.0
    time.sleep(outage)   # the outage itself: what is measured is what the daemon does in it
    during = attempts(d, "flaky") - before
    fault_proxy.open_listener()
    back = time.monotonic()
    client.join(30)
    assert served and served[0][0] == b"held"
    delay = served[0][1] - back
    print(f"{during} attempts in a {outage:g}s outage with a held client; served "
          f"{delay:.2f}s after the server came back")
    # one a second while held (Backoff.held_interval), plus the schedule's own few
    assert during <= outage / 1.0 + 4, during
    assert delay < 2.0, delay
    text = d.log(tail=None)
    failures = re.findall(r"flaky: connecting -> backoff", text)
    assert len(failures) <= 2, failures
    assert re.search(r"flaky: \d+ more attempts failed the same way", text), text[-3000:]
    assert "flaky: backoff -> connecting" not in text.split("connecting -> backoff")[-1] or \
        text.count("flaky: backoff -> connecting") <= 2


def test_without_a_client_the_schedule_backs_off(sshd, daemon, fault_proxy, echo_server,
                                                 free_port):
    """No client waiting: exponential backoff (0.5, 1, 2, 4, 8 s…): a handful of attempts
    in 12 s, and each identical failure after the first is only counted in the log."""
    d = daemon
    port = free_port()
    outage(d, fault_proxy, echo_server()[1], port, hold=10)
    before = attempts(d, "flaky")
    time.sleep(12)
    n = attempts(d, "flaky") - before
    print(f"{n} attempts in 12 s with nobody waiting")
    assert 2 <= n <= 6, n
    assert len(re.findall(r"flaky: connecting -> backoff", d.log(tail=None))) == 1
    fault_proxy.open_listener()


def test_the_first_retry_after_a_stable_connection_starts_at_the_bottom(sshd, daemon,
                                                                        fault_proxy,
                                                                        echo_server,
                                                                        free_port):
    d = daemon
    restart_with(d, FAST.format(hold=10))
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    fault_proxy.close_listener()
    fault_proxy.reset()
    # let the schedule climb (no client): 0.5 + 1 + 2 + 4 s
    before = attempts(d, "flaky")
    d.wait_for(lambda: attempts(d, "flaky") >= before + 4, timeout=30,
               what="the schedule to climb")
    fault_proxy.open_listener()
    assert roundtrip(port) == b"ping"   # a held client: served at once

    def stable() -> bool:
        """Connected for more than stable_after (10 s): ``since`` is the last transition."""
        h = d.host("flaky")
        since = calendar.timegm(time.strptime(h["since"], "%Y-%m-%dT%H:%M:%SZ"))
        return h["state"] == "connected" and time.time() - since > 11
    d.wait_for(stable, timeout=30, what="a stable connection")
    fault_proxy.reset()
    d.wait_for(lambda: d.host("flaky")["state"] != "connected", what="the loss")
    err = d.host("flaky")["last_error"] or ""
    m = re.search(r"retrying in ([\d.]+)s", err)
    assert m and float(m.group(1)) <= 0.6, err


# -- 2. commands wait for the restore -------------------------------------------------------------


def _free_range(n: int) -> int:
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise AssertionError("no free port range")


def _kill9_current(d) -> None:
    """kill -9 the daemon that answers now (after an autostart it is not ``d.proc``) and
    wait until it is gone (its lock is free)."""
    import fcntl
    import signal
    pid = json.loads(d.ctl("status", "--json").stdout)["pid"]
    os.kill(pid, signal.SIGKILL)
    lock = d.socket.with_name(d.socket.name + ".lock")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still holds the lock")


def _saved(daemon, host: str) -> list[str]:
    return json.loads(daemon.state_file.read_text())["hosts"].get(host, [])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,rounds", [(10, 10), (200, 4)])
def test_add_during_the_restore_after_kill_9_keeps_every_forward(sshd, daemon, echo_server,
                                                                 n, rounds):
    """kill -9, then an autostarting `add` (which reaches the new daemon while it restores):
    before the fix, `forwards.json` was rewritten with the few forwards restored so far, and
    an already-saved spec was bound twice (an orphan listener)."""
    d = daemon
    target = echo_server()[1]
    base = _free_range(n + rounds + 1)
    d.ctl("add", sshd.host, f"{base}-{base + n - 1}")
    auto = dict(d.env)
    auto.pop("TUNNELD_NO_AUTOSTART")
    expected = n
    try:
        for i in range(rounds):
            _kill9_current(d)
            # autostarts the daemon and arrives while it restores: a new spec, or (every
            # other round) one that is saved already
            spec = f"{base + n + i}:127.0.0.2:{target}" if i % 2 == 0 else str(base)
            r = subprocess.run([sys.executable, "-m", "tunnelctl", "add", sshd.host, spec],
                               env=auto, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            if i % 2 == 0:
                expected += 1
                assert "added" in r.stdout, r.stdout
            else:
                assert "already forwarded" in r.stdout, r.stdout
            listed = json.loads(d.ctl("list", "--json").stdout)
            (h,) = [h for h in listed["hosts"] if h["name"] == sshd.host]
            assert len(h["forwards"]) == expected, (i, len(h["forwards"]))
            assert sorted(_saved(d, sshd.host)) == sorted(f["spec"] for f in h["forwards"])
        log = (Path(d.env["XDG_STATE_HOME"]) / "tunneld" / "log" / "tunneld.log")
        text = log.read_text(errors="replace") if log.exists() else ""
        assert "could not restore forward" not in text
        assert not list(d.state_file.parent.glob(".forwards.json.*"))
    finally:
        d.ctl("stop", check=False)


def test_a_saved_forward_that_cannot_be_bound_at_start_stays_saved(sshd, daemon, free_port):
    """Its port is taken by another program when the daemon starts: it is not restored, but
    an unrelated `add` must not drop it from the state file; it comes back once the port is
    free again, and `remove` of it works meanwhile."""
    d = daemon
    a, b, c = free_port(), free_port(), free_port()
    d.ctl("add", sshd.host, str(a), str(b))
    assert d.stop() == 0
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", a))
    squatter.listen(1)
    try:
        d.start()
        assert [f["spec"] for f in d.host()["forwards"]] == [str(b)]
        d.ctl("add", sshd.host, str(c))
        assert sorted(_saved(d, sshd.host)) == sorted([str(a), str(b), str(c)])
    finally:
        squatter.close()
    assert d.stop() == 0
    d.start()
    assert sorted(f["spec"] for f in d.host()["forwards"]) == sorted([str(a), str(b), str(c)])
    # and while it is not bound, `remove` of it takes it out of the file
    assert d.stop() == 0
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", b))
    squatter.listen(1)
    try:
        d.start()
        r = d.ctl("remove", sshd.host, str(b))
        assert f"removed {b}" in r.stdout, r.stdout
        assert str(b) not in _saved(d, sshd.host)
    finally:
        squatter.close()


# -- 3. a cut transfer is a reset ------------------------------------------------------------------


class _Source:
    """Sends ``size`` bytes to each client (slowly enough that a cut lands mid-way), then
    closes: a download."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._send, args=(c,), daemon=True).start()

    def _send(self, c: socket.socket) -> None:
        chunk = b"x" * 65536
        sent = 0
        try:
            with c:
                while sent < self.size and not self.stop.is_set():
                    n = min(len(chunk), self.size - sent)
                    c.sendall(chunk[:n])
                    sent += n
                    if self.size > 10 << 20:
                        time.sleep(0.002)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _download(port: int, after: threading.Event | None = None) -> tuple[int, str]:
    """Read to the end: (bytes read, "eof" or "reset")."""
    n = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        while True:
            try:
                data = s.recv(1 << 20)
            except ConnectionResetError:
                return n, "reset"
            if not data:
                return n, "eof"
            n += len(data)
            if after is not None and n > 1 << 20:
                after.set()


@pytest.mark.parametrize("path", ["fast", "stock"])
@pytest.mark.parametrize("cut", ["reconnect", "server reset"])
def test_a_transfer_cut_by_the_connection_is_reset(sshd, fault_proxy, free_port, path, cut):
    from conftest import Daemon
    d = Daemon(sshd, {"TUNNELD_STOCK_ASYNCSSH": "1"} if path == "stock" else {})
    d.start()
    big, small = _Source(1 << 30), _Source(3 << 20)
    try:
        p1, p2 = free_port(), free_port()
        d.ctl("add", "flaky", f"{p1}:127.0.0.2:{big.port}", f"{p2}:127.0.0.2:{small.port}")
        # a normal end stays a FIN, with every byte
        assert _download(p2) == (3 << 20, "eof")
        going = threading.Event()
        result: list[tuple[int, str]] = []
        t = threading.Thread(target=lambda: result.append(_download(p1, going)))
        t.start()
        assert going.wait(30)
        if cut == "reconnect":
            d.ctl("reconnect", "flaky")
        else:
            fault_proxy.reset()
        t.join(60)
        n, how = result[0]
        assert how == "reset" and n < 1 << 30, result
    finally:
        big.close()
        small.close()
        d.close()


def test_a_transfer_cut_by_the_daemon_dying_is_reset(sshd, daemon, free_port):
    """kill -9: the kernel closes the daemon's sockets.  They are armed to reset
    (SO_LINGER 0) from the start and disarmed only for an orderly end, so the client still
    sees the transfer cut."""
    big = _Source(1 << 30)
    try:
        port = free_port()
        daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{big.port}")
        going = threading.Event()
        result: list[tuple[int, str]] = []
        t = threading.Thread(target=lambda: result.append(_download(port, going)))
        t.start()
        assert going.wait(30)
        daemon.kill9()
        t.join(60)
        assert result and result[0][1] == "reset", result
    finally:
        big.close()


def test_a_client_held_past_hold_timeout_is_reset(sshd, daemon, fault_proxy, free_port,
                                                  echo_server):
    d = daemon
    port = free_port()
    outage(d, fault_proxy, echo_server()[1], port, hold=1)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    fault_proxy.open_listener()


def test_many_held_clients_timing_out_write_a_line_and_a_count(sshd, daemon, fault_proxy,
                                                              free_port, echo_server):
    d = daemon
    port = free_port()
    outage(d, fault_proxy, echo_server()[1], port, hold=1)
    n = 300
    clients = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(n)]
    try:
        for c in clients:
            with pytest.raises(ConnectionResetError):
                c.recv(10)
    finally:
        for c in clients:
            c.close()
    d.wait_for(lambda: f"{n - 1} more clients failed the same way" in d.log(tail=None),
               timeout=15, what="the summary line")
    lines = [x for x in d.log(tail=None).splitlines() if "closed client" in x]
    assert len(lines) == 1, lines[:5]
    fault_proxy.open_listener()


# -- 4. a full disk fails the command -------------------------------------------------------------


def test_a_full_disk_fails_add_and_remove_and_changes_nothing(sshd, daemon, echo_server,
                                                              free_port):
    d = daemon
    state = d.state_file.parent
    target = echo_server()[1]
    a, b = free_port(), free_port()
    d.ctl("add", sshd.host, f"{a}:127.0.0.2:{target}")
    assert d.stop() == 0
    keep = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                        str(state)], capture_output=True, text=True)
    assert r.returncode == 0, f"this test mounts a small tmpfs (needs root): {r.stderr}"
    try:
        for name, data in keep.items():
            (state / name).write_bytes(data)
        d.start()
        filler = state / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range(10_000):    # 40 MB at most; the tmpfs has 256 KiB
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        r = d.ctl("add", sshd.host, f"{b}:127.0.0.2:{target}", check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "disk is full" in r.stderr and "nothing was added" in r.stderr, r.stderr
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", b), timeout=2).close()
        assert [f["listen"] for f in d.host()["forwards"]] == [f"127.0.0.1:{a}"]
        r = d.ctl("remove", sshd.host, str(a), check=False)
        assert r.returncode == 1 and "nothing was removed" in r.stderr, r.stderr
        assert roundtrip(a) == b"ping"
        filler.unlink()
        d.ctl("add", sshd.host, f"{b}:127.0.0.2:{target}")
        assert d.stop() == 0
        d.start()
        assert sorted(f["listen"] for f in d.host()["forwards"]) == \
            sorted([f"127.0.0.1:{a}", f"127.0.0.1:{b}"])
        assert not list(state.glob(".forwards.json.*"))
        assert d.stop() == 0
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_temp_files_left_by_a_killed_daemon_are_removed(sshd, daemon):
    d = daemon
    left = d.state_file.parent / ".forwards.json.k1ll3d9x"
    left.write_text("{")
    d.kill9()
    d.start()
    assert not left.exists()


# -- 5. autostart is not shadowed by the current directory -------------------------------------


def test_autostart_from_a_directory_holding_a_tunneld_folder(sshd, tmp_path):
    from conftest import Daemon
    d = Daemon(sshd)
    work = tmp_path / "work"
    (work / "tunneld").mkdir(parents=True)   # a clone of a project by that name, say
    env = dict(d.env)
    env.pop("TUNNELD_NO_AUTOSTART")
    tunnelctl = Path(sys.executable).with_name("tunnelctl")
    try:
        r = subprocess.run([str(tunnelctl), "list"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "ImportError" not in r.stderr
    finally:
        subprocess.run([str(tunnelctl), "stop"], cwd=work, env=env, capture_output=True,
                       timeout=60)


# -- 7. a closed pipe ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["sessions"],
                                  ["logs", "--daemon", "-n", "50"], ["--help"]])
def test_a_closed_output_pipe_ends_quietly(sshd, daemon, free_port, argv):
    d = daemon
    d.ctl("add", sshd.host, *[str(free_port()) for _ in range(30)])
    cmd = " ".join([sys.executable, "-m", "tunnelctl", *argv])
    for _ in range(5):
        r = subprocess.run(["sh", "-c", f"{cmd} | true"], env=d.env, capture_output=True,
                           text=True, timeout=30)
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# -- 8. errors are about the current state ---------------------------------------------------------


def test_a_forwards_error_is_about_its_current_state(sshd, daemon, fault_proxy, free_port):
    d = daemon
    restart_with(d, FAST.format(hold=1))
    port, tport = free_port(), free_port("127.0.0.2")
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{tport}")
    # nothing listens on the target: the client is reset, the error says why ...
    with pytest.raises(ConnectionResetError):
        roundtrip(port, timeout=10)
    assert "is anything listening" in d.forward(port, "flaky")["last_error"]
    # ... until a client is served
    srv = socket.socket()
    srv.bind(("127.0.0.2", tport))
    srv.listen(4)
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn, _ = srv.accept()
        conn.close()
        c.close()
        d.wait_for(lambda: d.forward(port, "flaky")["last_error"] is None,
                   what="the old error to be cleared")
        # a client held too long while the host is down: an error about the host ...
        fault_proxy.close_listener()
        fault_proxy.reset()
        d.wait_for(lambda: d.host("flaky")["state"] != "connected", what="outage")
        try:
            roundtrip(port, timeout=10)
        except ConnectionResetError:
            pass
        err = d.forward(port, "flaky")["last_error"]
        assert "still not connected after holding the client 1s" in err, err
        # ... that goes once the host is back
        fault_proxy.open_listener()
        d.wait_for(lambda: d.host("flaky")["state"] == "connected", timeout=30,
                   what="recovery")
        assert d.forward(port, "flaky")["last_error"] is None
    finally:
        srv.close()


def test_a_name_the_server_cannot_resolve_is_said_so(sshd, daemon, free_port):
    d = daemon
    port = free_port()
    d.ctl("add", sshd.host, f"{port}:no-such-node.invalid:8201")
    with pytest.raises(ConnectionResetError):
        roundtrip(port, timeout=10)
    err = d.forward(port)["last_error"]
    assert "could not resolve 'no-such-node.invalid'" in err, err
    assert "is anything listening" not in err


# -- 9. failures that looked like success ----------------------------------------------------------


def test_run_reports_a_command_that_cannot_start(sshd, daemon):
    d = daemon
    for mode in ([], ["--no-detach"]):
        r = d.ctl("run", sshd.host, *mode, "--", "no-such-command-xyz", "--flag", check=False)
        assert r.returncode == 1, (mode, r.stdout, r.stderr)
        assert "did not start" in r.stderr and "status 127" in r.stderr, r.stderr
        assert "not found" in r.stderr, r.stderr
        r = d.ctl("run", sshd.host, *mode, "--", "echo (unbalanced", check=False)
        assert r.returncode == 1 and "did not start" in r.stderr, (r.stdout, r.stderr)
        r = d.ctl("run", sshd.host, *mode, "--", "true")
        assert r.returncode == 0
    # a host that cannot be reached: no session at all
    sshd.add_host_alias("downhost", Port=str(_dead_port()))
    r = d.ctl("run", "downhost", "--", "true", check=False)
    assert r.returncode == 1 and "connection refused" in r.stderr, r.stderr
    assert "downhost" not in [s["host"] for s in
                              json.loads(d.ctl("sessions", "--json").stdout)["sessions"]]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_add_refuses_a_host_name_that_is_a_typo(sshd, daemon, free_port):
    d = daemon
    sshd.add_host_alias("hpc", HostName="127.0.0.1", Port=str(sshd.port))
    r = d.ctl("add", "hcp", str(free_port()), check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no host 'hcp' in ~/.ssh/config" in r.stderr and "did you mean 'hpc'" in r.stderr
    assert "hcp" not in json.dumps(d.list())
    assert not d.state_file.exists() or "hcp" not in d.state_file.read_text()
    r = d.ctl("add", "hcp", str(free_port()), "--force")
    assert r.returncode == 0
    assert "hcp" in d.state_file.read_text()
    # names resolved elsewhere, and names that resolve, are fine
    d.ctl("add", "localhost", str(free_port()))


def test_kill_of_an_ended_session_fails(sshd, daemon):
    d = daemon
    d.ctl("run", sshd.host, "--name", "short", "--follow", "--", "true")
    r = d.ctl("kill", "short", check=False)
    assert r.returncode == 1 and "had already ended" in r.stderr, (r.stdout, r.stderr)


# -- 10. the little things -------------------------------------------------------------------------


def test_sessions_fit_the_terminal_and_ended_ones_can_be_forgotten(sshd, daemon):
    d = daemon
    long = "x" * 300
    d.ctl("run", sshd.host, "--name", "wide", "--", f"echo {long}; exit 3", check=False)
    d.ctl("run", sshd.host, "--name", "keep", "--", "sleep 60")
    env = dict(d.env, COLUMNS="100")
    r = subprocess.run([sys.executable, "-m", "tunnelctl", "sessions"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert all(len(line) <= 100 for line in r.stdout.splitlines()), r.stdout
    assert "…" in r.stdout
    full = json.loads(d.ctl("sessions", "--json").stdout)["sessions"]
    assert any(long in s["command"] for s in full)
    r = d.ctl("forget", "keep", check=False)
    assert r.returncode == 1 and "still running" in r.stderr
    r = d.ctl("sessions", "--prune")
    assert "wide" in r.stdout
    names = [s["name"] for s in json.loads(d.ctl("sessions", "--json").stdout)["sessions"]]
    assert names == ["keep"]
    d.ctl("kill", "keep")
    d.ctl("forget", "keep")
    assert json.loads(d.ctl("sessions", "--json").stdout)["sessions"] == []


def test_adding_an_automatic_forward_saves_it(sshd, daemon, free_port):
    d = daemon
    port = free_port()
    d.ctl("run", sshd.host, "--name", "web", "--port", str(port), "--", "sleep 60")
    assert d.forward(port)["origin"] == "auto"
    assert "auto" in d.ctl("list").stdout.split("ORIGIN", 1)[1]
    r = d.ctl("add", sshd.host, str(port))
    assert "now saved" in r.stdout, r.stdout
    assert d.forward(port)["origin"] == "added"
    assert str(port) in _saved(d, sshd.host)
    d.ctl("kill", "web")
    d.wait_for(lambda: json.loads(d.ctl("sessions", "--json").stdout)["sessions"][0]["state"]
               != "running", what="the session to end")
    assert d.forward(port)["origin"] == "added"   # it stays with the session gone
