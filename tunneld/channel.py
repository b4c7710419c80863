"""A lean SSH ``direct-tcpip`` channel for the clients of local and SOCKS forwards.

asyncssh's ``SSHTCPChannel`` serves every kind of channel and stream; opening one costs a task,
two futures, a session object, a child logger and a handful of weak references, and each data
packet passes through its generic buffering and dispatch.  Profiled per forwarded connection
that was most of tunneld's Python time (design.md §9).  ``TCPChannel`` does only what a TCP
forward needs, with plain callbacks, on asyncssh's own connection: it takes a channel number
from asyncssh's table (``add_channel``), so asyncssh routes this channel's messages here
(``process_packet`` and the open confirmation/failure calls), and it sends with
``fastpath.send``, which seals the message itself on AES-GCM and hands it to asyncssh's
``send_packet`` otherwise.  On AES-GCM, ``fastpath``'s receive hook also skips asyncssh's
dispatch: it gives this channel's data to ``fast_data`` and its other messages to
``fast_packet``.

Protocol behaviour is asyncssh's (RFC 4254 §5): data is sent only within the peer's window
and packet size, the rest is buffered and the local socket stops being read above the
high-water mark; received data beyond the window is a protocol error; EOF and CLOSE wait for
buffered data, both ways; data arriving after our CLOSE is dropped and nothing is sent after
it; a channel number is freed once both CLOSEs have passed.  One difference: the window is
given back once more than three packets' worth is used (OpenSSH's rule), where asyncssh waits
for half of it — with megabytes in loopback socket buffers the server then stalled for window.
Either way only while the local socket takes data, so a slow local reader closes the window
and the server stops sending.

The local side is a ``forward._LocalProtocol`` (a local or SOCKS forward's client):
``_attach(channel)`` once the server confirmed the open, ``_failed(exc)`` if it refused or the
connection ended first, and its ``transport``.
Only used while ``fastpath`` is installed (the asyncssh version it was written for).
"""

from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING, Any

from asyncssh import ChannelOpenError, ProtocolError
from asyncssh.constants import (MSG_CHANNEL_CLOSE, MSG_CHANNEL_DATA, MSG_CHANNEL_EOF,
                                MSG_CHANNEL_EXTENDED_DATA, MSG_CHANNEL_FAILURE,
                                MSG_CHANNEL_OPEN, MSG_CHANNEL_OPEN_CONFIRMATION,
                                MSG_CHANNEL_REQUEST, MSG_CHANNEL_SUCCESS,
                                MSG_CHANNEL_WINDOW_ADJUST)
from asyncssh.packet import SSHPacket, String, UInt32

from . import fastpath

if TYPE_CHECKING:
    from asyncssh.connection import SSHClientConnection

    from .forward import _LocalProtocol


#: channel send buffer (bytes waiting for window) above which the local socket stops being
#: read (for asyncssh's channels too)
CHANNEL_HIGH_WATER = 256 * 1024
#: ... and at or below which it is read again
_LOW_WATER = CHANNEL_HIGH_WATER // 4

_OPEN = bytes((MSG_CHANNEL_OPEN,)) + String(b"direct-tcpip")
_CHAN_HEAD = struct.Struct(">BI")       # message type, recipient channel
_DATA_HEAD = struct.Struct(">BII")      # ... and the data's length
_CONFIRM = struct.Struct(">III")        # sender channel, initial window, maximum packet size


class TCPChannel:
    """One ``direct-tcpip`` channel, opened at construction.  Raises ``ChannelOpenError`` if
    the connection is already closing.  The methods the local side calls mirror asyncssh's
    channel: ``write``, ``write_eof``, ``close``, ``pause_reading``, ``resume_reading``."""

    __slots__ = ("conn", "local", "recv_chan", "send_chan", "send_state", "recv_state",
                 "send_window", "send_pktsize", "send_buf", "send_buf_len", "send_paused",
                 "init_window", "adjust_at", "recv_window", "recv_paused", "recv_buf")

    def __init__(self, conn: "SSHClientConnection", local: "_LocalProtocol", host: str, port: int,
                 orig_host: str, orig_port: int, window: int, max_pktsize: int):
        self.conn: "SSHClientConnection | None" = conn
        self.local = local
        #: raises ChannelOpenError if the connection is closing
        self.recv_chan: int = conn.add_channel(self)  # type: ignore[arg-type]
        if conn._max_recv_pktlen < max_pktsize + 1024:
            conn._update_recv_pktlen(max_pktsize)
        self.send_chan = 0
        #: opening -> open -> (eof_pending ->) eof -> (close_pending ->) closed; "abandoned":
        #: closed by the local side while the server was still opening it
        self.send_state = "opening"
        #: opening -> open -> (eof_pending ->) eof -> (close_pending ->) closed
        self.recv_state = "opening"
        self.send_window = 0
        self.send_pktsize = 0
        self.send_buf: collections.deque[Any] = collections.deque()
        self.send_buf_len = 0
        self.send_paused = False
        self.init_window = self.recv_window = window
        #: window given back once this much is consumed (OpenSSH: three packets or half)
        self.adjust_at = min(window // 2, 3 * max_pktsize)
        self.recv_paused = False
        self.recv_buf: collections.deque[Any] = collections.deque()
        fastpath.send(conn, b"".join((
            _OPEN, UInt32(self.recv_chan), UInt32(window), UInt32(max_pktsize), String(host),
            UInt32(port), String(orig_host), UInt32(orig_port))))

    # -- called by the local side ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` (any length); raises BrokenPipeError if the channel is not open for
        sending."""
        if self.send_state != "open":
            raise BrokenPipeError("channel not open for sending")
        n = len(data)
        if not n:
            return
        if self.send_buf or n > self.send_window:
            self.send_buf.append(data)
            self.send_buf_len += n
            self._flush_send()
            return
        self.send_window -= n
        conn, size = self.conn, self.send_pktsize
        if n <= size:
            fastpath.send(conn, _DATA_HEAD.pack(MSG_CHANNEL_DATA, self.send_chan, n), data)
            return
        view = memoryview(data)
        for i in range(0, n, size):
            chunk = view[i:i + size]
            fastpath.send(conn, _DATA_HEAD.pack(MSG_CHANNEL_DATA, self.send_chan, len(chunk)),
                          chunk)

    def write_eof(self) -> None:
        if self.send_state == "open":
            self.send_state = "eof_pending"
            self._flush_send()

    def close(self) -> None:
        """The local side is done: send what is buffered, then CLOSE; drop what arrives."""
        if self.send_state == "opening":
            self.send_state = "abandoned"  # CLOSE as soon as the server confirms the open
        elif self.send_state not in ("close_pending", "closed", "abandoned"):
            self.send_state = "close_pending"
            self._flush_send()
        self.recv_buf.clear()
        self.recv_paused = False
        if self.recv_state == "close_pending":
            self._cleanup(None)

    def pause_reading(self) -> None:
        self.recv_paused = True

    def resume_reading(self) -> None:
        if self.recv_paused:
            self.recv_paused = False
            self._flush_recv()

    # -- sending -----------------------------------------------------------------------------

    def _send(self, pkttype: int, body: bytes = b"") -> None:
        """Send a message on this channel; nothing after our CLOSE (e.g. a window adjust
        while data still buffered here reaches the local socket), as asyncssh does."""
        if self.send_state != "closed" and self.conn is not None:
            fastpath.send(self.conn, _CHAN_HEAD.pack(pkttype, self.send_chan) + body)

    def _flush_send(self) -> None:
        buf, conn = self.send_buf, self.conn
        while buf and self.send_window:
            data = buf[0]
            n = min(len(data), self.send_window, self.send_pktsize)
            if n == len(data):
                buf.popleft()
            else:
                view = memoryview(data)
                buf[0] = view[n:]
                data = view[:n]
            self.send_buf_len -= n
            self.send_window -= n
            fastpath.send(conn, _DATA_HEAD.pack(MSG_CHANNEL_DATA, self.send_chan, n), data)
        self._pause_resume()
        if not buf:
            if self.send_state == "eof_pending":
                self._send(MSG_CHANNEL_EOF)
                self.send_state = "eof"
            elif self.send_state == "close_pending":
                self._close_send()

    def _pause_resume(self) -> None:
        transport = self.local.transport
        if self.send_paused:
            if self.send_buf_len <= _LOW_WATER:
                self.send_paused = False
                if transport is not None and not transport.is_closing():
                    transport.resume_reading()
        elif self.send_buf_len > CHANNEL_HIGH_WATER:
            self.send_paused = True
            if transport is not None:
                transport.pause_reading()

    def _close_send(self) -> None:
        """Drop unsent data and send CLOSE (once)."""
        self.send_buf.clear()
        self.send_buf_len = 0
        if self.send_state != "closed":
            self._send(MSG_CHANNEL_CLOSE)
            self.send_state = "closed"

    # -- receiving ---------------------------------------------------------------------------

    def fast_data(self, data: Any) -> None:
        """A CHANNEL_DATA payload (``fastpath``'s receive hook, or ``process_packet``)."""
        if self.recv_state != "open":
            raise ProtocolError("Channel not open for sending")
        n = len(data)
        if n > self.recv_window:
            raise ProtocolError("Window exceeded")
        if not n or self.send_state in ("close_pending", "closed", "abandoned"):
            return  # the local side is gone: dropped, as asyncssh does
        self.recv_window -= n
        if self.recv_paused or self.recv_buf:
            self.recv_buf.append(data)
        else:
            self._deliver(data)

    def _deliver(self, data: Any) -> None:
        if self.recv_window < self.init_window - self.adjust_at:
            self._send(MSG_CHANNEL_WINDOW_ADJUST, UInt32(self.init_window - self.recv_window))
            self.recv_window = self.init_window
        self.local.deliver(data)

    def _flush_recv(self) -> None:
        buf = self.recv_buf
        while buf and not self.recv_paused:
            self._deliver(buf.popleft())
        if buf:
            return
        if self.recv_state == "eof_pending":
            self.recv_state = "eof"
            self.local.deliver_eof()
        elif self.recv_state == "close_pending":
            self._cleanup(None)

    # -- asyncssh's channel interface (SSHConnection calls these) ----------------------------

    def _confirmed(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        if self.send_state not in ("opening", "abandoned"):
            raise ProtocolError("Channel not being opened")
        self.send_chan, self.send_window, self.send_pktsize = \
            send_chan, send_window, send_pktsize
        self.recv_state = "open"
        if self.send_state == "abandoned":
            self.send_state = "close_pending"
            self._close_send()
            return
        self.send_state = "open"
        self.local._attach(self)

    def _window_adjust(self, adjust: int) -> None:
        if self.recv_state not in ("open", "eof_pending", "eof"):
            raise ProtocolError("Channel not open")
        self.send_window += adjust
        self._flush_send()

    def _eof(self) -> None:
        if self.recv_state != "open":
            raise ProtocolError("Channel not open for sending")
        self.recv_state = "eof_pending"
        self._flush_recv()

    def _close(self) -> None:
        if self.recv_state not in ("open", "eof_pending", "eof"):
            raise ProtocolError("Channel not open")
        self._close_send()
        self.recv_state = "close_pending"
        self._flush_recv()

    def fast_packet(self, pkttype: int, body: bytes) -> None:
        """A message for this channel, ``body`` after the recipient channel (``fastpath``'s
        receive hook; data goes to ``fast_data``)."""
        if pkttype == MSG_CHANNEL_WINDOW_ADJUST and len(body) == 4:
            self._window_adjust(int.from_bytes(body, "big"))
        elif pkttype == MSG_CHANNEL_EOF and not body:
            self._eof()
        elif pkttype == MSG_CHANNEL_CLOSE and not body:
            self._close()
        elif pkttype == MSG_CHANNEL_OPEN_CONFIRMATION and len(body) == 12:
            send_chan, send_window, send_pktsize = _CONFIRM.unpack(body)
            if send_pktsize <= 0:
                raise ProtocolError("Invalid maximum packet size")
            self._confirmed(send_chan, send_window, send_pktsize)
        else:
            raise ProtocolError(f"Invalid channel message (type {pkttype})")

    # -- asyncssh's channel interface (SSHConnection calls these) ----------------------------

    def process_open_confirmation(self, send_chan: int, send_window: int, send_pktsize: int,
                                  packet: SSHPacket) -> None:
        packet.check_end()
        self._confirmed(send_chan, send_window, send_pktsize)

    def process_open_failure(self, code: int, reason: str, lang: str) -> None:
        if self.send_state not in ("opening", "abandoned"):
            raise ProtocolError("Channel not being opened")
        abandoned = self.send_state == "abandoned"
        self.send_state = self.recv_state = "closed"
        self._release()
        if not abandoned:
            self.local._failed(ChannelOpenError(code, reason, lang))

    def process_connection_close(self, exc: Exception | None) -> None:
        """The SSH connection ended under the channel (asyncssh passes None when it was
        closed on purpose): the local socket is reset, whatever the cause."""
        opening = self.send_state == "opening"
        self.send_state = "closed"
        self.send_buf.clear()
        self.send_buf_len = 0
        exc = exc or ConnectionResetError("the SSH connection closed")
        if opening:
            self.recv_state = "closed"
            self._release()
            self.local._failed(exc)
        else:
            self._cleanup(exc)

    def process_packet(self, pkttype: int, _seq: int, packet: SSHPacket) -> bool:
        """A message for this channel through asyncssh's code (another cipher, or a message
        the receive hook does not take)."""
        if pkttype == MSG_CHANNEL_DATA:
            data = packet.get_string()
            packet.check_end()
            self.fast_data(data)
        elif pkttype == MSG_CHANNEL_WINDOW_ADJUST:
            adjust = packet.get_uint32()
            packet.check_end()
            self._window_adjust(adjust)
        elif pkttype == MSG_CHANNEL_EOF:
            packet.check_end()
            self._eof()
        elif pkttype == MSG_CHANNEL_CLOSE:
            packet.check_end()
            self._close()
        elif pkttype == MSG_CHANNEL_EXTENDED_DATA:
            if self.recv_state != "open":
                raise ProtocolError("Channel not open for sending")
            raise ProtocolError("Invalid extended data type")  # none on a TCP channel
        elif pkttype == MSG_CHANNEL_REQUEST:
            if self.recv_state not in ("open", "eof_pending", "eof"):
                raise ProtocolError("Channel not open")
            packet.get_string()
            want_reply = packet.get_boolean()
            if want_reply and self.send_state not in ("close_pending", "closed"):
                self._send(MSG_CHANNEL_FAILURE)  # no requests on a TCP channel
        elif pkttype in (MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE):
            raise ProtocolError("Unexpected channel response")  # we never ask
        else:
            return False  # asyncssh answers MSG_UNIMPLEMENTED
        return True

    def log_received_packet(self, pkttype: int, seq: int, packet: Any, note: str = "") -> None:
        if self.conn is not None:
            self.conn.log_received_packet(pkttype, seq, packet, note)

    def log_sent_packet(self, pkttype: int, seq: int, packet: Any, note: str = "") -> None:
        if self.conn is not None:
            self.conn.log_sent_packet(pkttype, seq, packet, note)

    # -- the end -----------------------------------------------------------------------------

    def _release(self) -> None:
        """Give the channel number back (both CLOSEs passed, or the channel never opened)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn._channels.pop(self.recv_chan, None)

    def _cleanup(self, exc: Exception | None) -> None:
        """The channel has ended: end the local socket after what it was sent so far (reset
        it if the SSH connection failed)."""
        self.recv_state = "closed"
        self._release()
        self.local.ended(exc)
