"""One supervisor per host: its SSH connection, its forwards, its state and backoff.

The supervisor task runs while the host has forwards.  It connects, waits for the connection
to end, and reconnects with backoff; states and transitions come from ``state.py``.  Clients
of a forward ask ``connection_for_client()`` for the live connection; while the host is down
they are held for ``hold_timeout`` seconds and their arrival cuts the backoff wait short.

Logins that need a person are answered by the *prompter* attached to the host (``prompting``;
see ``login.py``).  With none attached the attempt fails with ``LoginNeeded``, the host goes to
needs-auth without a retry, and a desktop notification says `tunnelctl login HOST`.  The
connection itself is opened by ``sshconnect.connect``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

import asyncssh

from . import fastpath
from .config import Defaults
from .errors import AuthError, ConfigError, ConnectError, HostKeyError, LoginNeeded
from .events import EventHub
from .login import LoginClient, Prompter, Prompting
from .notify import notify
from .spec import ForwardSpec
from .sshconnect import connect
from .state import (
    Backoff,
    ForwardState,
    HostEvent,
    HostState,
    Repeats,
    host_next,
    is_connected,
    state_phrase,
)
from .wire import iso_time

log = logging.getLogger("tunneld")

#: after a wake, keepalives this often (s) and this many unanswered declare the link dead...
LIVENESS_INTERVAL = 2.0
LIVENESS_COUNT_MAX = 2
#: ... for this long (s), then the configured keepalive settings return
LIVENESS_WINDOW = 15.0


class HostForward(Protocol):
    """What the host calls on its forwards (``forward.LocalForward``, ``RemoteForward``)."""

    spec: ForwardSpec
    origin: str
    state: ForwardState
    conns: set[Any]
    last_error: str | None

    def follow_host(self) -> None: ...

    async def close(self, abort_clients: bool = True) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


class HostSupervisor(Prompting):
    def __init__(self, name: str, settings: Defaults,
                 on_change: Callable[["HostSupervisor"], None] | None = None,
                 events: EventHub | None = None):
        self.name = name
        #: defaults for the next connection and the next held client (a reload replaces it)
        self.settings = settings
        self.on_change = on_change
        #: where transitions of this host and of its forwards are published (None: nowhere)
        self.events = events
        self.state = HostState.STOPPED
        #: wall-clock time of the last transition (shown as "since")
        self.since = time.time()
        #: why the host is not connected (None while connected and after a clean start)
        self.last_error: str | None = None
        #: why the host is down, without the retry delay ``last_error`` adds (None while
        #: connected)
        self.failure: str | None = None
        self.backoff = Backoff()
        #: the live connection; non-None iff state is CONNECTED
        self.conn: asyncssh.SSHClientConnection | None = None
        #: jump-host connections under ``conn``, closed with it
        self._hops: list[asyncssh.SSHClientConnection] = []
        self.forwards: dict[ForwardSpec, HostForward] = {}
        #: set and replaced on every transition; waiters wake on any change
        self._changed = asyncio.Event()
        #: set to make the backoff wait look again (a client was held, or an attempt was
        #: asked for); cleared by that wait
        self._poke = asyncio.Event()
        #: True iff an attempt was asked for now (`reconnect`, a wake): the next one starts at
        #: once, without advancing the schedule
        self._asked = False
        #: set by `reconnect` to retry from needs-auth / failed too
        self._retry = asyncio.Event()
        #: clients waiting in connection_for_client() right now
        self._held = 0
        #: monotonic time the last connection attempt ended (success or failure)
        self._last_end = 0.0
        #: monotonic time of the next scheduled attempt while in backoff
        self._due = 0.0
        #: the run of identical failed attempts, logged once with a count (``state.Repeats``)
        self._repeats = Repeats()
        #: (interval, count_max) of keepalives on the live connection
        self._keepalive: tuple[float, int] = (settings.keepalive_interval,
                                              settings.keepalive_count_max)
        #: number of connection attempts finished (success or failure)
        self.attempts = 0
        #: set once by stop(); the loop ends at its next step
        self._stopping = False
        #: the supervisor loop; None iff not running
        self._task: asyncio.Task[None] | None = None
        Prompting.__init__(self)

    # -- state -------------------------------------------------------------------------------

    def _set(self, event: HostEvent, why: str | None = None, key: str | None = None) -> None:
        """Make the transition ``event`` (``state.HOST_TABLE``); ``why`` says why (shown and
        logged).  ``key``: a failed attempt's error without the retry delay; a run of
        attempts failing with the same ``key`` is logged once, then as a count."""
        if self._stopping and event is not HostEvent.STOP:
            return  # after stop() the only transition left is to STOPPED
        old = self.state
        self.state = new = host_next(old, event)
        self.since = time.time()
        if new is HostState.CONNECTED:
            self.last_error = None
        elif why:
            self.last_error = why
        self._log_transition(old, new, why, key)
        before = [(fwd, fwd.state) for fwd in self.forwards.values()]
        for fwd in self.forwards.values():
            fwd.follow_host()
        if self.events is not None:
            self.events.publish("host", host=self.name, old=old.value, new=new.value,
                                error=why)
            for fwd, was in before:
                if fwd.state is not was:
                    self.events.publish("forward", host=self.name, spec=str(fwd.spec),
                                        event="state", origin=fwd.origin, old=was.value,
                                        new=fwd.state.value)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self.on_change:
            self.on_change(self)

    def _log_transition(self, old: HostState, new: HostState, why: str | None,
                        key: str | None) -> None:
        """One line per transition, except inside a run of identical failed attempts: its
        retries (backoff -> connecting) and repeated failures are counted, and the count is
        logged when the run ends or every ``Repeats.every`` seconds."""
        now = time.monotonic()
        if new is HostState.CONNECTING and old is HostState.BACKOFF and \
                self._repeats.key is not None:
            return  # a retry inside a run of failures: its outcome tells
        if new is HostState.BACKOFF and old is HostState.CONNECTING and key is not None:
            show, summary = self._repeats.note(key, now)
        else:
            show, summary = True, self._repeats.end(now)
        if summary is not None:
            log.warning("%s: %s", self.name, summary.text("attempts"))
        if not show:
            return
        suffix = f" ({why})" if why else ""
        level = logging.INFO if new in (HostState.CONNECTING, HostState.CONNECTED,
                                        HostState.STOPPED) else logging.WARNING
        log.log(level, "%s: %s -> %s%s", self.name, old, new, suffix)

    async def wait_change(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name=f"host:{self.name}")

    async def stop(self) -> None:
        """Close every forward and the connection; state becomes STOPPED."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # cancellation can be swallowed by wait_for races in Python 3.11; the loop also
            # checks _stopping, and we never wait for it unboundedly
            self._retry.set()
            self._poke.set()
            await asyncio.wait({task}, timeout=5)
        self.cut_clients()
        await self._close_conn()
        for fwd in list(self.forwards.values()):
            await fwd.close()
        if self.state is not HostState.STOPPED:
            self._set(HostEvent.STOP)

    def reconnect(self) -> None:
        """Drop the connection (if any) and try again now, whatever the state."""
        self._retry.set()
        self._ask_now()
        if self.conn is not None:
            self.cut_clients()
            self.conn.close()

    def _ask_now(self) -> None:
        """An attempt now (early: the schedule does not advance)."""
        self._asked = True
        self._poke.set()

    def cut_clients(self) -> None:
        """Reset every client whose channel rides the live connection, before tunneld closes
        it on purpose: a cut transfer must look cut (RST), not complete (FIN)."""
        for fwd in self.forwards.values():
            for side in list(fwd.conns):
                if side.channel is not None:
                    side.abort()

    def check_liveness(self) -> None:
        """Find out soon whether the link survived (after a sleep or a network change):
        a connected host gets quick keepalives for a while; a host in backoff retries now."""
        conn = self.conn
        if conn is not None and is_connected(self.state):
            conn.set_keepalive(LIVENESS_INTERVAL, LIVENESS_COUNT_MAX)
            loop = asyncio.get_running_loop()
            loop.call_later(LIVENESS_WINDOW, self._restore_keepalive, conn)
        elif self.state is HostState.BACKOFF:
            self._ask_now()

    def _restore_keepalive(self, conn: asyncssh.SSHClientConnection) -> None:
        if conn is self.conn and not conn.is_closed():
            conn.set_keepalive(*self._keepalive)

    async def wait_attempt(self, timeout: float) -> None:
        """Wait until the next connection attempt has finished (bounded; time spent waiting
        for a person's answer does not count)."""
        start = self.attempts
        deadline = self._machine_clock() + timeout
        while self.attempts == start:
            left = deadline - self._machine_clock()
            if left <= 0:
                return
            await self.wait_change(left)

    async def next_attempt(self, ask: Prompter | None, timeout: float,
                           retry: bool = False) -> None:
        """Wait (at most ``timeout`` s, not counting a person's answers) for this host's next
        connection attempt, ``ask`` (if any) answering its login prompts.  ``retry``: start it
        now, whatever the state.  Otherwise a host in needs-auth is tried again only when
        someone can answer, and a host that is connected, or waits for a person (needs-auth,
        failed), has no attempt coming: no wait."""
        with self.prompting(ask):
            if retry or (ask is not None and self.state is HostState.NEEDS_AUTH):
                self.reconnect()
            elif self.state in (HostState.CONNECTED, HostState.NEEDS_AUTH, HostState.FAILED):
                return
            self._held += 1   # someone waits for it: an early attempt, as for a held client
            self._poke.set()
            try:
                await self.wait_attempt(timeout)
            finally:
                self._held -= 1

    async def _run(self) -> None:
        while not self._stopping:
            self._set(HostEvent.ATTEMPT)
            self._asked = False
            self._retry.clear()
            try:
                client = await self._connect()
            except (AuthError, HostKeyError, ConfigError) as exc:
                self._attempted()
                self._set(HostEvent.FATAL if not isinstance(exc, AuthError)
                          else HostEvent.NEEDS_PERSON, str(exc))
                if isinstance(exc, LoginNeeded):
                    notify("tunneld", str(exc))
                await self._retry.wait()
                continue
            except ConnectError as exc:
                self.failure = str(exc)
                now = self._attempted()
                if now >= self._due:   # a scheduled attempt: the schedule moves on
                    self._due = now + self.backoff.next_delay()
                self._set(HostEvent.RETRY, f"{exc}; retrying in {self._due - now:.1f}s",
                          key=str(exc))
                await self._wait_retry()
                continue
            up = self._attempted()
            self.failure = None
            self._set(HostEvent.UP)
            lost = await client.lost
            await self._close_conn()
            if self._stopping:
                return
            now = time.monotonic()
            if now - up >= self.backoff.stable_after:
                self.backoff.reset()
            if self._retry.is_set():
                why = "reconnect requested"
                self._due = now
            else:
                why = f"connection lost: {_describe(lost)}" if lost else "connection closed"
                self._due = now + self.backoff.next_delay()
            self.failure = why
            self._set(HostEvent.LOST, f"{why}; retrying in {self._due - now:.1f}s")
            await self._wait_retry()

    def _attempted(self) -> float:
        """Count a finished attempt; returns the time it ended."""
        self.attempts += 1
        self._last_end = now = time.monotonic()
        return now

    async def _wait_retry(self) -> None:
        """Wait in backoff until the next attempt is due: the scheduled one at ``_due``, an
        early one ``held_interval`` after the last while a client is held (one attempt for
        all of them), or at once when one was asked for."""
        while not self._stopping:
            self._poke.clear()
            start = self.backoff.next_attempt_at(self._due, self._last_end, self._held > 0,
                                                 self._asked)
            left = start - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._poke.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _close_conn(self) -> None:
        conns = ([self.conn] if self.conn else []) + self._hops[::-1]
        self.conn, self._hops = None, []
        for c in conns:
            c.close()
        for c in conns:
            try:
                await asyncio.wait_for(c.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                pass

    # -- clients -----------------------------------------------------------------------------

    def why(self) -> str:
        """``last_error`` without the host's name in front (to follow "NAME …: ")."""
        text = self.last_error or ""
        return text[len(self.name) + 2:] if text.startswith(f"{self.name}: ") else text

    def live_connection(self) -> asyncssh.SSHClientConnection | None:
        """The connection, if the host is connected now (the one way to ask)."""
        conn = self.conn
        if is_connected(self.state) and conn is not None and not conn.is_closed():
            return conn
        return None

    async def connection_for_client(self) -> asyncssh.SSHClientConnection:
        """The live connection for a new client.  While the host is down the client is held
        (at most ``hold_timeout`` s); while any client is held the host is tried again every
        ``Backoff.held_interval`` s (one attempt for all of them).  Raises ConnectError."""
        conn = self.live_connection()
        if conn is not None:
            return conn
        deadline = time.monotonic() + self.settings.hold_timeout
        self._held += 1
        self._poke.set()
        try:
            while True:
                conn = self.live_connection()
                if conn is not None:
                    return conn
                if self.state in (HostState.NEEDS_AUTH, HostState.FAILED) or (
                        self.state is HostState.STOPPED and
                        (self._task is None or self._stopping)):
                    why = f": {self.why()}" if self.last_error else ""
                    raise ConnectError(f"{self.name} {state_phrase(self.state)}{why}")
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f" ({self.failure})" if self.failure else ""
                    raise ConnectError(f"{self.name} was still not connected after holding "
                                       f"the client {self.settings.hold_timeout:g}s{why}")
                await self.wait_change(left)
        finally:
            self._held -= 1

    # -- connecting --------------------------------------------------------------------------

    async def _connect(self) -> LoginClient:
        """One connection attempt, bounded by ``connect_timeout`` of the machine's time (the
        time a person takes to answer a prompt is bounded by the prompter)."""
        task = asyncio.ensure_future(connect(self, self.settings))
        deadline = self._machine_clock() + self.settings.connect_timeout
        try:
            while not task.done():
                left = deadline - self._machine_clock()
                if left <= 0:
                    raise ConnectError(f"{self.name}: no answer within "
                                       f"{self.settings.connect_timeout:g}s (timed out)")
                await asyncio.wait({task}, timeout=left)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        done = task.result()
        self.conn, self._hops, self._keepalive = done.conn, done.hops, done.keepalive
        return done.client

    # -- reporting ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state.value,
            "since": iso_time(self.since),
            "last_error": self.last_error,
            "attempts": self.attempts,
            "cipher": self.conn.get_extra_info("send_cipher") if self.conn else None,
            "rtt_ms": fastpath.rtt_ms(self.conn),
            "forwards": [f.snapshot() for f in sorted(self.forwards.values(),
                                                      key=lambda f: f.spec)],
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


