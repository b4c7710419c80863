"""A passenger: one ``ssh`` (``scp``, ``rsync``, ``git``…) riding a host's connection through
its control socket — a session channel (``MUX_C_NEW_SESSION``) or a stdio forward (``ssh -W``,
``MUX_C_NEW_STDIO_FWD``), pumped between the descriptors the client passed and the channel.

tunneld moves the bytes itself (``muxio``), as OpenSSH's master does: the client's stdin is
read to its end and sent, then EOF; stdout and stderr get exactly the channel's data and
extended data, with back-pressure both ways (a full descriptor pauses the channel, a full
channel pauses the reading).  When the channel closes, every byte is written and the client
hears the exit status (``MUX_S_EXIT_MESSAGE``), then its socket closes.  A session the
connection took down ends as ssh's own would: a line on its stderr, and exit status 255 (no
exit message).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
import time
from typing import Any, Awaitable, Callable, cast

import asyncssh

from . import mux, muxio

log = logging.getLogger("tunneld")

#: seconds the output of an ended session gets to be written to the client's descriptors
FLUSH_WAIT = 30.0
#: termios speed constants → baud, for the pty modes
_SPEEDS = {getattr(termios, f"B{n}"): n for n in (
    0, 50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400,
    57600, 115200, 230400) if hasattr(termios, f"B{n}")}
_TERMIOS = {name: getattr(termios, name) for _, _, name in mux.TTY_MODES
            if hasattr(termios, name)} | {"CSIZE": termios.CSIZE}


def window_size(fd: int) -> tuple[int, int, int, int] | None:
    """(columns, rows, x pixels, y pixels) of the terminal ``fd``, if it is one."""
    try:
        rows, cols, xpix, ypix = struct.unpack(
            "4H", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return cols, rows, xpix, ypix


def terminal_modes(fd: int) -> dict[int, int]:
    try:
        attrs = termios.tcgetattr(fd)
    except termios.error:
        return {}
    return mux.tty_modes(attrs, _TERMIOS, _SPEEDS)


class _Link(asyncssh.SSHClientSession[bytes]):
    """asyncssh's session object of one channel attempt: hands its events to the passenger
    while it is the passenger's channel (a channel refused for its pty is not)."""

    def __init__(self, owner: "Passenger") -> None:
        self.owner = owner

    def _mine(self) -> bool:
        return self.owner._link is self

    def connection_made(self, chan: Any) -> None:
        if self._mine():
            self.owner._chan = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._mine():
            self.owner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return True    # the client may still send: a half-closed session, as OpenSSH's

    def pause_writing(self) -> None:
        if self._mine():
            self.owner._in.pause()

    def resume_writing(self) -> None:
        if self._mine():
            self.owner._in.resume()

    def exit_status_received(self, status: int) -> None:
        if self._mine():
            self.owner._exit = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str,
                             lang: str) -> None:
        if self._mine():
            self.owner._signal = signal

    def connection_lost(self, exc: Exception | None) -> None:
        if self._mine():
            self.owner.connection_lost(exc)


class Passenger:
    """One session or stdio forward of a multiplexing client.  ``send`` writes a message to
    the client's control socket; ``run`` does the whole life and returns when the client's
    socket may be closed."""

    def __init__(self, host: str, sid: int, req: mux.NewSession | mux.StdioForward,
                 fds: list[int], send: Callable[[bytes], Awaitable[None]],
                 pid: int | None) -> None:
        self.host, self.sid, self.req, self.fds, self._send = host, sid, req, fds, send
        #: the ssh client's pid, where the socket tells it
        self.pid = pid
        self.started = time.time()
        self.stdio = isinstance(req, mux.StdioForward)
        self.command = (f"-W {mux.join_target(req.host, req.port)}"
                        if isinstance(req, mux.StdioForward) else mux.describe(req))
        self.pty = False
        #: True once the channel is open (the client was told SESSION_OPENED)
        self.opened = False
        #: how it ended, in words (for the log)
        self.outcome = "not opened"
        self._chan: asyncssh.SSHClientChannel[bytes] | asyncssh.SSHTCPChannel[bytes] | None \
            = None
        can = [muxio.prepare(fd) for fd in fds]
        self._in_fd = fds[0]
        self._outs = [muxio.Out(fd, c, self._out_level) for fd, c in zip(fds[1:], can[1:])]
        self._in = muxio.In(fds[0], can[0], self._stdin)
        self._closed = asyncio.get_running_loop().create_future()
        self._exit: int | None = None
        self._signal: str | None = None
        #: the line said on the client's stderr when the session did not end by itself
        self._lost: str | None = None
        #: asyncssh's session object of the current channel attempt
        self._link: _Link | None = None
        self._size = window_size(fds[0]) if isinstance(req, mux.NewSession) and \
            req.want_tty else None

    # -- from the channel (``_Link``) -----------------------------------------------------

    def data_received(self, data: bytes, datatype: int | None) -> None:
        out = self._outs[1] if datatype == asyncssh.EXTENDED_DATA_STDERR and \
            len(self._outs) > 1 else self._outs[0]
        out.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._lost is None:
            self._lost = (f"tunneld: the connection to {self.host} was lost "
                          f"({str(exc) or type(exc).__name__}); tunneld reconnects: run it "
                          "again")
        if not self._closed.done():
            self._closed.set_result(None)

    # -- the pumps ---------------------------------------------------------------------------

    def _out_level(self, high: bool) -> None:
        chan = self._chan
        if chan is None:
            return
        if high:
            chan.pause_reading()
        elif all(len(o) < muxio.LOW_WATER for o in self._outs):
            chan.resume_reading()

    def _stdin(self, data: bytes) -> None:
        """A chunk of the client's stdin (``b""``: its end) for the channel."""
        chan = self._chan
        if chan is None or chan.is_closing():
            self._in.close()
        elif not data:
            chan.write_eof()
        else:
            chan.write(data)

    # -- the life ----------------------------------------------------------------------------

    async def open(self, conn: asyncssh.SSHClientConnection) -> None:
        """Open the channel and tell the client (SESSION_OPENED, or FAILURE: it then makes
        its own connection, as ssh does when a master refuses)."""
        req = self.req
        try:
            if isinstance(req, mux.StdioForward):
                if req.port == mux.PORT_STREAMLOCAL:
                    await conn.create_unix_connection(cast(Any, self._new_link), req.host)
                else:
                    await conn.create_connection(cast(Any, self._new_link), req.host,
                                                 req.port)
            else:
                failed_tty = False
                try:
                    await self._open_session(conn, req.want_tty)
                except asyncssh.ChannelOpenError as exc:
                    if not req.want_tty or exc.code != asyncssh.OPEN_REQUEST_PTY_FAILED:
                        raise
                    failed_tty = True
                    await self._open_session(conn, False)
                self.pty = req.want_tty and not failed_tty
        except (asyncssh.Error, OSError) as exc:
            why = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
            await self._send(mux.failure(req.rid, f"tunneld: {self.host}: the server "
                                                  f"refused the channel: {why}"))
            raise
        self.opened = True
        await self._send(mux.session_opened(req.rid, self.sid))
        if isinstance(req, mux.NewSession):
            if req.want_tty and not self.pty:
                await self._send(mux.tty_alloc_fail(self.sid))
            asked = [what for what, want in (("agent forwarding (-A)", req.want_agent),
                                             ("X11 forwarding (-X/-Y)", req.want_x11)) if want]
            if asked:
                await self.say(f"tunneld: {' and '.join(asked)} not done through tunneld's "
                               "connection; ssh -o ControlPath=none gets its own")

    def _new_link(self) -> _Link:
        self._chan = None
        self._link = _Link(self)
        return self._link

    async def _open_session(self, conn: asyncssh.SSHClientConnection, tty: bool) -> None:
        req = self.req
        assert isinstance(req, mux.NewSession)
        text: Any = req.command
        try:
            text = req.command.decode()
        except UnicodeDecodeError:
            pass    # asyncssh sends bytes as they are
        command = None if req.subsystem or not text else text
        size = self._size or (80, 24, 0, 0)
        await conn.create_session(
            self._new_link, command, subsystem=text if req.subsystem else None,
            env=cast(Any, req.environment()), send_env=None, request_pty="force" if tty else False,
            term_type=(req.term or None) if tty else None,
            term_size=size if tty else None,
            term_modes=terminal_modes(self._in_fd) if tty else {},
            x11_forwarding=False, encoding=None)

    async def pump(self) -> None:
        """Move bytes until the channel closes, write everything out, then tell the
        client how it ended."""
        self._in.start()
        try:
            await self._closed
        finally:
            self._in.close()
        written = True
        for out in self._outs:
            written = await out.flush(FLUSH_WAIT) and written
        self.outcome = (self._lost or (f"exit status {self._exit}" if self._exit is not None
                                       else f"killed by signal {self._signal}"
                                       if self._signal else "closed"))
        if self._lost is not None:
            await self.say(self._lost)
        elif not self.stdio and self._exit is not None and written:
            # a command killed by a signal has no exit status: the client exits 255, as
            # OpenSSH's ssh does (measured: `ssh HOST 'kill -9 $$'` exits 255)
            await self._send(mux.exit_message(self.sid, self._exit))

    async def say(self, line: str) -> None:
        """A line of tunneld's on the client's stderr (a session's; a stdio forward has none
        that is its own)."""
        if self.stdio or len(self._outs) < 2:
            return
        out = self._outs[1]
        out.write(((line + "\r\n") if self.pty else (line + "\n")).encode())
        await out.flush(2.0)

    def resize(self) -> None:
        """The client's terminal may have a new size (SIGWINCH): tell the server if so."""
        if not self.pty or self._chan is None:
            return
        size = window_size(self._in_fd)
        if size is not None and size != self._size:
            self._size = size
            assert isinstance(self._chan, asyncssh.SSHClientChannel)
            self._chan.change_terminal_size(*size)

    def end(self, why: str | None = None) -> None:
        """End the passenger now: its client went away, or (``why``, said on its stderr; the
        client then exits 255) tunneld stops.  The channel is closed without waiting for the
        server (sshd keeps a session open while its command runs, as it does when a plain
        ssh goes away); nothing it still sends reaches the client."""
        if why is not None and self._lost is None:
            self._lost = f"tunneld: {why}"
        chan, self._chan, self._link = self._chan, None, None
        if chan is not None:
            chan.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def close_fds(self) -> None:
        self._link = None     # the descriptors' numbers may be reused: nothing more is written
        for out in self._outs:
            out.cancel()
        self._in.close()
        muxio.close_all(self.fds)
        self.fds = []

    def snapshot(self) -> dict[str, Any]:
        from .wire import iso_time
        return {"command": self.command, "started": iso_time(self.started), "pid": self.pid,
                "pty": self.pty, "kind": "stdio" if self.stdio else "session"}

