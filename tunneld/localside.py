"""The local socket of one forwarded connection, paired with one SSH channel: a client a local
or SOCKS forward accepted, or the target a remote forward connected to.

Data path::

    local socket ──LocalSide.data_received──► channel.write        (bytes_out)
    local socket ◄──transport.write── LocalSide.deliver            (bytes_in)

Back-pressure both ways: a full local write buffer pauses reading from the channel (so the
SSH window closes and the server stops sending); a full channel send buffer pauses reading
from the local socket (the channel does that, on ``transport``).  Memory per connection is
bounded by the transport's high-water mark plus the channel window.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Callable, Protocol

from .fastpath import Channel, batch

#: bytes read from the local socket before its channel is open; past this, reading pauses
PRE_OPEN_BUFFER = 256 * 1024

#: SO_LINGER values: on with 0 s (close sends RST, unsent data dropped), and off (the default)
LINGER_RESET = struct.pack("ii", 1, 0)
LINGER_OFF = struct.pack("ii", 0, 0)


class Counters(Protocol):
    """What a local side reports to its forward."""

    #: the forward's open connections (a local side each)
    conns: set[Any]
    bytes_in: int
    bytes_out: int

    def served(self) -> None:
        """A local side got its channel."""


class LocalSide(asyncio.Protocol):
    """One local socket and its channel (a ``fastpath.LocalEnd``).  Invariant: ``channel`` is
    None until the channel is open; until then received bytes wait in ``pending`` (bounded
    by ``PRE_OPEN_BUFFER``: a side that speaks first, under uvloop too)."""

    def __init__(self, fwd: Counters):
        self.fwd = fwd
        self.transport: asyncio.Transport | None = None
        self.channel: Channel | None = None
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.pending_eof = False
        self.closed = False
        #: the socket is disarmed (``LINGER_OFF``: an orderly end); it is armed until then
        self.disarmed = False
        #: data from the channel, written when the current batch ends: the packets decoded
        #: from one read of the SSH socket leave together
        self.out: list[bytes] = []

    # asyncio.Protocol -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        chan = self.channel
        if chan is not None:
            with batch:   # the packets made of ``data`` leave in one write
                try:
                    chan.write(data)
                except OSError:  # the channel closed under us (the remote end went away)
                    self.abort()
                    return
            self.fwd.bytes_out += len(data)
            return
        # channel not open yet (under uvloop this can happen even after pause_reading)
        self.pending.append(data)
        self.pending_len += len(data)
        if self.pending_len >= PRE_OPEN_BUFFER and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.channel is not None:
            self.channel.write_eof()
        else:
            self.pending_eof = True
        return True  # keep the socket half-open: the other side may still send

    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.pause_reading()

    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fwd.conns.discard(self)
        if self.channel is not None:
            self.channel.close()

    # ------------------------------------------------------------------------------------------

    def abort(self) -> None:
        """Close the local socket with a reset: the connection was cut, not ended."""
        if self.transport is not None:
            reset(self.transport)

    # fastpath.LocalEnd: from the channel ------------------------------------------------------

    def attached(self, chan: Channel) -> None:
        """The channel is open: send what arrived so far, then stream."""
        self.channel = chan
        self.fwd.served()
        self._granted()
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self.pending_len = 0
            chan.write(data)
            self.fwd.bytes_out += len(data)
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        if self.pending_eof:
            chan.write_eof()

    def failed(self, exc: Exception) -> None:
        """The channel could not be opened: end the socket (a subclass says why)."""
        self.abort()

    def deliver(self, data: Any) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if batch.depth:
                if not self.out:
                    batch.later(self.flush)
                self.out.append(data)
            else:
                transport.write(data)
            self.fwd.bytes_in += len(data)

    def flush(self) -> None:
        out, self.out = self.out, []
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            transport.writelines(out)

    def deliver_eof(self) -> None:
        """Half-close the local socket after the data before it."""
        if self.out:
            self.flush()
        transport = self.transport
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            self._disarm(transport)   # an orderly end: a FIN after every byte
            transport.write_eof()

    def ended(self, exc: Exception | None) -> None:
        """Close the local socket after the data before it (reset it if the SSH connection
        failed)."""
        transport = self.transport
        if transport is None:
            return
        if self.out:
            self.flush()
        if exc is not None:
            reset(transport)
        else:
            self._disarm(transport)
            transport.close()

    def _disarm(self, transport: asyncio.BaseTransport) -> None:
        """An orderly end: the socket closes with a FIN after every byte (once)."""
        if not self.disarmed:
            self.disarmed = True
            set_linger(transport, LINGER_OFF)

    def _granted(self) -> None:
        """Hook: the channel is open and ``channel`` set; ``pending`` is sent next."""


def reset(transport: asyncio.Transport) -> None:
    """Close ``transport``'s socket with a reset (RST), not a FIN: its peer must see the
    connection cut (a transfer cut short must not look complete).  ``abort()`` alone sends a
    FIN under uvloop.

    The local socket of every forwarded connection is *armed* this way when it is made
    (``LINGER_RESET``), so that any close but an orderly one is a reset — a daemon killed
    with SIGKILL included, whose sockets the kernel closes; an orderly end (the other side's
    EOF or close) disarms it first (``LINGER_OFF``: a FIN after every byte)."""
    if transport.is_closing():
        return   # closed already (its socket may be gone: uvloop's then has fd -1)
    set_linger(transport, LINGER_RESET)
    transport.abort()


def set_linger(transport: asyncio.BaseTransport, value: bytes) -> None:
    """Set ``transport``'s SO_LINGER to ``value`` (errors ignored: a socket already gone)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    if _setsockopt is not None:
        fd = sock.fileno()   # -1 once the transport closed its socket
        if fd >= 0:
            _setsockopt(fd, socket.SOL_SOCKET, socket.SO_LINGER, value, len(value))
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
    except (OSError, ValueError):
        pass


def arm_listener(sock: Any) -> None:
    """Arm a listening socket: the sockets it accepts inherit SO_LINGER (Linux, the BSDs and
    macOS copy the listener's options), so a client is armed before its first callback.
    ``armed_at_accept`` says whether it worked."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except (OSError, ValueError):
        pass


def armed_at_accept(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport``'s socket is armed already (asked of a listener's first client:
    then its others are too)."""
    sock = transport.get_extra_info("socket")
    try:
        if sock is None:
            return False
        onoff, seconds = struct.unpack("ii", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, len(LINGER_RESET)))
    except (OSError, ValueError, struct.error):
        return False
    return onoff != 0 and seconds == 0   # the BSDs say "on" with the option's bit


def _libc_setsockopt() -> Callable[..., int] | None:
    """libc's ``setsockopt(fd, level, name, value, len)``, or None.  One system call, where
    a socket object's (uvloop's transports make one per call) first asks ``getsockname`` and
    parses a bytes value only after two failed tries (two exceptions formatted)."""
    try:
        import ctypes
        fn = ctypes.PyDLL(None).setsockopt   # the GIL is kept: it never blocks
    except (ImportError, OSError, AttributeError):
        return None
    # no argtypes (converting through them costs more than the call): Python ints pass as
    # C ints, bytes as a pointer to them; the result is an int (0, or -1 with errno set)
    return fn


_setsockopt = _libc_setsockopt()
