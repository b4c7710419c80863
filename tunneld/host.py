"""One supervisor per host: its SSH connection, its forwards, its state and backoff.

The supervisor task runs while the host has forwards.  It connects, waits for the connection
to end, and reconnects with backoff; states and transitions come from ``state.py``.  Clients
of a forward ask ``connection_for_client()`` for the live connection; while the host is down
they are held for ``hold_timeout`` seconds and their arrival cuts the backoff wait short.

Logins that need a person (a password, the server's keyboard-interactive prompts such as a
verification code, a key passphrase) are answered by a *prompter*: the ``ask`` coroutine of a
tunnelctl client with a terminal that waits for this host's connection attempt.  With none
attached nothing is asked (asyncssh does not even send those methods, so the server counts no
failed try), the attempt fails with ``LoginNeeded``, the host goes to needs-auth without a retry,
and a desktop notification says `tunnelctl login HOST`.  Answers live only in the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import asyncssh

from .config import Defaults
from .errors import (AuthError, ConfigError, ConnectError, HostKeyError, LoginAbandoned,
                     LoginNeeded, TunneldError)
from .events import EventHub
from .forward import LocalForward
from .spec import ForwardSpec
from .state import Backoff, HostState, Repeats, check_host, state_phrase

log = logging.getLogger("tunneld")

#: ciphers tried first unless the user's ~/.ssh/config sets ``Ciphers``: AES-GCM is markedly
#: faster than chacha20-poly1305 in asyncssh on CPUs with AES instructions (design.md §9)
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
#: longest ProxyJump chain followed
MAX_JUMPS = 8
#: after a wake, keepalives this often (s) and this many unanswered declare the link dead...
LIVENESS_INTERVAL = 2.0
LIVENESS_COUNT_MAX = 2
#: ... for this long (s), then the configured keepalive settings return
LIVENESS_WINDOW = 15.0
#: a limit: a person's tries (password and keyboard-interactive together) in one connection
#: attempt, as OpenSSH's NumberOfPasswordPrompts; the server may allow fewer.  Wrong answers
#: lock accounts at many sites: tunneld never retries them on its own
MAX_ANSWER_TRIES = 3
#: a limit: passphrase tries per encrypted key in one connection attempt
MAX_PASSPHRASE_TRIES = 3
#: key files OpenSSH (and asyncssh) use when ~/.ssh/config names no IdentityFile
DEFAULT_KEY_FILES = ("id_ed25519_sk", "id_ecdsa_sk", "id_ed448", "id_ed25519", "id_ecdsa",
                     "id_rsa", "id_dsa")
#: seconds a desktop notification command may run before it is killed
NOTIFY_TIMEOUT = 10.0

#: asks the person at a waiting tunnelctl: a prompt (wire.prompt's fields without the id) →
#: one response per prompt; raises LoginAbandoned when nobody answers
Prompter = Callable[[dict[str, Any]], Awaitable[list[str]]]


class _Client(asyncssh.SSHClient):
    """Records why the connection ended, and the host key a server offered that known_hosts
    does not trust (for the error message; it is never accepted).  Answers the server's
    password / keyboard-interactive questions and unlocks encrypted keys through the
    supervisor's prompter, if one is attached; records what was needed when none is."""

    def __init__(self, sup: "HostSupervisor | None" = None, target: str = "",
                 who: str = "", key_files: list[str] | None = None) -> None:
        self.lost: asyncio.Future[Exception | None] = \
            asyncio.get_running_loop().create_future()
        #: "ssh-ed25519 SHA256:…" of an untrusted host key the server offered, if any
        self.offered_key: str | None = None
        self._sup = sup
        #: the alias or hop this login is for (shown with the prompts), and "user@host"
        self._target, self._who = target, who
        #: what the server wanted that nobody could answer: "password", "kbdint", "passphrase"
        self.needed: list[str] = []
        #: encrypted keys that stayed locked because nobody could give their passphrase
        self.locked_keys: list[str] = []
        #: the key whose passphrase was wrong every time, if any
        self.wrong_passphrase: str | None = None
        #: encrypted keys in OpenSSH's format while the bcrypt module is missing (no unlocking)
        self.unusable_keys: list[str] = []
        #: True once a person's password / kbdint answers were sent to the server
        self.answered = False
        #: why the person's login was abandoned, if it was; nothing is asked after that
        self.abandoned: str | None = None
        #: password / kbdint tries in this attempt (bounded by MAX_ANSWER_TRIES)
        self._tries = 0
        #: IdentityFile paths; the encrypted ones are offered by public_key_auth_requested
        self._key_files = list(key_files or [])

    # -- answers from a person (asyncssh calls these during authentication) -------------------

    def _prompter(self, kind: str) -> Prompter | None:
        """The prompter to ask for ``kind``, or None (noting that ``kind`` was needed)."""
        if self.abandoned is not None:
            return None
        ask = self._sup.prompter if self._sup is not None else None
        if ask is None and kind not in self.needed:
            self.needed.append(kind)
        return ask

    async def _ask(self, ask: Prompter, kind: str, prompts: list[tuple[str, bool]],
                   attempt: int, name: str = "", instructions: str = "") -> list[str] | None:
        assert self._sup is not None
        try:
            with self._sup.asking():
                responses = await ask({"host": self._target, "kind": kind, "name": name,
                                       "instructions": instructions, "attempt": attempt,
                                       "prompts": prompts})
        except LoginAbandoned as exc:
            self.abandoned = str(exc)
            return None
        return responses if len(responses) == len(prompts) else None

    def _next_try(self) -> int | None:
        self._tries += 1
        return self._tries if self._tries <= MAX_ANSWER_TRIES else None

    def kbdint_auth_requested(self) -> str | None:
        if self._prompter("kbdint") is None or self._next_try() is None:
            return None   # asyncssh moves on without sending the method
        return ""         # let the server choose its submethods

    async def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                        prompts: list[tuple[str, bool]]) -> list[str] | None:
        ask = self._prompter("kbdint")
        if ask is None:
            return None
        if not prompts and not name and not instructions:
            return []
        answers = await self._ask(ask, "kbdint", list(prompts), max(self._tries, 1), name,
                                  instructions)
        if answers is not None and prompts:
            self.answered = True
        return answers

    async def password_auth_requested(self) -> str | None:  # type: ignore[override]
        ask = self._prompter("password")
        n = self._next_try() if ask is not None else None
        if ask is None or n is None:
            return None
        answers = await self._ask(ask, "password", [(f"{self._who}'s password: ", False)], n)
        if not answers:
            return None
        self.answered = True
        return answers[0]

    async def public_key_auth_requested(  # type: ignore[override]
            self) -> list[asyncssh.SSHKey] | None:
        """After the agent's keys and the unencrypted IdentityFile keys: the encrypted ones,
        unlocked this daemon run, or unlocked now with a passphrase from the prompter."""
        while self._key_files:
            path = self._key_files.pop(0)
            found = _encrypted_key(path)
            if found is None:
                continue
            ident, data = found
            key = HostSupervisor.unlocked_keys.get(ident)
            if key is not None:
                return [key]
            if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY") and not _bcrypt():
                self.unusable_keys.append(path)
                continue
            ask = self._prompter("passphrase")
            if ask is None:
                self.locked_keys.append(path)
                continue
            shown = _home_path(path)
            for n in range(1, MAX_PASSPHRASE_TRIES + 1):
                answers = await self._ask(
                    ask, "passphrase", [(f"Enter passphrase for key '{shown}': ", False)], n)
                if answers is None:
                    return None
                try:   # the KDF takes a moment of CPU: not on the event loop
                    key = await asyncio.get_running_loop().run_in_executor(
                        None, asyncssh.import_private_key, data, answers[0])
                except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError):
                    continue
                finally:
                    answers = None
                HostSupervisor.unlocked_keys[ident] = key
                log.info("%s: unlocked key %s (held in memory until the daemon stops)",
                         self._sup.name if self._sup else self._target, shown)
                return [key]
            self.wrong_passphrase = shown
        return None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.offered_key = f"{key.get_algorithm()} {key.get_fingerprint()}"
        return False   # known_hosts alone decides; there is no trust on first use

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class HostSupervisor:
    #: private keys unlocked with a passphrase, by (path, mtime, size): shared by every host of
    #: this daemon run, held in memory only (never written anywhere), gone when it stops
    unlocked_keys: dict[tuple[str, int, int], asyncssh.SSHKey] = {}

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
        self.forwards: dict[ForwardSpec, LocalForward] = {}
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
        #: who can answer login prompts now: the ask coroutines of tunnelctl clients waiting
        #: for this host with a terminal, the last attached asked (empty: nobody is asked)
        self._prompters: list[Prompter] = []
        #: monotonic seconds spent waiting for people's answers (connect timeouts skip them)
        self._person_secs = 0.0
        #: monotonic time the pending question was asked; None while nobody is asked
        self._asking_since: float | None = None

    # -- state -------------------------------------------------------------------------------

    def _set(self, new: HostState, why: str | None = None, key: str | None = None) -> None:
        """Make the transition to ``new``; ``why`` says why (shown and logged).  ``key``: a
        failed attempt's error without the retry delay; a run of attempts failing with the
        same ``key`` is logged once, then as a count (``state.Repeats``)."""
        if self._stopping and new is not HostState.STOPPED:
            return  # after stop() the only transition left is to STOPPED
        old = self.state
        self.state = check_host(old, new)
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
            self._set(HostState.STOPPED)

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
        if conn is not None and self.state is HostState.CONNECTED:
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

    # -- login prompts -----------------------------------------------------------------------

    @property
    def prompter(self) -> Prompter | None:
        return self._prompters[-1] if self._prompters else None

    @contextlib.contextmanager
    def prompting(self, ask: Prompter | None) -> Iterator[None]:
        """Let ``ask`` answer this host's login prompts while the block runs (attach it
        before the attempt it should answer starts).  ``None``: a no-op."""
        if ask is None:
            yield
            return
        self._prompters.append(ask)
        try:
            yield
        finally:
            self._prompters.remove(ask)

    @contextlib.contextmanager
    def asking(self) -> Iterator[None]:
        """A person is being asked while the block runs: the connect timeout's clock stops."""
        self._asking_since = start = time.monotonic()
        try:
            yield
        finally:
            self._person_secs += time.monotonic() - start
            self._asking_since = None

    def _machine_clock(self) -> float:
        """Monotonic seconds, less the time spent waiting for people's answers."""
        now = time.monotonic()
        asking = now - self._asking_since if self._asking_since is not None else 0.0
        return now - self._person_secs - asking

    async def _run(self) -> None:
        while not self._stopping:
            self._set(HostState.CONNECTING)
            self._asked = False
            self._retry.clear()
            try:
                client = await self._connect()
            except (AuthError, HostKeyError, ConfigError) as exc:
                self._attempted()
                self._set(HostState.FAILED if not isinstance(exc, AuthError)
                          else HostState.NEEDS_AUTH, str(exc))
                if isinstance(exc, LoginNeeded):
                    notify("tunneld", str(exc))
                await self._retry.wait()
                continue
            except ConnectError as exc:
                self.failure = str(exc)
                now = self._attempted()
                if now >= self._due:   # a scheduled attempt: the schedule moves on
                    self._due = now + self.backoff.next_delay()
                self._set(HostState.BACKOFF, f"{exc}; retrying in {self._due - now:.1f}s",
                          key=str(exc))
                await self._wait_retry()
                continue
            up = self._attempted()
            self.failure = None
            self._set(HostState.CONNECTED)
            exc = await client.lost
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
                why = f"connection lost: {_describe(exc)}" if exc else "connection closed"
                self._due = now + self.backoff.next_delay()
            self.failure = why
            self._set(HostState.BACKOFF, f"{why}; retrying in {self._due - now:.1f}s")
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
        """The connection, if the host is connected now."""
        return self.conn if self.state is HostState.CONNECTED else None

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

    async def _connect(self) -> _Client:
        """One connection attempt, bounded by ``connect_timeout`` of the machine's time (the
        time a person takes to answer a prompt is bounded by the prompter)."""
        task = asyncio.ensure_future(self._open(self.name, None, 0))
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
        conn, client, hops = task.result()
        self.conn, self._hops = conn, hops
        return client

    async def _open(self, target: str, tunnel: asyncssh.SSHClientConnection | None,
                    depth: int) -> tuple[asyncssh.SSHClientConnection, _Client,
                                         list[asyncssh.SSHClientConnection]]:
        """Connect to ``target`` (an alias or ``[user@]host[:port]``), following its
        ProxyJump hops ourselves so that our options apply to every hop (design.md §9)."""
        user, host, port = _split_target(target)
        try:
            # config=() loads ~/.ssh/config (the default, None, loads nothing)
            options = asyncssh.SSHClientConnectionOptions(
                config=(), host=host, port=port if port else (), username=user or ())
        except (ValueError, asyncssh.Error) as exc:
            raise ConfigError(f"{self.name}: bad ssh configuration for {host}: {exc}") from None
        cfg = options.config
        hops: list[asyncssh.SSHClientConnection] = []
        jump = options.tunnel if tunnel is None else None
        if isinstance(jump, str) and jump.lower() != "none":
            if depth >= MAX_JUMPS:
                raise ConfigError(f"{self.name}: ProxyJump chain longer than {MAX_JUMPS} hops")
            for hop in jump.split(","):
                hop_conn, _, hop_hops = await self._open(hop.strip(), tunnel, depth + 1)
                hops.extend(hop_hops)
                hops.append(hop_conn)
                tunnel = hop_conn
        kwargs: dict[str, Any] = {}
        if cfg.get("Ciphers") is None:
            kwargs["encryption_algs"] = _available(PREFERRED_CIPHERS)
        # the user's ServerAlive* settings win over ours
        kwargs["keepalive_interval"] = cfg.get("ServerAliveInterval",
                                               self.settings.keepalive_interval)
        kwargs["keepalive_count_max"] = cfg.get("ServerAliveCountMax",
                                                self.settings.keepalive_count_max)
        if depth == 0:
            self._keepalive = (kwargs["keepalive_interval"], kwargs["keepalive_count_max"])
        client_box: list[_Client] = []
        who = f"{options.username}@{options.host}"
        keys = _identity_files(cfg)

        def factory() -> _Client:
            client_box.append(_Client(self, target, who, keys))
            return client_box[-1]

        try:
            conn = await asyncssh.connect(
                host, port=port if port else (), username=user or (),
                tunnel=tunnel if tunnel is not None else (), client_factory=factory,
                request_pty=False, x11_forwarding=False, agent_forwarding=False,
                # our own deadline bounds the attempt, less the time a person takes to answer
                login_timeout=0, **kwargs)
        except BaseException as exc:
            for h in reversed(hops):
                h.close()
            if isinstance(exc, Exception):
                client = client_box[-1] if client_box else None
                raise self._map_error(exc, options, target,
                                      client.offered_key if client else None, client) from None
            raise
        return conn, client_box[-1], hops

    def _map_error(self, exc: Exception, options: Any, target: str,
                   offered: str | None = None, client: _Client | None = None) -> TunneldError:
        """Foreign error → a TunneldError whose message a user can act on.  ``offered``: the
        untrusted host key the server showed ("ssh-ed25519 SHA256:…"), if any; ``client``:
        what the login needed and got."""
        via = "" if target == self.name else f" (via {target})"
        addr = f"{options.host}:{options.port}"
        name = f"{self.name}{via}"
        if isinstance(exc, TunneldError):
            return exc
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            files = _known_hosts_files(options)
            known = _has_known_key(files, options.host, options.port)
            entry = options.host if options.port == 22 else f"[{options.host}]:{options.port}"
            shown = ", ".join(str(f) for f in files) or "~/.ssh/known_hosts"
            now = f"; the server offers {offered}" if offered else ""
            # the fingerprint without trusting anything (not through a jump host: use ssh)
            scan = "" if via else (
                f" (`ssh-keyscan {'' if options.port == 22 else f'-p {options.port} '}"
                f"{options.host} | ssh-keygen -lf -` shows it too)")
            if known is not None:
                return HostKeyError(
                    f"{name}: the host key of {addr} does NOT match the one in {known} "
                    f"(it changed, or someone is intercepting the connection){now}. "
                    f"`ssh-keygen -lF '{entry}' -f {known}` shows the key on record. Check the "
                    f"new fingerprint with the server's admin{scan}, then run "
                    f"`ssh-keygen -R '{entry}' -f {known}` and `ssh {target}` to accept it; "
                    f"then `tunnelctl reconnect {self.name}`")
            return HostKeyError(
                f"{name}: the host key of {addr} is unknown (not in {shown}){now}. Check "
                f"that fingerprint with the server's admin{scan}, then run `ssh {target}` "
                f"once to accept it, then `tunnelctl reconnect {self.name}`")
        if isinstance(exc, asyncssh.PermissionDenied) and client is not None:
            login = self._login_error(client, name, addr, exc.reason or "permission denied")
            if login is not None:
                return login
        if isinstance(exc, asyncssh.PermissionDenied):
            return AuthError(
                f"{name}: authentication failed at {addr} ({exc.reason or 'permission denied'})"
                f". Check that `ssh {target}` logs in without a prompt (key in "
                f"~/.ssh/config IdentityFile or loaded with ssh-add), then "
                f"`tunnelctl reconnect {self.name}`")
        if isinstance(exc, asyncssh.DisconnectError):
            return ConnectError(f"{name}: the server at {addr} closed the connection: "
                                f"{exc.reason or exc}")
        if isinstance(exc, asyncssh.Error):
            return ConnectError(f"{name}: SSH error from {addr}: {exc}")
        import socket as _socket
        if isinstance(exc, _socket.gaierror):
            return ConnectError(f"{name}: cannot resolve host name {options.host!r} "
                                f"({exc.strerror}); check the Host/HostName in ~/.ssh/config "
                                "or your network/VPN")
        if isinstance(exc, ConnectionRefusedError):
            return ConnectError(f"{name}: connection refused by {addr}; is sshd running there "
                                "and is the Port right?")
        if isinstance(exc, OSError):
            return ConnectError(f"{name}: cannot connect to {addr}: {exc.strerror or exc}")
        if isinstance(exc, ValueError):
            return ConfigError(f"{name}: bad ssh configuration: {exc}")
        return ConnectError(f"{name}: {type(exc).__name__}: {exc}")

    def _login_error(self, client: _Client, name: str, addr: str,
                     reason: str) -> AuthError | None:
        """The error for a refused login that involved (or needed) a person; None if it did
        not.  Never contains an answer."""
        again = f"run `tunnelctl login {self.name}` to try again"
        if client.abandoned is not None:
            return LoginAbandoned(f"{name}: login abandoned ({client.abandoned}); {again}")
        if client.answered:
            return AuthError(f"{name}: the server at {addr} rejected the answers ({reason}); "
                             f"{again}")
        if client.wrong_passphrase:
            return AuthError(f"{name}: wrong passphrase for key '{client.wrong_passphrase}' "
                             f"({MAX_PASSPHRASE_TRIES} tries); {again}")
        unusable = ", ".join(f"'{_home_path(p)}'" for p in client.unusable_keys)
        if unusable and not client.needed:
            return AuthError(
                f"{name}: authentication failed at {addr} ({reason}); key {unusable} is "
                "encrypted in OpenSSH's format, which tunneld unlocks only with the Python "
                "module bcrypt installed (`pip install bcrypt` where tunneld runs); or load it "
                f"into your agent: `ssh-add {_home_path(client.unusable_keys[0])}`")
        if not client.needed:
            return None
        what = {"password": "a password",
                "kbdint": "answers to the server's prompts (password, verification code)",
                "passphrase": "the passphrase of key " + ", ".join(
                    f"'{_home_path(p)}'" for p in client.locked_keys)}
        needs = " or ".join(what[k] for k in client.needed
                            if not (k == "password" and "kbdint" in client.needed))
        hint = "".join(f", or load the key into your agent: `ssh-add {_home_path(p)}`"
                       for p in client.locked_keys[:1])
        return LoginNeeded(f"{name}: login needs {needs} and no terminal is waiting; run "
                           f"`tunnelctl login {self.name}`{hint}")

    # -- reporting ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state.value,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "last_error": self.last_error,
            "attempts": self.attempts,
            "cipher": self.conn.get_extra_info("send_cipher") if self.conn else None,
            "forwards": [f.snapshot() for f in sorted(self.forwards.values(),
                                                      key=lambda f: f.spec)],
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _identity_files(cfg: Any) -> list[str]:
    """The private key files a login may use: IdentityFile, else OpenSSH's defaults."""
    files = cfg.get("IdentityFile") or [os.path.join("~", ".ssh", f) for f in DEFAULT_KEY_FILES]
    return [os.path.expanduser(str(f)) for f in files]


def _encrypted_key(path: str) -> tuple[tuple[str, int, int], bytes] | None:
    """(identity, contents) of ``path`` if it is a private key that needs a passphrase."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return None
    try:
        asyncssh.import_private_key(data)
    except asyncssh.KeyImportError as exc:
        if "passphrase" in str(exc).lower():
            return (path, st.st_mtime_ns, st.st_size), data
        return None
    except (ValueError, asyncssh.Error):
        return None
    return None   # not encrypted: asyncssh loaded it already


def _bcrypt() -> bool:
    """True if asyncssh can decrypt keys in OpenSSH's format (it needs bcrypt's KDF)."""
    try:
        import bcrypt
    except ImportError:
        return False
    return hasattr(bcrypt, "kdf")


def _home_path(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home and path.startswith(home + os.sep) else path


#: desktop notifications still running (a reference keeps their task alive)
_notifying: set[asyncio.Task[None]] = set()


def notify_argv(title: str, text: str) -> list[str] | None:
    """The command that shows a desktop notification here, or None if there is none."""
    if shutil.which("notify-send"):
        return ["notify-send", "--app-name=tunneld", title, text]
    if shutil.which("osascript"):
        def q(x: str) -> str:
            return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return ["osascript", "-e", f"display notification {q(text)} with title {q(title)}"]
    return None


def notify(title: str, text: str) -> None:
    """Show a desktop notification if this machine can; fire and forget, never blocks."""
    argv = notify_argv(title, text)
    if argv is None:
        return

    async def run() -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.debug("notification failed: %s", exc)
            return
        try:
            await asyncio.wait_for(proc.wait(), NOTIFY_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()

    task = asyncio.get_running_loop().create_task(run())
    _notifying.add(task)
    task.add_done_callback(_notifying.discard)


def _split_target(target: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (IPv6 in brackets) → (user, host, port)."""
    user, _, rest = target.rpartition("@")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":") and tail[1:].isdigit():
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        if p.isdigit():
            port = int(p)
    else:
        host = rest
    return (user or None), host, port


def _available(preferred: tuple[str, ...]) -> list[str]:
    have = {a.decode() for a in asyncssh.encryption.get_encryption_algs()}
    return [a for a in preferred if a in have]


def _known_hosts_files(options: Any) -> list[Path]:
    files = options.config.get("UserKnownHostsFile") or ["~/.ssh/known_hosts"]
    return [Path(os.path.expanduser(f)) for f in files]


def _has_known_key(files: list[Path], host: str, port: int) -> Path | None:
    """The first of ``files`` that holds a key for ``host``:``port``, or None."""
    for f in files:
        try:
            known = asyncssh.read_known_hosts(str(f))
        except (OSError, ValueError, asyncssh.Error):
            continue
        keys = known.match(host, host, port)
        if keys[0] or keys[1]:
            return f
    return None
