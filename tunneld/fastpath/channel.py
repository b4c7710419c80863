"""A lean SSH ``direct-tcpip`` channel for the clients of local and SOCKS forwards.

asyncssh's ``SSHTCPChannel`` serves every kind of channel and stream; opening one costs a task,
two futures, a session object, a child logger and a handful of weak references, and each data
packet passes through its generic buffering and dispatch.  Profiled per forwarded connection
that was most of tunneld's Python time (design.md §9).  ``TCPChannel`` does only what a TCP
forward needs, with plain callbacks, on an attached asyncssh connection (``connection``): it
takes a channel number from asyncssh's table (``add_channel``), so asyncssh routes this
channel's messages here (``process_packet`` and the open confirmation/failure calls), and it
sends through the connection's ``Sender``, which seals the message itself on AES-GCM and
hands it to the connection's ``send_packet`` otherwise.  On AES-GCM the receive hook also
skips asyncssh's dispatch: it gives this channel's data to ``fast_data`` and its other
messages to ``fast_packet``.

Protocol behaviour is asyncssh's (RFC 4254 §5): data is sent only within the peer's window
and packet size, the rest is buffered and the local socket stops being read above the
high-water mark; received data beyond the window is a protocol error; EOF and CLOSE wait for
buffered data, both ways; data arriving after our CLOSE is dropped and nothing is sent after
it; a channel number is freed once both CLOSEs have passed.  One difference: the window is
given back once more than three packets' worth is used (OpenSSH's rule), where asyncssh waits
for half of it, and only for data the local socket took, so a slow reader closes the window;
and it grows with the link (``window``, ``_give_back``).

Each direction's state follows its machine in ``state.py`` (``CHAN_SEND_TABLE``,
``CHAN_RECV_TABLE``): a message from the server that its table does not allow is a
protocol error (asyncssh disconnects), a call of ours it does not allow raises
``IllegalTransition``.  The local end is a ``LocalEnd`` (``ends``).
"""

from __future__ import annotations

import collections
import struct
import time
import types
from typing import Any, Callable

from asyncssh import ChannelOpenError, ProtocolError
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_SUCCESS,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from asyncssh.packet import SSHPacket, String, UInt32

from ..state import (
    CHAN_LOCAL_GONE,
    CHAN_PEER_OPEN,
    CHAN_RECV_TABLE,
    CHAN_SEND_TABLE,
    ChanEvent,
    ChanState,
    chan_recv_next,
    chan_send_next,
)
from ..window import grown
from .connection import FastConnection
from .ends import LocalEnd

#: channel send buffer (bytes waiting for window) above which the local socket stops being
#: read (for asyncssh's channels too: ``stock``)
CHANNEL_HIGH_WATER = 256 * 1024
#: ... and at or below which it is read again
_LOW_WATER = CHANNEL_HIGH_WATER // 4

_OPEN_MSG = bytes((MSG_CHANNEL_OPEN,)) + String(b"direct-tcpip")
_CHAN_HEAD = struct.Struct(">BI")       # message type, recipient channel
_DATA_HEAD = struct.Struct(">BII")      # ... and the data's length
_CONFIRM = struct.Struct(">III")        # sender channel, initial window, maximum packet size

# the machine's states and events as plain globals (the hot path compares by identity)
_OPENING, _OPEN, _EOF_PENDING, _CLOSE_PENDING, _CLOSED, _ABANDONED = (
    ChanState.OPENING, ChanState.OPEN, ChanState.EOF_PENDING, ChanState.CLOSE_PENDING,
    ChanState.CLOSED, ChanState.ABANDONED)
_CONFIRMED, _REFUSED, _EOF, _CLOSE, _PEER_CLOSE, _DRAINED, _LOST = (
    ChanEvent.CONFIRMED, ChanEvent.REFUSED, ChanEvent.EOF, ChanEvent.CLOSE,
    ChanEvent.PEER_CLOSE, ChanEvent.DRAINED, ChanEvent.LOST)
_monotonic = time.monotonic


class _Next(dict[tuple[ChanState, ChanEvent], ChanState]):
    """A side's table as a lookup, ``table[state, event]`` (no call on the hot path); a
    transition it does not allow is ``step(state, event)``: ``IllegalTransition`` for our own
    events (the machine's function), a protocol error for the server's (``_peer``)."""

    __slots__ = ("step",)

    def __init__(self, table: dict[tuple[ChanState, ChanEvent], ChanState],
                 step: Callable[[ChanState, ChanEvent], ChanState]):
        super().__init__(table)
        self.step = step

    def __missing__(self, key: tuple[ChanState, ChanEvent]) -> ChanState:
        return self.step(*key)


def _peer(state: ChanState, event: ChanEvent) -> ChanState:
    """The server's message ``event`` is not allowed in ``state``: asyncssh's reason."""
    raise ProtocolError(_PEER_WHY[event])


_PEER_WHY = {_CONFIRMED: "Channel not being opened", _REFUSED: "Channel not being opened",
             _EOF: "Channel not open for sending", _CLOSE: "Channel not open"}
_SEND_NEXT, _SEND_PEER = _Next(CHAN_SEND_TABLE, chan_send_next), _Next(CHAN_SEND_TABLE, _peer)
_RECV_NEXT, _RECV_PEER = _Next(CHAN_RECV_TABLE, chan_recv_next), _Next(CHAN_RECV_TABLE, _peer)
#: what an ended channel has for its local end (``_cleanup``): no transport to pause
_ENDED = types.SimpleNamespace(transport=None)


def _open_msg(recv_chan: int, window: int, max_pktsize: int, host: str, port: int,
              orig_host: str, orig_port: int) -> bytes:
    """The CHANNEL_OPEN message (asyncssh's ``String``/``UInt32`` encodings, in one call)."""
    h = host.encode() if isinstance(host, str) else host
    o = orig_host.encode() if isinstance(orig_host, str) else orig_host
    return b"".join((_OPEN_MSG, _CONFIRM.pack(recv_chan, window, max_pktsize),
                     len(h).to_bytes(4, "big"), h, port.to_bytes(4, "big"),
                     len(o).to_bytes(4, "big"), o, orig_port.to_bytes(4, "big")))


class TCPChannel:
    """One ``direct-tcpip`` channel, opened at construction.  Raises ``ChannelOpenError`` if
    the connection is already closing.  The local end calls ``write``, ``write_eof``,
    ``close``, ``pause_reading``, ``resume_reading`` (``ends.Channel``)."""

    __slots__ = ("conn", "fast", "sender", "local", "recv_chan", "send_chan", "send_state",
                 "recv_state", "send_window", "send_pktsize", "send_buf", "send_buf_len",
                 "send_paused", "init_window", "max_window", "adjust_at", "recv_window",
                 "recv_paused", "recv_buf", "recv_buf_len", "epoch_start", "epoch_bytes")

    def __init__(self, fast: FastConnection, local: LocalEnd, host: str, port: int,
                 orig_host: str, orig_port: int, window: int, max_pktsize: int,
                 max_window: int = 0):
        conn = fast.conn
        self.fast = fast
        #: None once the channel number is given back
        self.conn: Any = conn
        self.sender = fast.sender
        self.local = local
        #: raises ChannelOpenError if the connection is closing
        self.recv_chan: int = conn.add_channel(self)  # type: ignore[arg-type]
        if conn._max_recv_pktlen < max_pktsize + 1024:
            conn._update_recv_pktlen(max_pktsize)
        self.send_chan = self.send_window = self.send_pktsize = 0
        self.send_state = self.recv_state = _OPENING
        self.send_buf: collections.deque[Any] = collections.deque()
        self.send_buf_len = 0
        self.send_paused = False
        #: the receive window (grown with the link up to max_window: ``window``), and what
        #: of it the server may still send
        self.init_window = self.recv_window = window
        self.max_window = max(window, max_window)
        #: window given back once this much is consumed (OpenSSH: three packets or half)
        self.adjust_at = min(window // 2, 3 * max_pktsize)
        self.recv_paused = False
        #: data waiting for the local socket, and its length (its window is not given back)
        self.recv_buf: collections.deque[Any] = collections.deque()
        self.recv_buf_len = 0
        #: since when (the open, then the confirmation, then each round trip measured) and
        #: how much data arrived that was given back: the window's growth (``_give_back``)
        self.epoch_start = _monotonic()
        self.epoch_bytes = 0
        self.sender.send(_open_msg(self.recv_chan, window, max_pktsize, host, port, orig_host,
                                   orig_port))

    # -- called by the local end ---------------------------------------------------------------

    def write(self, data: Any) -> None:
        if self.send_state is not _OPEN:
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
        send, size = self.sender.send, self.send_pktsize
        if n <= size:
            send(_DATA_HEAD.pack(MSG_CHANNEL_DATA, self.send_chan, n), data)
            return
        view = memoryview(data)
        for i in range(0, n, size):
            chunk = view[i:i + size]
            send(_DATA_HEAD.pack(MSG_CHANNEL_DATA, self.send_chan, len(chunk)), chunk)

    def write_eof(self) -> None:
        old = self.send_state
        self.send_state = _SEND_NEXT[old, _EOF]
        if old is _OPEN:
            self._flush_send()

    def close(self) -> None:
        old = self.send_state
        self.send_state = _SEND_NEXT[old, _CLOSE]
        if self.send_state is _CLOSE_PENDING and old is not _CLOSE_PENDING:
            self._flush_send()  # CLOSE once the buffered data is sent
        self.recv_buf.clear()
        self.recv_buf_len = 0
        self.recv_paused = False
        if self.recv_state is _CLOSE_PENDING:  # what was still to deliver is dropped
            self._cleanup(None, _DRAINED)

    def pause_reading(self) -> None:
        self.recv_paused = True

    def resume_reading(self) -> None:
        if self.recv_paused:
            self.recv_paused = False
            self._flush_recv()

    # -- sending -------------------------------------------------------------------------------

    def _send(self, pkttype: int, body: bytes = b"") -> None:
        """Send a message on this channel; nothing after our CLOSE (e.g. a window adjust
        while data still buffered here reaches the local socket), as asyncssh does."""
        if self.send_state is not _CLOSED and self.conn is not None:
            self.sender.send(_CHAN_HEAD.pack(pkttype, self.send_chan) + body)

    def _flush_send(self) -> None:
        buf, send = self.send_buf, self.sender.send
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
            send(_DATA_HEAD.pack(MSG_CHANNEL_DATA, self.send_chan, n), data)
        if self.send_paused or self.send_buf_len > CHANNEL_HIGH_WATER:
            self._pause_resume()
        if not buf:
            if self.send_state is _EOF_PENDING:
                self._send(MSG_CHANNEL_EOF)
                self.send_state = _SEND_NEXT[_EOF_PENDING, _DRAINED]
            elif self.send_state is _CLOSE_PENDING:
                self._close_send(_DRAINED)

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

    def _close_send(self, event: ChanEvent) -> None:
        """Drop unsent data and send CLOSE (once): the data before it has passed
        (``DRAINED``), or the server closed (``PEER_CLOSE``)."""
        self.send_buf.clear()
        self.send_buf_len = 0
        old = self.send_state
        if old is not _CLOSED:
            self._send(MSG_CHANNEL_CLOSE)
        self.send_state = _SEND_NEXT[old, event]

    # -- receiving -----------------------------------------------------------------------------

    def fast_data(self, data: Any) -> None:
        """A CHANNEL_DATA payload (the receive hook's, or ``process_packet``'s)."""
        if self.recv_state is not _OPEN:
            raise ProtocolError("Channel not open for sending")
        n = len(data)
        if n > self.recv_window:
            raise ProtocolError("Window exceeded")
        if not n or self.send_state in CHAN_LOCAL_GONE:
            return  # the local side is gone: dropped, as asyncssh does
        self.recv_window -= n
        if self.recv_paused or self.recv_buf:
            self.recv_buf.append(data)
            self.recv_buf_len += n
        else:
            self._deliver(data)

    def _deliver(self, data: Any) -> None:
        """Hand ``data`` (no longer waiting here) to the local socket, first giving the
        server back the window of what was delivered, once that is over three packets."""
        if self.init_window - self.recv_window - self.recv_buf_len > self.adjust_at:
            self._give_back()
        self.local.deliver(data)

    def _give_back(self) -> None:
        """Give the server back the window of what was delivered — the window grown first
        once a round trip has passed, if half a window or more was delivered in it."""
        window = self.init_window
        if window < self.max_window:
            now = _monotonic()
            self.epoch_bytes += window - self.recv_window - self.recv_buf_len
            elapsed = now - self.epoch_start
            rtt = self.fast.rtt
            if elapsed >= rtt:
                self.init_window = window = grown(window, self.max_window, self.epoch_bytes,
                                                  elapsed, rtt)
                self.epoch_start, self.epoch_bytes = now, 0
        adjust = window - self.recv_window - self.recv_buf_len
        self._send(MSG_CHANNEL_WINDOW_ADJUST, UInt32(adjust))
        self.recv_window += adjust

    def _flush_recv(self) -> None:
        buf = self.recv_buf
        while buf and not self.recv_paused:
            data = buf.popleft()
            self.recv_buf_len -= len(data)
            self._deliver(data)
        if buf:
            return
        if self.recv_state is _EOF_PENDING:
            self.recv_state = _RECV_NEXT[_EOF_PENDING, _DRAINED]
            self.local.deliver_eof()
        elif self.recv_state is _CLOSE_PENDING:
            self._cleanup(None, _DRAINED)

    # -- the server's messages -----------------------------------------------------------------

    def _confirmed(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        old = self.send_state
        new = _SEND_PEER[old, _CONFIRMED]
        self.send_chan, self.send_window, self.send_pktsize = \
            send_chan, send_window, send_pktsize
        now = _monotonic()
        self.fast.note_rtt(now - self.epoch_start)
        self.epoch_start = now
        self.recv_state = _RECV_NEXT[self.recv_state, _CONFIRMED]
        self.send_state = new
        if old is _ABANDONED:
            self._close_send(_DRAINED)  # nothing was buffered
            return
        self.local.attached(self)

    def _window_adjust(self, adjust: int) -> None:
        if self.recv_state not in CHAN_PEER_OPEN:
            raise ProtocolError("Channel not open")
        self.send_window += adjust
        self._flush_send()

    def _eof(self) -> None:
        self.recv_state = _RECV_PEER[self.recv_state, _EOF]
        self._flush_recv()

    def _close(self) -> None:
        self.recv_state = _RECV_PEER[self.recv_state, _CLOSE]
        self._close_send(_PEER_CLOSE)
        self._flush_recv()

    def fast_packet(self, pkttype: int, body: bytes) -> None:
        """A message for this channel, ``body`` after the recipient channel (the receive
        hook's; data goes to ``fast_data``)."""
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

    # -- asyncssh's channel interface (SSHConnection calls these) ------------------------------

    def process_open_confirmation(self, send_chan: int, send_window: int, send_pktsize: int,
                                  packet: SSHPacket) -> None:
        packet.check_end()
        self._confirmed(send_chan, send_window, send_pktsize)

    def process_open_failure(self, code: int, reason: str, lang: str) -> None:
        old = self.send_state
        self.send_state = _SEND_PEER[old, _REFUSED]
        self.recv_state = _RECV_NEXT[self.recv_state, _REFUSED]
        self._release()
        if old is not _ABANDONED:
            self.local.failed(ChannelOpenError(code, reason, lang))

    def process_connection_close(self, exc: Exception | None) -> None:
        """The SSH connection ended under the channel (asyncssh passes None when it was
        closed on purpose): the local socket is reset, whatever the cause."""
        opening = self.send_state is _OPENING
        self.send_state = _SEND_NEXT[self.send_state, _LOST]
        self.send_buf.clear()
        self.send_buf_len = 0
        exc = exc or ConnectionResetError("the SSH connection closed")
        if opening:
            self.recv_state = _RECV_NEXT[self.recv_state, _LOST]
            self._release()
            self.local.failed(exc)
        else:
            self._cleanup(exc, _LOST)

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
            if self.recv_state is not _OPEN:
                raise ProtocolError("Channel not open for sending")
            raise ProtocolError("Invalid extended data type")  # none on a TCP channel
        elif pkttype == MSG_CHANNEL_REQUEST:
            if self.recv_state not in CHAN_PEER_OPEN:
                raise ProtocolError("Channel not open")
            packet.get_string()
            want_reply = packet.get_boolean()
            if want_reply and self.send_state is not _CLOSE_PENDING and \
                    self.send_state is not _CLOSED:
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

    # -- the end -------------------------------------------------------------------------------

    def _release(self) -> None:
        """Give the channel number back (both CLOSEs passed, or the channel never opened)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn._channels.pop(self.recv_chan, None)

    def _cleanup(self, exc: Exception | None, event: ChanEvent) -> None:
        """The channel has ended (``event``: the data before the server's CLOSE has passed,
        or the connection was lost): end the local socket after what it was sent so far
        (reset it if the SSH connection failed)."""
        self.recv_state = _RECV_NEXT[self.recv_state, event]
        self._release()
        self.local.ended(exc)
        # nothing reaches the local end from here on; holding it, the channel would make a
        # cycle with it (its ``channel``) that only the garbage collector frees
        self.local = _ENDED
