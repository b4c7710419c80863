"""The file descriptors a multiplexing client passes (its stdin, stdout, stderr), read and
written on the event loop.

An ssh client hands over whatever its stdio is: a terminal, a pipe, a socket, a regular file
or ``/dev/null``.  The first three are waited on with the loop's readiness callbacks (a
terminal stays blocking, as OpenSSH's master leaves it: its other users — the user's shell —
share the open file; pipes and sockets are made non-blocking, as OpenSSH makes them); files
and devices that cannot be polled (epoll refuses them, and uvloop aborts on them) are read
and written in the loop's thread pool, where such calls never wait long.
"""

from __future__ import annotations

import asyncio
import errno
import os
import selectors
import stat
from typing import Callable

#: bytes read from a descriptor at once
CHUNK = 64 * 1024
#: a limit: bytes waiting to be written to a descriptor before the channel is paused
HIGH_WATER = 1024 * 1024
#: ... and resumed
LOW_WATER = 256 * 1024


def pollable(fd: int) -> bool:
    """True if the loop can wait for ``fd`` (not a regular file, not /dev/null)."""
    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or is_null(st):
        return False
    if not stat.S_ISCHR(mode) or os.isatty(fd):
        return True       # a pipe, a socket, a terminal
    with selectors.DefaultSelector() as sel:   # another device: epoll says (/dev/null: no)
        try:
            sel.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


def is_null(st: os.stat_result) -> bool:
    """True if ``st`` is /dev/null's (``ssh -n``, and every ssh started without a stdin)."""
    try:
        return os.path.samestat(st, os.stat(os.devnull))
    except OSError:
        return False


def prepare(fd: int) -> bool:
    """Make ``fd`` ready for the loop: non-blocking unless it is a terminal.  Returns
    whether it is pollable."""
    can = pollable(fd)
    if can and not os.isatty(fd):
        os.set_blocking(fd, False)
    return can


class In:
    """Reads ``fd`` and hands each chunk to ``on_data``, then ``b""`` once at its end (or
    when reading fails: a terminal hung up).  A pollable descriptor is read from the loop's
    readiness callback; another one in the thread pool."""

    def __init__(self, fd: int, can_poll: bool, on_data: Callable[[bytes], None]) -> None:
        self.fd, self.can_poll, self.on_data = fd, can_poll, on_data
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._done = False
        self._go = asyncio.Event()
        self._go.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.can_poll:
            self.resume()
        elif is_null(os.fstat(self.fd)):
            self._done = True             # nothing to read: its end, without a thread
            self._loop.call_soon(self.on_data, b"")
        else:
            self._task = self._loop.create_task(self._threaded())

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
        self.on_data(data)

    async def _threaded(self) -> None:
        while not self._done:
            await self._go.wait()
            try:
                data = await self._loop.run_in_executor(None, os.read, self.fd, CHUNK)
            except OSError:
                data = b""
            if self._done:
                return
            if not data:
                self._done = True
            self.on_data(data)

    def pause(self) -> None:
        self._go.clear()
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def resume(self) -> None:
        self._go.set()
        if self.can_poll and not self._reading and not self._done:
            self._loop.add_reader(self.fd, self._ready)
            self._reading = True

    def close(self) -> None:
        self._done = True
        self.pause()
        if self._task is not None:
            self._task.cancel()


async def ready(fd: int, write: bool = False) -> None:
    """Wait until ``fd`` can be read (written) without blocking."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)
    add, remove = (loop.add_writer, loop.remove_writer) if write else \
        (loop.add_reader, loop.remove_reader)
    add(fd, done)
    try:
        await fut
    finally:
        remove(fd)


class Out:
    """Bytes for one descriptor, written in order: at once while it takes them, else from the
    loop's readiness callback (a pollable descriptor) or a task in the thread pool (another
    one).  ``on_level(high)`` is called when the backlog passes ``HIGH_WATER`` (True) and when
    it falls under ``LOW_WATER`` again (False).  A descriptor that cannot be written any more
    (EPIPE: its reader went away) drops what is queued and everything after it, and says so
    with ``broken``."""

    def __init__(self, fd: int, can_poll: bool,
                 on_level: Callable[[bool], None] = lambda high: None) -> None:
        self.fd, self.can_poll, self.on_level = fd, can_poll, on_level
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._high = False
        self._waiting = False          # a writer callback is registered
        self._task: asyncio.Task[None] | None = None
        self._empty = asyncio.Event()
        self._empty.set()
        #: why writing stopped for good (None while it works)
        self.broken: str | None = None

    def __len__(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> None:
        if self.broken is not None or not data:
            return
        if not self._buf and self.can_poll:
            n = self._write_now(data)
            if n is None or n == len(data):
                return
            data = data[n:]
        self._buf += data
        self._empty.clear()
        self._level()
        if not self.can_poll:
            if self._task is None or self._task.done():
                self._task = self._loop.create_task(self._threaded())
        elif not self._waiting:
            self._loop.add_writer(self.fd, self._writable)
            self._waiting = True

    def _write_now(self, data: bytes | memoryview) -> int | None:
        """Bytes of ``data`` written now; None once broken."""
        try:
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._break(exc)
            return None

    def _break(self, exc: OSError) -> None:
        self.broken = os.strerror(exc.errno) if exc.errno else str(exc)
        self._buf.clear()
        self._stop_waiting()
        self._level()
        self._empty.set()

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._loop.remove_writer(self.fd)
            self._waiting = False

    def _level(self) -> None:
        n = len(self._buf)
        if not self._high and n > HIGH_WATER:
            self._high = True
            self.on_level(True)
        elif self._high and n < LOW_WATER:
            self._high = False
            self.on_level(False)

    def _writable(self) -> None:
        n = self._write_now(memoryview(self._buf)[:CHUNK * 4])
        if n is None:
            return
        del self._buf[:n]
        self._level()
        if not self._buf:
            self._stop_waiting()
            self._empty.set()

    async def _threaded(self) -> None:
        while self._buf and self.broken is None:
            chunk = bytes(self._buf[:CHUNK])
            try:
                n = await self._loop.run_in_executor(None, os.write, self.fd, chunk)
            except OSError as exc:
                self._break(exc)
                return
            del self._buf[:n]
            self._level()
        self._empty.set()

    async def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every queued byte is written.  True if so."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return not self._buf and self.broken is None

    def cancel(self) -> None:
        self._stop_waiting()
        if self._task is not None:
            self._task.cancel()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
