"""asyncssh adapter: a SOCKS proxy (``-D``) on a local port, one SSH channel per client.

A ``SocksForward`` is a ``LocalForward`` whose clients say where they want to go: the first
bytes of each connection are a SOCKS5 or SOCKS4/4a handshake (parsed by the pure
``socks.Handshake``); the target, a host name included, is handed to the server unresolved
(the channel's ``direct-tcpip`` target), so names only the server knows work.  The client
gets its success reply only once the channel is open, and the matching failure code when the
server refuses it (then the connection closes).  After that the data path, back-pressure,
counters and held connections during outages are ``forward``'s and ``localside``'s; the
handshake itself is counted in no byte counter.

Limits: ``socks.MAX_HANDSHAKE`` bytes and ``socks.HANDSHAKE_TIMEOUT`` seconds per handshake.
"""

from __future__ import annotations

import asyncio
import logging

import asyncssh

from . import socks
from .forward import LocalClient, LocalForward
from .localside import LINGER_OFF, set_linger

log = logging.getLogger("tunneld")


class SocksForward(LocalForward):
    """A bound SOCKS listener: state and counters as any forward's."""

    def _protocol(self) -> "_SocksProtocol":
        return _SocksProtocol(self)


class _SocksProtocol(LocalClient):
    """One SOCKS client.  Invariant: ``request`` is None until the client's request is
    complete; until then nothing is buffered in ``pending`` and no channel is being opened.
    ``hs.done`` with no ``request``: the handshake failed and the transport is closing."""

    def __init__(self, fwd: LocalForward):
        super().__init__(fwd)
        self.hs = socks.Handshake()
        #: where the client asked to go (None until its request is complete)
        self.request: socks.Request | None = None
        #: ends a handshake that takes too long; None once the request is complete
        self._timer: asyncio.TimerHandle | None = None

    def _begin(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(socks.HANDSHAKE_TIMEOUT,
                                                            self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if not self.hs.done and not self.closed:
            self._give_up(f"no complete SOCKS request within {socks.HANDSHAKE_TIMEOUT:g}s",
                          None)

    def _give_up(self, message: str, reply: bytes | None) -> None:
        self.hs.done = True
        self._cancel_timer()
        log.info("%s: %s: closed SOCKS client %s: %s", self.fwd.host.name,
                 self.fwd.spec.listen, self.peer, message)
        if self.transport is not None and not self.transport.is_closing():
            if reply:
                self.transport.write(reply)
            set_linger(self.transport, LINGER_OFF)   # the reply says why: an orderly end
            self.transport.close()

    # asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            super().data_received(data)
            return
        if self.hs.done:
            return  # a failed handshake: the transport is closing
        for ev in self.hs.feed(data):
            if isinstance(ev, socks.Send):
                assert self.transport is not None
                self.transport.write(ev.data)
            elif isinstance(ev, socks.Failed):
                self._give_up(ev.message, ev.reply)
                return
            else:
                self._cancel_timer()
                self.request = ev
                if self.hs.rest:
                    super().data_received(self.hs.rest)  # held until the channel is open
                self._connect()
                return

    def eof_received(self) -> bool:
        if self.request is None:
            self._give_up("the client closed before its SOCKS request was complete", None)
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # forward.LocalClient's hooks -------------------------------------------------------------

    def _target(self) -> tuple[str, int]:
        assert self.request is not None
        return self.request.host, self.request.port

    def _granted(self) -> None:
        assert self.transport is not None
        self.transport.write(self.hs.success())

    def _refuse(self, exc: Exception) -> None:
        if isinstance(exc, asyncssh.ChannelOpenError):
            code = socks.code_for_open_error(exc.code, exc.reason)
        else:  # the SSH connection is down (held too long, needs-auth, failed)
            code = socks.GENERAL_FAILURE
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(self.hs.failure(code))
            set_linger(transport, LINGER_OFF)
            transport.close()
