"""Framing, sealing and opening the packets of a connection tunneld attached: the one owner
of each direction's AES-GCM nonce.

AES-GCM in SSH (RFC 5647 §7.1) builds each packet's nonce from a fixed field and a 64-bit
invocation counter that moves on by one per packet.  The same (key, nonce) used for two
packets gives away the XOR of their plaintexts and the key that authenticates them, so the
counter must have exactly one owner per direction and key.  asyncssh keeps it in its
``GCMCipher`` and moves it on in ``encrypt_and_sign``/``verify_and_decrypt``; the fast path
seals and opens the channel messages of its own channels itself.  Rather than let both
advance the same counter, a connection's counters move here, for every packet: ``Sender``
seals all that the connection sends (asyncssh's own packets come through the connection's
``send_packet``, which ``connection`` replaces), ``Opener`` opens all that it receives under
AES-GCM (asyncssh's receive code calls it through the cipher's ``decrypt_packet``).  Each
takes over a key from asyncssh's cipher object when the key is new (``_adopt``/``adopt``),
reading the counter where asyncssh left it.

Two further savings over asyncssh's code: one ``AESGCM`` context per key, not one per packet
(asyncssh makes a key schedule for every packet it seals or opens: sealing and opening a
100-byte packet took 4.4 µs here, 2.2 µs with one context per key), and random padding drawn
from a pool instead of a system call per packet.
"""

from __future__ import annotations

import os
import time
from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_NEWKEYS
from asyncssh.encryption import Encryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import ProtocolError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .batch import batch

_COUNTER_MASK = 0xffffffffffffffff
_PADLEN = [bytes((i,)) for i in range(256)]


class _Padding:
    """Random padding bytes, each drawn once from a pool (no system call per packet):
    ``Sender.seal`` takes ``pool[pos:pos + n]`` and moves ``pos`` on, refilling the pool
    when it runs out."""

    __slots__ = ("pool", "pos")

    def __init__(self) -> None:
        self.pool = b""
        self.pos = 0


_padding = _Padding()


def _take_over(enc: Encryption | None) -> tuple[AESGCM | None, bytes, int]:
    """For an AES-GCM key: its context, the nonce's fixed field, and the invocation counter
    where asyncssh's cipher left it; (None, b"", 0) for any other cipher."""
    if enc.__class__ is not GCMEncryption:
        return None, b"", 0
    cipher = enc._cipher
    return AESGCM(cipher._key), cipher._iv[:4], int.from_bytes(cipher._iv[4:], "big")


def _sealed_elsewhere(header: bytes, data: bytes) -> tuple[bytes, bytes]:
    raise AssertionError("a packet sealed outside fastpath's Sender would reuse its nonce")


class Sender:
    """The send side of one connection: frames, pads, seals and queues each of its packets.

    Invariant: every packet sent on this connection is sealed in ``seal()``, once, and
    ``seal()`` is the only code that advances the connection's send sequence number and the
    invocation counter of its AES-GCM key — one step of each per packet, so no nonce is ever
    used twice under a key.  Once a key is taken over here, its asyncssh cipher refuses to
    seal (``_sealed_elsewhere``): a second sealer would fail loudly, not reuse a nonce.

    The sealed bytes wait in ``pending`` for the end of the batch (``batch``), or for a
    ``call_soon`` outside one.  They are bound to the transport they were written for and
    leave before any ``abort`` asyncssh schedules (also with ``call_soon``), so a DISCONNECT
    message still goes out first."""

    __slots__ = ("conn", "enc", "aead", "fixed", "counter", "pending")

    def __init__(self, conn: SSHConnection):
        self.conn = conn
        #: the connection's ``_send_encryption`` the fields below were taken from
        self.enc: Encryption | None = None
        #: AES-GCM: the key's context, the nonce's fixed field and its invocation counter;
        #: ``aead`` is None for any other cipher (asyncssh's ``encrypt_packet`` seals then)
        self.aead: AESGCM | None = None
        self.fixed = b""
        self.counter = 0
        #: (transport, chunks) sealed but not yet written; None if nothing waits
        self.pending: tuple[Any, list[Any]] | None = None

    def _adopt(self, enc: Encryption | None) -> None:
        self.enc = enc
        self.aead, self.fixed, self.counter = _take_over(enc)
        if self.aead is not None:
            enc._cipher.encrypt_and_sign = _sealed_elsewhere  # type: ignore[union-attr]

    def send(self, head: bytes, data: Any = b"") -> None:
        """Send the message ``head + data`` (``head`` starts with the message type; ``data``
        is any bytes-like object): sealed at once on AES-GCM, else through the connection's
        ``send_packet`` (a key exchange due or running, another cipher, compression, packet
        logging)."""
        conn = self.conn
        if self.aead is None or self.enc is not conn._send_encryption or \
                conn._compressor is not None or not conn._kex_complete or \
                conn._rekey_bytes_sent >= conn._rekey_bytes or \
                (conn._rekey_seconds and time.monotonic() >= conn._rekey_time) or \
                SSHLogger._debug_level >= 3:
            conn.send_packet(head[0], head[1:], bytes(data))
            return
        self.seal(head[0], head, data)

    def seal(self, pkttype: int, head: Any, data: Any = b"") -> int:
        """Frame, pad and seal the packet whose payload is ``head + data`` (compressed
        already, if the connection compresses) and queue it; returns its sequence number.
        The sequence rules are asyncssh 2.24's (``SSHConnection.send_packet``)."""
        conn = self.conn
        enc = conn._send_encryption
        if enc is not self.enc:
            self._adopt(enc)
        blocksize = conn._send_blocksize
        padlen = -(conn._send_enchdrlen + len(head) + len(data)) % blocksize
        if padlen < 4:
            padlen += blocksize
        pad = _padding
        pos = pad.pos
        if pos + padlen > len(pad.pool):
            pad.pool, pos = os.urandom(4096), 0
        pad.pos = pos + padlen
        plain = b"".join((_PADLEN[padlen], head, data, pad.pool[pos:pos + padlen]))
        pktlen = len(plain)
        header = pktlen.to_bytes(4, "big")
        seq = conn._send_seq
        aead = self.aead
        if aead is not None:
            counter = self.counter
            self.counter = (counter + 1) & _COUNTER_MASK
            sealed = aead.encrypt(self.fixed + counter.to_bytes(8, "big"), plain, header)
        elif enc:
            header, sealed = enc.encrypt_packet(seq, header, plain)  # chacha: nonce = seq
        else:
            sealed = plain
        # queued: written when the batch ends, or soon
        transport = conn._transport
        if transport:
            pending = self.pending
            if pending is None or pending[0] is not transport:
                self.pending = pending = (transport, [])
                if batch.depth:
                    batch.later(self._flush, pending)
                else:
                    conn._loop.call_soon(self._flush, pending)
            pending[1].extend((header, sealed))
        if seq == 0xffffffff and not enc:
            conn._send_seq = 0
            raise ProtocolError("Sequence rollover before kex complete")
        conn._send_seq = 0 if pkttype == MSG_NEWKEYS and conn._strict_kex else \
            (seq + 1) & 0xffffffff
        if conn._kex_complete:
            conn._rekey_bytes_sent += pktlen
        return seq

    def _flush(self, pending: tuple[Any, list[Any]]) -> None:
        if self.pending is pending:
            self.pending = None
        transport, chunks = pending
        if chunks and not transport.is_closing():
            try:
                transport.writelines(chunks)
            except ConnectionError:  # the peer is gone; asyncssh notices on its own
                pass


_NOTHING: Any = object()


class Opener:
    """The receive side of one connection under AES-GCM: opens each packet it receives.

    Invariant: every packet received under an AES-GCM key of this connection is opened in
    ``open()``, once — by the receive hook (``connection``), or by asyncssh's receive code
    through the cipher's ``decrypt_packet``, which ``adopt`` points here — and ``open()`` is
    the only code that advances that key's invocation counter: one step per packet, whether
    its tag checks or not (as asyncssh does).  A packet the hook opened but leaves to asyncssh
    is ``held`` and handed over by the ``decrypt_packet`` call that comes next, for that very
    packet (it is at the front of the buffer), so it is not opened twice."""

    __slots__ = ("enc", "aead", "fixed", "counter", "held")

    def __init__(self) -> None:
        #: the connection's ``_recv_encryption`` the fields below were taken from
        self.enc: Encryption | None = None
        #: AES-GCM: as ``Sender``'s; ``aead`` is None for any other cipher (asyncssh's code
        #: opens those packets)
        self.aead: AESGCM | None = None
        self.fixed = b""
        self.counter = 0
        #: the plaintext (None: a bad tag) of the packet at the front of the buffer, opened by
        #: the hook and left to asyncssh; ``_NOTHING`` otherwise
        self.held: Any = _NOTHING

    def adopt(self, enc: Encryption | None) -> None:
        """Take over the connection's new receive key (call before a packet under it)."""
        self.enc = enc
        self.held = _NOTHING
        self.aead, self.fixed, self.counter = _take_over(enc)
        if self.aead is not None:
            enc.decrypt_packet = self.decrypt_packet  # type: ignore[union-attr, method-assign]

    def open(self, header: Any, sealed: Any) -> bytes | None:
        """The plaintext of a packet (``sealed``: ciphertext and tag), None if its tag is bad."""
        counter = self.counter
        self.counter = (counter + 1) & _COUNTER_MASK
        try:
            return self.aead.decrypt(  # type: ignore[union-attr]
                self.fixed + counter.to_bytes(8, "big"), sealed, header)
        except InvalidTag:
            return None

    def hold(self, plain: bytes | None) -> None:
        self.held = plain

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes | None:
        """asyncssh's ``GCMEncryption.decrypt_packet``, opening through ``open()``."""
        held = self.held
        if held is not _NOTHING:
            self.held = _NOTHING
            return held
        return self.open(first[:header_len], first[header_len:] + rest + mac)
