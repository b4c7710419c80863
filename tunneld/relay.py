"""The two ends of a resumable forward (``tunnelctl add HOST PORT --resume``): one program,
standard library only (Python 3.8+), sent as text and run with ``python3 -``.

- The *relay* runs on the server, started by tunneld over the SSH connection; it detaches
  (a session of its own) and listens on a Unix socket in its private directory
  ``~/.tunneld/relay/ID/`` (0700).  It connects each stream to the forward's target.
- The *keeper* runs on this machine, started by tunneld with the forward's bound listener;
  it accepts the local clients.  It outlives tunneld (a kill -9, a crash, a restart).

tunneld splices the two ends' *link* (a connection to each end's socket: the relay's over a
``direct-streamlocal`` channel) whenever the host is connected.  Each end keeps, per stream,
the bytes it sent that the other end has not taken yet; after a new link both ends say how
much they received (``SYNC``) and send the rest, so a stream resumes from the last byte each
end received: nothing lost, duplicated or reordered.  A link that is down for ``suspend``
seconds closes every stream (the relay then exits; the keeper exits once it has had no
tunneld for as long).  Limits: ``stream_buffer`` bytes unacknowledged per stream and
``buffer`` per end (a full one pauses the reader), ``max_streams``.

Every connection to an end starts with ``AUTH`` (the secret made for this forward, compared
in constant time; the peer must be the same uid); the relay connects only to ``targets``.

Frames: ``>BII`` (type, stream id, payload length) and the payload.  The program is three
modules sent as one text (``resume_relay.program``): this one (the frames, a stream), ``relay_end``
(an end: the link, the resync, the limits) and ``relay_serve`` (the sockets, the start).
"""

from __future__ import annotations

import asyncio
import collections
import json
import struct
import time
from typing import Any

AUTH, SYNC, OPEN, DATA, ACK, EOF, RESET, QUIT, STATUS, CMD, PING = range(1, 12)
HEAD = struct.Struct(">BII")
ACK_BODY = struct.Struct(">QB")
#: the largest payload accepted (DATA is cut at CHUNK)
MAX_FRAME = 1 << 20
CHUNK = 1 << 18
#: received bytes after which an ACK goes at once (else at the next tick)
ACK_EVERY = 1 << 18
TICK = 0.05
#: the longest Unix socket path (Linux's sun_path less its NUL)
SUN_PATH_MAX = 107
#: reset stream ids remembered, to tell a peer that asks after a link loss
RESETS_KEPT = 1024
#: seconds between PINGs on an idle link; a link with nothing from the other end for three
#: of them is dead (a black hole that sshd has not noticed yet)
PING_EVERY = 5.0
DEFAULTS = {"suspend": 600.0, "stream_buffer": 8 << 20, "buffer": 64 << 20,
            "max_streams": 256}


def frame(kind: int, sid: int = 0, payload: bytes = b"") -> bytes:
    return HEAD.pack(kind, sid, len(payload)) + payload


def jframe(kind: int, obj: object, sid: int = 0) -> bytes:
    return frame(kind, sid, json.dumps(obj).encode())


class Frames:
    """Frames cut from a byte stream (bounded)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        #: bytes the frame begun in ``buf`` needs in all
        self.need = 0

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        if self.buf:
            self.buf += data
            if len(self.buf) < self.need:   # a large frame in many reads: one copy, at its end
                return []
            data = bytes(self.buf)
        out = []
        at, end, size = 0, len(data), HEAD.size
        self.need = size
        while end - at >= size:
            kind, sid, n = HEAD.unpack_from(data, at)
            if n > MAX_FRAME or not AUTH <= kind <= PING:
                raise ValueError(f"bad frame (type {kind}, {n} bytes)")
            if end - at < size + n:
                self.need = size + n
                break
            out.append((kind, sid, data[at + size:at + size + n]))
            at += size + n
        self.buf = bytearray(data[at:])
        return out


class Stream(asyncio.Protocol):
    """One forwarded connection at this end: its local socket and what it sent that the
    other end has not taken yet (``buf``, from offset ``acked`` to ``sent``)."""

    def __init__(self, end: Any, sid: int, opened: bool) -> None:
        #: its ``relay_end.End``
        self.end, self.sid = end, sid
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []   # received before the target connected
        self.sent = self.acked = 0
        #: what the peer has delivered of ours: ``sent - credit`` is held to stream_buffer
        #: (``acked`` may be ahead: bytes the peer holds undelivered after a resync)
        self.credit = 0
        self.buf: collections.deque = collections.deque()
        self.buf_len = 0
        self.recv = self.acked_out = 0   # received; what we told the peer it may drop
        self.eof_out = self.eof_in = self.eof_acked = self.eof_told = False
        self.opened = opened             # the peer knows this stream
        self.offered = False             # the keeper's OPEN went on a synced link
        self.paused = False
        self.since = time.time()

    # the local socket
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.end.streams.get(self.sid) is not self:   # reset while it connected
            transport.abort()
            return
        for data in self.pending:
            transport.write(data)
        self.pending = []
        if self.eof_in:
            self._local_eof()
        self.end.check_pause(self)

    def data_received(self, data: bytes) -> None:
        self.sent += len(data)
        self.buf.append(data)
        self.buf_len += len(data)
        self.end.owed += len(data)
        self.end.send_data(self, data)
        self.end.check_pause(self)

    def eof_received(self) -> bool:
        if self.eof_out:   # reading resumed after the end: said once
            return True
        self.eof_out = True
        self.end.send(frame(EOF, self.sid))
        self.end.maybe_done(self)
        return True

    def connection_lost(self, exc) -> None:
        if self.sid in self.end.streams and not self.done():
            self.end.reset(self, "the local end closed" if exc is None else str(exc))

    def pause_writing(self) -> None:
        pass  # what waits is not acknowledged: the peer stops at stream_buffer

    def resume_writing(self) -> None:
        self.end.ack(self)

    # accounting
    def delivered(self) -> int:
        t = self.transport
        waiting = sum(map(len, self.pending)) + (t.get_write_buffer_size() if t else 0)
        return self.recv - waiting

    def owed(self) -> int:
        """Bytes sent that the peer has not delivered yet (held to stream_buffer)."""
        return self.sent - self.credit

    def drop_to(self, n: int, delivered: int | None = None) -> None:
        """The peer has bytes up to ``n`` (and has delivered up to ``delivered``, by
        default ``n``): free them."""
        credit = max(self.credit, n if delivered is None else min(n, delivered))
        self.end.owed -= credit - self.credit
        self.credit = credit
        while self.buf and self.acked + len(self.buf[0]) <= n:
            d = self.buf.popleft()
            self.acked += len(d)
            self.buf_len -= len(d)
        if self.buf and n > self.acked:
            cut = n - self.acked
            self.buf[0] = self.buf[0][cut:]
            self.acked += cut
            self.buf_len -= cut
        self.end.check_pause(self)

    def unsent_from(self, n: int) -> bytes:
        return b"".join(self.buf)[n - self.acked:]

    def deliver(self, data: bytes) -> None:
        self.recv += len(data)
        if self.transport is None:
            self.pending.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)
        if self.delivered() - self.acked_out >= ACK_EVERY:
            self.end.ack(self)

    def got_eof(self) -> None:
        self.eof_in = True
        if self.transport is not None:
            self._local_eof()
        self.end.ack(self)
        self.end.maybe_done(self)

    def _local_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def done(self) -> bool:
        """Both ways ended and acknowledged: the peer has all of ours, and has been told
        that we delivered all of its (else it would keep its bytes for ever)."""
        return self.eof_in and self.eof_out and self.eof_acked and not self.buf_len and \
            self.eof_told and self.acked_out == self.recv

    def status(self) -> dict:
        return {"sid": self.sid, "since": self.since, "sent": self.sent, "recv": self.recv,
                "buffered": self.buf_len}
