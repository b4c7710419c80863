"""Self-tests for the netns_sshd / netns_daemon fixtures (sshd in its own network namespace)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncssh
import pytest
from conftest import SSHServer, netns_ssh_server

# a one-line-per-connection server: binds 127.0.0.1:argv[1], prints "ready",
# answers every connection with argv[2] and closes it
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode() + b"\\n")
    c.close()
"""


def _ssh(server: SSHServer, *args: str, timeout: float = 20,
         **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(server.ssh_config), *args], check=False,
        env=server.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, **kw,
    )


def _start_listener(argv: list[str], port: int, reply: str) -> subprocess.Popen:
    proc = subprocess.Popen([*argv, sys.executable, "-c", LISTENER, str(port), reply],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ready = threading.Event()

    def read() -> None:
        if proc.stdout.readline().strip() == "ready":
            ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(10):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"listener did not start: {err}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def _read_from(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(5)
        data = b""
        while chunk := s.recv(100):
            data += chunk
        return data


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                          timeout=10, check=True).stdout


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          timeout=10, check=True).stdout


@pytest.mark.timeout(60)
def test_layout_and_openssh_client(netns_sshd):
    s = netns_sshd
    assert s.host == "netnshost" and s.port == 22
    assert s.netns and s.netns in _netns_list()
    assert s.listen_host.startswith("10.251.") and s.address == (s.listen_host, 22)
    assert s.exec_in_ns(["true"]) == ["ip", "netns", "exec", s.netns, "true"]
    assert s.ns is not None and s.ns.ns_ip == s.listen_host
    # port 22: the known_hosts entry is the bare address, as ssh writes it
    assert s.known_hosts.read_text().startswith(f"{s.listen_host} ssh-ed25519 ")
    cfg = s.ssh_config.read_text()
    assert "Host netnshost\n" in cfg and f"HostName {s.listen_host}\n" in cfg
    assert f"ListenAddress {s.listen_host}:22" in s.sshd_config.read_text()
    r = _ssh(s, "netnshost", "true")
    assert r.returncode == 0, r.stderr
    # the session runs inside the namespace: it sees the veth end, not ours
    r = _ssh(s, "netnshost", "ip", "-o", "-4", "addr", text=True)
    assert r.returncode == 0, r.stderr
    assert s.ns.ns_ip in r.stdout and s.ns.host_ip not in r.stdout
    # the listener is sshd itself (ip netns exec execs in place)
    assert os.readlink(f"/proc/{s.pid}/exe") == s.sshd_path


@pytest.mark.timeout(60)
def test_sshd_without_netns_is_unchanged(sshd):
    assert sshd.netns is None and sshd.listen_host == "127.0.0.1" and sshd.ns is None
    assert sshd.exec_in_ns(["true"]) == ["true"]
    assert sshd.address == ("127.0.0.1", sshd.port)
    assert sshd.known_hosts.read_text().startswith(f"[127.0.0.1]:{sshd.port} ")


@pytest.mark.timeout(60)
async def test_server_has_its_own_loopback(netns_sshd, monkeypatch):
    s = netns_sshd
    # same address and port on both loopbacks, two different servers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = _start_listener([], port, "root")
    ns = _start_listener(s.exec_in_ns([]), port, "ns")
    try:
        assert _read_from("127.0.0.1", port) == b"root\n"
        r = _ssh(s, "-W", f"127.0.0.1:{port}", "netnshost")
        assert r.stdout == b"ns\n", r.stderr
        monkeypatch.setenv("HOME", str(s.home))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        async with asyncssh.connect("netnshost") as conn:
            reader, writer = await conn.open_connection("127.0.0.1", port)
            assert await reader.read() == b"ns\n"
            writer.close()
        _stop(root)
        # with ours gone, 127.0.0.1:port here is nobody (certainly not the ns server)
        with pytest.raises(ConnectionRefusedError):
            _read_from("127.0.0.1", port)
    finally:
        for p in (root, ns):
            if p.poll() is None:
                _stop(p)


@pytest.mark.timeout(60)
def test_stop_start_and_kill_connections(netns_sshd):
    s = netns_sshd
    session = subprocess.Popen(
        ["ssh", "-F", str(s.ssh_config), "netnshost", "sleep", "50"], env=s.env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not s.session_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.session_pids(), "no session process showed up"
        s.stop()
        assert not s.running
        with pytest.raises(OSError):
            socket.create_connection(s.address, timeout=2).close()
        assert _ssh(s, "netnshost", "true").returncode != 0
        assert session.poll() is None  # established sessions survive stop()
        s.kill_connections()
        session.wait(timeout=15)
        s.start()
        assert s.running
        r = _ssh(s, "netnshost", "true")
        assert r.returncode == 0, r.stderr
    finally:
        if session.poll() is None:
            session.kill()
        session.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_teardown_removes_namespace_veth_and_processes(tmp_path: Path):
    with pytest.raises(RuntimeError, match="boom"), netns_ssh_server(tmp_path / "a") as s:
        name, ns = s.netns, s.ns
        assert name in _netns_list() and f"{ns.veth_host}@" in _links()
        session = subprocess.Popen(
            ["ssh", "-F", str(s.ssh_config), "netnshost", "sleep", "50"], env=s.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a stray process the "test" forgot about, started inside the namespace
        stray = subprocess.Popen(s.exec_in_ns(["sleep", "50"]))
        deadline = time.monotonic() + 15
        while not s.session_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        listener, sessions = s.pid, s.session_pids()
        assert sessions
        raise RuntimeError("boom")  # teardown must still happen
    try:
        assert stray.wait(timeout=10) == -9
        session.wait(timeout=15)
    finally:
        for p in (stray, session):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for pid in {listener, *sessions}:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    assert name not in _netns_list()
    links = _links()
    assert f"{ns.veth_host}@" not in links and f"{ns.veth_host}:" not in links
    assert not os.path.exists(f"/sys/class/net/{ns.veth_host}")


@pytest.mark.timeout(60)
def test_two_namespaces_do_not_clash(tmp_path: Path):
    with netns_ssh_server(tmp_path / "a") as a, \
            netns_ssh_server(tmp_path / "b", host="other") as b:
        assert a.netns != b.netns and a.listen_host != b.listen_host
        assert a.ns.veth_host != b.ns.veth_host
        for s in (a, b):
            r = _ssh(s, s.host, "true")
            assert r.returncode == 0, r.stderr
    lst = _netns_list()
    assert a.netns not in lst and b.netns not in lst


@pytest.mark.timeout(60)
def test_netns_daemon_forwards_to_the_servers_loopback(netns_daemon, netns_sshd):
    s, d = netns_sshd, netns_daemon
    # the design's "tunnelctl add H 8090" case: same port on both sides
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = _start_listener(s.exec_in_ns([]), port, "ns")
    try:
        d.ctl("add", "netnshost", str(port))
        assert d.host()["name"] == "netnshost"
        assert _read_from("127.0.0.1", port) == b"ns\n"
    finally:
        _stop(target)
