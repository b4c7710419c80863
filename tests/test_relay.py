"""The resumable-forward program (``tunneld.relay``) in one process: a keeper and a relay
served on this loop, the link between them spliced here and cut again and again at random
points; every byte arrives once and in order, both ways.  (With a real sshd, the daemon and
its restarts: tests/e2e/test_e2e_resume.py.)"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import json
import os
import random
import socket
import struct
import sys

import pytest

from tunneld import relay, relay_serve, resume_relay

pytestmark = pytest.mark.timeout(60)

SECRET = os.urandom(32).hex()


def test_frames_are_cut_from_any_chunking():
    data = relay.frame(relay.DATA, 7, b"abc") + relay.jframe(relay.SYNC, {"x": 1}) + \
        relay.frame(relay.EOF, 7)
    for size in (1, 2, 5, len(data)):
        f = relay.Frames()
        out = []
        for i in range(0, len(data), size):
            out += f.feed(data[i:i + size])
        assert out == [(relay.DATA, 7, b"abc"), (relay.SYNC, 0, b'{"x": 1}'),
                       (relay.EOF, 7, b"")]


@pytest.mark.parametrize("head", [relay.HEAD.pack(99, 0, 0),
                                  relay.HEAD.pack(relay.DATA, 1, relay.MAX_FRAME + 1)])
def test_a_bad_frame_is_refused(head):
    with pytest.raises(ValueError):
        relay.Frames().feed(head)


async def _auth(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_unix_connection(path)
    w.write(relay.jframe(relay.AUTH, {"secret": SECRET, "kind": "link"}))
    t, _, n = relay.HEAD.unpack(await r.readexactly(relay.HEAD.size))
    assert json.loads(await r.readexactly(n))["ok"]
    return r, w


async def _pump(r, w) -> None:
    while data := await r.read(random.choice((1, 100, 65536))):
        w.write(data)
        await w.drain()


@contextlib.asynccontextmanager
async def _ends(tmp_path, target_port: int, **limits):
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    fd = lsock.detach()   # the keeper's now: closed once, by it
    paths = {}
    tasks = []
    for role in ("keeper", "relay"):
        d = tmp_path / role
        d.mkdir(mode=0o700)
        conf = dict(limits, role=role, dir=str(d), secret=SECRET,
                    targets=[["127.0.0.2", target_port]], fd=fd)
        tasks.append(asyncio.ensure_future(relay_serve.serve(
            conf, lambda p, end, r=role: paths.__setitem__(r, (p, end)))))
    while len(paths) < 2:
        await asyncio.sleep(0.01)
    try:
        yield port, paths["keeper"], paths["relay"]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _echo(reader, writer) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_bytes_survive_a_link_cut_at_random_points(tmp_path):
    server = await asyncio.start_server(_echo, "127.0.0.2", 0)
    target = server.sockets[0].getsockname()[1]
    payload = os.urandom(24 * 1024 * 1024)
    async with _ends(tmp_path, target, stream_buffer=1 << 20) as (port, (keeper, _),
                                                                  (relay_path, _)):
        stop = asyncio.Event()
        cuts = 0

        async def link() -> None:
            nonlocal cuts
            while not stop.is_set():
                kr, kw = await _auth(keeper)
                rr, rw = await _auth(relay_path)
                pumps = [asyncio.ensure_future(_pump(kr, rw)),
                         asyncio.ensure_future(_pump(rr, kw))]
                await asyncio.wait(pumps, timeout=random.uniform(0.002, 0.03))
                for p in pumps:
                    p.cancel()
                kw.transport.abort()
                rw.transport.abort()
                cuts += 1
                await asyncio.sleep(random.uniform(0, 0.05))

        linker = asyncio.ensure_future(link())
        r, w = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            for i in range(0, len(payload), 100_000):
                w.write(payload[i:i + 100_000])
                await w.drain()
            w.write_eof()

        sender = asyncio.ensure_future(send())
        got = bytearray()
        while data := await asyncio.wait_for(r.read(1 << 20), 20):
            got += data
        await sender
        stop.set()
        await linker
        w.close()
    server.close()
    assert cuts >= 5, cuts
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_a_full_buffer_pauses_the_reader(tmp_path):
    """No link at all: the keeper takes what its stream_buffer allows, then stops reading
    (the client's writes back up in the kernel), never holding more."""
    limit = 256 * 1024
    async with _ends(tmp_path, 9, stream_buffer=limit) as (port, (_, keeper), _):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x" * (8 * 1024 * 1024))
        held: list[int] = []
        for _ in range(10):
            await asyncio.sleep(0.05)
            held.append(sum(s.buf_len for s in keeper.streams.values()))
        assert w.transport.get_write_buffer_size() > 0   # the client is held back
        w.transport.abort()
    assert limit <= held[-1] <= limit + 256 * 1024, held   # one read past the limit at most
    assert held[-1] == held[-5]


class _Link:
    """A link spliced between the two ends (as tunneld does), until cut."""

    async def start(self, keeper: str, relay_path: str) -> _Link:
        kr, self.kw = await _auth(keeper)
        rr, self.rw = await _auth(relay_path)
        self.pumps = [asyncio.ensure_future(_pump(kr, self.rw)),
                      asyncio.ensure_future(_pump(rr, self.kw))]
        return self

    def cut(self) -> None:
        for p in self.pumps:
            p.cancel()
        self.kw.transport.abort()
        self.rw.transport.abort()


async def _until(what: str, cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _source(reader, writer, total: int, gate: asyncio.Event | None = None) -> None:
    """A target that sends ``total`` bytes (endless if 0; once ``gate`` is set), then ends."""
    if gate is not None:
        await gate.wait()
    chunk, sent = b"z" * 65536, 0
    with contextlib.suppress(ConnectionError):
        while not total or sent < total:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        writer.write_eof()
        await reader.read()
    writer.close()


def _rst(w: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), not an orderly end."""
    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
    w.transport.abort()


def _slow_reader(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    return s


async def test_a_stream_is_forgotten_only_once_its_last_bytes_are_delivered(tmp_path):
    """The keeper's client reads nothing until the target has sent everything and ended:
    the keeper holds the last bytes undelivered when both ends have ended.  It must not
    forget the stream before it has delivered them and said so, or the relay keeps them
    (and the stream) for ever."""
    total, gate = 1 << 20, asyncio.Event()   # within stream_buffer: all of it comes
    server = await asyncio.start_server(lambda r, w: _source(r, w, total, gate), "127.0.0.2", 0)
    target = server.sockets[0].getsockname()[1]
    async with _ends(tmp_path, target, stream_buffer=4 << 20) as (
            port, (keeper, kend), (relay_path, rend)):
        link = await _Link().start(keeper, relay_path)
        loop = asyncio.get_running_loop()
        s = _slow_reader(port)
        s.shutdown(socket.SHUT_WR)
        await _until("a stream", lambda: kend.streams)
        st = next(iter(kend.streams.values()))
        st.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                         4096)
        gate.set()
        await _until("the target's end at the keeper", lambda: st.eof_in)
        assert st.delivered() < st.recv == total   # the case: its last bytes wait here
        got = 0
        while data := await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 10):
            got += len(data)
        s.close()
        assert got == total
        await _until("both ends to forget the stream", lambda: not rend.streams and
                     not kend.streams)
        assert rend.owed == kend.owed == 0
        link.cut()
    server.close()


async def test_a_stream_reset_while_its_target_connects_closes_that_connection(
        tmp_path, monkeypatch):
    accepted: list[asyncio.StreamReader] = []

    async def target_side(reader, writer) -> None:
        accepted.append(reader)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(target_side, "127.0.0.2", 0)
    target = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    connecting = asyncio.Event()
    go_on = asyncio.Event()
    real = loop.create_connection

    async def slow(factory, host=None, port=None, **kwargs):
        if host == "127.0.0.2":   # the relay's, to its target (not the test's own)
            connecting.set()
            await go_on.wait()
        return await real(factory, host, port, **kwargs)

    monkeypatch.setattr(loop, "create_connection", slow)
    async with _ends(tmp_path, target) as (port, (keeper, kend), (relay_path, rend)):
        link = await _Link().start(keeper, relay_path)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(connecting.wait(), 10)
        _rst(w)   # the RESET reaches the relay mid-connect
        await _until("the relay to drop the stream", lambda: not rend.streams)
        go_on.set()
        await _until("the target to be reached", lambda: accepted)
        # the late connection is closed, not left open with no stream
        assert await asyncio.wait_for(accepted[0].read(), 10) == b""
        link.cut()
    server.close()


async def test_a_link_replaced_while_backed_up_leaves_no_stream_paused(tmp_path):
    server = await asyncio.start_server(_echo, "127.0.0.2", 0)
    target = server.sockets[0].getsockname()[1]
    async with _ends(tmp_path, target) as (port, (keeper, kend), (relay_path, rend)):
        old = await _Link().start(keeper, relay_path)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"one")
        assert await asyncio.wait_for(r.readexactly(3), 10) == b"one"
        for end, conn in ((kend, kend.link), (rend, rend.link)):
            conn.pause_writing()   # the old link is backed up when the new one comes
            assert end.blocked
        new = await _Link().start(keeper, relay_path)
        w.write(b"two")
        assert await asyncio.wait_for(r.readexactly(3), 10) == b"two"
        w.close()
        old.cut()
        new.cut()
    server.close()


async def test_a_stream_that_ends_frees_the_end_buffer_for_the_others(tmp_path):
    """No link: a fills the keeper's whole buffer, so b (and any new stream) waits; once a
    is gone (here: reset, as by its suspend limit), b reads again."""
    async with _ends(tmp_path, 9, buffer=1 << 20) as (port, (_, kend), _):
        ra, wa = await asyncio.open_connection("127.0.0.1", port)
        wa.write(b"a" * (4 << 20))
        await _until("a to fill the buffer", lambda: kend.owed >= 1 << 20)
        rb, wb = await asyncio.open_connection("127.0.0.1", port)
        await _until("b's stream", lambda: len(kend.streams) == 2)
        wb.write(b"b" * 1000)
        await asyncio.sleep(0.2)
        b = max(kend.streams.values(), key=lambda st: st.sid)
        assert b.buf_len == 0 and b.paused
        a = min(kend.streams.values(), key=lambda st: st.sid)
        kend.reset(a, "ended here")   # (a paused reader sees no reset of its client)
        await _until("b to read once a is gone", lambda: b.buf_len == 1000)
        wb.transport.abort()
        wa.transport.abort()


@pytest.mark.parametrize("streams, limits", [
    (1, {"stream_buffer": 256 << 10}),
    (4, {"stream_buffer": 1 << 20, "buffer": 1 << 20}),
], ids=["stream_buffer", "buffer"])
async def test_stalled_readers_hold_one_buffer_across_link_cuts(tmp_path, streams, limits):
    """The keeper's clients read nothing; the target sends without end.  After each link the
    relay may send only what the keeper has *delivered* plus stream_buffer (and all streams
    together: buffer), not what it has received: the bytes the keeper holds stay bounded
    however often the link is cut."""
    limit = min(limits.values())
    server = await asyncio.start_server(lambda r, w: _source(r, w, 0), "127.0.0.2", 0)
    target = server.sockets[0].getsockname()[1]
    async with _ends(tmp_path, target, **limits) as (port, (keeper, kend), (relay_path, rend)):
        clients = [_slow_reader(port) for _ in range(streams)]
        held = []
        for _ in range(6):
            link = await _Link().start(keeper, relay_path)
            await _until("the streams", lambda: len(kend.streams) == streams)
            await _until("the relay to send all it may", lambda: rend.synced and kend.synced and
                         len(rend.streams) == streams and
                         all(st.paused for st in rend.streams.values()))
            await asyncio.sleep(0.1)   # what is on its way arrives
            held.append(sum(st.recv - st.delivered() for st in kend.streams.values()))
            link.cut()
            await _until("the link to go", lambda: kend.link is None and rend.link is None)
        for c in clients:
            c.close()
    server.close()
    # one read (256 KiB) per stream past the limit at most, each time
    assert max(held) <= limit + streams * (256 << 10), held


async def test_links_that_never_sync_do_not_hold_off_the_suspend_limit(tmp_path):
    """A relay reached again and again by a tunneld that cannot link it to the keeper (its
    keeper gone) still exits at its suspend limit."""
    async with _ends(tmp_path, 9, suspend=1.0) as (_, _, (relay_path, rend)):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not rend.quit.done() and loop.time() - t0 < 5:
            _, w = await _auth(relay_path)   # no SYNC from this side: never synced
            await asyncio.sleep(0.2)
            w.transport.abort()
        assert rend.quit.done(), "the relay did not stop at its suspend limit"
        assert loop.time() - t0 < 2.5


def test_the_program_is_one_text_of_the_standard_library_for_python_3_8():
    """What ``python3 -`` runs on the server: the three modules joined, no import of each
    other or of anything outside the standard library, parsable by Python 3.8."""
    text = resume_relay.program({"role": "relay"}).decode()
    tree = ast.parse(text, feature_version=(3, 8))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, ast.unparse(node)
            used.add((node.module or "").split(".")[0])
    assert used - {"__future__"} <= sys.stdlib_module_names, used
    assert text.count("from __future__") == 1 and "_CONFIG = {'role': 'relay'}" in text
