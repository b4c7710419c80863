"""The two ends of a forwarded connection, as the fast path sees them: the SSH channel the data
path writes to (``Channel``: the lean ``channel.TCPChannel`` or ``stock.StockChannel``, the
same interface on both paths), and the local socket the channel talks to (``LocalEnd``:
implemented above this package, by ``localside.LocalSide``)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Channel(Protocol):
    """An SSH channel carrying one TCP connection."""

    def write(self, data: Any) -> None:
        """Send ``data`` (any length, any bytes-like object); raises OSError
        (BrokenPipeError) if the channel is no longer open for sending."""

    def write_eof(self) -> None:
        """Send EOF after the data written so far."""

    def close(self) -> None:
        """The local end is done: send what is buffered, then CLOSE; drop what arrives.  Before
        the channel is open: close it as soon as it is (``attached`` is not called then)."""

    def pause_reading(self) -> None:
        """Stop delivering data (the window closes, so the server stops sending)."""

    def resume_reading(self) -> None: ...


class LocalEnd(Protocol):
    """The local socket one channel is paired with.  The channel calls, in order:
    ``attached`` once it is open, or ``failed`` if it never opens; then any number of
    ``deliver``, at most one ``deliver_eof``, and ``ended`` once it has ended.  It pauses and
    resumes reading ``transport`` as its send buffer fills and drains."""

    transport: asyncio.Transport | None

    def attached(self, chan: Channel) -> None:
        """The channel is open: write to it from now on."""

    def failed(self, exc: Exception) -> None:
        """The channel could not be opened: ``asyncssh.ChannelOpenError`` if the server
        refused, another error if the connection failed first."""

    def deliver(self, data: Any) -> None:
        """Data from the channel, for the local socket."""

    def deliver_eof(self) -> None:
        """The channel's EOF, after the data before it."""

    def ended(self, exc: Exception | None) -> None:
        """The channel has ended (``exc``: the SSH connection failed: reset the socket)."""
