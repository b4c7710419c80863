"""Operating the daemon end to end (issue 6): reload, graceful stop, sd_notify, events, the
daemon log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import Daemon

pytestmark = pytest.mark.timeout(60)


def write_config(daemon, text: str) -> None:
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(text)


def forwards_config(host: str, *specs: str, extra: str = "") -> str:
    listed = ", ".join(json.dumps(s) for s in specs)
    return f"[defaults]\n{extra}\n[hosts.{host}]\nforwards = [{listed}]\n"


class Client:
    """One long-lived TCP connection through a forward."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def echo(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = self.sock.recv(65536)
            if not data:
                break
            got += data
        return got

    def close(self) -> None:
        self.sock.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def echoes(port: int, payload: bytes = b"hello") -> bool:
    c = Client(port)
    try:
        return c.echo(payload) == payload
    finally:
        c.close()


def test_reload_keeps_open_connections_and_applies_changes(daemon, sshd, echo_server,
                                                           free_port):
    _, target = echo_server()
    keep, drop, new, added = (free_port() for _ in range(4))
    spec = lambda port: f"{port}:127.0.0.2:{target}"  # noqa: E731
    # a forward added at run time is not the config's: reloads leave it alone
    daemon.ctl("add", sshd.host, spec(added))
    write_config(daemon, forwards_config(sshd.host, spec(keep), spec(drop)))
    r = daemon.ctl("reload")
    assert f"{sshd.host} {keep}:" in r.stdout and "0 unchanged" in r.stdout, r.stdout
    daemon.wait_for(lambda: daemon.forward(keep)["state"] == "listening", what="listening")

    client = Client(keep)
    try:
        assert client.echo(b"before") == b"before"
        write_config(daemon, forwards_config(sshd.host, spec(keep), spec(new),
                                             extra="keepalive_interval = 4"))
        r = daemon.ctl("reload")
        assert f"added {sshd.host} {new}:" in r.stdout, r.stdout
        assert f"removed {sshd.host} {drop}:" in r.stdout, r.stdout
        assert "1 unchanged" in r.stdout, r.stdout
        # the open connection went through the reload untouched
        assert client.echo(b"after") == b"after"
        assert echoes(new)
        assert refused(drop)
        assert echoes(added)
        origins = {f["listen"]: f["origin"] for f in daemon.host()["forwards"]}
        assert origins == {f"127.0.0.1:{keep}": "config", f"127.0.0.1:{new}": "config",
                           f"127.0.0.1:{added}": "added"}
        assert daemon.forward(keep)["total"] == 1  # the same listener, not a new one
    finally:
        client.close()
    assert "config reloaded" in daemon.log()


def test_bad_config_is_rejected_and_the_running_one_stays(daemon, sshd, echo_server, free_port):
    _, target = echo_server()
    port, other = free_port(), free_port()
    write_config(daemon, forwards_config(sshd.host, f"{port}:127.0.0.2:{target}"))
    daemon.ctl("reload")
    daemon.wait_for(lambda: daemon.forward(port)["state"] == "listening", what="listening")
    client = Client(port)
    try:
        assert client.echo(b"one") == b"one"
        write_config(daemon, forwards_config(sshd.host, f"{other}:127.0.0.2:{target}",
                                             extra="keepalive_interval = -1"))
        r = daemon.ctl("reload", check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert f"{daemon.config_file}:2" in r.stderr and "keepalive_interval" in r.stderr
        assert "the running config stays" in r.stderr
        assert "Traceback" not in r.stderr
        # SIGHUP with the same bad file: logged, nothing changes, the daemon lives on
        os.kill(daemon.pid, signal.SIGHUP)
        daemon.wait_for(lambda: daemon.log().count("reload rejected") >= 2,
                        what="the SIGHUP reload to be rejected")
        assert daemon.proc.poll() is None
        assert client.echo(b"two") == b"two"
        assert echoes(port)
        assert refused(other)
        # a config whose forward collides with one tunneld already has is rejected too
        daemon.ctl("add", sshd.host, f"{other}:127.0.0.2:{target}")
        write_config(daemon, forwards_config(sshd.host, f"{other}:127.0.0.2:{target + 1}"))
        r = daemon.ctl("reload", check=False)
        assert r.returncode == 1 and "the running one stays" in r.stderr, r.stderr
        assert f"tunnelctl remove {sshd.host}" in r.stderr, r.stderr
        assert client.echo(b"three") == b"three"
    finally:
        client.close()
    assert "Traceback" not in daemon.log(None)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ntf-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[str] = []

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.seen.append(msg)
            if msg.startswith(prefix):
                return msg
        raise AssertionError(f"no {prefix!r} on NOTIFY_SOCKET within {timeout}s; got "
                             f"{self.seen}")

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify():
    n = NotifySocket()
    try:
        yield n
    finally:
        n.close()


def test_sd_notify_reload_and_sigterm_drains_open_connections(sshd, echo_server, free_port,
                                                              notify):
    _, target = echo_server()
    port = free_port()
    d = Daemon(sshd, {"NOTIFY_SOCKET": notify.path})
    write_config(d, "[defaults]\nstop_timeout = 1.5\n")
    d.start()
    try:
        assert notify.expect("READY=1") == "READY=1"
        # SIGHUP reloads (what systemd does with Type=notify-reload), framed for systemd
        write_config(d, forwards_config(sshd.host, f"{port}:127.0.0.2:{target}",
                                        extra="stop_timeout = 1.5"))
        os.kill(d.pid, signal.SIGHUP)
        reloading = notify.expect("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading
        notify.expect("READY=1")
        d.wait_for(lambda: any(f["listen"].endswith(f":{port}") and f["state"] == "listening"
                               for h in d.list()["hosts"] for f in h["forwards"]),
                   what="the reloaded forward")
        client = Client(port)
        try:
            assert client.echo(b"up") == b"up"
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            notify.expect("STOPPING=1")
            # the listener is closed at once, the open connection is still served
            d.wait_for(lambda: refused(port), timeout=5, what="the listener to close")
            assert client.echo(b"still here") == b"still here"
            assert d.proc.wait(timeout=15) == 0, d.log()
            took = time.monotonic() - t0
        finally:
            client.close()
        assert 1.0 < took < 8.0, took
        log = d.log(None)
        assert "waiting up to 1.5s for 1 open connection(s) to finish" in log, log
        assert "closing 1 connection(s) still open after 1.5s" in log, log
        assert "stopped" in log and "Traceback" not in log
    finally:
        d.close()


def test_stop_lets_a_finishing_connection_end(daemon, sshd, echo_server, free_port):
    _, target = echo_server()
    port = free_port()
    daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{target}")
    client = Client(port)
    assert client.echo(b"x") == b"x"
    closer = threading.Timer(0.5, client.close)
    closer.start()
    t0 = time.monotonic()
    try:
        r = daemon.ctl("stop", timeout=30)
    finally:
        closer.join()
    assert "stopped" in r.stdout
    assert daemon.proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 6, "the daemon waited longer than its connection lived"
    assert "every open connection finished" in daemon.log()


def test_events_stream_shows_adds_and_host_transitions(daemon, sshd, echo_server, free_port):
    _, target = echo_server()
    port = free_port()
    ev = subprocess.Popen([sys.executable, "-m", "tunnelctl", "events", "--json"],
                          env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        assert "watching" in ev.stderr.readline()
        daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:{target}")
        events: list[dict] = []

        def saw(pred) -> bool:
            return any(pred(e) for e in events)

        lines = iter(ev.stdout.readline, "")
        for line in lines:
            events.append(json.loads(line))
            if saw(lambda e: e["kind"] == "host" and e["new"] == "connected") and \
                    saw(lambda e: e["kind"] == "forward" and e.get("event") == "state"):
                break
        assert saw(lambda e: e["kind"] == "forward" and e["event"] == "added"
                   and e["spec"] == f"{port}:127.0.0.2:{target}"
                   and e["host"] == sshd.host and e["origin"] == "added"), events
        assert saw(lambda e: e["kind"] == "host" and e["old"] == "connecting"
                   and e["new"] == "connected"), events
        assert saw(lambda e: e["kind"] == "forward" and e["new"] == "listening"), events
        assert all(set(e) >= {"time", "kind"} for e in events)
        # the daemon stopping ends the stream cleanly
        daemon.ctl("stop")
        rest = [json.loads(x) for x in ev.stdout.read().splitlines() if x.strip()]
        assert any(e["kind"] == "daemon" and e["event"] == "stopping" for e in rest), rest
        assert ev.wait(timeout=10) == 0
        assert "daemon is stopping" in ev.stderr.read()
    finally:
        if ev.poll() is None:
            ev.kill()
            ev.wait()


def test_logs_daemon_tails_and_follows_the_log_file(daemon, sshd, free_port):
    r = daemon.ctl("logs", "--daemon", "-n", "200")
    assert "ready (pid" in r.stdout, r.stdout
    assert daemon.ctl("logs", check=False).returncode == 2
    follow = subprocess.Popen([sys.executable, "-m", "tunnelctl", "logs", "--daemon", "-f",
                               "-n", "0"], env=daemon.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # let it reach the end of the file
        port = free_port()
        daemon.ctl("add", sshd.host, f"{port}:127.0.0.2:9")
        deadline = time.monotonic() + 15
        seen = ""
        while time.monotonic() < deadline and f"added {port}:" not in seen:
            seen += follow.stdout.readline()
        assert f"added {port}:" in seen, seen
        assert "ready (pid" not in seen  # -n 0: no tail, only what came after
    finally:
        follow.terminate()
        follow.wait(timeout=10)
