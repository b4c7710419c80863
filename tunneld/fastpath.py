"""The one place where tunneld changes asyncssh internals, to cut its per-packet cost: no
SSH_MSG_IGNORE before every packet on AEAD ciphers, writes batched per read, one AES-GCM
context per key, and no log text built for messages nobody will see.

First: asyncssh 2.24 ``SSHConnection.send_packet`` inserts an empty ``SSH_MSG_IGNORE`` packet before
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

Second: writes leave in batches, as OpenSSH flushes its buffers once per poll loop.  While
the bytes of one read are processed — a read of the SSH socket (``data_received``, wrapped
here) or of a local client (``forward`` calls ``begin()``/``end()``) — that is a *batch*: the
SSH packets made meanwhile (``_send``) and the data for local clients (``forward``'s channel
session, via ``at_end``) wait and leave in one ``writelines`` per socket when the outermost
batch ends.  A bulk upload makes several 32 KiB packets from each local read, a download
decodes several packets from each SSH read, and a ping-pong or a new connection saves the
extra loop callback per write.  Packets sent outside a batch (timers, tasks) are flushed by a
``call_soon`` scheduled when the first one arrives.  Pending packets are bound to the
transport they were written for and leave before any ``abort`` asyncssh schedules (it does so
with ``call_soon``), so a DISCONNECT message still leaves first.

Third: AES-GCM's context is made once per key, not once per packet: asyncssh's ``GCMCipher``
builds an ``AESGCM`` object (a key schedule) for every packet it seals or opens.  Sealing and
opening a 100-byte packet took 4.4 µs here, 2.2 µs with one context per key (32 KiB: 8.9 →
7.3 µs).  The methods are otherwise asyncssh's, nonce update included.

Fourth: no log text is built for a message nobody will see.  asyncssh formats a description of
every packet it sends or receives ("Sent MSG_CHANNEL_DATA (94), 100 bytes") before its logger
finds that packet logging (debug level 3) is off, and converts the arguments of every
per-channel message before the standard ``isEnabledFor`` check.  Profiled on a forward that
opens, echoes 100 bytes and closes, that was the largest share of tunneld's own Python time per
connection.  The wrappers return early in exactly the cases where asyncssh would not log.

Fifth: the channel messages of tunneld's own TCP channels (``channel.TCPChannel``) skip
asyncssh's generic packet code on AES-GCM.  ``send`` frames, pads (random bytes from a pool,
not a system call per packet) and seals a message in one step; the receive hook (asyncssh's
``_recv_pkthdr``, which starts each packet) opens every complete packet in the buffer and
hands the data, window adjust, EOF, CLOSE and open confirmation of such a channel straight to
it, consuming the buffer once per read instead of twice per packet.  Anything else (another
message, another channel, a packet not yet complete, a bad tag, a key exchange due,
compression, packet logging on) goes to asyncssh's code unchanged: the hook does not advance
the nonce for a packet it does not take, so asyncssh opens that one again itself.

Sixth: one keepalive timer per connection instead of one per read.  asyncssh cancels and
re-creates its keepalive timer for every read of the SSH socket, so that the keepalive goes
out ``interval`` after the last data; here a read only notes the time, and a timer that fires
early waits out the rest.  A changed interval (``set_keepalive``) re-arms at once, as before.

Only for the asyncssh versions in ``SUPPORTED``; with any other version ``install()`` changes
nothing and says so, and tunneld runs on stock asyncssh.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import (MSG_CHANNEL_CLOSE, MSG_CHANNEL_DATA, MSG_CHANNEL_EOF,
                                MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_WINDOW_ADJUST,
                                MSG_IGNORE, MSG_KEX_LAST)
from asyncssh.crypto.cipher import GCMCipher
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import ProtocolError
from asyncssh.packet import SSHPacketLogger, String

log = logging.getLogger("tunneld")

#: asyncssh versions whose send_packet this was written for and tested against
SUPPORTED = ("2.24.",)
_AEAD = (GCMEncryption, ChachaEncryption)
_EMPTY = String(b"")
_MARK = "_tunneld_drop_ignore"

_PENDING = "_tunneld_pending"
#: the keepalive interval the connection's timer was set with, and when data last arrived
_KA_INTERVAL = "_tunneld_keepalive_interval"
_KA_RECEIVED = "_tunneld_received_at"

#: (class, attribute, asyncssh's original) of every patch in place; empty: stock asyncssh
_patched: list[tuple[type, str, Any]] = []


#: >0 while bytes read from a socket are being processed (a *batch*); writes made meanwhile
#: wait for the end of the outermost batch and leave together
_depth = 0
#: (function, args) to call when the outermost batch ends: the flushes of those writes
_at_end: list[tuple[Callable[..., None], tuple[Any, ...]]] = []


def begin() -> None:
    """Start a batch (pair with ``end()`` in a ``finally``)."""
    global _depth
    _depth += 1


def end() -> None:
    """End a batch; the outermost one runs the flushes registered with ``at_end``."""
    global _depth
    _depth -= 1
    while not _depth and _at_end:
        calls = _at_end[:]
        _at_end.clear()
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one socket's failure must not keep the others'
                log.exception("fastpath: a batched write failed")


def batching() -> bool:
    return _depth > 0


def at_end(fn: Callable[..., None], *args: Any) -> None:
    """Call ``fn(*args)`` when the current batch ends (only call while ``batching()``)."""
    _at_end.append((fn, args))


#: whether the patches are in place (``install``/``uninstall``)
active = False


def supported(version: str = asyncssh.__version__) -> bool:
    return version.startswith(SUPPORTED)


def install() -> bool:
    """Patch asyncssh once (idempotent).  Returns whether the fast path is active."""
    if _patched:
        return True
    if not supported():
        log.info("asyncssh %s is not one fastpath was written for (%s); using stock asyncssh",
                 asyncssh.__version__, ", ".join(SUPPORTED))
        return False
    orig_send_packet = SSHConnection.send_packet
    orig_data_received = SSHConnection.data_received
    orig_log_packet = SSHPacketLogger._log_packet
    orig_log = SSHLogger.log
    orig_recv_pkthdr = SSHConnection._recv_pkthdr
    orig_reset_keepalive = SSHConnection._reset_keepalive_timer
    orig_keepalive_callback = SSHConnection._keepalive_timer_callback

    def send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,) and getattr(self, _MARK, False):
            setattr(self, _MARK, False)  # the ignore packet asyncssh inserts: drop it
            return
        setattr(self, _MARK, pkttype > MSG_KEX_LAST and
                isinstance(getattr(self, "_send_encryption", None), _AEAD))
        try:
            orig_send_packet(self, pkttype, *args, handler=handler)
        finally:
            setattr(self, _MARK, False)

    def _send(self: SSHConnection, data: bytes) -> None:
        chunks = _outgoing(self)
        if chunks is not None:
            chunks.append(data)

    def data_received(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
        begin()
        try:
            orig_data_received(self, data, datatype)
        finally:
            end()

    def _log_packet(self: SSHPacketLogger, *args: Any) -> None:
        if SSHLogger._debug_level >= 3:  # what SSHLogger.packet() checks
            orig_log_packet(self, *args)

    def ssh_log(self: SSHLogger, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):  # what LoggerAdapter.log() checks, after the formatting
            orig_log(self, level, msg, *args, **kwargs)

    def gcm_encrypt_and_sign(self: GCMCipher, header: bytes,
                             data: bytes) -> tuple[bytes, bytes]:
        data = _aead(self).encrypt(self._iv, data, header)
        self._update_iv()
        return header + data[:-_GCM_TAG], data[-_GCM_TAG:]

    def gcm_verify_and_decrypt(self: GCMCipher, header: bytes, data: bytes,
                               mac: bytes) -> bytes | None:
        try:
            decrypted: bytes | None = _aead(self).decrypt(self._iv, data + mac, header)
        except InvalidTag:
            decrypted = None
        self._update_iv()
        return decrypted

    def recv_pkthdr(self: SSHConnection) -> bool:
        enc = self._recv_encryption
        if enc.__class__ is not GCMEncryption or self._decompressor is not None or \
                SSHLogger._debug_level >= 3:
            return orig_recv_pkthdr(self)
        buf = self._inpbuf
        size = len(buf)
        view = memoryview(buf)
        cipher = enc._cipher
        aead = _aead(cipher)
        channels = self._channels
        limit = self._max_recv_pktlen
        pos = 0
        try:
            while size - pos >= 4:
                pktlen = int.from_bytes(buf[pos:pos + 4], "big")
                end = pos + 4 + pktlen + _GCM_TAG
                if pktlen > limit:
                    break  # asyncssh's code refuses it
                if end > size:
                    return False  # the rest of the packet is still on its way
                try:
                    plain = aead.decrypt(cipher._iv, view[pos + 4:end], view[pos:pos + 4])
                except InvalidTag:
                    break  # asyncssh's code refuses it
                pkttype = plain[1]
                if pkttype not in _FAST_TYPES or len(plain) < 6:
                    break
                try:
                    chan = channels[int.from_bytes(plain[2:6], "big")]
                    take = chan.fast_packet
                except (KeyError, AttributeError):
                    break  # not one of ours: asyncssh's channel (or an error) takes it
                cipher._update_iv()
                self._recv_seq = (self._recv_seq + 1) & 0xffffffff
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
                self._inpbuf = buf[pos:]
                self._auth_final = True
        return orig_recv_pkthdr(self) if self._inpbuf else False

    def reset_keepalive_timer(self: SSHConnection) -> None:
        if self._keepalive_timer is not None and self._auth_complete and \
                getattr(self, _KA_INTERVAL, None) == self._keepalive_interval:
            setattr(self, _KA_RECEIVED, self._loop.time())  # the timer waits out the rest
            return
        orig_reset_keepalive(self)
        setattr(self, _KA_INTERVAL, self._keepalive_interval)

    def keepalive_timer_callback(self: SSHConnection) -> None:
        interval = self._keepalive_interval
        received = getattr(self, _KA_RECEIVED, None)
        if interval and received is not None and \
                getattr(self, _KA_INTERVAL, None) == interval:
            due = received + interval
            if due > self._loop.time():  # data arrived since the timer was set
                self._keepalive_timer = self._loop.call_at(
                    due, self._keepalive_timer_callback)
                return
        orig_keepalive_callback(self)

    global active
    active = True
    for cls, name, fn in ((SSHConnection, "send_packet", send_packet),
                          (SSHConnection, "_reset_keepalive_timer", reset_keepalive_timer),
                          (SSHConnection, "_keepalive_timer_callback",
                           keepalive_timer_callback),
                          (SSHConnection, "_recv_pkthdr", recv_pkthdr),
                          (GCMCipher, "encrypt_and_sign", gcm_encrypt_and_sign),
                          (GCMCipher, "verify_and_decrypt", gcm_verify_and_decrypt),
                          (SSHConnection, "_send", _send),
                          (SSHConnection, "data_received", data_received),
                          (SSHPacketLogger, "_log_packet", _log_packet),
                          (SSHLogger, "log", ssh_log)):
        _patched.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, fn)
    return True


_GCM_TAG = 16
#: connection-protocol messages the receive hook gives to a channel with ``fast_packet``
_FAST_TYPES = frozenset((MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_WINDOW_ADJUST,
                         MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_CLOSE))


def _aead(cipher: GCMCipher) -> AESGCM:
    """The cipher's AESGCM context, made once per key (asyncssh makes one per packet)."""
    try:
        return cipher._tunneld_aead  # type: ignore[attr-defined, no-any-return]
    except AttributeError:
        cipher._tunneld_aead = aead = AESGCM(cipher._key)  # type: ignore[attr-defined]
        return aead


_PADLEN = [bytes((i,)) for i in range(256)]
_pad_pool = b""
_pad_pos = 0


def _padding(n: int) -> bytes:
    """``n`` random bytes (each drawn once from a pool: no system call per packet)."""
    global _pad_pool, _pad_pos
    pos = _pad_pos
    if pos + n > len(_pad_pool):
        _pad_pool, pos = os.urandom(4096), 0
    _pad_pos = pos + n
    return _pad_pool[pos:pos + n]


def send(conn: SSHConnection, head: bytes, data: Any = b"") -> None:
    """Send the message ``head + data`` (``head`` starts with the message type; ``data`` is
    any bytes-like object): framed, padded and sealed here on AES-GCM, else by asyncssh."""
    enc = conn._send_encryption
    if enc.__class__ is not GCMEncryption or conn._compressor is not None or \
            not conn._kex_complete or conn._rekey_bytes_sent >= conn._rekey_bytes or \
            (conn._rekey_seconds and time.monotonic() >= conn._rekey_time) or \
            SSHLogger._debug_level >= 3:
        conn.send_packet(head[0], head[1:], bytes(data))
        return
    blocksize = conn._send_blocksize
    padlen = -(conn._send_enchdrlen + len(head) + len(data)) % blocksize
    if padlen < 4:
        padlen += blocksize
    plain = b"".join((_PADLEN[padlen], head, data, _padding(padlen)))
    pktlen = len(plain)
    header = pktlen.to_bytes(4, "big")
    cipher = enc._cipher
    sealed = _aead(cipher).encrypt(cipher._iv, plain, header)
    cipher._update_iv()
    chunks = _outgoing(conn)
    if chunks is not None:
        chunks += (header, sealed)
    conn._send_seq = (conn._send_seq + 1) & 0xffffffff
    conn._rekey_bytes_sent += pktlen


def _outgoing(conn: SSHConnection) -> list[bytes] | None:
    """The list of bytes waiting to be written to the connection's socket (flushed when the
    batch ends, or by a ``call_soon`` outside one); None if the connection has no socket."""
    transport = conn._transport
    if not transport:
        return None
    pending = getattr(conn, _PENDING, None)
    if pending is None or pending[0] is not transport:
        pending = (transport, [])
        setattr(conn, _PENDING, pending)
        if _depth:
            _at_end.append((_flush, (conn, pending)))
        else:
            conn._loop.call_soon(_flush, conn, pending)
    return pending[1]  # type: ignore[no-any-return]


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
    global active
    active = False
    while _patched:
        cls, name, orig = _patched.pop()
        setattr(cls, name, orig)
