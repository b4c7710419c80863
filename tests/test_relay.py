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
import sys

import pytest

from tunneld import relay, relay_serve, resume

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


def test_the_program_is_one_text_of_the_standard_library_for_python_3_8():
    """What ``python3 -`` runs on the server: the three modules joined, no import of each
    other or of anything outside the standard library, parsable by Python 3.8."""
    text = resume.program({"role": "relay"}).decode()
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
