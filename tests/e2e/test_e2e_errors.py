"""End-to-end: the errors a user hits first, as the user sees them.

Each test drives a real tunneld through ``tunnelctl`` against a real OpenSSH sshd
(conftest.py) and checks four things: tunnelctl's exit status, its message on stderr (naming
the host/port and what to do), the host's ``state``/``last_error`` in ``tunnelctl list
--json`` (design.md §4, §6) and a one-line, traceback-free entry in the daemon log (§3 rule 12).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netutil import roundtrip

# -- helpers ------------------------------------------------------------------------------------


def _log_lines(daemon) -> list[str]:
    """The daemon's whole stderr log (daemon.log() only returns its tail)."""
    try:
        return daemon.stderr_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _log_line(daemon, *needles: str) -> str:
    """The one log line containing every needle; fails showing the log if there is none."""
    for line in _log_lines(daemon):
        if all(n in line for n in needles):
            return line
    raise AssertionError(f"no log line containing {needles!r}:\n{daemon.log()}")


def _assert_no_traceback(daemon) -> None:
    text = "\n".join(_log_lines(daemon))
    assert "Traceback" not in text, f"expected failures must not log tracebacks:\n{text}"


def _transitions(daemon, alias: str, new: str) -> int:
    """How many ``ALIAS: old -> NEW`` lines the log holds."""
    pat = re.compile(rf"\b{re.escape(alias)}: \S+ -> {re.escape(new)}\b")
    return sum(1 for line in _log_lines(daemon) if pat.search(line))


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-C", "other", "-f",
                    str(path)], check=True, capture_output=True, stdin=subprocess.DEVNULL,
                   timeout=30)
    return path



def _closed_within(port: int, seconds: float, payload: bytes = b"hello\n") -> float:
    """Connect to 127.0.0.1:port and return how long it took until the daemon closed (EOF
    or reset) the connection without sending any data; fails if it stays open longer."""
    start = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    except ConnectionResetError:
        return time.monotonic() - start   # reset before connect() even returned
    with s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        except socket.timeout:
            raise AssertionError(f"client on port {port} was neither served nor closed "
                                 f"within {seconds}s (hung)") from None
    assert data == b"", f"expected the connection to be closed, got {data!r}"
    return time.monotonic() - start


def _add_failing(daemon, alias: str, lport: int, rport: int) -> subprocess.CompletedProcess:
    """`tunnelctl add ALIAS LPORT:127.0.0.2:RPORT` for a host that cannot connect."""
    r = daemon.ctl("add", alias, f"{lport}:127.0.0.2:{rport}", check=False)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr, daemon.log())
    assert f"{alias}: added {lport}:127.0.0.2:{rport}" in r.stdout, r.stdout
    return r


def _assert_warning(r: subprocess.CompletedProcess, alias: str, state: str) -> str:
    """The stderr warning of a `tunnelctl add` whose host did not connect; returns its text."""
    assert f"tunnelctl: warning: {alias} is {state}: " in r.stderr, r.stderr
    assert "the forwards stay" in r.stderr, r.stderr
    assert f"tunnelctl remove {alias}" in r.stderr, r.stderr
    return r.stderr


# -- 1. unknown host name -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unknown_host_name_backs_off(daemon, sshd, free_port):
    alias = "nosuchhost"
    sshd.add_host_alias(alias, HostName="no-such-host.invalid")
    lport = free_port()
    r = _add_failing(daemon, alias, lport, 8090)

    err = _assert_warning(r, alias, "backoff")
    assert "cannot resolve host name" in err and "no-such-host.invalid" in err, err
    assert "~/.ssh/config" in err, err  # what to do: check HostName (or network/VPN)

    h = daemon.host(alias)
    assert h["state"] in ("backoff", "connecting"), h
    daemon.wait_for(lambda: daemon.host(alias)["state"] == "backoff", 10, "backoff")
    h = daemon.host(alias)
    assert "cannot resolve host name" in h["last_error"], h
    assert "no-such-host.invalid" in h["last_error"], h
    assert "retrying in" in h["last_error"], h
    # the listener stays bound while the host is unreachable
    [fwd] = h["forwards"]
    assert fwd["listen"] == f"127.0.0.1:{lport}" and fwd["state"] == "waiting", fwd

    line = _log_line(daemon, f"{alias}: connecting -> backoff", "cannot resolve host name")
    assert "no-such-host.invalid" in line, line
    # it is retried on its own (backoff starts at ~0.5 s); the log says it once
    daemon.wait_for(lambda: daemon.host(alias)["attempts"] >= 3, 10,
                    "more attempts after backoff")
    assert _transitions(daemon, alias, "backoff") == 1, daemon.log()
    _assert_no_traceback(daemon)


# -- 2. connection refused ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_connection_refused_backs_off(daemon, sshd, free_port):
    alias = "refused"
    dead = free_port()  # nobody listens here
    sshd.add_host_alias(alias, Port=str(dead))
    lport = free_port()
    r = _add_failing(daemon, alias, lport, 8090)

    err = _assert_warning(r, alias, "backoff")
    assert "connection refused" in err and f"127.0.0.1:{dead}" in err, err
    assert "is sshd running" in err, err

    daemon.wait_for(lambda: daemon.host(alias)["state"] == "backoff", 10, "backoff")
    h = daemon.host(alias)
    assert "connection refused" in h["last_error"], h
    assert f"127.0.0.1:{dead}" in h["last_error"], h
    assert h["forwards"][0]["state"] == "waiting", h

    _log_line(daemon, f"{alias}: connecting -> backoff", "connection refused",
              f"127.0.0.1:{dead}")
    daemon.wait_for(lambda: daemon.host(alias)["attempts"] >= 3, 10,
                    "more attempts after backoff")
    assert _transitions(daemon, alias, "backoff") == 1, daemon.log()
    _assert_no_traceback(daemon)


# -- 3. authentication failed -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_auth_failure_needs_auth_and_is_not_retried(daemon, sshd, free_port, tmp_path):
    alias = "badkey"
    key = _keygen(tmp_path / "not_authorized")
    sshd.add_host_alias(alias, IdentityFile=str(key))
    lport = free_port()
    r = _add_failing(daemon, alias, lport, 8090)

    err = _assert_warning(r, alias, "needs-auth")
    assert "authentication failed" in err and f"127.0.0.1:{sshd.port}" in err, err
    assert f"ssh {alias}" in err and f"tunnelctl reconnect {alias}" in err, err

    h = daemon.host(alias)
    assert h["state"] == "needs-auth", h
    assert "authentication failed" in h["last_error"], h
    _log_line(daemon, f"{alias}: connecting -> needs-auth", "authentication failed")

    # not retried: no new attempt while nobody acts
    before = _transitions(daemon, alias, "connecting")
    assert before == 1, _log_lines(daemon)
    time.sleep(3)
    assert _transitions(daemon, alias, "connecting") == before, daemon.log()
    assert daemon.host(alias)["state"] == "needs-auth"

    # a client of the forward is closed at once (not held for hold_timeout)
    assert _closed_within(lport, 5) < 3
    _assert_no_traceback(daemon)


# -- 4. unknown host key ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unknown_host_key_fails(daemon, sshd, free_port, tmp_path):
    alias = "newkey"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    sshd.add_host_alias(alias, UserKnownHostsFile=str(empty))
    lport = free_port()
    r = _add_failing(daemon, alias, lport, 8090)

    err = _assert_warning(r, alias, "failed")
    assert "host key" in err and "unknown" in err, err
    assert f"127.0.0.1:{sshd.port}" in err, err
    assert f"`ssh {alias}`" in err and f"tunnelctl reconnect {alias}" in err, err

    h = daemon.host(alias)
    assert h["state"] == "failed", h
    assert "unknown" in h["last_error"] and f"ssh {alias}" in h["last_error"], h
    _log_line(daemon, f"{alias}: connecting -> failed", "unknown")

    # a client of the forward is closed promptly, not hung
    assert _closed_within(lport, 5) < 3
    daemon.wait_for(lambda: daemon.forward(lport, alias)["last_error"] is not None, 5,
                    "the forward's last_error")
    fwd = daemon.forward(lport, alias)
    assert alias in fwd["last_error"] and "failed" in fwd["last_error"], fwd
    _log_line(daemon, f"{alias}: 127.0.0.1:{lport}: closed client")
    # never retried silently
    assert _transitions(daemon, alias, "connecting") == 1, daemon.log()
    _assert_no_traceback(daemon)


# -- 5. changed host key ------------------------------------------------------------------------


def _changed_key_alias(sshd, tmp_path: Path, alias: str) -> Path:
    other = _keygen(tmp_path / "other_host_key")
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "changed_known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    sshd.add_host_alias(alias, UserKnownHostsFile=str(known))
    return known


@pytest.mark.timeout(60)
def test_changed_host_key_fails(daemon, sshd, free_port, tmp_path):
    alias = "changedkey"
    _changed_key_alias(sshd, tmp_path, alias)
    lport = free_port()
    r = _add_failing(daemon, alias, lport, 8090)

    err = _assert_warning(r, alias, "failed")
    assert "does NOT match" in err, err
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in err, err
    assert f"tunnelctl reconnect {alias}" in err, err

    h = daemon.host(alias)
    assert h["state"] == "failed", h
    assert "does NOT match" in h["last_error"] and "ssh-keygen -R" in h["last_error"], h
    _log_line(daemon, f"{alias}: connecting -> failed", "does NOT match")
    assert _transitions(daemon, alias, "connecting") == 1, daemon.log()
    _assert_no_traceback(daemon)


# -- 6. reconnect after fixing it ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reconnect_after_fixing_host_key(daemon, sshd, free_port, tmp_path, echo_server):
    alias = "fixme"
    known = _changed_key_alias(sshd, tmp_path, alias)
    _, rport = echo_server()
    lport = free_port()
    _add_failing(daemon, alias, lport, rport)
    assert daemon.host(alias)["state"] == "failed"

    # while failed, reconnect reports the failure (exit 1) and says why
    r = daemon.ctl("reconnect", alias, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"{alias}: failed" in r.stdout and "does NOT match" in r.stdout, r.stdout

    # the user fixes known_hosts (as `ssh-keygen -R` + `ssh ALIAS` would)
    known.write_text(sshd.known_hosts.read_text())
    r = daemon.ctl("reconnect", alias, check=False)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr, daemon.log())
    assert f"{alias}: connected" in r.stdout, r.stdout

    h = daemon.host(alias)
    assert h["state"] == "connected" and h["last_error"] is None, h
    assert h["forwards"][0]["state"] == "listening", h
    _log_line(daemon, f"{alias}: connecting -> connected")

    assert roundtrip(lport, b"ping through the fixed host\n") == \
        b"ping through the fixed host\n"
    _assert_no_traceback(daemon)


@pytest.mark.timeout(60)
def test_reconnect_after_fixing_auth(daemon, sshd, free_port, tmp_path, echo_server):
    alias = "authfix"
    key = _keygen(tmp_path / "late_key")
    sshd.add_host_alias(alias, IdentityFile=str(key))
    _, rport = echo_server()
    lport = free_port()
    _add_failing(daemon, alias, lport, rport)
    assert daemon.host(alias)["state"] == "needs-auth"

    # the user installs the key on the server
    with sshd.authorized_keys.open("a") as f:
        f.write(key.with_suffix(".pub").read_text())
    r = daemon.ctl("reconnect", alias, check=False)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr, daemon.log())
    assert f"{alias}: connected" in r.stdout, r.stdout
    assert daemon.host(alias)["state"] == "connected"
    assert roundtrip(lport, b"authorized now\n") == b"authorized now\n"


# -- 7. the server refuses the forward's target --------------------------------------------------


@pytest.mark.timeout(60)
def test_refused_target_closes_client_and_forward_stays(daemon, sshd, free_port, echo_server):
    rport = free_port("127.0.0.2")  # nothing listens here (yet)
    lport = free_port()
    r = daemon.ctl("add", sshd.host, f"{lport}:127.0.0.2:{rport}", check=False)
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stdout, r.stderr)
    assert daemon.host()["state"] == "connected"

    assert _closed_within(lport, 5) < 3
    daemon.wait_for(lambda: daemon.forward(lport)["last_error"] is not None, 5,
                    "the forward's last_error")
    fwd = daemon.forward(lport)
    assert f"127.0.0.2:{rport}" in fwd["last_error"], fwd
    assert "forward stays" in fwd["last_error"], fwd
    assert fwd["state"] == "listening" and fwd["active"] == 0, fwd
    line = _log_line(daemon, f"{sshd.host}: 127.0.0.1:{lport} -> 127.0.0.2:{rport}")
    assert "could not open" in line, line
    # the connection itself is fine
    assert daemon.host()["state"] == "connected"

    # once something listens there, the very same forward works
    echo_server(port=rport)
    assert roundtrip(lport, b"now it listens\n") == b"now it listens\n"
    fwd = daemon.forward(lport)
    assert fwd["total"] == 2, fwd
    _assert_no_traceback(daemon)


# -- 8. usage errors ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_usage_errors(daemon, sshd, free_port, echo_server):
    host = sshd.host

    # a range that runs backwards: exit 1, says so and how to write it
    r = daemon.ctl("add", host, "8090-8080", check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "runs backwards" in r.stderr and "8080-8090" in r.stderr, r.stderr
    assert r.stderr.startswith("tunnelctl: "), r.stderr

    # missing arguments: argparse usage error, exit 2
    for args in (("add",), ("add", host), ()):
        r = daemon.ctl(*args, check=False)
        assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
        assert "usage:" in r.stderr, r.stderr

    # remove from a host with no forwards
    r = daemon.ctl("remove", host, "1234", check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"{host} has no forwards" in r.stderr and "tunnelctl list" in r.stderr, r.stderr
    r = daemon.ctl("remove", host, check=False)
    assert r.returncode == 1 and f"{host} has no forwards" in r.stderr, r.stderr

    # remove a forward the host does not have: the message lists the ones it has
    _, rport = echo_server()
    lport = free_port()
    daemon.ctl("add", host, f"{lport}:127.0.0.2:{rport}")
    r = daemon.ctl("remove", host, "9", check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"{host} has no forward" in r.stderr, r.stderr
    assert f"{lport}:127.0.0.2:{rport}" in r.stderr, r.stderr
    assert len(daemon.host()["forwards"]) == 1  # nothing was removed

    # a non-loopback bind needs --public, and nothing is bound without it
    pport = free_port("0.0.0.0")
    spec = f"0.0.0.0:{pport}:127.0.0.2:{rport}"
    r = daemon.ctl("add", host, spec, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "--public" in r.stderr and f"0.0.0.0:{pport}" in r.stderr, r.stderr
    assert [f["listen"] for f in daemon.host()["forwards"]] == [f"127.0.0.1:{lport}"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pport), timeout=2).close()

    r = daemon.ctl("add", "--public", host, spec, check=False)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert daemon.forward(pport)["listen"] == f"0.0.0.0:{pport}"
    _log_line(daemon, f"{host}: 0.0.0.0:{pport} is listening on a public address")
    assert roundtrip(pport, b"public\n") == b"public\n"
    _assert_no_traceback(daemon)


# -- 9. daemon not running ----------------------------------------------------------------------


def _stop_and_reap(daemon) -> subprocess.CompletedProcess:
    """`tunnelctl stop`, while this process reaps the daemon as its parent (a shell, systemd)
    would; returns tunnelctl's result."""
    p = subprocess.Popen([sys.executable, "-m", "tunnelctl", "stop"], env=daemon.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert daemon.proc.wait(timeout=15) == 0, daemon.log()
        out, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.timeout(60)
def test_daemon_not_running(daemon, sshd):
    assert daemon.env["TUNNELD_NO_AUTOSTART"] == "1"
    pid = daemon.pid
    r = _stop_and_reap(daemon)
    assert r.returncode == 0 and f"tunneld stopped (pid {pid})" in r.stdout, \
        (r.returncode, r.stdout, r.stderr)
    assert not daemon.socket.exists()
    for args in (("list",), ("add", sshd.host, "18090"), ("status",)):
        r = daemon.ctl(*args, check=False, timeout=20)
        assert r.returncode == 3, (args, r.returncode, r.stdout, r.stderr)
        assert "not running" in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("tunnelctl: "), r.stderr
    # `stop` of a stopped daemon is not an error
    r = daemon.ctl("stop", check=False, timeout=20)
    assert r.returncode == 0 and "not running" in r.stdout, (r.returncode, r.stdout, r.stderr)


@pytest.mark.timeout(60)
def test_daemon_killed_leaves_stale_socket(daemon, sshd):
    daemon.kill9()
    assert daemon.socket.exists()  # left behind by the dead daemon
    r = daemon.ctl("list", check=False, timeout=20)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "not running" in r.stderr, r.stderr
    # and a new daemon starts over the stale socket
    daemon.start()
    assert daemon.ctl("status", check=False).returncode == 0


@pytest.mark.timeout(60)
def test_stop_succeeds_before_the_daemon_is_reaped(daemon):
    """`tunnelctl stop` must report success once the daemon has exited, even if its parent
    has not reaped it yet (the exited daemon is a zombie: pid still exists, but its socket and
    lock are gone).  tunnelctl polls ``os.kill(pid, 0)``, which succeeds on a zombie."""
    pid = daemon.pid
    start = time.monotonic()
    r = daemon.ctl("stop", check=False, timeout=40)
    took = time.monotonic() - start
    assert not daemon.socket.exists()
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr, f"after {took:.1f}s")
    assert f"tunneld stopped (pid {pid})" in r.stdout, r.stdout
    assert took < 5, f"tunnelctl stop took {took:.1f}s"
