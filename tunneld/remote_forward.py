"""asyncssh adapter: a remote forward (``-R``): the server listens, connections come back here.

Per ``ForwardSpec`` of kind "remote" (``bind_host:bind_port`` on the server, ``target`` here)
one ``RemoteForward`` asks the server for a listener (``conn.create_server``, the SSH
``tcpip-forward`` request) each time its host becomes connected, and cancels it when the
forward is removed.  The server's listener dies with the connection; after a reconnect it is
requested again, and a refusal is retried for ``RETRY_WINDOW`` seconds, because the sshd
process of the old connection may still hold the port for a moment (a half-dead link, a killed
daemon) — the autossh failure users meet most.  After that the forward gives up, says why in
``last_error``, and tries again on the next connection (``tunnelctl reconnect HOST``).

Each connection the server accepts comes on an asyncssh channel (``fastpath.accepted_session``)
paired with a ``_TargetProtocol``, a ``localside.LocalSide``: the data path is the mirror
image of a local forward's.  As for local forwards, ``bytes_out`` counts what leaves this
machine through the tunnel and ``bytes_in`` what arrives.  Back-pressure both ways as in
``localside``.  The channel is
confirmed only once the local target accepted the TCP connection; if it refuses, the server
side's client sees the channel refused (its connection closes) and the forward logs why.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncssh

from . import fastpath
from .errors import BindError
from .forward import CHANNEL_MAX_PKTSIZE, CHANNEL_WINDOW, ForwardHost, ForwardReport
from .localside import LINGER_RESET, LocalSide, set_linger
from .spec import ForwardSpec, join_host_port
from .state import ForwardEvent, ForwardState, forward_follow, forward_next

log = logging.getLogger("tunneld")

#: seconds during which a refused listen request is retried after a (re)connect
RETRY_WINDOW = 30.0
#: first and longest pause (s) between two listen requests within that window
RETRY_INITIAL = 0.5
RETRY_MAX = 4.0
#: seconds allowed to connect to the local target of one forwarded connection
TARGET_CONNECT_TIMEOUT = 10.0
#: seconds a removed forward waits for the server to confirm the cancelled listener
CANCEL_TIMEOUT = 5.0


class RemoteForward(ForwardReport):
    """A listener on the server for one spec (while the host is connected), and the counters
    of the connections it carried.  Same interface as ``LocalForward`` (bind, follow_host,
    close, snapshot, conns, counters)."""

    def __init__(self, spec: ForwardSpec, host: ForwardHost, origin: str = "added"):
        assert spec.kind == "remote"
        # state: CLOSED until bind(); then LISTENING iff the server holds our listener, else
        # WAITING; conns: the local targets of forwarded connections
        super().__init__(spec, host, origin)
        #: listen requests answered (granted or refused), over the forward's life
        self.attempts = 0
        #: the server-side listener; non-None iff the server holds it on ``_conn``
        self._listener: asyncssh.SSHListener | None = None
        #: the connection the listener is (being) requested on: the host's live connection
        #: as last seen by follow_host(), None while the host is not connected
        self._conn: asyncssh.SSHClientConnection | None = None
        #: the task requesting the listener on ``_conn``; None iff no request is running
        self._task: asyncio.Task[None] | None = None
        #: True while that task waits for the server's answer (cancelling it then could leave
        #: a granted listener on the server: close() lets it finish and cancel that instead)
        self._asking = False
        #: set and replaced whenever a request was answered
        self._answered = asyncio.Event()

    # -- the listener on the server ----------------------------------------------------------

    @property
    def where(self) -> str:
        """``ADDR:PORT on HOST``, for messages."""
        return f"{self.spec.listen} on {self.host.name}"

    async def bind(self) -> None:
        """Take effect.  If the host is connected, ask the server for the listener now, once:
        a refusal raises ``BindError`` naming the port and the server (nothing is left
        there).  Otherwise the listener is requested when the host connects."""
        conn = self._live_conn()
        if conn is not None:
            try:
                listener = await self._request(conn)
            except asyncssh.ChannelListenError:
                self._answer()
                if not conn.is_closed():
                    raise BindError(self._refused_message()) from None
                listener = None  # the connection ended meanwhile: ask on the next one
            except (OSError, asyncssh.Error):
                listener = None
            else:
                self._answer()
            if listener is not None:
                if conn.is_closed():
                    listener = None
                else:
                    self._conn, self._listener = conn, listener
                    log.info("%s: the server listens on %s for %s", self.host.name,
                             self.spec.listen, self.spec.target)
        self.state = forward_next(self.state, ForwardEvent.BIND)
        self.follow_host()

    def follow_host(self) -> None:
        """Called on every host transition: a new connection gets a listen request, a lost
        one takes the listener with it."""
        if self.state is ForwardState.CLOSED:
            return
        conn = self._live_conn()
        if conn is not self._conn:
            self._stop_task()
            self._listener = None  # it belonged to the old connection, which is gone
            self._conn = conn
            if conn is not None:
                self._task = asyncio.get_running_loop().create_task(
                    self._establish(conn), name=f"remote:{self.host.name}:{self.spec.bind_port}")
        self._to(self._listener is not None, publish=False)

    async def close(self, abort_clients: bool = True) -> None:
        """Cancel the listener on the server (and, by default, every open connection)."""
        if self.state is not ForwardState.CLOSED:
            self.state = forward_next(self.state, ForwardEvent.CLOSE)
        if not self._asking:
            self._stop_task()
        else:
            self._task = None  # it sees CLOSED when the answer comes, and cancels a grant
        listener, self._listener = self._listener, None
        conn, self._conn = self._conn, None
        if abort_clients:
            for c in list(self.conns):
                c.abort()
        if listener is not None and conn is not None and not conn.is_closed():
            listener.close()
            try:
                await asyncio.wait_for(listener.wait_closed(), CANCEL_TIMEOUT)
            except (asyncio.TimeoutError, OSError, asyncssh.Error):
                pass
            log.info("%s: the server no longer listens on %s", self.host.name,
                     self.spec.listen)

    async def wait_answer(self, timeout: float) -> None:
        """Wait (bounded) until a listen request has been answered, if none was yet."""
        deadline = time.monotonic() + timeout
        while self.attempts == 0 and self.state is not ForwardState.CLOSED:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._answered.wait(), left)
            except asyncio.TimeoutError:
                return

    # -- internals -----------------------------------------------------------------------------

    def _live_conn(self) -> asyncssh.SSHClientConnection | None:
        return self.host.live_connection()

    async def _request(self, conn: asyncssh.SSHClientConnection) -> asyncssh.SSHListener:
        self._asking = True
        try:
            return await conn.create_server(self._accept, self.spec.bind_host,
                                            self.spec.bind_port, window=CHANNEL_WINDOW,
                                            max_pktsize=CHANNEL_MAX_PKTSIZE)
        finally:
            self._asking = False

    def _answer(self) -> None:
        self.attempts += 1
        answered, self._answered = self._answered, asyncio.Event()
        answered.set()

    def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _to(self, up: bool, publish: bool = True) -> None:
        """LISTENING iff ``up`` (the server holds our listener), else WAITING."""
        old = self.state
        self.state = new = forward_follow(old, up)
        events = self.host.events
        if new is not old and publish and events is not None:
            events.publish("forward", host=self.host.name, spec=str(self.spec), event="state",
                           origin=self.origin, old=old.value, new=new.value)

    def _refused_message(self) -> str:
        why = ["the port is in use there"]
        if self.spec.bind_port < 1024:
            why.append("it is a privileged port (below 1024)")
        rules = "AllowTcpForwarding, PermitListen"
        if self.spec.is_public:
            rules += ", GatewayPorts clientspecified for a non-loopback address"
        return (f"{self.host.name}: the server refused to listen on {self.spec.listen} "
                f"(remote port {self.spec.bind_port}): {' or '.join(why)}, or its sshd does "
                f"not allow it ({rules}); nothing was added — pick another remote port "
                f"(e.g. -R {self.spec.bind_port + 10000}:{self.spec.target})"
                if self.spec.bind_port < 55536 else
                f"{self.host.name}: the server refused to listen on {self.spec.listen} "
                f"(remote port {self.spec.bind_port}): {' or '.join(why)}, or its sshd does "
                f"not allow it ({rules}); nothing was added")

    async def _establish(self, conn: asyncssh.SSHClientConnection) -> None:
        """Request the listener on ``conn``; retry refusals within ``RETRY_WINDOW``."""
        deadline = time.monotonic() + RETRY_WINDOW
        delay = RETRY_INITIAL
        refused = 0
        try:
            while True:
                if conn is not self._conn or self.state is ForwardState.CLOSED:
                    return
                try:
                    listener = await self._request(conn)
                except asyncssh.ChannelListenError:
                    self._answer()
                    if conn.is_closed() or conn is not self._conn:
                        return
                    refused += 1
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.fail(f"the server refused to listen on {self.spec.listen} "
                                  f"{refused} times in {RETRY_WINDOW:g}s (the port is in use "
                                  "there, or its sshd does not allow it); gave up until the "
                                  "next connection. Free the port on the server, then "
                                  f"`tunnelctl reconnect {self.host.name}`")
                        return
                    if refused == 1:
                        self.fail(f"the server refused to listen on {self.spec.listen} (in "
                                  f"use there?); retrying for up to {RETRY_WINDOW:g}s (the "
                                  "sshd of an old connection may still hold it)")
                    await asyncio.sleep(min(delay, left))
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except (OSError, asyncssh.Error):
                    return  # the connection is going away; the next one asks again
                self._answer()
                if conn is not self._conn or self.state is ForwardState.CLOSED:
                    listener.close()  # removed (or reconnected) while we asked: take it back
                    return
                self._listener = listener
                self.last_error = None
                log.info("%s: the server listens on %s for %s%s", self.host.name,
                         self.spec.listen, self.spec.target,
                         f" (after {refused} refusals)" if refused else "")
                self._to(True)
                return
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _accept(self, orig_host: str, orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        """asyncssh's session factory: a connection arrived on the server's listener.
        Connect to the local target; raise ChannelOpenError (the server side's client is
        refused) when that fails."""
        self.total += 1
        peer = join_host_port(orig_host, orig_port) if orig_host else "?"
        target = _TargetProtocol(self, peer)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: target, self.spec.target_host, self.spec.target_port),
                TARGET_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            why = (f"no answer within {TARGET_CONNECT_TIMEOUT:g}s"
                   if isinstance(exc, asyncio.TimeoutError) else
                   (exc.strerror or str(exc) or type(exc).__name__))
            self.fail(f"{self.where} -> {self.spec.target}: cannot connect to "
                      f"{self.spec.target} here ({why}); is anything listening on it on this "
                      f"machine? Refused client {peer} on the server. The forward stays open.")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            f"tunneld could not connect to {self.spec.target}: "
                                            f"{why}") from None
        if self.state is ForwardState.CLOSED or self._live_conn() is None:
            target.abort()  # removed, or the connection ended while we connected
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            "the forward was removed")
        return fastpath.accepted_session(target, CHANNEL_MAX_PKTSIZE)


class _TargetProtocol(LocalSide):
    """The local end of one forwarded connection: the target this machine connected to for a
    connection the server accepted; its channel is confirmed after the connect."""

    def __init__(self, fwd: RemoteForward, peer: str):
        super().__init__(fwd)
        #: the client's address on the server side (for logs)
        self.peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_linger(transport, LINGER_RESET)   # see localside.reset()
        self.fwd.conns.add(self)

    def attached(self, chan: fastpath.Channel) -> None:
        """The channel is confirmed: send what the target said so far, then stream."""
        super().attached(chan)
        if self.closed:
            chan.close()  # the target already went away; buffered bytes are flushed first
