"""A local forward's channels against a real sshd, in this process: on the fast path
(``fastpath.channel.TCPChannel``, on AES-GCM and through asyncssh's own packet code: other
ciphers, packet logging) clients get the same bytes as through asyncssh's channel;
half-closes, refused opens, clients that leave while their channel is being opened and a
dying connection all end cleanly and give the channel number back; keepalives keep their
timing.  With ``TUNNELD_STOCK_ASYNCSSH=1`` (the tests' stock pass) the same tests run on
asyncssh's channels, less the fast path's internals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import AsyncIterator, Iterator

import asyncssh
import pytest
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_CLOSE

from tunneld import fastpath, localside
from tunneld.config import Defaults
from tunneld.fastpath import gate
from tunneld.fastpath.channel import TCPChannel
from tunneld.fastpath.sealing import Sender
from tunneld.forward import LocalClient, LocalForward
from tunneld.spec import ForwardSpec
from tunneld.state import ChanState, HostState
from tunneld.window import BASE_WINDOW

pytestmark = pytest.mark.timeout(60)

GCM = "aes128-gcm@openssh.com"
#: whether the connections are attached (the fast path is on)
FAST = gate.current.active
fast_only = pytest.mark.skipif(not FAST,
                               reason=f"the fast path is off here ({gate.current.reason})")


class _Host:
    """What a forward asks of its host supervisor: the live connection (a real one)."""

    name = "chan-test"
    #: the window's growth is test_e2e_window's: here it stays at the start (a first open
    #: slower than 2 ms on a loaded machine would let a loopback channel grow its window)
    settings = Defaults(max_window=BASE_WINDOW)

    def __init__(self, conn: asyncssh.SSHClientConnection):
        self.conn = conn
        self.state = HostState.CONNECTED

    def live_connection(self) -> asyncssh.SSHClientConnection:
        return self.conn

    async def connection_for_client(self) -> asyncssh.SSHClientConnection:
        return self.conn


@pytest.fixture
def home(sshd, monkeypatch):
    monkeypatch.setenv("HOME", str(sshd.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield sshd


@contextlib.asynccontextmanager
async def forward(sshd, target: tuple[str, int], cipher: str = GCM,
                  **kw) -> AsyncIterator[tuple[LocalForward, asyncssh.SSHClientConnection]]:
    """A LocalForward on a free port to ``target`` through a connection to the test sshd
    (attached, unless the fast path is off)."""
    conn = await asyncssh.connect(sshd.host, encryption_algs=[cipher], **kw)
    assert fastpath.attach(conn) is FAST
    fwd = LocalForward(ForwardSpec("127.0.0.1", 0, target[0], target[1]), _Host(conn))
    try:
        await fwd.bind()
        yield fwd, conn
    finally:
        await fwd.close()
        conn.close()
        await conn.wait_closed()


async def _exchange(port: int, payload: bytes, chunk: int = 65536) -> bytes:
    """Send ``payload`` through the forward, half-close, and read everything back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), chunk):
            writer.write(payload[i:i + chunk])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = await reader.read()
    await sender
    writer.close()
    return got


async def _channels_empty(conn: asyncssh.SSHClientConnection, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while conn._channels and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert not conn._channels, conn._channels


def small_send_buffer(monkeypatch, size: int) -> None:
    """Each local client's socket gets a ``size``-byte kernel send buffer: little room on our
    side, so the data a slow reader does not take waits in tunneld."""
    orig_made = LocalClient.connection_made

    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                      size)
        orig_made(self, transport)

    monkeypatch.setattr(LocalClient, "connection_made", connection_made)


@contextlib.contextmanager
def _count(owner: object, name: str) -> Iterator[list[int]]:
    """Count calls of ``owner.name`` while in the block: a class's method (asyncssh's own
    code paths), or an attribute of one object (what an attached connection calls)."""
    calls = [0]
    orig = getattr(owner, name)
    had = name in vars(owner)

    def counting(*args, **kwargs):
        calls[0] += 1
        return orig(*args, **kwargs)

    if isinstance(owner, type):
        setattr(owner, name, lambda self, *a, **k: counting(self, *a, **k))
    else:
        setattr(owner, name, counting)
    try:
        yield calls
    finally:
        if had:
            setattr(owner, name, orig)
        else:
            delattr(owner, name)


@fast_only
async def test_fast_path_carries_bulk_data_both_ways_without_asyncssh_packet_code(
        home, echo_server, monkeypatch):
    echo = echo_server()
    payload = os.urandom(3_000_000)
    async with forward(home, echo) as (fwd, conn):
        port = fwd.spec.bind_port
        assert await _exchange(port, b"warm up") == b"warm up"
        adjusts = []
        orig_send = Sender.send

        def send(self, head, data=b""):
            if head[0] == asyncssh.constants.MSG_CHANNEL_WINDOW_ADJUST:
                adjusts.append(int.from_bytes(head[5:9], "big"))
            orig_send(self, head, data)

        monkeypatch.setattr(Sender, "send", send)
        with _count(SSHConnection, "_recv_packet") as stock_recv, \
                _count(conn, "send_packet") as stock_send:
            got = await _exchange(port, payload)
        monkeypatch.undo()
        assert got == payload
        # the window is given back as OpenSSH does, once more than three packets' worth
        # (96 KiB) is used, not only when half of it is: the server never waits for window
        assert max(adjusts) <= 4 * 32768, max(adjusts)
        assert len(adjusts) >= len(payload) // (4 * 32768), len(adjusts)
        assert fwd.bytes_out == fwd.bytes_in == len(payload) + 7
        # open, confirm, ~92 data packets each way, window adjusts, EOFs, CLOSEs: all sealed
        # and opened by the fast path; asyncssh's packet code saw none of them
        assert stock_recv[0] == 0, stock_recv
        assert stock_send[0] == 0, stock_send
        await _channels_empty(conn)


@pytest.mark.parametrize("cipher", ["chacha20-poly1305@openssh.com", "aes128-ctr"])
async def test_other_ciphers_go_through_asyncssh_packet_code(home, echo_server, cipher):
    echo = echo_server()
    payload = os.urandom(1_000_000)
    async with forward(home, echo, cipher) as (fwd, conn):
        with _count(SSHConnection, "_recv_packet") as stock_recv:
            got = await _exchange(fwd.spec.bind_port, payload)
        assert got == payload
        assert stock_recv[0] > 30  # every data packet, then EOF and CLOSE
        await _channels_empty(conn)


async def test_packet_logging_takes_asyncssh_code_and_still_works(home, echo_server):
    echo = echo_server()
    async with forward(home, echo) as (fwd, conn):
        asyncssh.set_debug_level(3)
        try:
            with _count(SSHConnection, "_recv_packet") as stock_recv:
                got = await _exchange(fwd.spec.bind_port, b"logged" * 1000)
        finally:
            asyncssh.set_debug_level(1)
        assert got == b"logged" * 1000
        assert stock_recv[0] >= 3


async def test_server_that_speaks_first_then_closes(home, echo_server):
    echo = echo_server(greeting=b"220 hello\r\n")
    async with forward(home, echo) as (fwd, conn):
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.spec.bind_port)
        assert await reader.readexactly(11) == b"220 hello\r\n"
        writer.write(b"QUIT\r\n")
        writer.write_eof()
        assert await reader.read() == b"QUIT\r\n"
        writer.close()
        await _channels_empty(conn)


@fast_only
async def test_slow_client_gets_everything_after_the_server_closed(home, monkeypatch):
    """The server writes 3 MB and closes; the client reads slowly: data waits here (the
    window closes and opens again), the server's CLOSE arrives while some of it is still
    queued, the client gets all of it, and the connection stays up (nothing is sent on the
    channel after its CLOSE: OpenSSH disconnects on a message for a channel it freed)."""
    payload = os.urandom(3_000_000)
    srv = socket.create_server(("127.0.0.2", 0))
    loop = asyncio.get_running_loop()

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.sendall(payload)

    small_send_buffer(monkeypatch, 8 * 1024)
    queued_at_close = []
    orig_close = TCPChannel._close

    def close(self):
        queued_at_close.append(sum(len(d) for d in self.recv_buf))
        orig_close(self)

    monkeypatch.setattr(TCPChannel, "_close", close)
    sent: list[tuple[int, int]] = []   # (message type, recipient channel) of what we send
    orig_send = Sender.send

    def send(self, head, data=b""):
        if len(head) >= 5:
            sent.append((head[0], int.from_bytes(head[1:5], "big")))
        orig_send(self, head, data)

    monkeypatch.setattr(Sender, "send", send)
    server = loop.run_in_executor(None, serve)
    try:
        async with forward(home, srv.getsockname()) as (fwd, conn):
            s = socket.create_connection(("127.0.0.1", fwd.spec.bind_port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            s.shutdown(socket.SHUT_WR)  # sshd closes the channel once the server is done
            s.setblocking(False)
            got = bytearray()
            while len(got) < len(payload) + 1:
                data = await asyncio.wait_for(loop.sock_recv(s, 16 * 1024), 10)
                if not data:
                    break
                got += data
                await asyncio.sleep(0.0005)
            s.close()
            await asyncio.wait_for(server, 20)
            assert bytes(got) == payload
            assert queued_at_close and queued_at_close[0] > 4 * 32768, queued_at_close
            closes = [i for i, (t, _) in enumerate(sent) if t == MSG_CHANNEL_CLOSE]
            assert len(closes) == 1
            after = [m for m in sent[closes[0] + 1:] if m[1] == sent[closes[0]][1]]
            assert not after, after
            assert await _still_fine(conn)
            await _channels_empty(conn)
    finally:
        srv.close()


async def _still_fine(conn: asyncssh.SSHClientConnection) -> bool:
    """The SSH connection still runs a command."""
    result = await conn.run("echo still fine", check=True)
    return result.stdout.strip() == "still fine"


@pytest.mark.parametrize("by_listener", [True, False], ids=["by-listener", "one-by-one"])
@pytest.mark.parametrize("native", [True, False], ids=["libc-setsockopt", "socket-object"])
async def test_clients_are_armed_from_their_accept_and_end_with_a_fin(
        home, monkeypatch, by_listener, native):
    """A client's socket is armed to reset (SO_LINGER 0) before its first callback: by the
    listener, whose SO_LINGER the sockets it accepts inherit, or one by one where they do not
    (the listener's first client tells).  An orderly end disarms it, with libc's setsockopt
    or a socket object's: a slow client whose data still waits in tunneld and in its socket
    when the server's CLOSE arrives gets every byte, then EOF (armed, it would be reset)."""
    if not by_listener:
        monkeypatch.setattr("tunneld.forward.arm_listener", lambda sock: None)
    if not native:
        monkeypatch.setattr(localside, "_setsockopt", None)
    payload = os.urandom(600_000)
    srv = socket.create_server(("127.0.0.2", 0))
    loop = asyncio.get_running_loop()

    srv.settimeout(20)   # a failed test must not leave the thread in accept()

    def serve() -> None:
        for _ in range(2):
            c, _ = srv.accept()
            with c:
                c.sendall(payload)

    armed: list[bytes] = []
    orig_made = LocalClient.connection_made

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024)  # data queues here
        orig_made(self, transport)
        armed.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     len(localside.LINGER_RESET)))

    monkeypatch.setattr(LocalClient, "connection_made", connection_made)
    server = loop.run_in_executor(None, serve)
    try:
        async with forward(home, srv.getsockname()) as (fwd, conn):
            for _ in range(2):
                s = socket.create_connection(("127.0.0.1", fwd.spec.bind_port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
                s.shutdown(socket.SHUT_WR)
                s.setblocking(False)
                got = bytearray()
                with s:
                    while True:
                        data = await asyncio.wait_for(loop.sock_recv(s, 16 * 1024), 10)
                        if not data:
                            break
                        got += data
                        await asyncio.sleep(0.001)
                assert bytes(got) == payload
            await asyncio.wait_for(server, 20)
            assert armed == [localside.LINGER_RESET] * 2
            assert fwd.arms_clients is by_listener
            await _channels_empty(conn)
    finally:
        srv.close()


async def test_refused_open_closes_the_client_and_says_why(home, free_port):
    closed_port = free_port("127.0.0.2")
    async with forward(home, ("127.0.0.2", closed_port)) as (fwd, conn):
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.spec.bind_port)
        writer.write(b"anyone?")
        with pytest.raises(ConnectionResetError):   # refused: a reset, not an empty reply
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert "the server could not open the connection" in (fwd.last_error or "")
        assert f"127.0.0.2:{closed_port}" in fwd.last_error
        await _channels_empty(conn)


async def test_clients_leaving_while_their_channel_opens_leak_nothing(home, echo_server):
    """A client that disconnects before the server confirmed its channel: the channel is
    closed as soon as it is confirmed, and its number given back."""
    echo = echo_server()
    async with forward(home, echo) as (fwd, conn):
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", fwd.spec.bind_port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # reset right away
        await _channels_empty(conn)
        await asyncio.sleep(0.2)
        assert not fwd.conns
        # and the forward still serves
        assert await _exchange(fwd.spec.bind_port, b"still fine") == b"still fine"
        await _channels_empty(conn)


@fast_only
async def test_connection_dying_under_open_and_opening_channels(home, echo_server):
    """The SSH link dies with one channel open and one still being opened: both clients are
    ended, the opening one with the reason logged, and no channel is left behind."""
    echo = echo_server()
    async with forward(home, echo) as (fwd, conn):
        port = fwd.spec.bind_port
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"ping")
        assert await r1.readexactly(4) == b"ping"
        opening: list[TCPChannel] = []
        orig_init = TCPChannel.__init__

        def init(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            opening.append(self)
            conn._transport.abort()  # dies before the server can confirm this one

        TCPChannel.__init__ = init  # type: ignore[method-assign]
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r2.read(), 10)
        finally:
            TCPChannel.__init__ = orig_init  # type: ignore[method-assign]
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r1.readexactly(1), 10)
        for w in (w1, w2):
            w.close()
        assert len(opening) == 1 and opening[0].send_state is ChanState.CLOSED
        assert not conn._channels
        assert "the connection to the server failed" in (fwd.last_error or ""), fwd.last_error


async def test_rekeying_under_the_channel_fast_path(home, echo_server):
    echo = echo_server()
    payload = os.urandom(4_000_000)
    with _count(SSHConnection, "_send_kexinit") as kexinits:
        async with forward(home, echo, rekey_bytes=200_000) as (fwd, conn):
            got = await _exchange(fwd.spec.bind_port, payload)
            assert got == payload
            # the connection is still good after the key exchanges
            result = await conn.run("echo still here", check=True)
            assert result.stdout.strip() == "still here"
    assert kexinits[0] >= 5, kexinits


async def test_keepalive_waits_for_quiet_and_follows_a_new_interval(home, echo_server):
    """asyncssh sends a keepalive ``interval`` after the last data arrived; the fast path
    keeps one timer instead of re-arming it per read: traffic still postpones keepalives, quiet
    still brings them, and set_keepalive applies at once."""
    echo = echo_server()
    with _count(SSHConnection, "_make_keepalive_request") as sent:
        async with forward(home, echo, keepalive_interval=1.0) as (fwd, conn):
            reader, writer = await asyncio.open_connection("127.0.0.1", fwd.spec.bind_port)

            async def tick() -> None:
                writer.write(b"tick")
                assert await reader.readexactly(4) == b"tick"

            for _ in range(40):  # 2 s of traffic, a round trip every 50 ms
                await tick()
                await asyncio.sleep(0.05)
            busy = sent[0]
            await asyncio.sleep(2.3)  # quiet: keepalives at about 1 and 2 s
            quiet = sent[0] - busy
            await tick()  # the 1 s timer starts over here (next at about 3 s)...
            conn.set_keepalive(0.2)  # ...but a new interval applies at once
            before = sent[0]
            await asyncio.sleep(0.35)
            faster = sent[0] - before
            writer.close()
    assert busy == 0, busy
    assert quiet == 2, quiet
    assert faster >= 1, faster
