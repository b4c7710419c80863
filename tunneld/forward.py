"""asyncssh adapter: one local listener per ``ForwardSpec``, one SSH channel per client.

Why our own listener and not ``forward_local_port`` (design.md §9): it stays bound while the
host is down (clients are held, then served), each refused connection is seen and logged,
counters and flow control live in one place, and early bytes from a server that speaks first
are not lost under uvloop.

Data path, per accepted client::

    local socket ──_LocalProtocol.data_received──► channel.write      (bytes_out)
    local socket ◄──transport.write── _ChannelSession.data_received   (bytes_in)

Back-pressure both ways: a full local write buffer pauses reading from the channel (so the
SSH window closes and the server stops sending); a full channel send buffer (window exhausted)
pauses reading from the local socket.  Memory per connection is bounded by the transport's
high-water mark plus the channel window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import asyncssh

from . import fastpath, openfail
from .bindfail import bind_failure
from .channel import CHANNEL_HIGH_WATER, TCPChannel
from .errors import BindError, TunneldError
from .spec import ForwardSpec, join_host_port
from .state import ForwardState, HostState, Repeats, check_forward, forward_state_for

if TYPE_CHECKING:
    from .host import HostSupervisor

log = logging.getLogger("tunneld")

#: listen backlog of each forward's socket (the kernel caps it at net.core.somaxconn)
LISTEN_BACKLOG = 4096
#: bytes read from a local client before its channel is open; past this, reading pauses
PRE_OPEN_BUFFER = 256 * 1024
#: seconds without another identical failure after which a run of them is summarised
REPEAT_QUIET = 5.0
#: SSH channel window and packet size offered for each channel
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 32768


class ForwardReport:
    """Counters, the last error and the report every kind of forward gives."""

    def __init__(self, spec: ForwardSpec, host: "HostSupervisor", origin: str) -> None:
        self.spec = spec
        self.host = host
        #: "config" (declared in config.toml), "added" (tunnelctl add, persisted) or "auto"
        self.origin = origin
        #: CLOSED until bind() succeeds (then see the subclass)
        self.state = ForwardState.CLOSED
        #: open forwarded connections (a local side each; its channel may still be opening)
        self.conns: set[Any] = set()
        self.total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: what went wrong, about the forward's current state: an error caused by its host
        #: being down is cleared when the host connects, any error when a channel opens
        self.last_error: str | None = None
        #: True iff ``last_error`` was caused by the host's connection (not by the target)
        self._host_error = False
        #: runs of identical failures (2,000 held clients timing out) are logged once, then
        #: as a count after ``REPEAT_QUIET`` s without one
        self._repeats = Repeats()
        self._repeat_timer: asyncio.TimerHandle | None = None

    def fail(self, message: str, key: str | None = None, host_error: bool = False) -> None:
        """Record and log ``message``.  ``key``: the message without what differs from one
        client to the next (its address); ``host_error``: caused by the host being down."""
        self.last_error = message
        self._host_error = host_error
        show, summary = self._repeats.note(key or message, time.monotonic())
        if summary is not None:
            log.warning("%s: %s", self.host.name, summary.text("clients"))
        if show:
            log.warning("%s: %s", self.host.name, message)
        elif self._repeat_timer is None:
            self._repeat_timer = asyncio.get_running_loop().call_later(
                REPEAT_QUIET, self._end_repeats)

    def _end_repeats(self) -> None:
        self._repeat_timer = None
        summary = self._repeats.end(time.monotonic())
        if summary is not None:
            log.warning("%s: %s", self.host.name, summary.text("clients"))

    def served(self) -> None:
        """A client got its channel: an older error is history (events and the log)."""
        self.last_error = None

    def host_changed(self) -> None:
        """The host is connected again: an error caused by its being down is history."""
        if self._host_error and self.host.state is HostState.CONNECTED:
            self.last_error = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "spec": str(self.spec), "kind": self.spec.kind, "listen": self.spec.listen,
            "target": self.spec.target, "state": self.state.value, "active": len(self.conns),
            "total": self.total, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "last_error": self.last_error, "origin": self.origin,
        }


def write_channel(chan: "asyncssh.SSHTCPChannel[bytes] | TCPChannel", data: bytes) -> None:
    """Write ``data`` one packet's worth at a time: asyncssh copies each write once, but cuts
    a larger buffer into packets by deleting from its front (a ``TCPChannel`` cuts without
    copying itself).  Raises OSError if the channel is closed for sending."""
    n = len(data)
    if n <= CHANNEL_MAX_PKTSIZE or type(chan) is TCPChannel:
        chan.write(data)
        return
    view = memoryview(data)
    for i in range(0, n, CHANNEL_MAX_PKTSIZE):
        chan.write(view[i:i + CHANNEL_MAX_PKTSIZE])  # type: ignore[arg-type]


class LocalForward(ForwardReport):
    """A bound listener for one spec, and the counters of the clients it served."""

    def __init__(self, spec: ForwardSpec, host: "HostSupervisor", origin: str = "added"):
        # state: CLOSED until bind() succeeds; then follows the host (LISTENING iff the host
        # is connected)
        super().__init__(spec, host, origin)
        #: the asyncio server; None iff the listener is not bound
        self._server: asyncio.base_events.Server | None = None

    # -- listener ---------------------------------------------------------------------------

    async def bind(self) -> None:
        """Bind the listener.  Raises ``BindError`` naming the port and, if known, its holder."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.spec.bind_host else socket.AF_INET
        try:
            self._server = await loop.create_server(
                self._protocol, self.spec.bind_host, self.spec.bind_port,
                family=family, reuse_address=True, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise BindError(await bind_failure(self.spec, exc)) from None
        if self.spec.bind_port == 0:  # the OS chose the port
            port = self._server.sockets[0].getsockname()[1]
            self.spec = dataclasses.replace(self.spec, bind_port=port)
        self.state = ForwardState.WAITING
        self.follow_host()

    def _protocol(self) -> "_LocalProtocol":
        """A protocol for one accepted client (a subclass serves another protocol)."""
        return _LocalProtocol(self)

    def follow_host(self) -> None:
        """Set this forward's state from its host's (called on every host transition)."""
        if self.state is ForwardState.CLOSED:
            return
        self.host_changed()
        new = forward_state_for(self.host.state)
        if new is not self.state:
            self.state = check_forward(self.state, new)

    async def close(self, abort_clients: bool = True) -> None:
        """Close the listener (and, by default, every open client connection)."""
        if self.state is not ForwardState.CLOSED:
            self.state = check_forward(self.state, ForwardState.CLOSED)
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if abort_clients:
            for conn in list(self.conns):
                conn.abort()
        if server is not None:
            await server.wait_closed()

class _LocalSide(asyncio.Protocol):
    """The local socket of one forwarded connection, paired with one SSH channel: a client
    accepted by a local forward, or the target a remote forward connected to.  Invariant:
    ``channel`` is None until the channel is open; until then received bytes wait in
    ``pending`` (bounded by ``PRE_OPEN_BUFFER``: a side that speaks first, under uvloop too)."""

    def __init__(self, fwd: ForwardReport):
        self.fwd = fwd
        self.transport: asyncio.Transport | None = None
        self.channel: asyncssh.SSHTCPChannel[bytes] | TCPChannel | None = None
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.pending_eof = False
        self.closed = False
        #: data from the channel, written when the current batch ends (``fastpath``): the
        #: packets decoded from one read of the SSH socket leave together
        self.out: list[bytes] = []

    # asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        chan = self.channel
        if chan is not None:
            fastpath.begin()   # the packets made of ``data`` leave in one write
            try:
                write_channel(chan, data)
            except OSError:  # the channel closed under us (the remote end went away)
                self.abort()
                return
            finally:
                fastpath.end()
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

    # ---------------------------------------------------------------------------------------

    def abort(self) -> None:
        """Close the local socket with a reset: the connection was cut, not ended."""
        if self.transport is not None:
            reset(self.transport)

    # from the channel ------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        """Data from the channel for the local socket."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if fastpath.batching():
                if not self.out:
                    fastpath.at_end(self.flush)
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
        """The channel's EOF: half-close the local socket after the data before it."""
        self.flush()
        transport = self.transport
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            set_linger(transport, LINGER_OFF)   # an orderly end: a FIN after every byte
            transport.write_eof()

    def ended(self, exc: Exception | None) -> None:
        """The channel has ended: close the local socket after the data before it (reset it
        if the SSH connection failed)."""
        transport = self.transport
        if transport is None:
            return
        self.flush()
        if exc is not None:
            reset(transport)
        else:
            set_linger(transport, LINGER_OFF)
            transport.close()

    def _granted(self) -> None:
        """The channel is open and ``channel`` set; ``pending`` is sent next."""

    def _attach(self, chan: asyncssh.SSHTCPChannel[bytes] | TCPChannel) -> None:
        """The channel is open: send what arrived so far, then stream."""
        if type(chan) is not TCPChannel:  # (whose mark is CHANNEL_HIGH_WATER already)
            chan.set_write_buffer_limits(CHANNEL_HIGH_WATER)
        self.channel = chan
        self.fwd.served()
        self._granted()
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.pending_len = 0
            chan.write(data)
            self.fwd.bytes_out += len(data)
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        if self.pending_eof:
            chan.write_eof()


class _LocalProtocol(_LocalSide):
    """One client accepted by a local forward; its channel is opened when it connects: a
    ``TCPChannel`` (fastpath installed), else asyncssh's."""

    def __init__(self, fwd: LocalForward):
        super().__init__(fwd)
        self.fwd: LocalForward = fwd
        #: the client's (host, port)
        self.peername: tuple[str, int] = ("", 0)
        #: waits for the host's connection (and, on stock asyncssh, for the channel)
        self._opener: asyncio.Task[None] | None = None
        #: the channel being opened (until ``_attach``)
        self._opening: TCPChannel | None = None

    @property
    def peer(self) -> str:
        """The client's address, for log lines."""
        return join_host_port(*self.peername) if self.peername[0] else "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is not a subclass)
        set_linger(transport, LINGER_RESET)   # see reset()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = peer[:2]
        fwd = self.fwd
        fwd.conns.add(self)
        fwd.total += 1
        fastpath.begin()  # the channel open leaves before this callback returns
        try:
            self._begin()
        finally:
            fastpath.end()

    def eof_received(self) -> bool:
        fastpath.begin()
        try:
            return super().eof_received()
        finally:
            fastpath.end()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.channel is None:
            if self._opening is not None:
                self._opening.close()  # closed as soon as the server confirms it
            if self._opener is not None:
                self._opener.cancel()

    # hooks for a subclass (socks_forward): where to connect, and what the client is told

    def _begin(self) -> None:
        """Start serving the client that just connected: open its channel now."""
        self._connect()

    def _target(self) -> tuple[str, int]:
        """Where the server connects this client to."""
        return self.fwd.spec.target_host, self.fwd.spec.target_port

    def _refuse(self, exc: Exception) -> None:
        """The channel could not be opened (already logged): end the client."""
        self.abort()

    # ---------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the channel to ``_target()``: at once if the host is connected."""
        conn = self.fwd.host.live_connection()
        if conn is not None and fastpath.active:
            self._open_fast(conn)
        else:
            self._opener = asyncio.get_running_loop().create_task(self._open())

    def _open_fast(self, conn: asyncssh.SSHClientConnection) -> None:
        host, port = self._target()
        try:
            self._opening = TCPChannel(conn, self, host, port, *self.peername,
                                       window=CHANNEL_WINDOW, max_pktsize=CHANNEL_MAX_PKTSIZE)
        except asyncssh.ChannelOpenError as exc:  # the connection is closing: not a refusal
            self._failed(ConnectionResetError(exc.reason))
        except (OSError, asyncssh.Error) as exc:
            self._failed(exc)

    def _attach(self, chan: asyncssh.SSHTCPChannel[bytes] | TCPChannel) -> None:
        self._opening = None
        super()._attach(chan)

    def _failed(self, exc: Exception) -> None:
        self._opening = None
        fwd, spec = self.fwd, self.fwd.spec
        if isinstance(exc, asyncssh.ChannelOpenError):
            host, port = self._target()
            fwd.fail(f"{spec.listen} -> {join_host_port(host, port)}: "
                     f"{openfail.describe(host, port, exc.code, exc.reason)} The forward "
                     "stays open.")
        else:
            why = str(exc) if isinstance(exc, TunneldError) else \
                f"the connection to the server failed ({exc})"
            fwd.fail(f"{spec.listen}: closed client {self.peer}: {why}",
                     key=f"{spec.listen}: closed a client: {why}", host_error=True)
        self._refuse(exc)

    async def _open(self) -> None:
        try:
            conn = await self.fwd.host.connection_for_client()
            if fastpath.active:
                if not self.closed:
                    self._open_fast(conn)
                return
            host, port = self._target()
            chan, _ = await conn.create_connection(
                lambda: _ChannelSession(self), host, port,
                *self.peername, window=CHANNEL_WINDOW,
                max_pktsize=CHANNEL_MAX_PKTSIZE)
        except asyncio.CancelledError:
            return
        except (TunneldError, OSError, asyncssh.Error) as exc:
            self._failed(exc)
            return
        if self.closed:
            chan.close()
            return
        self._attach(chan)


class _ChannelSession(asyncssh.SSHTCPSession[bytes]):
    """The SSH side of one client on an asyncssh channel (a remote forward's, or on stock
    asyncssh): passes what the channel says on to the local side."""

    def __init__(self, local: _LocalSide):
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


def reset(transport: asyncio.BaseTransport) -> None:
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


#: SO_LINGER values: on with 0 s (close sends RST, unsent data dropped), and off (the default)
LINGER_RESET = struct.pack("ii", 1, 0)
LINGER_OFF = struct.pack("ii", 0, 0)


def set_linger(transport: asyncio.BaseTransport, value: bytes) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
        except (OSError, ValueError):
            pass
