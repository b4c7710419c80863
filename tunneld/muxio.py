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
from typing import Callable

#: bytes read from a descriptor at once
CHUNK = 64 * 1024
#: a limit: bytes waiting to be written to a descriptor before the channel is paused
HIGH_WATER = 1024 * 1024
#: ... and resumed
LOW_WATER = 256 * 1024


def pollable(fd: int) -> bool:
    """True if the loop can wait for ``fd`` (not a regular file, not /dev/null)."""
    with selectors.DefaultSelector() as sel:
        try:
            sel.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


def prepare(fd: int) -> bool:
    """Make ``fd`` ready for the loop: non-blocking unless it is a terminal.  Returns
    whether it is pollable."""
    can = pollable(fd)
    if can and not os.isatty(fd):
        os.set_blocking(fd, False)
    return can


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


async def read(fd: int, can_poll: bool, size: int = CHUNK) -> bytes:
    """Some bytes of ``fd`` (b"" at its end, or when reading fails: a terminal hung up)."""
    if not can_poll:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, os.read, fd, size)
        except OSError:
            return b""
    while True:
        await ready(fd)
        try:
            return os.read(fd, size)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return b""


class Out:
    """Bytes for one descriptor, written in order by one task; ``on_level(high)`` is called
    when the backlog passes ``HIGH_WATER`` (True) and when it falls under ``LOW_WATER``
    again (False).  A descriptor that cannot be written any more (EPIPE: its reader went
    away) drops what is queued and everything after it, and says so with ``broken``."""

    def __init__(self, fd: int, can_poll: bool,
                 on_level: Callable[[bool], None] = lambda high: None) -> None:
        self.fd, self.can_poll, self.on_level = fd, can_poll, on_level
        self._buf = bytearray()
        self._high = False
        self._task: asyncio.Task[None] | None = None
        #: why writing stopped for good (None while it works)
        self.broken: str | None = None

    def __len__(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> None:
        if self.broken is not None or not data:
            return
        self._buf += data
        if not self._high and len(self._buf) > HIGH_WATER:
            self._high = True
            self.on_level(True)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _write_some(self, data: memoryview) -> int:
        if not self.can_poll:
            return await asyncio.get_running_loop().run_in_executor(None, os.write, self.fd,
                                                                    data)
        while True:
            try:
                return os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                await ready(self.fd, write=True)

    async def _run(self) -> None:
        while self._buf and self.broken is None:
            chunk = bytes(self._buf[:CHUNK])
            try:
                n = await self._write_some(memoryview(chunk))
            except OSError as exc:
                self.broken = os.strerror(exc.errno) if exc.errno else str(exc)
                self._buf.clear()
                break
            del self._buf[:n]
            if self._high and len(self._buf) < LOW_WATER:
                self._high = False
                self.on_level(False)
        if self._high:
            self._high = False
            self.on_level(False)

    async def flush(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every queued byte is written.  True if so."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
        return not self._buf

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
