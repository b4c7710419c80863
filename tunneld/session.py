"""asyncssh adapter: remote commands run as named sessions, their output scanned for markers.

A session runs ``remote.session_command(...)`` over its host's connection, with stdin closed
(as ``ssh -n``) and no PTY.  stdout and stderr go to a per-session log file (0600) and through
one ``markers.Scanner`` each; every ``BrowserOpen`` goes to the opener.  Followers (``tunnelctl
logs -f``, ``run --follow``) get the same chunks through bounded queues.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import asyncssh

from . import remote
from .errors import ConnectError, UsageError
from .markers import BrowserOpen, Scanner

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

OnOpen = Callable[["Session", BrowserOpen], Awaitable[None]]


class Session:
    """One remote command.  ``state``: starting → running → exited | killed | failed | lost."""

    def __init__(self, name: str, host: "HostSupervisor", command: str, log_path: Path,
                 on_open: OnOpen, env: dict[str, str] | None = None,
                 port: int | None = None):
        self.name = name
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
        #: the remote shell's pid (= its process group); None until its first line arrives
        self.pid: int | None = None
        self.opens = 0
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_fd: int | None = None
        self._followers: set[asyncio.Queue[bytes | None]] = set()
        self._kill_requested = False
        #: marker actions under way (readiness waits, browser launches)
        self._open_tasks: set[asyncio.Task[None]] = set()
        #: set once the session has ended (any final state)
        self.done = asyncio.Event()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.log_path.parent, 0o700)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(self._log_fd, 0o600)   # also when an older log of that name was 0644
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"session:{self.name}")

    async def _run(self) -> None:
        try:
            conn = await self.host.connection_for_client()
            text = remote.session_command(self.command, self.env)
            self._proc = await conn.create_process(
                text, encoding=None, request_pty=False, term_type=None)
            self._proc.stdin.write_eof()
            self.state = "running"
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
        except asyncio.CancelledError:
            self.state = "killed" if self._kill_requested else "lost"
            raise
        except (ConnectError, asyncssh.Error, OSError) as exc:
            self.state = "failed"
            self.error = str(exc)
            log.warning("%s: session %s failed: %s", self.host.name, self.name, exc)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.done.is_set():
            return
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

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) for marker actions still under way after the output ended."""
        if self._open_tasks:
            await asyncio.wait(set(self._open_tasks), timeout=timeout)

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
            "log": str(self.log_path),
        }


def _offer(q: asyncio.Queue[bytes | None], item: bytes | None) -> bool:
    try:
        q.put_nowait(item)
        return True
    except asyncio.QueueFull:
        return False


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
