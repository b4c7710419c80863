"""The one place where tunneld changes asyncssh internals: no SSH_MSG_IGNORE before every
packet when the cipher is an AEAD (AES-GCM, chacha20-poly1305).

asyncssh 2.24 ``SSHConnection.send_packet`` inserts an empty ``SSH_MSG_IGNORE`` packet before
every encrypted packet after key exchange.  That is the classic countermeasure to the CBC-mode
chosen-plaintext attack on SSH (Dai 2002; Bellare, Kohno, Namprempre 2004): with CBC the IV of
a packet is the last ciphertext block of the previous one, which an attacker has seen, so an
unpredictable packet is put in between.  AEAD modes have no chained IV — AES-GCM in SSH (RFC
5647) uses a per-packet invocation counter nonce and chacha20-poly1305@openssh.com derives its
nonce from the packet sequence number — so the attack does not apply, and OpenSSH itself never
sends such packets with any cipher.  An empty ignore packet hides nothing else (not even
sizes: its length is fixed).  For those ciphers it only doubles the packets, encryptions and
socket writes, which is most of a channel's per-packet cost (design.md §9).

How: ``send_packet`` is wrapped, not copied.  For a non-KEX packet on an AEAD cipher the wrapper
marks the connection; the ignore packet that asyncssh then sends from inside ``send_packet``
is recognised (type, empty payload, the mark) and dropped before it is framed, so no sequence
number is used for it.  Everything else, rekeying included, runs asyncssh's own code.

Second change: packets sent in one event-loop iteration leave in one ``writelines`` call
instead of one socket write each (``_send``).  A bulk upload makes several 32 KiB channel
packets from each read of the local socket; OpenSSH likewise flushes its output buffer once
per poll loop.  The pending packets are bound to the transport they were written for and are
flushed by a ``call_soon`` scheduled when the first one arrives — before any ``abort`` that
asyncssh schedules later, so a DISCONNECT message still leaves first.

Only for the asyncssh versions in ``SUPPORTED``; with any other version ``install()`` changes
nothing and says so, and tunneld runs on stock asyncssh.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE, MSG_KEX_LAST
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.packet import String

log = logging.getLogger("tunneld")

#: asyncssh versions whose send_packet this was written for and tested against
SUPPORTED = ("2.24.",)
_AEAD = (GCMEncryption, ChachaEncryption)
_EMPTY = String(b"")
_MARK = "_tunneld_drop_ignore"

_PENDING = "_tunneld_pending"

_orig_send_packet: Any = None
_orig_send: Any = None


def supported(version: str = asyncssh.__version__) -> bool:
    return version.startswith(SUPPORTED)


def install() -> bool:
    """Patch asyncssh once (idempotent).  Returns whether the fast path is active."""
    global _orig_send_packet, _orig_send
    if _orig_send_packet is not None:
        return True
    if not supported():
        log.info("asyncssh %s is not one fastpath was written for (%s); using stock asyncssh",
                 asyncssh.__version__, ", ".join(SUPPORTED))
        return False
    _orig_send_packet = SSHConnection.send_packet

    def send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,) and getattr(self, _MARK, False):
            setattr(self, _MARK, False)  # the ignore packet asyncssh inserts: drop it
            return
        setattr(self, _MARK, pkttype > MSG_KEX_LAST and
                isinstance(getattr(self, "_send_encryption", None), _AEAD))
        try:
            _orig_send_packet(self, pkttype, *args, handler=handler)
        finally:
            setattr(self, _MARK, False)

    def _send(self: SSHConnection, data: bytes) -> None:
        transport = self._transport
        if not transport:
            return
        pending = getattr(self, _PENDING, None)
        if pending is None or pending[0] is not transport:
            pending = (transport, [])
            setattr(self, _PENDING, pending)
            self._loop.call_soon(_flush, self, pending)
        pending[1].append(data)

    _orig_send = SSHConnection._send
    SSHConnection.send_packet = send_packet  # type: ignore[method-assign]
    SSHConnection._send = _send  # type: ignore[method-assign]
    return True


def _flush(conn: SSHConnection, pending: tuple[Any, list[bytes]]) -> None:
    if getattr(conn, _PENDING, None) is pending:
        setattr(conn, _PENDING, None)
    transport, chunks = pending
    if chunks and not transport.is_closing():
        try:
            transport.writelines(chunks)
        except ConnectionError:  # the peer is gone; asyncssh notices on its own
            pass


def uninstall() -> None:
    """Back to stock asyncssh (tests compare both)."""
    global _orig_send_packet, _orig_send
    if _orig_send_packet is not None:
        SSHConnection.send_packet = _orig_send_packet  # type: ignore[method-assign]
        SSHConnection._send = _orig_send  # type: ignore[method-assign]
        _orig_send_packet = _orig_send = None
