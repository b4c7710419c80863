#!/usr/bin/env python3
"""A TCP delay proxy: a long link on loopback (this kernel has no netem).

    python bench/delay.py --to HOST:PORT --rtt-ms 50 [--listen 127.0.0.1:0]

prints the port it listens on as one line on stdout once it listens, then serves until
SIGTERM/SIGINT (or, with ``--stdin-watch``, until its stdin reaches EOF: the parent died).
From Python (bench/ on sys.path)::

    from delay import DelayProxy
    with DelayProxy(("127.0.0.1", sshd_port), rtt_ms=50) as p:
        ... connect to ("127.0.0.1", p.port) ...
    p.stats   # counters the proxy printed when it stopped (see Stats)

Model.  Every chunk read from one side is written to the other side ``rtt_ms / 2`` later, in
each direction independently (one-way delay = RTT / 2).  EOF (half-close) follows the data
read before it, after the same delay; a connection reset by one side resets the other (SO_LINGER
0, then abort), after the same delay; data that can no longer be delivered is dropped.  By
default the TCP handshake's round trip is also paid: the upstream connection is made
1.5 × RTT after the client's was accepted (the client's connect() returns at once, so its first
bytes, or the server's banner, arrive when they would have on a real link: 2 RTT after the
connect for an echo, as over a real link; ``--no-handshake``: upstream connect at once).
At RTT 0 nothing is scheduled: a chunk is written as soon as it is read.

What is not modelled: bandwidth limits, loss, jitter, and TCP's own end-to-end window (the
proxy terminates TCP on each side, like a split-TCP link).  Each direction keeps up to
``--queue-mib`` (64 MiB) in flight; above it the proxy stops reading that side (back-pressure,
memory stays bounded), so a link of RTT r carries at most 64 MiB / r (1.3 GB/s at 50 ms):
what limits a transfer below that is the tunnel's own window, not this proxy.

A side that does not take data as fast as it comes (its transport's write buffer above 8 MiB)
stops the reading of the other side until it drains: end-to-end back-pressure, so at 0 ms the
queue stays at one chunk.  The client's socket is not read while the upstream connect is
under way (the queue would fill in the few milliseconds it takes).

So as not to be the bottleneck: 256 KiB reads (uvloop makes up to 32 per wake-up; larger ones
delay the timers by as much), one shared read buffer copied out per chunk, SO_RCVBUF/SO_SNDBUF
of 4 MiB asked on both sockets (capped by net.core.[rw]mem_max), TCP_NODELAY, uvloop when it
is importable, one process (own CPU).  The counters printed on stderr when it stops (``stats``)
say whether it had to: ``queue_full`` (reading stopped at the 64 MiB bound), ``max_late_ms``
(a delivery timer fired that late: the proxy's loop was busy).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

READ_SIZE = 256 << 10        # one read (uvloop reads up to 32 per wake-up: 8 MiB)
SOCK_BUF = 4 << 20           # SO_RCVBUF / SO_SNDBUF asked for
QUEUE_MAX = 64 << 20         # bytes in flight per direction before reading stops
WRITE_HIGH = 8 << 20         # transport write buffer: pause delivering above ...
WRITE_LOW = 2 << 20          # ... resume below
EPS = 0.0005                 # a chunk due within this many seconds is delivered now
CONNECT_TIMEOUT = 10.0       # upstream connect
STATS_PREFIX = "delay.py stats: "

_EOF = object()
_RST = object()


def set_sock_opts(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Stats:
    def __init__(self) -> None:
        self.conns = 0
        self.open = 0
        self.bytes = {"up": 0, "down": 0}      # client -> target, target -> client
        self.peak_queue = 0                    # most bytes waiting in one direction
        self.queue_full = 0                    # times reading stopped at QUEUE_MAX
        self.write_blocked = 0                 # times a side's write buffer hit WRITE_HIGH
        self.connect_errors = 0
        self.resets = 0
        self.max_late_ms = 0.0                 # worst timer firing after its due time

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, max_late_ms=round(self.max_late_ms, 2))


class Pipe:
    """One direction of one connection: what ``src`` reads, ``dst`` gets ``delay`` later."""

    def __init__(self, conn: Conn, name: str):
        self.conn = conn
        self.name = name
        self.src: Side
        self.dst: Side
        self.q: collections.deque[tuple[float, Any]] = collections.deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.blocked = False       # dst's write buffer is above WRITE_HIGH
        self.src_paused = False
        self.done = False          # EOF or reset delivered, or dst gone

    def push(self, item: Any) -> None:
        if self.done:
            return
        c = self.conn
        self.q.append((c.loop.time() + c.delay, item))
        if isinstance(item, bytes):
            self.queued += len(item)
            st = c.stats
            if self.queued > st.peak_queue:
                st.peak_queue = self.queued
            if self.queued >= QUEUE_MAX and not self.src_paused:
                st.queue_full += 1
                self.pause_src()
        if len(self.q) == 1 and self.timer is None:
            if c.delay <= 0:
                self.pump(False)
            else:
                self.timer = c.loop.call_at(self.q[0][0], self.pump)

    def pause_src(self) -> None:
        if not self.src_paused and self.src.transport is not None and not self.src.lost:
            self.src_paused = True
            with contextlib.suppress(Exception):
                self.src.transport.pause_reading()

    def kick(self) -> None:
        """dst became writable (connected, or its buffer drained)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pump(False)

    def pump(self, timed: bool = True) -> None:
        """Deliver what is due; ``timed``: called by the timer set for the head's due time
        (then how late it runs is the loop's lag, recorded in the stats)."""
        self.timer = None
        dst = self.dst
        if self.done or self.blocked or dst.transport is None:
            return
        loop = self.conn.loop
        now = loop.time()
        st = self.conn.stats
        while self.q:
            due, item = self.q[0]
            if due > now + EPS:
                self.timer = loop.call_at(due, self.pump)
                break
            self.q.popleft()
            if timed:
                timed = False
                late = (now - due) * 1e3
                if late > st.max_late_ms:
                    st.max_late_ms = late
            if item is _EOF:
                self.done = True
                if dst.transport.can_write_eof():
                    with contextlib.suppress(Exception):
                        dst.transport.write_eof()
                self.conn.check_done()
                break
            if item is _RST:
                self.done = True
                self.conn.reset(dst)
                break
            self.queued -= len(item)
            st.bytes[self.name] += len(item)
            dst.transport.write(item)
            if self.blocked:          # pause_writing() was called from inside write()
                break
        if self.src_paused and not self.blocked and self.queued <= QUEUE_MAX // 2:
            self.src_paused = False
            if self.src.transport is not None and not self.src.lost and not (
                    self.src is self.conn.client and self.conn.held):
                with contextlib.suppress(Exception):
                    self.src.transport.resume_reading()

    def drop(self) -> None:
        """dst is gone: nothing more can be delivered."""
        self.done = True
        self.q.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Side(asyncio.BufferedProtocol):
    """One socket of a connection."""

    def __init__(self, conn: Conn, out: Pipe, inn: Pipe):
        self.conn = conn
        self.out = out           # the pipe this side reads into
        self.inn = inn           # the pipe that writes into this side
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.read_eof = False

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_sock_opts(sock)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.transport = transport
        self.conn.side_up(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.proxy.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.out.push(bytes(self.conn.proxy.buf[:nbytes]))
        if self.out.src_paused or self.conn.held and self is self.conn.client:
            # paused before the transport started reading (from connection_made: uvloop
            # starts reading after it returns, undoing the pause): pause now
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.read_eof = True
        self.out.push(_EOF)
        return True              # keep the socket open: the other direction may go on

    def pause_writing(self) -> None:
        """This side does not take data as fast as it comes: stop reading the other side
        too (end-to-end back-pressure, as TCP's window would; the data in flight stays)."""
        self.inn.blocked = True
        self.conn.stats.write_blocked += 1
        self.inn.pause_src()

    def resume_writing(self) -> None:
        self.inn.blocked = False
        self.inn.kick()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.conn.closing:
            return
        self.inn.drop()
        if not self.read_eof:
            self.out.push(_RST if exc is not None else _EOF)
        elif exc is not None:
            self.out.push(_RST)
        self.conn.check_done()


class Conn:
    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.loop = proxy.loop
        self.delay = proxy.delay
        self.stats = proxy.stats
        self.closing = False
        self.up = Pipe(self, "up")        # client -> target
        self.down = Pipe(self, "down")    # target -> client
        self.client = Side(self, out=self.up, inn=self.down)
        self.server = Side(self, out=self.down, inn=self.up)
        self.up.src, self.up.dst = self.client, self.server
        self.down.src, self.down.dst = self.server, self.client
        self.task: asyncio.Task | None = None
        self.held = False                 # client reading paused until the upstream is up

    def side_up(self, side: Side) -> None:
        if side is self.client:
            self.stats.conns += 1
            self.stats.open += 1
            self.proxy.conns.add(self)
            if self.proxy.connect_delay <= 0:
                self.hold_client()
            self.task = self.loop.create_task(self.connect())
        else:
            self.up.kick()
            if self.held and not self.up.src_paused and not self.client.lost:
                with contextlib.suppress(Exception):
                    self.client.transport.resume_reading()
            self.held = False

    def hold_client(self) -> None:
        """Stop reading the client while the upstream connect is under way (uvloop reads up
        to 32 chunks per wake-up: the queue would fill before the connect is done)."""
        if not self.client.lost and self.client.transport is not None:
            self.held = True
            with contextlib.suppress(Exception):
                self.client.transport.pause_reading()

    async def connect(self) -> None:
        if self.proxy.connect_delay > 0:
            await asyncio.sleep(self.proxy.connect_delay)
        if self.closing or self.client.lost and not self.up.q:
            return self.close()
        self.hold_client()
        family, type_, proto, addr = self.proxy.target_addr
        try:
            sock = socket.socket(family, type_, proto)
            set_sock_opts(sock)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(self.loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
                await self.loop.create_connection(lambda: self.server, sock=sock)
            except BaseException:
                sock.close()
                raise
        except asyncio.CancelledError:
            self.close()
            raise
        except (OSError, asyncio.TimeoutError):
            self.stats.connect_errors += 1
            self.reset(self.client)   # as a refused connect: the client sees a reset

    def check_done(self) -> None:
        if self.closing:
            return
        if (self.up.done or self.client.lost) and (self.down.done or self.server.lost) \
                and not self.up.q and not self.down.q:
            self.close()

    def reset(self, side: Side) -> None:
        self.stats.resets += 1
        t = side.transport
        if t is not None and not side.lost:
            sock = t.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            t.abort()
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self.closing:
            return
        self.closing = True
        self.proxy.conns.discard(self)
        self.stats.open -= 1
        for p in (self.up, self.down):
            p.drop()
        for s in (self.client, self.server):
            if s.transport is not None and not s.lost:
                (s.transport.abort if abort else s.transport.close)()
        if self.task is not None and not self.task.done() and \
                self.task is not asyncio.current_task(self.loop):
            self.task.cancel()


class Proxy:
    def __init__(self, target: tuple[str, int], rtt_ms: float, handshake: bool = True):
        self.target = target
        self.delay = max(0.0, rtt_ms) / 2e3
        self.connect_delay = 3 * self.delay if handshake else 0.0
        self.stats = Stats()
        self.conns: set[Conn] = set()
        self.buf = memoryview(bytearray(READ_SIZE))
        self.loop: asyncio.AbstractEventLoop
        self.target_addr: tuple[Any, ...]

    async def serve(self, listen: tuple[str, int], stdin_watch: bool) -> None:
        self.loop = asyncio.get_running_loop()
        family, type_, proto, _, addr = socket.getaddrinfo(*self.target,
                                                           type=socket.SOCK_STREAM)[0]
        self.target_addr = (family, type_, proto, addr)   # resolved once, not per connect
        infos = socket.getaddrinfo(listen[0], listen[1], type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        lsock = socket.socket(family, type_, proto)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_sock_opts(lsock)     # inherited by accepted sockets (buffers before the handshake)
        lsock.bind(addr)
        lsock.listen(4096)
        server = await self.loop.create_server(lambda: Conn(self).client, sock=lsock)
        print(lsock.getsockname()[1], flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        if stdin_watch:
            fd = sys.stdin.fileno()
            self.loop.add_reader(fd, lambda: os.read(fd, 4096) or stop.set())
        await stop.wait()
        server.close()
        for c in list(self.conns):
            c.close(abort=True)
        await asyncio.sleep(0)
        print(STATS_PREFIX + json.dumps(self.stats.as_dict()), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--to", required=True, metavar="HOST:PORT", help="where to connect")
    ap.add_argument("--rtt-ms", type=float, required=True,
                    help="round trip added (each direction gets half)")
    ap.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    ap.add_argument("--no-handshake", action="store_true",
                    help="connect upstream at once (default: 1.5 × RTT after the accept, "
                         "the TCP handshake's cost)")
    ap.add_argument("--queue-mib", type=float, default=64.0,
                    help="bytes in flight per direction before reading stops (MiB)")
    ap.add_argument("--stdin-watch", action="store_true",
                    help="also stop when stdin reaches EOF")
    global QUEUE_MAX
    args = ap.parse_args(argv)
    QUEUE_MAX = max(READ_SIZE, int(args.queue_mib * (1 << 20)))
    proxy = Proxy(parse_addr(args.to), args.rtt_ms, handshake=not args.no_handshake)
    coro = proxy.serve(parse_addr(args.listen), args.stdin_watch)
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


# ------------------------------------------------------------------------------------------
# from Python: the proxy as a subprocess


class DelayProxy:
    """``bench/delay.py`` in a subprocess (own CPU), for ``with`` or start()/stop()."""

    def __init__(self, target: tuple[str, int], rtt_ms: float,
                 listen: tuple[str, int] = ("127.0.0.1", 0), *, handshake: bool = True,
                 timeout: float = 10.0, stderr_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None):
        self.target = target
        self.rtt_ms = rtt_ms
        self.listen = listen
        self.handshake = handshake
        self.timeout = timeout
        self.stderr_path = stderr_path
        self.env = env
        self.port: int = 0
        self.proc: subprocess.Popen | None = None
        self.stats: dict[str, Any] | None = None
        self._err: Any = None

    def command(self) -> list[str]:
        h, p = self.target
        lh, lp = self.listen
        cmd = [sys.executable, os.path.abspath(__file__), "--to", f"{h}:{p}",
               "--rtt-ms", f"{self.rtt_ms:g}", "--listen", f"{lh}:{lp}", "--stdin-watch"]
        return cmd + ([] if self.handshake else ["--no-handshake"])

    def start(self) -> DelayProxy:
        self._err = (open(self.stderr_path, "a+b") if self.stderr_path
                     else tempfile.TemporaryFile())
        self._err_start = self._err.seek(0, os.SEEK_END)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, env=self.env,
                                     start_new_session=True, close_fds=True)
        assert self.proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and not line.endswith(b"\n"):
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    break
                chunk = os.read(self.proc.stdout.fileno(), 64)
                if not chunk:
                    break
                line += chunk
        if not line.strip().isdigit():
            err = self._stderr_text()
            self.stop()
            raise RuntimeError(f"delay proxy did not start within {self.timeout:g}s "
                               f"(stdout {line[:80]!r}): {err[-600:]}")
        self.port = int(line)
        return self

    def _stderr_text(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(self._err_start)
        text = self._err.read().decode(errors="replace")
        self._err.seek(0, os.SEEK_END)
        return text

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Stop the process (SIGTERM, then SIGKILL); returns (and keeps) its stats."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=timeout)
            if proc.stdout:
                proc.stdout.close()
        if self._err is not None:
            for ln in self._stderr_text().splitlines():
                if ln.startswith(STATS_PREFIX):
                    with contextlib.suppress(ValueError):
                        self.stats = json.loads(ln[len(STATS_PREFIX):])
            self._err.close()
            self._err = None
        return self.stats

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
