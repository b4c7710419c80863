"""A lean channel's receive window grows with the link (``tunneld.window``), against a real
sshd in this process: on a long round trip the window doubles up to ``max_window`` and the
data stays exact; a local client that stops reading never makes it grow, and what waits in
tunneld for it is bounded by the window it had; window adjusts stay as infrequent as they
were (one per three packets' worth) however large the window; a real delayed link
(``bench/delay.py``) grows it with no help."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
from test_channel import _Host, fast_only, small_send_buffer

from tunneld import fastpath
from tunneld.config import Defaults
from tunneld.fastpath.channel import TCPChannel
from tunneld.fastpath.connection import FastConnection
from tunneld.fastpath.sealing import Sender
from tunneld.forward import CHANNEL_MAX_PKTSIZE, LocalForward
from tunneld.spec import ForwardSpec
from tunneld.window import BASE_WINDOW

pytestmark = [pytest.mark.timeout(90), fast_only]

GCM = "aes128-gcm@openssh.com"
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(sshd, monkeypatch):
    monkeypatch.setenv("HOME", str(sshd.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield sshd


@pytest.fixture
def channels(monkeypatch) -> list[TCPChannel]:
    """Every lean channel opened while the test runs."""
    made: list[TCPChannel] = []
    orig = TCPChannel.__init__

    def init(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(TCPChannel, "__init__", init)
    return made


@pytest.fixture
def adjusts(monkeypatch) -> list[int]:
    """The size of every window adjust tunneld sends."""
    sent: list[int] = []
    orig = Sender.send

    def send(self, head, data=b""):
        if head[:1] == bytes((MSG_CHANNEL_WINDOW_ADJUST,)) and len(head) == 9:
            sent.append(int.from_bytes(head[5:9], "big"))
        orig(self, head, data)

    monkeypatch.setattr(Sender, "send", send)
    return sent


def _fixed_rtt(monkeypatch, conn: asyncssh.SSHClientConnection, rtt: float) -> None:
    """Make the connection's round trip ``rtt`` (a long link, on loopback)."""
    fast = FastConnection.of(conn)
    assert fast is not None
    monkeypatch.setattr(fast, "note_rtt", lambda sample: None)
    fast.rtt = rtt


@contextlib.asynccontextmanager
async def forward(sshd, target: tuple[str, int], max_window: int, port: int | None = None,
                  ) -> AsyncIterator[tuple[LocalForward, asyncssh.SSHClientConnection]]:
    """A LocalForward to ``target`` whose host's ``max_window`` is given, through the test
    sshd (or whatever listens on ``port`` in front of it)."""
    kw = {"port": port, "known_hosts": None} if port else {}
    conn = await asyncssh.connect(sshd.host, encryption_algs=[GCM], **kw)
    assert fastpath.attach(conn)
    host = _Host(conn)
    host.settings = Defaults(max_window=max_window)
    fwd = LocalForward(ForwardSpec("127.0.0.1", 0, target[0], target[1]), host)
    try:
        await fwd.bind()
        yield fwd, conn
    finally:
        await fwd.close()
        conn.close()
        await conn.wait_closed()


@contextlib.contextmanager
def source(payload: bytes, rate: float = 0) -> Iterator[tuple[str, int]]:
    """A target on 127.0.0.2 that sends ``payload`` to its first client (at most ``rate``
    bytes a second, if given), then closes."""
    srv = socket.create_server(("127.0.0.2", 0))
    srv.settimeout(30)

    def serve() -> None:
        try:
            c, _ = srv.accept()
        except OSError:
            return
        with c:
            if not rate:
                c.sendall(payload)
                return
            t0, view = time.monotonic(), memoryview(payload)
            for i in range(0, len(payload), MiB):
                c.sendall(view[i:i + MiB])
                time.sleep(max(0.0, t0 + (i + MiB) / rate - time.monotonic()))

    import threading
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()
    finally:
        srv.close()
        t.join(10)


async def _read_all(port: int, limit: int, pause_when=None, on_pause=None) -> bytes:
    """Read up to ``limit`` bytes; once ``pause_when(bytes read so far)`` holds, stop reading
    while ``on_pause()`` runs (once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write_eof()
    got = bytearray()
    try:
        while len(got) <= limit:
            data = await asyncio.wait_for(reader.read(1 << 20), 20)
            if not data:
                break
            got += data
            if pause_when is not None and pause_when(len(got)):
                pause_when = None
                await on_pause()
    finally:
        writer.close()
    return bytes(got)


async def test_window_doubles_on_a_long_round_trip_up_to_max_window(
        home, channels, adjusts, monkeypatch):
    # a 200 ms round trip at 100 MB/s: each doubling (2 -> 4 -> 8 MiB) asks for half a
    # window per round trip (at most 10.5 MB/s), and the 64 MiB last three round trips or
    # more, however busy the machine (at 50 ms the second doubling asked for 42 MB/s, more
    # than a loaded CI machine gave)
    payload = os.urandom(64 * MiB)
    with source(payload, rate=100e6) as target:
        async with forward(home, target, max_window=8 * MiB) as (fwd, conn):
            _fixed_rtt(monkeypatch, conn, 0.2)
            got = await _read_all(fwd.spec.bind_port, len(payload))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    [chan] = channels
    assert chan.init_window == 8 * MiB
    # it doubled: the adjusts that grew it gave more than was used
    assert max(adjusts) > 4 * MiB, sorted(adjusts)[-5:]
    assert sum(adjusts) <= len(payload) + 8 * MiB - BASE_WINDOW


async def test_window_stays_put_where_max_window_is_the_start(home, channels, monkeypatch):
    payload = os.urandom(8 * MiB)
    with source(payload) as target:
        async with forward(home, target, max_window=BASE_WINDOW) as (fwd, conn):
            _fixed_rtt(monkeypatch, conn, 0.05)
            got = await _read_all(fwd.spec.bind_port, len(payload))
    assert got == payload
    assert channels[0].init_window == BASE_WINDOW


async def test_a_smaller_max_window_starts_the_channel_smaller(home, channels, adjusts):
    payload = os.urandom(4 * MiB)
    with source(payload) as target:
        async with forward(home, target, max_window=256 * 1024) as (fwd, conn):
            got = await _read_all(fwd.spec.bind_port, len(payload))
    assert got == payload
    assert channels[0].init_window == 256 * 1024
    assert max(adjusts) <= 256 * 1024


async def test_adjusts_stay_one_per_three_packets_however_large_the_window(
        home, channels, adjusts, monkeypatch):
    payload = os.urandom(48 * MiB)
    with source(payload) as target:
        async with forward(home, target, max_window=16 * MiB) as (fwd, conn):
            _fixed_rtt(monkeypatch, conn, 0.05)
            got = await _read_all(fwd.spec.bind_port, len(payload))
    assert got == payload
    assert len(adjusts) <= len(payload) // (3 * CHANNEL_MAX_PKTSIZE) + 1
    # what was not grown is one adjust per three packets or a little more
    assert min(adjusts) > 3 * CHANNEL_MAX_PKTSIZE


async def test_a_reader_that_stops_at_the_largest_window_holds_at_most_that(
        home, channels, monkeypatch):
    """Fast first (until the window has grown to max_window), then the client stops reading:
    what waits here never passes the window, stays put while it waits, and every byte
    arrives once the client reads again.  (That a stopped or slow reader never grows the
    window: test_a_slow_reader_from_the_start_keeps_the_first_window.)"""
    payload = os.urandom(96 * MiB)
    queued: list[int] = []

    small_send_buffer(monkeypatch, 64 * 1024)

    def grown_up(n: int) -> bool:
        # one doubling, on a round trip of 100 ms: 2 -> 4 MiB needs 10 MB/s, which a loaded
        # CI machine moves (8 MiB at 50 ms needed 80 MB/s: one CI run paused with 4 MiB)
        return channels[0].init_window == 4 * MiB or n >= 80 * MiB

    async def stalled() -> None:
        [chan] = channels
        assert chan.init_window == 4 * MiB, "the window did not grow in the first 80 MiB"
        for _ in range(10):  # 1 s without reading
            await asyncio.sleep(0.1)
            queued.append(sum(len(d) for d in chan.recv_buf))

    with source(payload) as target:
        async with forward(home, target, max_window=4 * MiB) as (fwd, conn):
            _fixed_rtt(monkeypatch, conn, 0.1)
            got = await _read_all(fwd.spec.bind_port, len(payload), pause_when=grown_up,
                                  on_pause=stalled)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert len(queued) == 10
    assert 0 < max(queued) <= 4 * MiB, queued
    assert queued[-1] == queued[-5], queued  # the server stopped: the window closed


async def test_a_slow_reader_from_the_start_keeps_the_first_window(home, channels,
                                                                   monkeypatch):
    payload = os.urandom(6 * MiB)
    small_send_buffer(monkeypatch, 16 * 1024)
    with source(payload) as target:
        async with forward(home, target, max_window=64 * MiB) as (fwd, conn):
            _fixed_rtt(monkeypatch, conn, 0.05)
            s = socket.create_connection(("127.0.0.1", fwd.spec.bind_port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            got = bytearray()
            most = 0
            while len(got) < len(payload):
                data = await asyncio.wait_for(loop.sock_recv(s, 16 * 1024), 20)
                if not data:
                    break
                got += data
                most = max(most, sum(len(d) for d in channels[0].recv_buf))
                await asyncio.sleep(0.002)   # ~8 MB/s at most
            s.close()
    assert bytes(got) == payload
    assert channels[0].init_window == BASE_WINDOW
    assert most <= BASE_WINDOW


@contextlib.contextmanager
def delay_proxy(target: tuple[str, int], rtt_ms: float) -> Iterator[int]:
    """bench/delay.py in front of ``target``: every chunk rtt/2 late, each way."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "delay.py"),
                             "--to", f"{target[0]}:{target[1]}", "--rtt-ms", str(rtt_ms)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip().isdigit(), f"delay.py printed {line!r}"
        yield int(line)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_a_real_delayed_link_grows_the_window(home, channels):
    """Through a 40 ms round trip, measured by the channel's own open: the window grows."""
    payload = os.urandom(32 * MiB)
    with source(payload) as target, delay_proxy(home.address, 40) as port:
        async with forward(home, target, max_window=16 * MiB, port=port) as (fwd, conn):
            got = await _read_all(fwd.spec.bind_port, len(payload))
            rtt = FastConnection.of(conn).rtt  # type: ignore[union-attr]
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert 0.035 <= rtt < 1.0, rtt
    assert channels[0].init_window > 2 * BASE_WINDOW, channels[0].init_window
