"""Detached sessions: the command outlives the SSH connection and the daemon.

Its command runs on the server in a session of its own, its output appended to a log in a
private directory there (``remote.detached_start_command``).  The daemon follows that log from
the byte offset it has (``remote.follow_command``), so nothing is lost or read twice:
``received`` is always the length of the local copy.  When the connection drops the session is
``disconnected`` and re-attaches once its host is connected again; when the follower reports
the end, whatever the follower missed is fetched (``remote.tail_command``) before the session
ends.  One ``markers.Scanner`` sees the bytes in order across re-attaches, so no marker is
acted on twice in a daemon run; after a daemon restart the scanner is primed with the local
log's last, unterminated line (``resume``), so a marker split at the restart is acted on once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import asyncssh

from . import printed, remote, sshrun
from .errors import ConnectError
from .markers import MAX_LINE, Scanner
from .session import KILL_TIMEOUT, READ_SIZE, Session, _offer
from .state import SESSION_ENDED, SessionEvent, SessionState, state_phrase

log = logging.getLogger("tunneld")

#: seconds the start command of a detached session may take
START_TIMEOUT = remote.START_WAIT + 20
#: seconds between re-attach attempts while the connection is up but following fails (grows
#: to the max)
REATTACH_DELAY = 1.0
REATTACH_DELAY_MAX = 10.0
#: a limit: attempts to learn whether a start whose answer was lost happened
PROBE_TRIES = 5
#: a limit: bytes of a follower's stderr kept (it holds one status line)
MAX_FOLLOW_STDERR = 64 * 1024

#: keys of a detached session's record in the daemon's sessions file
RECORD_KEYS = ("name", "host", "command", "words", "detached", "remote_id", "remote_dir",
               "server", "pid", "port", "log", "started", "ended", "state", "exit_status", "error",
               "opens", "forwards", "urls", "url_opened", "sock", "sock_dir", "received", "job")


class DetachedSession(Session):
    detached = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the session directory's name on the server, set before it is created
        self.remote_id: str | None = None
        #: bytes of the remote log received = the local log's length
        self.received = 0
        #: taken up after a restart: bytes below this offset were received (and their
        #: markers acted on) before; received again, their markers are not acted on
        self._quiet_until = 0
        #: set while the daemon stops: the task ends, the session is left running remotely
        self._detaching = False
        #: the follower or catch-up process under way
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        #: the kill under way or done (the reaper lets it finish)
        self._killing: asyncio.Future[str] | None = None
        #: the scanner of the log, kept across re-attaches
        self._scanner = Scanner(urls=True)

    # -- the sessions file -------------------------------------------------------------------

    def resume(self, record: dict[str, Any]) -> None:
        """Take up a detached session from the daemon's sessions file: an ended one as it
        ended; a running one by re-attaching from the local log's length."""
        rid, pid = record.get("remote_id"), record.get("pid")
        if rid is not None and not (isinstance(rid, str) and remote.ID_RE.match(rid)):
            raise ValueError(f"bad remote id {rid!r}")
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1):
            raise ValueError(f"bad pid {pid!r}")
        self.remote_id, self.pid = rid, pid
        self.remote_dir = _text(record.get("remote_dir"))
        self.server = _text(record.get("server"))
        self.started = float(record.get("started") or time.time())
        self.opens = int(record.get("opens") or 0)
        self.forwards = [f for f in record.get("forwards") or [] if isinstance(f, str)]
        self.urls = [u for u in record.get("urls") or [] if _is_url_entry(u)]
        self.sock, self.sock_dir = _text(record.get("sock")), _text(record.get("sock_dir"))
        for u in self.urls:
            self.url_seen.add(u["remote"])
            found = printed.url_key(u["remote"])
            if found is not None:
                self.url_ports.setdefault(*found)
        self.url_opened = self.opens > 0 or bool(record.get("url_opened"))
        if record.get("ended") is not None or self.remote_id is None:
            state, status = record.get("state"), record.get("exit_status")
            # taken up as it ended (a state read from the file, not a transition)
            self.state = SessionState(state) if state in SESSION_ENDED else SessionState.LOST
            self.exit_status = status if isinstance(status, int) and \
                not isinstance(status, bool) else None
            self.error = _text(record.get("error"))
            self.ended = float(record.get("ended") or time.time())
            self.done.set()
            self.up.set()
            return
        self.state = SessionState.DISCONNECTED   # taken up: following again
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._log_fd, 0o600)
        self.received = os.fstat(self._log_fd).st_size
        self._scanner = Scanner(urls=True)
        # the last, unterminated line: its marker (if any) is acted on when the line ends
        self._scanner.feed(_last_partial_line(self.log_path, self.received))
        seen = record.get("received")
        if isinstance(seen, int) and not isinstance(seen, bool) and seen > self.received:
            # the local copy lost its end (deleted, truncated): fetch it again from the
            # server, but the markers the daemon already acted on are not acted on again
            self._quiet_until = seen
            log.warning("%s: session %s: the local log %s has %d of the %d bytes already "
                        "received; fetching the rest again (markers in it are not acted on "
                        "again)", self.host.name, self.name, self.log_path, self.received, seen)
        self._run_task()

    def record(self) -> dict[str, Any]:
        """What the daemon's sessions file keeps of a detached session."""
        return {"name": self.name, "host": self.host.name, "command": self.command,
                "words": self.words, "detached": True, "remote_id": self.remote_id,
                "remote_dir": self.remote_dir,
                "server": self.server, "pid": self.pid, "port": self.port,
                "log": str(self.log_path), "started": self.started, "ended": self.ended,
                "state": self.state.value, "exit_status": self.exit_status,
                "error": self.error, "opens": self.opens, "forwards": self.forwards,
                "urls": self.urls, "url_opened": self.url_opened, "sock": self.sock,
                "sock_dir": self.sock_dir,
                "received": self.received}

    # -- running -----------------------------------------------------------------------------

    async def _body(self) -> None:
        if self.remote_id is None:
            await self._start_remote()
        elif self.pid is None:
            # taken up from a daemon that stopped while starting it: did it start?
            self._started(await self._probe_start())
        await self._attach_until_end()

    def _letting_go(self) -> bool:
        return self._detaching

    async def _start_remote(self) -> None:
        conn = await self.host.connection_for_client()
        self.remote_id = f"{self.name}-{secrets.token_hex(4)}"
        self._changed()   # recorded before it may start: a daemon killed now can look later
        text = remote.detached_start_command(self.remote_id, self.shell_text(), self.env)
        try:
            result = await sshrun.run(conn, text, START_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            # the answer is lost; the command may run all the same: ask once connected
            log.info("%s: session %s: no answer from the start command (%s); asking the "
                     "server once connected", self.host.name, self.name,
                     "timed out" if isinstance(exc, asyncio.TimeoutError) else
                     (str(exc) or type(exc).__name__))
            result = await self._probe_start()
        self._started(result)

    def _started(self, result: Any) -> None:
        """Take the start command's (or the probe's) answer; raise if it did not start."""
        started = remote.parse_start_line(str(result.stdout or ""))
        if started is None:
            said = str(result.stderr or "").strip().splitlines()
            raise ConnectError(f"{self.host.name}: session {self.name} could not be started "
                               f"on the server: {said[-1] if said else 'no answer'}")
        self.pid, self.server, self.remote_dir = started.pid, started.server, started.dir
        self._to(SessionEvent.STARTED)
        log.info("%s: session %s started (detached, pid %d, %s): %s", self.host.name,
                 self.name, self.pid, self.remote_dir, self.command)
        self._changed()

    async def _probe_start(self) -> asyncssh.SSHCompletedProcess:
        assert self.remote_id is not None
        text = remote.probe_start_command(self.remote_id)
        for _ in range(PROBE_TRIES):
            conn = await self._connected()
            try:
                return await sshrun.run(conn, text, START_TIMEOUT)
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                await asyncio.sleep(REATTACH_DELAY)
        raise ConnectError(f"{self.host.name}: session {self.name}: the server did not say "
                           f"whether it started ({self.remote_dir or self.remote_id})")

    async def _connected(self) -> asyncssh.SSHClientConnection:
        """The host's live connection; ``disconnected`` while there is none."""
        sup = self.host
        while True:
            conn = sup.live_connection()
            if conn is not None:
                return conn
            self._disconnected(f"{sup.name} {state_phrase(sup.state)}")
            await sup.wait_change(REATTACH_DELAY_MAX)

    def _disconnected(self, why: str) -> None:
        if self.state is not SessionState.DISCONNECTED:
            self._to(SessionEvent.DISCONNECTED, why, quiet=False)

    async def _attach_until_end(self) -> None:
        delay = REATTACH_DELAY
        while True:
            conn = await self._connected()
            end = await self._follow(conn)
            if end is None:
                delay = await self._follower_lost(conn, delay)
                continue
            delay = REATTACH_DELAY
            if isinstance(end, str):   # "gone"
                self._gone()
                return
            size, status = end
            if self.received < size and not await self._catch_up(conn, size):
                continue   # the connection dropped while fetching: follow again
            self._ended_with(status, lost="it ended without an exit status (killed by a "
                                          "signal?)")
            return

    async def _follower_lost(self, conn: asyncssh.SSHClientConnection, delay: float) -> float:
        """The follower ended without its end line: ``disconnected`` until a new connection
        comes or the old one is declared dead (at most ``delay`` s: never a hot loop); the
        next delay."""
        self._disconnected("the connection was lost")
        deadline = time.monotonic() + delay
        while self.host.live_connection() is conn and time.monotonic() < deadline:
            await self.host.wait_change(deadline - time.monotonic())
        return min(REATTACH_DELAY_MAX, delay * 2) if self.host.live_connection() is conn \
            else delay

    def _gone(self, before: str = "") -> None:
        """The session directory on the server is gone: ``lost``."""
        self.error = (f"{before}its directory {self.remote_dir or self.remote_id} on the "
                      "server is gone")
        self._to(SessionEvent.LOST)

    async def _follow(self, conn: asyncssh.SSHClientConnection
                      ) -> tuple[int, int | None] | str | None:
        """Stream the remote log from ``received`` until the follower ends; its end line's
        values, or None when the connection was lost first."""
        assert self.remote_id is not None
        try:
            proc = await sshrun.start(conn, remote.follow_command(self.remote_id,
                                                                  self.received))
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: session %s: cannot follow: %s", self.host.name, self.name, exc)
            return None
        self._proc = proc
        try:
            if self.state is not SessionState.RUNNING:
                self._to(SessionEvent.REATTACHED, f"re-attached at byte {self.received}",
                         quiet=False)
            err = asyncio.ensure_future(_read_all(proc.stderr, MAX_FOLLOW_STDERR))
            try:
                while True:
                    data = await proc.stdout.read(READ_SIZE)
                    if not data:
                        break
                    self._take(data)
                said = await err
            finally:
                err.cancel()
            await proc.wait(check=False)
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: session %s: following stopped: %s", self.host.name, self.name, exc)
            return None
        finally:
            self._proc = None
            proc.close()
        return remote.parse_end_line(said.decode("utf-8", "replace"))

    async def _catch_up(self, conn: asyncssh.SSHClientConnection, size: int) -> bool:
        """Fetch the log's bytes from ``received`` to ``size``; False if the connection
        dropped first."""
        assert self.remote_id is not None
        log.info("%s: session %s: fetching the last %d byte(s) of its log", self.host.name,
                 self.name, size - self.received)
        try:
            proc = await sshrun.start(conn, remote.tail_command(self.remote_id, self.received))
            try:
                while self.received < size:
                    data = await proc.stdout.read(min(READ_SIZE, size - self.received))
                    if not data:
                        break
                    self._take(data[:size - self.received])
            finally:
                proc.close()
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: session %s: fetching the log's end failed: %s", self.host.name,
                     self.name, exc)
            return False
        return self.received >= size

    def _take(self, data: bytes) -> None:
        """Bytes of the remote log, in order: log them, scan them (bytes received again
        below ``_quiet_until`` are scanned without acting on their markers)."""
        quiet = self._quiet_until - self.received
        if quiet > 0:
            self._output(data[:quiet])
            self.received += len(data[:quiet])
            self._scanner.feed(data[:quiet])
            data = data[quiet:]
        self._output(data)
        self.received += len(data)
        for ev in self._scanner.feed(data):
            self._open(ev)

    def _ended_output(self) -> None:
        for ev in self._scanner.close():
            self._open(ev)

    # -- the daemon stops --------------------------------------------------------------------

    @property
    def detaching(self) -> bool:
        """The daemon stops and has let go of this (running) session."""
        return self._detaching

    def detach(self) -> None:
        """The daemon stops: stop following, leave the command running on the server."""
        if self.running and self._task is not None:
            self._detaching = True
            self._task.cancel()
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            for q in self._followers:
                _offer(q, None)

    # -- kill --------------------------------------------------------------------------------

    async def _kill(self) -> str:
        if self.pid is None or self.remote_id is None:
            # not started on the server yet: let the start finish (bounded), then kill
            deadline = time.monotonic() + START_TIMEOUT
            while self.pid is None and self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.pid is None or self.remote_id is None:
                self._stop_task()
                return f"session {self.name} stopped before it ran"
        self._killing = asyncio.ensure_future(self._run_killer())
        return await asyncio.shield(self._killing)

    async def _run_killer(self) -> str:
        assert self.remote_id is not None and self.pid is not None
        try:
            conn = await self.host.connection_for_client()
        except ConnectError as exc:
            self._kill_requested = False
            raise ConnectError(f"{exc}; session {self.name} keeps running on the server: "
                               f"kill it again once {self.host.name} is connected") from None
        try:
            result = await sshrun.run(
                conn, remote.detached_kill_command(self.remote_id, self.pid), KILL_TIMEOUT)
            said = str(result.stdout or "").strip()
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            said = f"kill command failed: {exc}"
        log.info("%s: session %s: kill: %s", self.host.name, self.name,
                 said.replace("\n", "; "))
        try:
            # the follower sees the end and fetches the last output
            await asyncio.wait_for(asyncio.shield(self.done.wait()), 15)
        except asyncio.TimeoutError:
            self._stop_task()
        return said

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for marker actions and a kill still under way after the output
        ended (a detached session ends as soon as its runner does, while the killer may
        still be sending SIGKILL to the rest of the tree over the connection)."""
        waits: set[asyncio.Future[Any]] = set(self._open_tasks)
        if self._killing is not None:
            waits.add(self._killing)
        if waits:
            await asyncio.wait(waits, timeout=timeout)


async def _read_all(stream: asyncssh.SSHReader[bytes], limit: int) -> bytes:
    """A stream to its end; only its first ``limit`` bytes are kept."""
    kept = b""
    while True:
        data = await stream.read(READ_SIZE)
        if not data:
            return kept
        kept += data[:max(0, limit - len(kept))]


def _last_partial_line(path: Path, size: int) -> bytes:
    """The bytes after the last line end in the first ``size`` bytes of ``path`` (at most
    ``MAX_LINE``; what the scanner would hold there)."""
    if size <= 0:
        return b""
    with open(path, "rb") as f:
        start = max(0, size - MAX_LINE - 1)
        f.seek(start)
        tail = f.read(size - start)
    cut = max(tail.rfind(b"\n"), tail.rfind(b"\r"))
    return tail[cut + 1:] if cut >= 0 else tail[-MAX_LINE:]


def _is_url_entry(u: Any) -> bool:
    """A session's URL entry as a sessions file keeps it (see ``Session.urls``)."""
    return isinstance(u, dict) and set(u) == {"remote", "local", "seen", "forward"} and \
        all(isinstance(v, str) for v in u.values())


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
