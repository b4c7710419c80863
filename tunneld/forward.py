"""asyncssh adapter: one local listener per ``ForwardSpec``, one SSH channel per client.

Why our own listener and not ``forward_local_port`` (design.md §9): it stays bound while the
host is down (clients are held, then served), each refused connection is seen and logged,
counters and flow control live in one place, and early bytes from a server that speaks first
are not lost under uvloop.

Each accepted client is a ``LocalClient`` (a ``localside.LocalSide``: the data path and its
back-pressure are there); its channel comes from ``fastpath.open_channel``.  ``ForwardReport``
holds the counters, the last error and the report of every kind of forward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

import asyncssh

from . import fastpath, openfail, remotehome
from .bindfail import bind_failure
from .errors import BindError, TunneldError
from .events import EventHub
from .localside import LINGER_RESET, LocalSide, arm_listener, armed_at_accept, set_linger
from .spec import ForwardSpec, join_host_port
from .state import (
    ForwardEvent,
    ForwardState,
    HostState,
    Repeats,
    forward_follow,
    forward_next,
    is_connected,
)
from .window import BASE_WINDOW, start_window

if TYPE_CHECKING:
    from .config import Defaults

log = logging.getLogger("tunneld")

#: listen backlog of each forward's socket (the kernel caps it at net.core.somaxconn)
LISTEN_BACKLOG = 4096
#: seconds without another identical failure after which a run of them is summarised
REPEAT_QUIET = 5.0
#: SSH channel window and packet size offered for each channel (a local forward's lean
#: channel starts at ``window.start_window`` and grows with the link: ``window``)
CHANNEL_WINDOW = BASE_WINDOW
CHANNEL_MAX_PKTSIZE = 32768


class ForwardHost(Protocol):
    """What a forward needs of its host's supervisor (``host.HostSupervisor``)."""

    name: str
    state: HostState
    #: the host's connection (None while it has none)
    conn: asyncssh.SSHClientConnection | None
    #: where forward transitions are published (None: nowhere)
    events: EventHub | None
    #: the configured defaults (``max_window``: how far a channel's window may grow)
    settings: Defaults

    def live_connection(self) -> asyncssh.SSHClientConnection | None:
        """The connection, if the host is connected now."""

    async def connection_for_client(self) -> asyncssh.SSHClientConnection:
        """The live connection for a new client, holding it while the host is down; raises
        ConnectError."""


class ForwardReport:
    """Counters, the last error and the report every kind of forward gives."""

    def __init__(self, spec: ForwardSpec, host: ForwardHost, origin: str) -> None:
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
            "target_path": self.spec.target_path or None,
        }


class LocalForward(ForwardReport):
    """A bound listener for one spec, and the counters of the clients it served."""

    def __init__(self, spec: ForwardSpec, host: ForwardHost, origin: str = "added"):
        # state: CLOSED until bind() succeeds; then follows the host (LISTENING iff the host
        # is connected)
        super().__init__(spec, host, origin)
        #: the asyncio server; None iff the listener is not bound
        self._server: asyncio.base_events.Server | None = None
        #: whether the listener's sockets arm the clients they accept (``localside``: they
        #: inherit its SO_LINGER); None until its first client says
        self.arms_clients: bool | None = None

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
        self.arms_clients = None
        for sock in self._server.sockets:
            arm_listener(sock)   # each client is armed from its accept (see localside.reset)
        if self.spec.bind_port == 0:  # the OS chose the port
            port = self._server.sockets[0].getsockname()[1]
            self.spec = dataclasses.replace(self.spec, bind_port=port)
        self.state = forward_next(self.state, ForwardEvent.BIND)
        self.follow_host()

    def _protocol(self) -> "LocalClient":
        """A protocol for one accepted client (a subclass serves another protocol)."""
        return LocalClient(self)

    def follow_host(self) -> None:
        """Set this forward's state from its host's (called on every host transition)."""
        if self.state is ForwardState.CLOSED:
            return
        self.host_changed()
        self.state = forward_follow(self.state, is_connected(self.host.state))

    async def close(self, abort_clients: bool = True) -> None:
        """Close the listener (and, by default, every open client connection)."""
        if self.state is not ForwardState.CLOSED:
            self.state = forward_next(self.state, ForwardEvent.CLOSE)
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if abort_clients:
            for conn in list(self.conns):
                conn.abort()
        if server is not None:
            await server.wait_closed()


class LocalClient(LocalSide):
    """One client accepted by a local forward; its channel is opened when it connects (on
    the host's live connection, or once the host is back)."""

    # what a client starts with (class attributes: no __init__ of its own per client)
    fwd: LocalForward
    #: the client's (host, port)
    peername: tuple[str, int] = ("", 0)
    #: waits for the host's connection; None when not waiting
    _waiting: asyncio.Task[None] | None = None
    #: the channel being opened (until ``attached`` or ``failed``)
    _opening: fastpath.Channel | None = None
    #: a forward to a Unix socket: the path opened on the server (``~`` expanded)
    _socket_path = ""

    @property
    def peer(self) -> str:
        """The client's address, for log lines."""
        return join_host_port(*self.peername) if self.peername[0] else "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not a subclass
        fwd = self.fwd
        arms = fwd.arms_clients
        if arms is None:
            arms = fwd.arms_clients = armed_at_accept(transport)
        if not arms:
            set_linger(transport, LINGER_RESET)   # see localside.reset()
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = peer[:2]
        fwd.conns.add(self)
        fwd.total += 1
        with fastpath.batch:  # the channel open leaves before this callback returns
            self._begin()

    def eof_received(self) -> bool:
        with fastpath.batch:
            return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.channel is None:
            if self._opening is not None:
                self._opening.close()  # closed as soon as the server confirms it
            if self._waiting is not None:
                self._waiting.cancel()

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

    # ------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the channel to ``_target()``: at once if the host is connected."""
        conn = self.fwd.host.live_connection()
        if conn is not None:
            self._open_on(conn)
        else:
            self._waiting = asyncio.get_running_loop().create_task(self._wait_and_open())

    async def _wait_and_open(self) -> None:
        try:
            conn = await self.fwd.host.connection_for_client()
        except asyncio.CancelledError:
            return
        except (TunneldError, OSError, asyncssh.Error) as exc:
            self.failed(exc)
            return
        finally:
            self._waiting = None
        if not self.closed:
            self._open_on(conn)

    def _open_on(self, conn: asyncssh.SSHClientConnection) -> None:
        if self.fwd.spec.target_path:
            self._open_path(conn)
            return
        host, port = self._target()
        max_window = self.fwd.host.settings.max_window
        try:
            self._opening = fastpath.open_channel(
                conn, self, host, port, *self.peername, window=start_window(max_window),
                pktsize=CHANNEL_MAX_PKTSIZE, max_window=max_window)
        except (OSError, asyncssh.Error) as exc:  # ConnectionResetError: the connection closes
            self.failed(exc)

    def _open_path(self, conn: asyncssh.SSHClientConnection) -> None:
        """Open the channel to the forward's Unix socket on the server (its ``~`` expanded
        first: once per connection, the client waits for it)."""
        path = self.fwd.spec.target_path
        try:
            full = remotehome.expanded(conn, path)
        except TunneldError as exc:  # too long once expanded
            self._path_failed(exc)
            return
        if full is None:
            self._waiting = asyncio.get_running_loop().create_task(self._expand_and_open(conn))
            return
        self._socket_path = full
        try:
            self._opening = fastpath.open_unix_channel(
                conn, self, full, window=CHANNEL_WINDOW, pktsize=CHANNEL_MAX_PKTSIZE)
        except (OSError, asyncssh.Error) as exc:  # ConnectionResetError: the connection closes
            self.failed(exc)

    async def _expand_and_open(self, conn: asyncssh.SSHClientConnection) -> None:
        try:
            await remotehome.home(conn)
        except asyncio.CancelledError:
            return
        except TunneldError as exc:
            self._path_failed(exc)
            return
        finally:
            self._waiting = None
        if not self.closed:
            self._open_path(conn)

    def _path_failed(self, exc: TunneldError) -> None:
        """The socket path could not be made absolute: the client is reset."""
        spec = self.fwd.spec
        self.fwd.fail(f"{spec.listen} -> {spec.target_path}: {exc}. The forward stays open.")
        self._refuse(exc)

    # fastpath.LocalEnd ------------------------------------------------------------------------

    def attached(self, chan: fastpath.Channel) -> None:
        self._opening = None
        super().attached(chan)

    def failed(self, exc: Exception) -> None:
        self._opening = None
        fwd, spec = self.fwd, self.fwd.spec
        if isinstance(exc, asyncssh.ChannelOpenError) and spec.target_path:
            why = openfail.describe_path(spec.target_path, self._socket_path, exc.code,
                                         exc.reason)
            fwd.fail(f"{spec.listen} -> {spec.target_path}: {why} The forward stays open.")
        elif isinstance(exc, asyncssh.ChannelOpenError):
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
