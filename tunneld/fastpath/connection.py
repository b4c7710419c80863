"""tunneld's changes to one asyncssh connection, installed on that connection alone.

``FastConnection.attach(conn)`` sets instance attributes on ``conn`` that shadow seven of
its class's methods (asyncssh calls each of them through ``self.``, so the instance's wins),
and gives its logger a subclass.  asyncssh's classes are not touched: a connection tunneld
did not attach (a test's in-process server, another library in the process) runs stock
asyncssh.  What the changes do:

``send_packet`` — asyncssh 2.24's, with two differences: it seals through ``Sender`` (the
one owner of the send nonce, see ``sealing``), and it sends no SSH_MSG_IGNORE before each
packet on AEAD ciphers.  asyncssh inserts an empty ignore packet before every encrypted
packet after key exchange.  That is the classic countermeasure to the CBC-mode
chosen-plaintext attack on SSH (Dai 2002; Bellare, Kohno, Namprempre 2004): with CBC the IV
of a packet is the last ciphertext block of the previous one, which an attacker has seen, so
an unpredictable packet is put in between.  AEAD modes have no chained IV — AES-GCM in SSH
(RFC 5647) uses a per-packet invocation counter nonce and chacha20-poly1305@openssh.com
derives its nonce from the packet sequence number — so the attack does not apply, and
OpenSSH itself never sends such packets with any cipher.  An empty ignore packet hides
nothing else (not even sizes: its length is fixed).  For those ciphers it only doubled the
packets, encryptions and socket writes, which was most of a channel's per-packet cost.  Other
ciphers keep it.

``_recv_pkthdr`` — the receive hook, where asyncssh starts each packet: on AES-GCM it opens
every complete packet in the buffer (through ``Opener``) and hands the data, window adjust,
EOF, CLOSE and open confirmation of a lean channel (``channel.TCPChannel``) straight to it,
consuming the buffer once per read instead of twice per packet.  Anything else (another
message, another channel, a bad tag, compression, packet logging on) goes to asyncssh's code
unchanged, which gets the packet already opened (``Opener.hold``).

``_recv_data`` — asyncssh 2.24's, in a batch (``batch``): the packets and local writes a
read of the SSH socket causes leave together.

``_reset_keepalive_timer``, ``_keepalive_timer_callback`` — one keepalive timer per
connection instead of one per read.  asyncssh cancels and re-creates its timer for every
read of the SSH socket, so that the keepalive goes out ``interval`` after the last data;
here a read only notes the time, and a timer that fires early waits out the rest.  A changed
interval (``set_keepalive``) re-arms at once, as before.

``_log_packet``, ``add_channel`` and the logger — no log text built for a message nobody
will see.  asyncssh formats a description of every packet it sends or receives ("Sent
MSG_CHANNEL_DATA (94), 100 bytes") before its logger finds that packet logging (debug level
3) is off, and converts the arguments of every message before the standard ``isEnabledFor``
check.  The connection's and its asyncssh channels' ``_log_packet`` (``add_channel`` sets the
channels') and its logger, whose children its channels' loggers are, return early in exactly
the cases where asyncssh would not log.
"""

from __future__ import annotations

import time
import types
from typing import Any

from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_DEBUG,
    MSG_IGNORE,
    MSG_KEX_LAST,
    MSG_SERVICE_ACCEPT,
    MSG_SERVICE_REQUEST,
    MSG_USERAUTH_BANNER,
    MSG_USERAUTH_LAST,
)
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import CompressionError, DisconnectError, ProtocolError
from asyncssh.packet import String

from .batch import batch
from .sealing import Opener, Sender

_AEAD = (GCMEncryption, ChachaEncryption)
_IGNORE = String(b"")
_GCM_TAG = 16
#: connection-protocol messages the receive hook gives to a lean channel
_FAST_TYPES = frozenset((MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_WINDOW_ADJUST,
                         MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_CLOSE))
#: packets asyncssh holds back until the key exchange (or the login) is complete
_DEFERRED_UNTIL_KEX = frozenset((MSG_DEBUG, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT))
#: the attribute of an attached connection that holds its FastConnection
_ATTR = "_tunneld_fastpath"

#: asyncssh's own methods, called where the replacements hand over
_stock_recv_pkthdr = SSHConnection._recv_pkthdr
_stock_reset_keepalive = SSHConnection._reset_keepalive_timer
_stock_keepalive_callback = SSHConnection._keepalive_timer_callback
_stock_add_channel = SSHConnection.add_channel
_stock_log_packet = SSHConnection._log_packet


class _QuietLogger(SSHLogger):
    """asyncssh's logger, converting a message's arguments only if it will be logged (its
    children, the loggers of the connection's channels, are of this class too)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):  # what LoggerAdapter.log() checks, after the converting
            super().log(level, msg, *args, **kwargs)


def _quiet_log_packet(handler: Any, *args: Any) -> None:
    if SSHLogger._debug_level >= 3:  # what SSHLogger.packet() checks
        _stock_log_packet(handler, *args)


class FastConnection:
    """The fast path's state for one attached asyncssh connection (see the module)."""

    def __init__(self, conn: SSHConnection):
        self.conn = conn
        self.sender = Sender(conn)
        self.opener = Opener()
        #: the keepalive interval the connection's timer was set with (None: not set by us
        #: yet), and when data last arrived (None: none since then)
        self.ka_interval: float | None = None
        self.ka_received: float | None = None
        #: the fastest channel open → confirmation seen (s): the round trip a channel's
        #: window grows with (``channel``, ``window``); infinite until the first
        self.rtt = float("inf")

    def note_rtt(self, sample: float) -> None:
        if sample < self.rtt:
            self.rtt = sample

    @staticmethod
    def of(conn: Any) -> "FastConnection | None":
        """``conn``'s FastConnection, None if it is not attached."""
        return getattr(conn, _ATTR, None)

    @classmethod
    def attach(cls, conn: SSHConnection) -> "FastConnection":
        """Install the changes on ``conn`` (idempotent).  Call between two of asyncssh's
        callbacks (it takes over the connection's current keys where asyncssh left them)."""
        fast = cls.of(conn)
        if fast is not None:
            return fast
        fast = cls(conn)
        setattr(conn, _ATTR, fast)
        for name, method in (("send_packet", fast.send_packet),
                             ("_recv_pkthdr", fast.recv_pkthdr),
                             ("_recv_data", fast.recv_data),
                             ("_reset_keepalive_timer", fast.reset_keepalive_timer),
                             ("_keepalive_timer_callback", fast.keepalive_timer_callback),
                             ("add_channel", fast.add_channel),
                             ("_log_packet", types.MethodType(_quiet_log_packet, conn))):
            setattr(conn, name, method)
        handler = conn._recv_handler
        if getattr(handler, "__func__", None) is _stock_recv_pkthdr:
            conn._recv_handler = fast.recv_pkthdr
        if type(conn._logger) is SSHLogger:
            conn._logger.__class__ = _QuietLogger
        fast.sender._adopt(conn._send_encryption)
        fast.opener.adopt(conn._recv_encryption)
        return fast

    # -- sending -------------------------------------------------------------------------------

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        """asyncssh 2.24's ``SSHConnection.send_packet``, sealing through ``Sender`` and with
        no ignore packet before each packet on AEAD ciphers (see the module)."""
        conn = self.conn
        if conn._auth_complete and conn._kex_complete and \
                (conn._rekey_bytes_sent >= conn._rekey_bytes or
                 (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)):
            conn._send_kexinit()
            conn._kexinit_sent = True
        if ((pkttype in _DEFERRED_UNTIL_KEX or pkttype > MSG_KEX_LAST) and
                not conn._kex_complete) or \
                (pkttype == MSG_USERAUTH_BANNER and
                 not (conn._auth_in_progress or conn._auth_complete)) or \
                (pkttype > MSG_USERAUTH_LAST and not conn._auth_complete):
            conn._deferred_packets.append((pkttype, args))
            return
        enc = conn._send_encryption
        if enc and pkttype > MSG_KEX_LAST and not isinstance(enc, _AEAD):
            self.send_packet(MSG_IGNORE, _IGNORE)
        payload = bytes((pkttype,)) + b"".join(args)
        if conn._compressor and (conn._auth_complete or not conn._compress_after_auth):
            compressed = conn._compressor.compress(payload)
            if compressed is None:
                raise CompressionError("Compression failed")
            seq = self.sender.seal(pkttype, compressed)
        else:
            seq = self.sender.seal(pkttype, payload)
        if SSHLogger._debug_level >= 3:
            (handler or conn).log_sent_packet(pkttype, seq, payload)

    # -- receiving -----------------------------------------------------------------------------

    def recv_data(self) -> None:
        """asyncssh 2.24's ``_recv_data`` in a batch, with ``reset_keepalive_timer``'s usual
        case (a timer running: note the time) inline."""
        conn = self.conn
        with batch:
            if conn._keepalive_timer is not None and conn._auth_complete and \
                    self.ka_interval == conn._keepalive_interval:
                self.ka_received = conn._loop.time()
            else:
                conn._reset_keepalive_timer()
            try:
                while conn._inpbuf and conn._recv_handler():
                    pass
            except DisconnectError as exc:
                conn._send_disconnect(exc.code, exc.reason, exc.lang)
                conn._force_close(exc)
            except Exception:  # noqa: BLE001 - asyncssh's: it reports and closes
                conn.internal_error()

    def recv_pkthdr(self) -> bool:
        """asyncssh's ``_recv_pkthdr`` (the start of each packet), taking the messages of lean
        channels (those with ``fast_packet`` and ``fast_data``) first on AES-GCM (see the
        module)."""
        conn = self.conn
        opener = self.opener
        if conn._recv_encryption is not opener.enc:
            opener.adopt(conn._recv_encryption)
        aead = opener.aead
        if aead is None or conn._decompressor is not None or SSHLogger._debug_level >= 3:
            return _stock_recv_pkthdr(conn)
        buf = conn._inpbuf
        size = len(buf)
        view = memoryview(buf)
        channels = conn._channels
        limit = conn._max_recv_pktlen
        pos = 0
        try:
            while size - pos >= 4:
                pktlen = int.from_bytes(buf[pos:pos + 4], "big")
                end = pos + 4 + pktlen + _GCM_TAG
                if pktlen > limit:
                    break  # asyncssh's code refuses it
                if end > size:
                    return False  # the rest of the packet is still on its way
                plain = opener.open(view[pos:pos + 4], view[pos + 4:end])
                if plain is None:
                    opener.hold(None)  # asyncssh's code refuses it
                    break
                pkttype = plain[1]
                chan: Any = None
                if pkttype in _FAST_TYPES and len(plain) >= 6:
                    chan = channels.get(int.from_bytes(plain[2:6], "big"))
                take = getattr(chan, "fast_packet", None)
                if take is None:  # asyncssh's: another message, or asyncssh's channel
                    opener.hold(plain)
                    break
                conn._recv_seq = (conn._recv_seq + 1) & 0xffffffff
                pos = end
                stop = len(plain) - plain[0]
                if pkttype == MSG_CHANNEL_DATA:
                    if stop < 10 or int.from_bytes(plain[6:10], "big") != stop - 10:
                        raise ProtocolError("Invalid channel data packet")
                    chan.fast_data(memoryview(plain)[10:stop])
                else:
                    take(pkttype, plain[6:stop])
        finally:
            if pos:
                conn._inpbuf = buf[pos:]
                conn._auth_final = True
        return _stock_recv_pkthdr(conn) if conn._inpbuf else False

    # -- keepalive -----------------------------------------------------------------------------

    def reset_keepalive_timer(self) -> None:
        conn = self.conn
        if conn._keepalive_timer is not None and conn._auth_complete and \
                self.ka_interval == conn._keepalive_interval:
            self.ka_received = conn._loop.time()  # the timer waits out the rest
            return
        _stock_reset_keepalive(conn)
        self.ka_interval = conn._keepalive_interval

    def keepalive_timer_callback(self) -> None:
        conn = self.conn
        interval = conn._keepalive_interval
        received = self.ka_received
        if interval and received is not None and self.ka_interval == interval:
            due = received + interval
            if due > conn._loop.time():  # data arrived since the timer was set
                conn._keepalive_timer = conn._loop.call_at(due, self.keepalive_timer_callback)
                return
        _stock_keepalive_callback(conn)

    # -- channels ------------------------------------------------------------------------------

    def add_channel(self, chan: Any) -> int:
        """asyncssh's ``add_channel``; an asyncssh channel logs packets only if it will."""
        number: int = _stock_add_channel(self.conn, chan)
        if isinstance(chan, SSHChannel):
            chan._log_packet = types.MethodType(_quiet_log_packet, chan)  # type: ignore
        return number
