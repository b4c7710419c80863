"""Resilience end to end: server restarts, black-holed links, held clients, leaks, kill -9.

Between tunneld and the real sshd sits a FaultProxy (conftest) reached through the alias
``flaky``.  Keepalives are shortened through config.toml so detection takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import threading
import time

import pytest
from netutil import roundtrip, rss_kib

pytestmark = pytest.mark.timeout(120)

FAST = """

[defaults]
keepalive_interval = 1
keepalive_count_max = 2
hold_timeout = 10
connect_timeout = 5
"""



@pytest.fixture
def fast_daemon(sshd, daemon, fault_proxy):
    """The daemon restarted with short keepalives (the config is read at start)."""
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(FAST)
    assert daemon.stop() == 0
    daemon.start()
    return daemon


def transitions(daemon, host: str = "flaky") -> list[tuple[str, str]]:
    return re.findall(rf"{host}: (\S+) -> (\S+)", daemon.log(tail=None))



def status(daemon) -> dict:
    return json.loads(daemon.ctl("status", "--json").stdout)


def test_sshd_restart_brings_forwards_back(fast_daemon, sshd, fault_proxy, echo_server,
                                           free_port):
    d = fast_daemon
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    assert roundtrip(port) == b"ping"
    recover = []
    for _ in range(3):
        sshd.stop()
        sshd.kill_connections()
        d.wait_for(lambda: d.host("flaky")["state"] in ("backoff", "connecting"),
                   what="the loss to be noticed")
        assert d.forward(port, "flaky")["state"] == "waiting"
        sshd.start()
        t0 = time.monotonic()
        d.wait_for(lambda: d.host("flaky")["state"] == "connected", timeout=30,
                   what="reconnect")
        assert roundtrip(port) == b"ping"
        recover.append(time.monotonic() - t0)
    print(f"server back -> forward usable: median {statistics.median(recover):.2f}s "
          f"({', '.join(f'{r:.2f}' for r in recover)})")
    seen = transitions(d)
    assert ("connected", "backoff") in seen and ("backoff", "connecting") in seen
    assert re.search(r"flaky: connected -> backoff \(connection lost", d.log())


def test_black_holed_link_is_detected_and_recovers(fast_daemon, fault_proxy, echo_server,
                                                   free_port):
    d = fast_daemon
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    assert d.host("flaky")["state"] == "connected"
    fault_proxy.pause()
    t0 = time.monotonic()
    # keepalive 1 s x (2 + 1): declared dead in about 3 s; allow generous slack
    d.wait_for(lambda: d.host("flaky")["state"] != "connected", timeout=20,
               what="the black hole to be detected")
    detected = time.monotonic() - t0
    print(f"black hole detected after {detected:.2f}s (keepalive 1s x 2)")
    assert "keepalive" in (d.host("flaky")["last_error"] or "")
    fault_proxy.resume()
    fault_proxy.reset()  # the old, dead connection goes away as a real one would
    d.wait_for(lambda: d.host("flaky")["state"] == "connected", timeout=30, what="recovery")
    assert roundtrip(port) == b"ping"


def test_client_during_outage_is_held_then_served(fast_daemon, fault_proxy, echo_server,
                                                  free_port):
    d = fast_daemon
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    fault_proxy.close_listener()
    fault_proxy.reset()
    # let the backoff grow so that only the held client can explain a prompt reconnect
    before = d.host("flaky")["attempts"]
    d.wait_for(lambda: d.host("flaky")["attempts"] >= before + 3, timeout=30,
               what="several failed attempts")
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(roundtrip(port, b"held", timeout=30)))
    t.start()
    # the client is held by the daemon (its listener stayed bound)
    d.wait_for(lambda: d.forward(port, "flaky")["active"] == 1, what="the client to be held")
    fault_proxy.open_listener()
    t.join(30)
    assert result == [b"held"]


def test_held_client_is_closed_when_host_stays_down(sshd, daemon, fault_proxy, free_port,
                                                    echo_server):
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(FAST.replace("hold_timeout = 10", "hold_timeout = 1"))
    daemon.stop()
    daemon.start()
    port = free_port()
    daemon.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    fault_proxy.close_listener()
    fault_proxy.reset()
    daemon.wait_for(lambda: daemon.host("flaky")["state"] != "connected", what="outage")
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"x")
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 12
    daemon.wait_for(lambda: "after holding the client" in daemon.log(), what="log line")


@pytest.mark.timeout(240)
def test_many_loss_cycles_leak_nothing(fast_daemon, fault_proxy, echo_server, free_port):
    d = fast_daemon
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    assert roundtrip(port) == b"ping"
    time.sleep(0.5)
    before = status(d)
    rss_before = rss_kib(d.pid)
    def losses() -> int:
        return len([t for t in transitions(d) if t == ("connected", "backoff")])

    for i in range(50):
        n = losses()
        fault_proxy.reset()
        # polling `list` could miss a short outage: count the transitions in the log
        d.wait_for(lambda: losses() == n + 1, what=f"loss {i}")
        # the backoff grows with every short-lived connection; a client cuts it short
        assert roundtrip(port) == b"ping"
        d.wait_for(lambda: d.host("flaky")["state"] == "connected" and
                   fault_proxy.connections == 1, timeout=30, what=f"cycle {i}")
    time.sleep(1)  # let closed channels and connections settle
    after = status(d)
    rss_after = rss_kib(d.pid)
    print(f"fds {before['fds']} -> {after['fds']}, tasks {before['tasks']} -> "
          f"{after['tasks']}, RSS {rss_before} -> {rss_after} KiB")
    assert rss_after - rss_before < 8 * 1024
    assert after["fds"] <= before["fds"] + 2
    assert after["tasks"] <= before["tasks"] + 2
    assert len([t for t in transitions(d) if t == ("connected", "backoff")]) >= 50


def test_kill_9_then_restart_restores_every_forward(daemon, sshd, echo_server, free_port):
    ports = [free_port() for _ in range(3)]
    t = echo_server()[1]
    daemon.ctl("add", sshd.host, *[f"{p}:127.0.0.2:{t}" for p in ports])
    daemon.kill9()
    assert daemon.socket.exists()  # left behind by the dead daemon
    daemon.start()
    for p in ports:
        assert roundtrip(p) == b"ping"
    assert sorted(int(f["listen"].rsplit(":", 1)[1]) for f in daemon.host()["forwards"]) \
        == sorted(ports)


def test_sigusr1_checks_liveness_of_a_black_holed_link(sshd, daemon, fault_proxy, echo_server,
                                                       free_port):
    """With the default keepalive (10 s x 2) a black hole takes ~30 s to notice; a wake or
    network-change signal finds it in a few seconds."""
    port = free_port()
    daemon.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    fault_proxy.pause()
    t0 = time.monotonic()
    os.kill(daemon.pid, 10)  # SIGUSR1
    daemon.wait_for(lambda: daemon.host("flaky")["state"] != "connected", timeout=15,
                    what="liveness check to notice the black hole")
    print(f"black hole noticed {time.monotonic() - t0:.2f}s after SIGUSR1")
    assert "checking 1 connection" in daemon.log()
    fault_proxy.resume()


def test_reconnect_command(fast_daemon, fault_proxy, echo_server, free_port):
    d = fast_daemon
    port = free_port()
    d.ctl("add", "flaky", f"{port}:127.0.0.2:{echo_server()[1]}")
    n = fault_proxy.accepted
    r = d.ctl("reconnect", "flaky")
    assert "flaky: connected" in r.stdout
    assert fault_proxy.accepted == n + 1
    assert roundtrip(port) == b"ping"
    r = d.ctl("reconnect")
    assert "flaky: connected" in r.stdout
    r = d.ctl("reconnect", "nosuchhost", check=False)
    assert r.returncode == 1 and "nosuchhost" in r.stderr
