"""asyncssh's own TCP channel behind the data path's interface (``ends.Channel``), on
asyncssh's public API alone: what a local forward's client gets on a connection that is not
attached (stock asyncssh), what every remote forward's connection comes on (the server
opens those channels and asyncssh makes them, on either path), and what a local forward to a
Unix socket on the server gets on either path (``direct-streamlocal@openssh.com``, asyncssh's
``create_unix_connection``: the lean channel speaks only ``direct-tcpip``)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Union

import asyncssh

from .channel import CHANNEL_HIGH_WATER
from .ends import LocalEnd

#: asyncssh's channel of either kind (the same calls on both)
_Chan = Union["asyncssh.SSHTCPChannel[bytes]", "asyncssh.SSHUNIXChannel[bytes]"]


class StockChannel:
    """An asyncssh ``SSHTCPChannel`` (``chan``, None until it is open) for one local end."""

    __slots__ = ("chan", "local", "pktsize", "task", "abandoned")

    def __init__(self, local: LocalEnd, pktsize: int):
        self.chan: _Chan | None = None
        self.local = local
        #: writes are cut into pieces of at most this size: asyncssh copies each write once,
        #: but cuts a larger buffer into packets by deleting from its front
        self.pktsize = pktsize
        #: the task opening the channel (kept: the loop holds tasks weakly)
        self.task: asyncio.Task[None] | None = None
        #: the local end closed before the channel was open
        self.abandoned = False

    @classmethod
    def open(cls, conn: asyncssh.SSHClientConnection, local: LocalEnd, host: str, port: int,
             orig_host: str, orig_port: int, window: int, pktsize: int) -> "StockChannel":
        """Open a ``direct-tcpip`` channel with ``create_connection``; ``local`` hears how it
        went (``attached`` or ``failed``)."""
        return cls._start(local, pktsize, lambda self: conn.create_connection(
            lambda: _Session(self.local), host, port, orig_host, orig_port,
            window=window, max_pktsize=pktsize))

    @classmethod
    def open_unix(cls, conn: asyncssh.SSHClientConnection, local: LocalEnd, path: str,
                  window: int, pktsize: int) -> "StockChannel":
        """Open a ``direct-streamlocal@openssh.com`` channel to the Unix socket ``path`` on
        the server with ``create_unix_connection``; ``local`` hears how it went."""
        return cls._start(local, pktsize, lambda self: conn.create_unix_connection(
            lambda: _UnixSession(self.local), path, window=window, max_pktsize=pktsize))

    @classmethod
    def _start(cls, local: LocalEnd, pktsize: int,
               connect: Callable[["StockChannel"], Awaitable[tuple[Any, Any]]]
               ) -> "StockChannel":
        self = cls(local, pktsize)
        self.task = asyncio.get_running_loop().create_task(self._open(connect))
        return self

    async def _open(self, connect: Callable[["StockChannel"], Awaitable[tuple[Any, Any]]]
                    ) -> None:
        try:
            chan, _ = await connect(self)
        except (OSError, asyncssh.Error) as exc:
            if not self.abandoned:
                self.local.failed(exc)
            return
        if self.abandoned:
            chan.close()
            return
        self.opened(chan)

    def opened(self, chan: _Chan) -> None:
        chan.set_write_buffer_limits(CHANNEL_HIGH_WATER)
        self.chan = chan
        self.local.attached(self)

    # -- ends.Channel --------------------------------------------------------------------------

    def write(self, data: Any) -> None:
        chan, size = self.chan, self.pktsize
        assert chan is not None
        n = len(data)
        if n <= size:
            chan.write(data)
            return
        view = memoryview(data)
        for i in range(0, n, size):
            chan.write(view[i:i + size])

    def write_eof(self) -> None:
        assert self.chan is not None
        self.chan.write_eof()

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        else:
            self.abandoned = True  # not cancelled: asyncssh would leave the channel open

    def pause_reading(self) -> None:
        assert self.chan is not None
        self.chan.pause_reading()

    def resume_reading(self) -> None:
        assert self.chan is not None
        self.chan.resume_reading()


class _Relay:
    """What asyncssh's channel (TCP or Unix) says, passed on to the local end."""

    def __init__(self, local: LocalEnd):
        self.local = local

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.local.deliver(data)

    def eof_received(self) -> bool:
        self.local.deliver_eof()
        return True

    def pause_writing(self) -> None:
        if self.local.transport is not None:
            self.local.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.local.transport is not None and not self.local.transport.is_closing():
            self.local.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.local.ended(exc)


class _Session(_Relay, asyncssh.SSHTCPSession[bytes]):
    """The session of a TCP channel."""


class _UnixSession(_Relay, asyncssh.SSHUNIXSession[bytes]):
    """The session of a channel to a Unix socket on the server."""


class _AcceptedSession(_Session):
    """The session of a channel the server opened: the local end is attached as soon as
    asyncssh has made the channel."""

    def __init__(self, local: LocalEnd, pktsize: int):
        super().__init__(local)
        self.pktsize = pktsize

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        StockChannel(self.local, self.pktsize).opened(chan)


def accepted_session(local: LocalEnd, pktsize: int) -> asyncssh.SSHTCPSession[bytes]:
    """The session for a channel the server opens to ``local`` (``create_server``'s
    session factory returns it)."""
    return _AcceptedSession(local, pktsize)
