"""asyncssh adapter: remote commands run as named sessions, their output scanned for markers.

A session is **detached** (the default) or **attached** (``run --no-detach``).

A detached session's command runs on the server in a session of its own, its output appended
to a log in a private directory there (``remote.detached_start_command``); it survives a
dropped connection and a stopped daemon.  The daemon follows that log from the byte offset it
has (``remote.follow_command``), so nothing is lost or read twice: ``received`` is always the
length of the local copy.  When the connection drops the session is ``disconnected`` and
re-attaches once its host is connected again; when the follower reports the end, whatever the
follower missed is fetched (``remote.tail_command``) before the session ends.  One
``markers.Scanner`` sees the bytes in order across re-attaches, so no marker is acted on twice
in a daemon run; after a daemon restart the scanner is primed with the local log's last,
unterminated line (``resume``), so a marker split at the restart is acted on once.

An attached session runs ``remote.session_command(...)`` in the SSH channel and ends with it.

Either way stdin is closed (as ``ssh -n``), there is no PTY, output goes to a local log file
(0600) and through a ``markers.Scanner`` per stream; every ``BrowserOpen`` goes to the opener.
Followers (``tunnelctl logs -f``, ``run --follow``) get the same chunks through bounded queues.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import asyncssh

from . import remote
from .errors import ConnectError, UsageError
from .markers import MAX_LINE, BrowserOpen, Scanner
from .state import HostState

if TYPE_CHECKING:
    from .host import HostSupervisor

log = logging.getLogger("tunneld")

#: bytes read from a remote stream at a time
READ_SIZE = 65536
#: a limit: chunks queued for one follower before it is dropped as too slow
FOLLOW_QUEUE = 1024
#: a limit: sessions kept (running + ended) before the oldest ended ones are forgotten
MAX_SESSIONS = 200
#: seconds the kill command may take on the server
KILL_TIMEOUT = remote.KILL_GRACE + 10

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

#: seconds the start command of a detached session may take
START_TIMEOUT = remote.START_WAIT + 20
#: seconds between re-attach attempts while the connection is up but following fails (grows
#: to the max)
REATTACH_DELAY = 1.0
REATTACH_DELAY_MAX = 10.0
#: a limit: attempts to learn whether a start whose answer was lost happened
PROBE_TRIES = 5
#: a limit: lines (and bytes) of output shown when a command fails at once
START_ERROR_LINES = 10
START_ERROR_BYTES = 4096
#: a limit: bytes of a follower's stderr kept (it holds one status line)
MAX_FOLLOW_STDERR = 64 * 1024

#: the states a session ends in
ENDED_STATES = frozenset({"exited", "killed", "failed", "lost"})

OnOpen = Callable[["Session", BrowserOpen], Awaitable[None]]
OnChange = Callable[["Session"], None]

#: keys of a detached session's record in the daemon's sessions file
RECORD_KEYS = ("name", "host", "command", "detached", "remote_id", "remote_dir", "server",
               "pid", "port", "log", "started", "ended", "state", "exit_status", "error",
               "opens", "forwards", "received")


class Session:
    """One remote command.  ``state``: starting → running ⇄ disconnected (detached only) →
    exited | killed | failed | lost."""

    def __init__(self, name: str, host: "HostSupervisor", command: str, log_path: Path,
                 on_open: OnOpen, env: dict[str, str] | None = None,
                 port: int | None = None, detached: bool = True,
                 on_change: OnChange | None = None):
        self.name = name
        #: the command outlives its connection and the daemon (see the module docstring)
        self.detached = detached
        #: called when something a sessions file records changed
        self.on_change = on_change
        #: detached: the session directory's name on the server, set before it is created
        self.remote_id: str | None = None
        #: detached: the session directory on the server, as the server reported it
        self.remote_dir: str | None = None
        #: detached: the server's host name (a marker naming another host ran on a node)
        self.server: str | None = None
        #: detached: bytes of the remote log received = the local log's length
        self.received = 0
        #: detached, taken up after a restart: bytes below this offset were received (and
        #: their markers acted on) before; received again, their markers are not acted on
        self._quiet_until = 0
        #: local forwards made for this session's markers ("LISTEN:TARGET" specs)
        self.forwards: list[str] = []
        #: set while the daemon stops: the task ends, the session is left running remotely
        self._detaching = False
        self.host = host
        self.command = command
        self.env = env or {}
        self.port = port
        self.log_path = log_path
        self.on_open = on_open
        self.state = "starting"
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.error: str | None = None
        self.started = time.time()
        self.ended: float | None = None
        #: the remote shell's pid (= its process group; detached: the runner's); None until
        #: the server reported it
        self.pid: int | None = None
        self.opens = 0
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_fd: int | None = None
        self._followers: set[asyncio.Queue[bytes | None]] = set()
        self._kill_requested = False
        #: detached: the kill under way or done (the reaper lets it finish)
        self._killing: asyncio.Future[str] | None = None
        #: detached: the scanner of the log, kept across re-attaches
        self._scanner = Scanner()
        #: marker actions under way (readiness waits, browser launches)
        self._open_tasks: set[asyncio.Task[None]] = set()
        #: set once the session has ended (any final state)
        self.done = asyncio.Event()
        #: set once the command runs on the server (its pid is known), or the session ended
        self.up = asyncio.Event()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.log_path.parent, 0o700)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(self._log_fd, 0o600)   # also when an older log of that name was 0644
        run = self._run_detached() if self.detached else self._run()
        self._task = asyncio.get_running_loop().create_task(self._guarded(run),
                                                            name=f"session:{self.name}")

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
        if record.get("ended") is not None or self.remote_id is None:
            state, status = record.get("state"), record.get("exit_status")
            self.state = state if state in ENDED_STATES else "lost"
            self.exit_status = status if isinstance(status, int) and \
                not isinstance(status, bool) else None
            self.error = _text(record.get("error"))
            self.ended = float(record.get("ended") or time.time())
            self.done.set()
            return
        self.state = "disconnected"
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(self._log_fd, 0o600)
        self.received = os.fstat(self._log_fd).st_size
        self._scanner = Scanner()
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
        self._task = asyncio.get_running_loop().create_task(
            self._guarded(self._run_detached()), name=f"session:{self.name}")

    def record(self) -> dict[str, Any]:
        """What the daemon's sessions file keeps of a detached session."""
        return {"name": self.name, "host": self.host.name, "command": self.command,
                "detached": True, "remote_id": self.remote_id, "remote_dir": self.remote_dir,
                "server": self.server, "pid": self.pid, "port": self.port,
                "log": str(self.log_path), "started": self.started, "ended": self.ended,
                "state": self.state, "exit_status": self.exit_status, "error": self.error,
                "opens": self.opens, "forwards": self.forwards, "received": self.received}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _set_state(self, new: str, why: str = "") -> None:
        if new != self.state:
            log.info("%s: session %s: %s -> %s%s", self.host.name, self.name, self.state, new,
                     f" ({why})" if why else "")
            self.state = new
            self._changed()

    # -- detached ----------------------------------------------------------------------------

    async def _run_detached(self) -> None:
        if self.remote_id is None:
            await self._start_remote()
        elif self.pid is None:
            # taken up from a daemon that stopped while starting it: did it start?
            self._started(await self._probe_start())
        await self._attach_until_end()

    async def _guarded(self, body: Awaitable[None]) -> None:
        """Run a session's body and record how it ended (unless the daemon let go of it)."""
        try:
            await body
        except asyncio.CancelledError:
            if self._detaching:
                return    # the daemon stops; the command runs on, the sessions file says so
            self.state = "killed" if self._kill_requested else "lost"
            raise
        except (ConnectError, asyncssh.Error, OSError) as exc:
            self.state = "failed"
            self.error = str(exc)
            log.warning("%s: session %s failed: %s", self.host.name, self.name, exc)
        finally:
            if not self._detaching:
                self._finish()

    async def _start_remote(self) -> None:
        conn = await self.host.connection_for_client()
        self.remote_id = f"{self.name}-{secrets.token_hex(4)}"
        self._changed()   # recorded before it may start: a daemon killed now can look later
        text = remote.detached_start_command(self.remote_id, self.command, self.env)
        try:
            result = await asyncio.wait_for(
                conn.run(text, check=False, request_pty=False, term_type=None),
                START_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            # the answer is lost; the command may run all the same: ask once connected
            log.info("%s: session %s: no answer from the start command (%s); asking the "
                     "server once connected", self.host.name, self.name,
                     _describe(exc, "timed out"))
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
        self.state = "running"
        self.up.set()
        log.info("%s: session %s started (detached, pid %d, %s): %s", self.host.name,
                 self.name, self.pid, self.remote_dir, self.command)
        self._changed()

    async def _probe_start(self) -> asyncssh.SSHCompletedProcess:
        assert self.remote_id is not None
        text = remote.probe_start_command(self.remote_id)
        for _ in range(PROBE_TRIES):
            conn = await self._connected()
            try:
                return await asyncio.wait_for(
                    conn.run(text, check=False, request_pty=False, term_type=None),
                    START_TIMEOUT)
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                await asyncio.sleep(REATTACH_DELAY)
        raise ConnectError(f"{self.host.name}: session {self.name}: the server did not say "
                           f"whether it started ({self.remote_dir or self.remote_id})")

    async def _connected(self) -> asyncssh.SSHClientConnection:
        """The host's live connection; ``disconnected`` while there is none."""
        sup = self.host
        while True:
            conn = sup.conn
            if conn is not None and sup.state is HostState.CONNECTED and not conn.is_closed():
                return conn
            self._set_state("disconnected", f"{sup.name} is {sup.state}")
            await sup.wait_change(REATTACH_DELAY_MAX)

    async def _attach_until_end(self) -> None:
        delay = REATTACH_DELAY
        while True:
            conn = await self._connected()
            end = await self._follow(conn)
            if end is None:
                self._set_state("disconnected", "the connection was lost")
                # a new connection, or the old one declared dead; never a hot loop
                deadline = time.monotonic() + delay
                while self.host.conn is conn and not conn.is_closed() and \
                        time.monotonic() < deadline:
                    await self.host.wait_change(deadline - time.monotonic())
                if self.host.conn is conn and not conn.is_closed():
                    delay = min(REATTACH_DELAY_MAX, delay * 2)
                continue
            delay = REATTACH_DELAY
            if end == "gone":
                self.state = "lost"
                self.error = (f"its directory {self.remote_dir or self.remote_id} on the "
                              "server is gone")
                return
            size, status = end
            if self.received < size and not await self._catch_up(conn, size):
                continue   # the connection dropped while fetching: follow again
            self.exit_status = status
            if self._kill_requested:
                self.state = "killed"
            elif status is None:
                self.state = "lost"
                self.error = "it ended without an exit status (killed by a signal?)"
            else:
                self.state = "exited"
            return

    async def _follow(self, conn: asyncssh.SSHClientConnection
                      ) -> tuple[int, int | None] | str | None:
        """Stream the remote log from ``received`` until the follower ends; its end line's
        values, or None when the connection was lost first."""
        assert self.remote_id is not None
        try:
            proc = await conn.create_process(
                remote.follow_command(self.remote_id, self.received), encoding=None,
                request_pty=False, term_type=None)
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: session %s: cannot follow: %s", self.host.name, self.name, exc)
            return None
        self._proc = proc
        try:
            proc.stdin.write_eof()
            if self.state != "running":
                self._set_state("running", f"re-attached at byte {self.received}")
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
            proc = await conn.create_process(
                remote.tail_command(self.remote_id, self.received), encoding=None,
                request_pty=False, term_type=None)
            proc.stdin.write_eof()
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

    @property
    def detaching(self) -> bool:
        """The daemon stops and has let go of this (running) detached session."""
        return self._detaching

    def detach(self) -> None:
        """The daemon stops: stop following, leave the command running on the server."""
        if self.detached and self.running and self._task is not None:
            self._detaching = True
            self._task.cancel()
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            for q in self._followers:
                _offer(q, None)

    async def _run(self) -> None:
        conn = await self.host.connection_for_client()
        text = remote.session_command(self.command, self.env)
        self._proc = await conn.create_process(
            text, encoding=None, request_pty=False, term_type=None)
        self._proc.stdin.write_eof()
        self.state = "running"
        self.up.set()
        log.info("%s: session %s started: %s", self.host.name, self.name, self.command)
        await asyncio.gather(self._pump(self._proc.stdout, first=True),
                             self._pump(self._proc.stderr))
        await self._proc.wait(check=False)
        self.exit_status = self._proc.exit_status
        self.exit_signal = (self._proc.exit_signal or (None,))[0]
        if self._kill_requested:
            self.state = "killed"
        elif self.exit_status is None and self.exit_signal is None:
            self.state = "lost"
            self.error = "the connection to the server was lost"
        else:
            self.state = "exited"

    def _finish(self) -> None:
        if self.done.is_set():
            return
        if self.detached:
            for ev in self._scanner.close():
                self._open(ev)
        self.ended = time.time()
        how = (f"exit status {self.exit_status}" if self.exit_status is not None else
               f"signal {self.exit_signal}" if self.exit_signal else self.error or self.state)
        log.info("%s: session %s %s (%s)", self.host.name, self.name, self.state, how)
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        for q in self._followers:
            _offer(q, None)
        self.done.set()
        self.up.set()
        self._changed()

    async def _pump(self, stream: asyncssh.SSHReader[bytes], first: bool = False) -> None:
        scanner = Scanner()
        pending_first = first
        head = b""
        while True:
            data = await stream.read(READ_SIZE)
            if not data:
                break
            if pending_first:
                # the wrapper's first line carries the pid; it is not the program's output
                head += data
                if b"\n" not in head and len(head) < 256:
                    continue
                line, _, data = head.partition(b"\n")
                pid = remote.parse_pid_line(line)
                if pid is None:
                    data = head
                else:
                    self.pid = pid
                pending_first = False
                if not data:
                    continue
            self._output(data)
            for ev in scanner.feed(data):
                self._open(ev)
        for ev in scanner.close():
            self._open(ev)

    def _open(self, ev: BrowserOpen) -> None:
        """Act on a marker in the background: the readiness wait must not stall output."""
        self.opens += 1
        task = asyncio.get_running_loop().create_task(self._open_one(ev))
        self._open_tasks.add(task)
        task.add_done_callback(self._open_tasks.discard)

    async def _open_one(self, ev: BrowserOpen) -> None:
        try:
            await self.on_open(self, ev)
        except Exception as exc:  # noqa: BLE001 - a bad marker must not end the session
            log.warning("%s: session %s: could not act on a marker: %s", self.host.name,
                        self.name, exc)

    def _output(self, data: bytes) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, data)
        for q in list(self._followers):
            if not _offer(q, data):
                self._followers.discard(q)

    async def kill(self) -> str:
        """Stop the remote process and all its children (TERM, then KILL after a grace)."""
        if not self.running:
            return f"session {self.name} has already ended ({self.state})"
        self._kill_requested = True
        if self.detached:
            return await self._kill_detached()
        conn = self.host.conn
        if self.pid is None or conn is None:
            # not started on the server (yet): closing the channel is all we can do
            if self._proc is not None:
                self._proc.close()
            elif self._task is not None:
                self._task.cancel()
            return f"session {self.name} stopped before it ran"
        try:
            result = await asyncio.wait_for(
                conn.run(remote.kill_tree_command(self.pid), check=False, request_pty=False,
                         term_type=None), KILL_TIMEOUT)
            said = (result.stdout or "").strip()
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            said = f"kill command failed: {exc}"
        log.info("%s: session %s: kill: %s", self.host.name, self.name,
                 said.replace("\n", "; "))
        if self._proc is not None:
            self._proc.close()
        try:
            await asyncio.wait_for(self.done.wait(), 10)
        except asyncio.TimeoutError:
            if self._task is not None:
                self._task.cancel()
        return said

    async def _kill_detached(self) -> str:
        if self.pid is None or self.remote_id is None:
            # not started on the server yet: let the start finish (bounded), then kill
            deadline = time.monotonic() + START_TIMEOUT
            while self.pid is None and self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.pid is None or self.remote_id is None:
                if self._task is not None:
                    self._task.cancel()
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
            result = await asyncio.wait_for(
                conn.run(remote.detached_kill_command(self.remote_id, self.pid), check=False,
                         request_pty=False, term_type=None), KILL_TIMEOUT)
            said = str(result.stdout or "").strip()
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            said = f"kill command failed: {exc}"
        log.info("%s: session %s: kill: %s", self.host.name, self.name,
                 said.replace("\n", "; "))
        try:
            # the follower sees the end and fetches the last output
            await asyncio.wait_for(asyncio.shield(self.done.wait()), 15)
        except asyncio.TimeoutError:
            if self._task is not None:
                self._task.cancel()
        return said

    async def wait_started(self, up_timeout: float, check: float) -> str | None:
        """Wait until the command runs on the server (at most ``up_timeout`` s), then
        ``check`` s more; why it did not start (it could not be started, or it failed at
        once), or None (it runs, or it ended well, or it is still starting)."""
        try:
            await asyncio.wait_for(self.up.wait(), up_timeout)
        except asyncio.TimeoutError:
            return None
        if self.running:
            try:
                await asyncio.wait_for(asyncio.shield(self.done.wait()), check)
            except asyncio.TimeoutError:
                return None
        elif self.state == "exited" and check == 0:
            return None   # it started (the caller follows its output and end)
        if self.state == "exited" and self.exit_status == 0:
            return None
        if self.state == "exited":
            why = f"it exited at once with status {self.exit_status}"
        elif self.state == "killed":
            return None
        else:
            why = self.error or f"it ended at once ({self.state})"
        head = self.output_head()
        return why + (f"; its output:\n{head}" if head else "; it printed nothing")

    def output_head(self, lines: int = START_ERROR_LINES) -> str:
        """The first ``lines`` lines of the local log (bounded)."""
        try:
            with open(self.log_path, "rb") as f:
                data = f.read(START_ERROR_BYTES)
        except OSError:
            return ""
        text = data.decode("utf-8", "replace").rstrip("\n")
        return "\n".join(text.split("\n")[:lines])

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for marker actions and a kill still under way after the output
        ended (a detached session ends as soon as its runner does, while the killer may
        still be sending SIGKILL to the rest of the tree over the connection)."""
        waits = set(self._open_tasks)
        if self._killing is not None:
            waits.add(self._killing)
        if waits:
            await asyncio.wait(waits, timeout=timeout)

    # -- followers ---------------------------------------------------------------------------

    def follow(self) -> asyncio.Queue[bytes | None]:
        """A queue of new output chunks, then None when the session ends."""
        q: asyncio.Queue[bytes | None] = asyncio.Queue(FOLLOW_QUEUE)
        if self.done.is_set():
            q.put_nowait(None)
        else:
            self._followers.add(q)
        return q

    def unfollow(self, q: asyncio.Queue[bytes | None]) -> None:
        self._followers.discard(q)

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "host": self.host.name, "command": self.command,
            "state": self.state, "exit_status": self.exit_status,
            "exit_signal": self.exit_signal, "error": self.error, "pid": self.pid,
            "port": self.port, "opens": self.opens,
            "started": _iso(self.started), "ended": _iso(self.ended) if self.ended else None,
            "log": str(self.log_path), "detached": self.detached,
            "remote_dir": self.remote_dir, "server": self.server,
        }


def _offer(q: asyncio.Queue[bytes | None], item: bytes | None) -> bool:
    try:
        q.put_nowait(item)
        return True
    except asyncio.QueueFull:
        return False


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


def _describe(exc: BaseException, default: str) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return default
    return str(exc) or type(exc).__name__


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"{name!r} is not a session name; use letters, digits, '.', '_' or "
                         "'-' (at most 64), starting with a letter or digit")
    return name


def default_name(command: str, taken: set[str]) -> str:
    """``jupyter lab --no-browser`` → ``jupyter-1`` (the first free number)."""
    words = command.split()
    base = os.path.basename(words[0]) if words else "session"
    base = re.sub(r"[^A-Za-z0-9_.-]", "", base)[:40] or "session"
    if not base[0].isalnum():
        base = "s" + base
    n = 1
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"
