"""asyncssh adapter: remote commands run as named sessions, their output scanned for markers.

A session is **detached** (the default: ``session_detached.DetachedSession``) or **attached**
(``run --no-detach``: ``AttachedSession`` here).  This module holds what both share: the
state (``state.SESSION_TABLE``), the local log, the followers, the marker scanning and the
report; the subclass runs the command (``_body``) and kills it (``_kill``).

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
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Protocol

import asyncssh

from . import remote, sshrun
from .errors import ConnectError
from .markers import BrowserOpen, Scanner
from .printed import PrintedUrl
from .state import SESSION_ENDED, HostState, SessionEvent, SessionState, session_next
from .wire import iso_time

log = logging.getLogger("tunneld")

#: bytes read from a remote stream at a time
READ_SIZE = 65536
#: a limit: chunks queued for one follower before it is dropped as too slow
FOLLOW_QUEUE = 1024
#: a limit: sessions kept (running + ended) before the oldest ended ones are forgotten
MAX_SESSIONS = 200
#: seconds the kill command may take on the server
KILL_TIMEOUT = remote.KILL_GRACE + 10
#: a limit: lines (and bytes) of output shown when a command fails at once
START_ERROR_LINES = 10
START_ERROR_BYTES = 4096

OnOpen = Callable[["Session", BrowserOpen | PrintedUrl], Awaitable[None]]
OnChange = Callable[["Session"], None]


class SessionHost(Protocol):
    """What a session needs of its host."""

    name: str
    state: HostState

    def live_connection(self) -> asyncssh.SSHClientConnection | None: ...

    async def connection_for_client(self) -> asyncssh.SSHClientConnection: ...

    async def wait_change(self, timeout: float | None = None) -> None: ...


class Session:
    """One remote command (see the module docstring).  Invariant: ``done`` is set iff the
    state is an ended one; ``up`` is set once the command runs on the server or it ended."""

    #: the command outlives its connection and the daemon (``DetachedSession``)
    detached = False

    def __init__(self, name: str, host: SessionHost, words: list[str], log_path: Path,
                 on_open: OnOpen, env: dict[str, str] | None = None,
                 port: int | None = None, on_change: OnChange | None = None,
                 values: dict[str, str] | None = None):
        self.name = name
        self.host = host
        #: the command as given (``remote.shell_text``: one word is a shell line), and what
        #: replaces its ``{port}``/``{sock}``
        self.words = list(words)
        self.values = dict(values or {})
        #: the command as shown (pasted back after ``--``, it gives the same words)
        self.command = remote.shown(self.words)
        self.env = env or {}
        self.port = port
        self.log_path = log_path
        self.on_open = on_open
        #: called when something a sessions file records changed
        self.on_change = on_change
        self.state = SessionState.STARTING
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.error: str | None = None
        self.started = time.time()
        self.ended: float | None = None
        #: the remote shell's pid (= its process group; detached: the runner's); None until
        #: the server reported it
        self.pid: int | None = None
        #: the server's host name (a marker naming another host ran on a node); detached only
        self.server: str | None = None
        #: where the command runs when that is not the server: a batch job's node (its
        #: output's loopback URLs mean that node)
        self.node: str | None = None
        self.remote_dir: str | None = None
        self.opens = 0
        #: local forwards made for this session's markers and printed URLs ("LISTEN:TARGET"
        #: specs): they end with it, and come back with a detached session taken up
        self.forwards: list[str] = []
        #: the URLs it printed, oldest first: {"remote", "local", "seen", "forward"}
        self.urls: list[dict[str, Any]] = []
        #: the browser was opened for it (a marker, or a printed URL with printed_urls="open")
        self.url_opened = False
        #: remote port → the host of the first printed URL with that port; the URLs taken
        #: (listed, or being forwarded)
        self.url_ports: dict[int | str, str] = {}
        self.url_seen: set[str] = set()
        #: ``run --sock auto``: the socket path on the server, and its private directory
        self.sock: str | None = None
        self.sock_dir: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_fd: int | None = None
        self._followers: set[asyncio.Queue[bytes | None]] = set()
        self._kill_requested = False
        #: marker actions under way (readiness waits, browser launches)
        self._open_tasks: set[asyncio.Task[None]] = set()
        #: set once the session has ended (any final state)
        self.done = asyncio.Event()
        #: set once the command runs on the server (its pid is known), or the session ended
        self.up = asyncio.Event()

    def shell_text(self) -> str:
        """What the remote shell runs for the command."""
        return remote.shell_text(self.words, self.values)

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    # -- state -------------------------------------------------------------------------------

    def _to(self, event: SessionEvent, why: str = "", quiet: bool = True) -> None:
        """The transition ``event``; logged unless ``quiet`` (the end is logged by
        ``_finish``), and the sessions file hears of it."""
        new = session_next(self.state, event)
        if new is self.state:
            return
        if not quiet:
            log.info("%s: session %s: %s -> %s%s", self.host.name, self.name, self.state,
                     new, f" ({why})" if why else "")
        self.state = new
        if new is SessionState.RUNNING:
            self.up.set()
        if not quiet:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.log_path.parent, 0o700)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(self._log_fd, 0o600)   # also when an older log of that name was 0644
        self._run_task()

    def _run_task(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._guarded(self._body()),
                                                            name=f"session:{self.name}")

    async def _body(self) -> None:
        """Run the command until it ends (the subclass's)."""
        raise NotImplementedError

    def _letting_go(self) -> bool:
        """True once the daemon let go of the session (a detached one, as the daemon stops):
        its end is not recorded."""
        return False

    async def _guarded(self, body: Awaitable[None]) -> None:
        """Run a session's body and record how it ended (unless the daemon let go of it)."""
        try:
            await body
        except asyncio.CancelledError:
            if self._letting_go():
                return    # the daemon stops; the command runs on, the sessions file says so
            if self.state not in SESSION_ENDED:
                self._to(SessionEvent.KILLED if self._kill_requested else SessionEvent.LOST)
            raise
        except (ConnectError, asyncssh.Error, OSError) as exc:
            self.error = str(exc)
            self._to(SessionEvent.FAILED)
            log.warning("%s: session %s failed: %s", self.host.name, self.name, exc)
        finally:
            if not self._letting_go():
                self._finish()

    def _finish(self) -> None:
        if self.done.is_set():
            return
        self._ended_output()
        if self.state not in SESSION_ENDED:
            self._to(SessionEvent.LOST)   # the body returned without saying how it ended
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

    def _ended_output(self) -> None:
        """The output has ended: act on what the scanners still hold (the subclass's)."""

    def _ended_with(self, status: int | None, signal: str | None = None,
                    lost: str | None = None) -> None:
        """The command ended: with ``status`` (or ``signal``), or without one (``lost``
        says why)."""
        self.exit_status, self.exit_signal = status, signal
        if self._kill_requested:
            self._to(SessionEvent.KILLED)
        elif status is None and signal is None:
            self.error = lost
            self._to(SessionEvent.LOST)
        else:
            self._to(SessionEvent.EXITED)

    # -- output and markers ------------------------------------------------------------------

    def _output(self, data: bytes) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, data)
        for q in list(self._followers):
            if not _offer(q, data):
                self._followers.discard(q)

    def _open(self, ev: BrowserOpen | PrintedUrl) -> None:
        """Act on a marker or a printed URL in the background: the readiness wait must not
        stall output."""
        if isinstance(ev, BrowserOpen):
            self.opens += 1
        self.background(self._open_one(ev))

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` for this session; the reaper waits for it (``settle``) before the
        session's forwards go."""
        task = asyncio.get_running_loop().create_task(coro)
        self._open_tasks.add(task)
        task.add_done_callback(self._open_tasks.discard)

    async def _open_one(self, ev: BrowserOpen | PrintedUrl) -> None:
        try:
            await self.on_open(self, ev)
        except Exception as exc:  # noqa: BLE001 - a bad marker must not end the session
            log.warning("%s: session %s: could not act on %s: %s", self.host.name,
                        self.name, "a marker" if isinstance(ev, BrowserOpen) else "a URL", exc)

    # -- kill --------------------------------------------------------------------------------

    async def kill(self) -> str:
        """Stop the remote process and all its children (TERM, then KILL after a grace)."""
        if not self.running:
            return f"session {self.name} has already ended ({self.state})"
        self._kill_requested = True
        return await self._kill()

    async def _kill(self) -> str:
        raise NotImplementedError

    def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- waiting -----------------------------------------------------------------------------

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
        elif self.state is SessionState.EXITED and check == 0:
            return None   # it started (the caller follows its output and end)
        if self.state is SessionState.EXITED and self.exit_status == 0:
            return None
        if self.state is SessionState.EXITED:
            why = f"it exited at once with status {self.exit_status}"
        elif self.state is SessionState.KILLED:
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
        """Wait (bounded) for marker actions still under way after the output ended."""
        waits = set(self._open_tasks)
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
            "words": self.words,
            "state": self.state.value, "exit_status": self.exit_status,
            "exit_signal": self.exit_signal, "error": self.error, "pid": self.pid,
            "port": self.port, "sock": self.sock, "opens": self.opens,
            "urls": [dict(u) for u in self.urls],
            "started": iso_time(self.started),
            "ended": iso_time(self.ended) if self.ended else None,
            "log": str(self.log_path), "detached": self.detached,
            "remote_dir": self.remote_dir, "server": self.server,
            "job": None,   # a batch job's (``session_job``)
        }


class AttachedSession(Session):
    """``run --no-detach``: the command runs in the SSH channel and ends with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None

    async def _body(self) -> None:
        conn = await self.host.connection_for_client()
        text = remote.session_command(self.shell_text(), self.env)
        self._proc = proc = await sshrun.start(conn, text)
        self._to(SessionEvent.STARTED)
        log.info("%s: session %s started: %s", self.host.name, self.name, self.command)
        await asyncio.gather(self._pump(proc.stdout, first=True), self._pump(proc.stderr))
        await proc.wait(check=False)
        self._ended_with(proc.exit_status, (proc.exit_signal or (None,))[0],
                         "the connection to the server was lost")

    async def _pump(self, stream: asyncssh.SSHReader[bytes], first: bool = False) -> None:
        scanner = Scanner(urls=True)
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

    async def _kill(self) -> str:
        conn = self.host.live_connection()
        if self.pid is None or conn is None:
            # not started on the server (yet): closing the channel is all we can do
            if self._proc is not None:
                self._proc.close()
            else:
                self._stop_task()
            return f"session {self.name} stopped before it ran"
        try:
            result = await sshrun.run(conn, remote.kill_tree_command(self.pid), KILL_TIMEOUT)
            said = str(result.stdout or "").strip()
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            said = f"kill command failed: {exc}"
        log.info("%s: session %s: kill: %s", self.host.name, self.name,
                 said.replace("\n", "; "))
        if self._proc is not None:
            self._proc.close()
        try:
            await asyncio.wait_for(self.done.wait(), 10)
        except asyncio.TimeoutError:
            self._stop_task()
        return said


def _offer(q: asyncio.Queue[bytes | None], item: bytes | None) -> bool:
    try:
        q.put_nowait(item)
        return True
    except asyncio.QueueFull:
        return False


def default_name(words: list[str], taken: set[str]) -> str:
    """``jupyter lab --no-browser`` → ``jupyter-1`` (the first free number); one word is a
    shell line: its first word counts (``'cd ~/p && jupyter lab'`` → ``cd-1``)."""
    first = (words[0].split() or [""])[0] if len(words) == 1 else (words[0] if words else "")
    base = os.path.basename(first) if first else "session"
    base = re.sub(r"[^A-Za-z0-9_.-]", "", base)[:40] or "session"
    if not base[0].isalnum():
        base = "s" + base
    n = 1
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"
