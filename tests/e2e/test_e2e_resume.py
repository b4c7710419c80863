"""Resumable forwards (``--resume``) end to end: a real sshd, the real relay program started
on it by tunneld, the keeper here; outages made by the fault proxy (a black hole), by
killing sshd's connections, and by a daemon kill -9.  The application on top is a real
WebSocket (the ``websockets`` library) exchanging numbered messages, and a 50 MB echo."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import websockets
from netutil import roundtrip

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
FAST = """
[defaults]
keepalive_interval = 1
keepalive_count_max = 2
connect_timeout = 5
"""


@pytest.fixture(autouse=True)
def no_ends_left(daemon) -> Iterator[None]:
    """Every keeper and relay a test started is gone after it (a stopped daemon leaves them
    running for resume_suspend seconds, by design).  The daemon stops first: a keeper killed
    under a running daemon is replaced at once (that is a feature), and the new one lived on."""
    yield
    daemon.stop()
    root = Path(daemon.env["XDG_RUNTIME_DIR"]) / "tunneld" / "resume"
    pids, relay_dirs = [], []
    for info in root.glob("*/forward.json"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int((info.parent / "pid").read_text()))
            relay = json.loads(info.read_text()).get("relay_path")
            if relay:
                relay_dirs.append(Path(relay).parent)
                pids.append(int((Path(relay).parent / "pid").read_text()))
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    for d in relay_dirs:   # a relay killed leaves its directory (under /tmp: the HOME is deep)
        shutil.rmtree(d, ignore_errors=True)


def _config(daemon, extra: str = "") -> None:
    """Restart ``daemon`` with short keepalives (and ``extra`` defaults)."""
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(FAST + extra)
    assert daemon.stop() == 0
    daemon.start()


class WsServer:
    """A websockets server on 127.0.0.2 (its own thread and loop) that echoes each numbered
    message and records what it got, per connection."""

    def __init__(self) -> None:
        self.got: list[list[int]] = []
        self.closed = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def handler(ws) -> None:
            mine: list[int] = []
            self.got.append(mine)
            try:
                async for msg in ws:
                    mine.append(int(msg.split()[0]))
                    await ws.send(msg)
            finally:
                self.closed += 1

        async def main() -> None:
            self.server = await websockets.serve(handler, "127.0.0.2", 0, ping_timeout=120,
                                                 max_size=None)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()
            await self.server.wait_closed()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),),
                                       daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.thread.join(10)


@pytest.fixture
def ws_server() -> Iterator[WsServer]:
    s = WsServer()
    yield s
    s.close()


async def _exchange(port: int, count: int, outage, every: float = 0.02) -> list[int]:
    """Send ``count`` numbered messages (one each ``every`` s, without waiting for the echo)
    while ``outage()`` runs in a thread after the first tenth; the numbers echoed back."""
    back: list[int] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/", ping_timeout=120,
                                  open_timeout=20, max_size=None) as ws:
        async def reader() -> None:
            while len(back) < count:
                msg = await ws.recv()
                back.append(int(msg.split()[0]))

        task = asyncio.ensure_future(reader())
        fault = None
        for i in range(count):
            await ws.send(f"{i} " + "x" * (i % 500))
            if i == count // 10:
                fault = asyncio.get_running_loop().run_in_executor(None, outage)
            await asyncio.sleep(every)
        assert fault is not None
        await asyncio.wait_for(fault, 120)
        await asyncio.wait_for(task, 90)
    return back


def _add(daemon, host: str, target_port: int) -> int:
    port = _free_port()
    daemon.ctl("add", host, f"{port}:127.0.0.2:{target_port}", "--resume")
    return port


def _killing(sshd, daemon, port: int, times: int):
    """An outage: sshd's connections killed ``times`` times, each once the link is back."""
    def outage() -> None:
        for _ in range(times):
            sshd.kill_connections()
            daemon.wait_for(lambda: daemon.forward(port)["resume"]["link"], timeout=30,
                            what="the link to come back")
            time.sleep(0.5)
    return outage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_websocket_lives_through_a_20s_black_hole(sshd, daemon, fault_proxy, ws_server):
    _config(daemon)
    port = _add(daemon, "flaky", ws_server.port)
    states: list[dict] = []

    def outage() -> None:
        fault_proxy.pause()
        daemon.wait_for(lambda: daemon.host("flaky")["state"] != "connected", timeout=20,
                        what="the black hole to be noticed")
        daemon.wait_for(lambda: daemon.forward(port, "flaky")["resume"]["suspended"] == 1,
                        timeout=10, what="the stream to be listed as suspended")
        states.append(daemon.forward(port, "flaky"))
        states.append({"list": daemon.ctl("list").stdout})
        time.sleep(max(0.0, 20 - (time.monotonic() - t0)))
        fault_proxy.resume()
        fault_proxy.reset()   # the old, dead connection goes away, as a real one would

    t0 = time.monotonic()
    back = asyncio.run(_exchange(port, 1500, outage))
    n = list(range(1500))
    assert back == n
    assert ws_server.got == [n]   # one connection: the server never saw the outage
    assert states[0]["active"] == 1 and states[0]["resume"]["link"] is False
    assert "1 stream suspended for" in states[1]["list"]
    assert "stream(s) resumed after" in daemon.log(tail=None)
    assert time.monotonic() - t0 >= 20


def test_a_websocket_lives_through_killed_ssh_connections(sshd, daemon, ws_server):
    port = _add(daemon, sshd.host, ws_server.port)
    back = asyncio.run(_exchange(port, 600, _killing(sshd, daemon, port, 3)))
    assert back == list(range(600))
    assert ws_server.got == [list(range(600))]


def test_a_websocket_lives_through_a_daemon_kill_9_and_restart(sshd, daemon, ws_server):
    port = _add(daemon, sshd.host, ws_server.port)
    keeper = daemon.forward(port)["resume"]["keeper_pid"]

    def outage() -> None:
        daemon.kill9()
        time.sleep(2)        # messages keep coming: the keeper holds them
        daemon.start()
        daemon.wait_for(lambda: daemon.forward(port)["resume"]["link"], timeout=30,
                        what="the restarted daemon to link the relay again")

    back = asyncio.run(_exchange(port, 600, outage))
    assert back == list(range(600))
    assert ws_server.got == [list(range(600))]
    assert daemon.forward(port)["resume"]["keeper_pid"] == keeper
    assert "took over its keeper" in daemon.log(tail=None)


def test_50_mb_each_way_arrive_exact_across_three_outages(sshd, daemon, echo_server):
    port = _add(daemon, sshd.host, echo_server()[1])
    payload = os.urandom(50 * MiB)
    got = bytearray()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)

    def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), MiB):
            s.sendall(view[i:i + MiB])
        s.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    outages, mark = 0, 10 * MiB
    while True:
        data = s.recv(1 << 20)
        if not data:
            break
        got += data
        if outages < 3 and len(got) >= mark:
            sshd.kill_connections()
            outages, mark = outages + 1, mark + 12 * MiB
    sender.join(30)
    s.close()
    assert outages == 3
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    log = daemon.log(tail=None)
    assert log.count("stream(s) resumed after") >= 3, log


class Target:
    """A TCP target on 127.0.0.2 that notes when its client goes away."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.ended = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        c, _ = self.sock.accept()
        with c:
            c.settimeout(120)
            with contextlib.suppress(OSError):
                while c.recv(65536):
                    c.sendall(b"ok")
        self.ended.set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and \
        "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]


def test_a_stream_suspended_past_the_limit_is_closed_at_both_ends_and_the_relay_exits(
        sshd, daemon, fault_proxy):
    _config(daemon, "resume_suspend = 3\n")
    target = Target()
    port = _add(daemon, "flaky", target.port)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"hi")
    assert s.recv(10) == b"ok"
    info = daemon.forward(port, "flaky")["resume"]
    relay_dir = Path(info["relay_path"]).parent
    relay_pid = int((relay_dir / "pid").read_text())
    fault_proxy.pause()            # a black hole: sshd does not notice it
    t0 = time.monotonic()
    assert s.recv(10) == b""       # closed here ...
    here = time.monotonic() - t0
    assert target.ended.wait(30)   # ... and there (the relay saw no PING for 3 x 0.75 s)
    s.close()
    deadline = time.monotonic() + 30
    while _pid_alive(relay_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(relay_pid), "the relay did not exit"
    assert not relay_dir.exists()
    print(f"closed here after {here:.1f} s (keepalive ~3 s + suspend 3 s)")
    daemon.wait_for(lambda: "suspended longer than 3 s" in daemon.log(), timeout=10,
                    what="the log line of the closed stream")
    fault_proxy.resume()


def test_a_keeper_without_tunneld_exits_after_the_limit(sshd, daemon, echo_server):
    _config(daemon, "resume_suspend = 2\n")
    port = _add(daemon, sshd.host, echo_server()[1])
    assert roundtrip(port) == b"ping"
    keeper = daemon.forward(port)["resume"]["keeper_pid"]
    daemon.kill9()
    assert _pid_alive(keeper)
    deadline = time.monotonic() + 20
    while _pid_alive(keeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(keeper)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_the_relay_refuses_another_uid_and_a_wrong_secret(sshd, daemon, echo_server):
    port = _add(daemon, sshd.host, echo_server()[1])
    assert roundtrip(port) == b"ping"
    info = daemon.forward(port)["resume"]
    path = info["relay_path"]
    assert os.stat(Path(path).parent).st_mode & 0o777 == 0o700
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print(type(e).__name__)\n"
             "else:\n print('connected')\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "/usr/bin/python3", "-c", probe, path], capture_output=True, text=True,
                       timeout=20)
    assert r.stdout.strip() == "PermissionError", r
    # the same uid without the secret: refused, and the relay goes on serving
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(path)
    c.sendall(_frame(1, json.dumps({"secret": "00" * 32, "kind": "link"}).encode()))
    answer = c.recv(4096)
    c.close()
    assert b'"ok": false' in answer and b"wrong secret" in answer
    assert roundtrip(port) == b"ping"


def _frame(kind: int, payload: bytes) -> bytes:
    import struct
    return struct.pack(">BII", kind, 0, len(payload)) + payload


def test_remove_ends_the_keeper_and_the_relay(sshd, daemon, echo_server):
    port = _add(daemon, sshd.host, echo_server()[1])
    assert roundtrip(port) == b"ping"
    info = daemon.forward(port)["resume"]
    relay_dir = Path(info["relay_path"]).parent
    daemon.ctl("remove", sshd.host, str(port))
    deadline = time.monotonic() + 20
    while (_pid_alive(info["keeper_pid"]) or relay_dir.exists()) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(info["keeper_pid"])
    assert not relay_dir.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_keeper_that_dies_is_replaced_and_said(sshd, daemon, echo_server):
    port = _add(daemon, sshd.host, echo_server()[1])
    assert roundtrip(port) == b"ping"
    old = daemon.forward(port)["resume"]["keeper_pid"]
    os.kill(old, 9)
    daemon.wait_for(lambda: daemon.forward(port)["resume"]["keeper_pid"] not in (old, None),
                    timeout=20, what="a new keeper")
    assert "the keeper of the resumable forward exited; its streams are gone" in daemon.log()
    assert roundtrip(port) == b"ping"


def test_where_the_server_refuses_unix_socket_forwarding_the_link_runs_in_a_session(
        sshd, daemon, ws_server):
    text = sshd.sshd_config.read_text()
    assert "AllowStreamLocalForwarding yes" in text
    sshd.sshd_config.write_text(text.replace("AllowStreamLocalForwarding yes",
                                             "AllowStreamLocalForwarding no"))
    sshd.start()
    port = _add(daemon, sshd.host, ws_server.port)
    back = asyncio.run(_exchange(port, 300, _killing(sshd, daemon, port, 2)))
    assert back == list(range(300))
    assert ws_server.got == [list(range(300))]
    log = daemon.log(tail=None)
    assert "the relay is reached through a session instead" in log
    assert log.count("started its relay on the server") == 1, log


def test_a_changed_forward_ends_the_keeper_a_former_daemon_left(sshd, daemon, echo_server):
    """The daemon stops (its keeper lives on, holding the port); the forward's target is
    changed in config.toml; the next daemon ends that keeper and binds the port anew."""
    _, first = echo_server()
    second = Target()
    port = _free_port()
    forward = '{spec = "%d:127.0.0.2:%d", resume = true}'
    daemon.config_file.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_file.write_text(
        f"[hosts.{sshd.host}]\nforwards = [{forward % (port, first)}]\n")
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_for(lambda: daemon.forward(port)["resume"]["link"], timeout=30,
                    what="the link")
    assert roundtrip(port) == b"ping"
    old = daemon.forward(port)["resume"]
    assert daemon.stop() == 0
    assert _pid_alive(old["keeper_pid"])   # stop leaves it, for the next daemon
    daemon.config_file.write_text(
        f"[hosts.{sshd.host}]\nforwards = [{forward % (port, second.port)}]\n")
    daemon.start()
    daemon.wait_for(lambda: daemon.forward(port)["resume"]["link"], timeout=30,
                    what="the new link")
    new = daemon.forward(port)
    assert new["state"] != "failed" and new["resume"]["keeper_pid"] != old["keeper_pid"]
    assert not _pid_alive(old["keeper_pid"])
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"hi")
    assert s.recv(10) == b"ok"   # the new target's answer
    s.close()
    deadline = time.monotonic() + 20   # the former relay was told to go
    while Path(old["relay_path"]).parent.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(old["relay_path"]).parent.exists()
    assert "the forward changed" in daemon.log(tail=None)


def test_a_server_without_python3_says_so_and_closes_the_waiting_client(sshd, daemon):
    text = sshd.sshd_config.read_text()
    assert "SetEnv HOME=" in text
    sshd.sshd_config.write_text(text.replace("SetEnv HOME=", "SetEnv PATH=/nonexistent HOME="))
    sshd.start()
    port = _add(daemon, sshd.host, 9)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(10) == b""   # closed, not left waiting for resume_suspend
    s.close()
    fwd = daemon.forward(port)
    assert "the server has no python3 in PATH" in fwd["last_error"], fwd
    assert "no python3 in PATH" in daemon.ctl("list").stdout
    assert "no python3 in PATH" in daemon.log(tail=None)
