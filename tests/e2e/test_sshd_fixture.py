"""Self-tests for the e2e fixtures in conftest.py (real OpenSSH sshd on loopback)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess

import asyncssh
import pytest

pytestmark = pytest.mark.timeout(30)


def _ssh(sshd, alias: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(sshd.home / ".ssh" / "config"), alias, *command],
        env=sshd.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20,
    )


@pytest.fixture
def ssh_home(sshd, monkeypatch):
    """Point asyncssh (which expands ~ through $HOME) at the fixture's home."""
    monkeypatch.setenv("HOME", str(sshd.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return sshd


def test_layout(sshd):
    assert sshd.host == "testhost"
    assert (sshd.home / ".ssh" / "id_ed25519").is_file()
    assert (sshd.home / ".ssh" / "id_ed25519.pub").is_file()
    known = (sshd.home / ".ssh" / "known_hosts").read_text()
    assert known.startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")
    config = (sshd.home / ".ssh" / "config").read_text()
    assert "Host testhost\n" in config and f"Port {sshd.port}\n" in config
    assert (sshd.workdir / "sshd_config").is_file()
    assert sshd.sshd_log.is_file()
    assert sshd.env["HOME"] == str(sshd.home)
    assert "SSH_AUTH_SOCK" not in sshd.env
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        assert sshd.env[var].startswith(str(sshd.home) + "/")
    runtime = sshd.env["XDG_RUNTIME_DIR"]
    assert len(runtime) < 40 and os.stat(runtime).st_mode & 0o777 == 0o700


def test_openssh_client(sshd):
    r = _ssh(sshd, sshd.host, "true")
    assert r.returncode == 0, r.stderr
    r = _ssh(sshd, sshd.host, "echo", "hello")
    assert r.returncode == 0 and r.stdout == "hello\n", r.stderr


async def test_asyncssh_connect(ssh_home):
    async with asyncssh.connect("testhost") as conn:
        r = await conn.run("echo hello", check=True, timeout=10)
        assert r.stdout == "hello\n"


async def test_host_key_is_verified(ssh_home):
    empty = ssh_home.home / ".ssh" / "empty_known_hosts"
    empty.write_text("")
    ssh_home.add_host_alias("unknownkey", UserKnownHostsFile=str(empty))
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with asyncssh.connect("unknownkey"):
            pass
    assert _ssh(ssh_home, "unknownkey", "true").returncode != 0


async def test_local_forward_to_echo_server(ssh_home, echo_server):
    host, port = echo_server(greeting=b"hi\n")
    assert host == "127.0.0.2"
    async with asyncssh.connect("testhost") as conn:
        listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
        assert await asyncio.wait_for(reader.readexactly(3), 10) == b"hi\n"
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # half-close passed on
        writer.close()
        listener.close()


async def test_proxyjump_alias(ssh_home):
    ssh_home.add_host_alias("jumped", ProxyJump="testhost")
    async with asyncssh.connect("jumped") as conn:
        r = await conn.run("echo via-jump", check=True, timeout=10)
        assert r.stdout == "via-jump\n"
    r = _ssh(ssh_home, "jumped", "true")
    assert r.returncode == 0, r.stderr


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_stop_start_reconnect(ssh_home):
    port = ssh_home.port
    async with asyncssh.connect("testhost") as conn:
        await conn.run("true", check=True, timeout=10)
        ssh_home.stop()
        assert not ssh_home.running
        assert _refused(port)
        # an established session is served by its own process and survives stop()
        r = await conn.run("echo still-here", check=True, timeout=10)
        assert r.stdout == "still-here\n"
        with pytest.raises(OSError):
            await asyncssh.connect("testhost")
        ssh_home.start()
        assert ssh_home.port == port
        # same port and same host key: known_hosts still matches
        async with asyncssh.connect("testhost") as conn2:
            await conn2.run("true", check=True, timeout=10)
        # the old session can still be killed after it was orphaned by stop()
        ssh_home.kill_connections()
        await asyncio.wait_for(conn.wait_closed(), 10)
    assert _ssh(ssh_home, "testhost", "true").returncode == 0


async def test_kill_connections(ssh_home):
    async with asyncssh.connect("testhost") as conn:
        proc = await conn.create_process("sleep 60")
        assert ssh_home.session_pids()
        ssh_home.kill_connections()
        await asyncio.wait_for(conn.wait_closed(), 10)
        await asyncio.wait_for(proc.wait_closed(), 10)
        assert not ssh_home.session_pids()
    assert ssh_home.running
    async with asyncssh.connect("testhost") as conn:
        await conn.run("true", check=True, timeout=10)


def test_free_port(free_port):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert free_port("127.0.0.2") > 0


def test_echo_server_plain(echo_server):
    host, port = echo_server(host="127.0.0.1")
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"abc" * 1000)
        got = b""
        while len(got) < 3000:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        assert got == b"abc" * 1000
