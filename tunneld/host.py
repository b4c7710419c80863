"""One supervisor per host: its SSH connection, its forwards, its state and backoff.

The supervisor task runs while the host has forwards.  It connects, waits for the connection
to end, and reconnects with backoff; states and transitions come from ``state.py``.  Clients
of a forward ask ``connection_for_client()`` for the live connection; while the host is down
they are held for ``hold_timeout`` seconds and their arrival cuts the backoff wait short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import asyncssh

from .config import Defaults
from .errors import AuthError, ConfigError, ConnectError, HostKeyError, TunneldError
from .events import EventHub
from .forward import LocalForward
from .spec import ForwardSpec
from .state import Backoff, HostState, check_host

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


class _Client(asyncssh.SSHClient):
    """Records why the connection ended, and the host key a server offered that known_hosts
    does not trust (for the error message; it is never accepted)."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = \
            asyncio.get_running_loop().create_future()
        #: "ssh-ed25519 SHA256:…" of an untrusted host key the server offered, if any
        self.offered_key: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.offered_key = f"{key.get_algorithm()} {key.get_fingerprint()}"
        return False   # known_hosts alone decides; there is no trust on first use

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class HostSupervisor:
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
        self.backoff = Backoff()
        #: the live connection; non-None iff state is CONNECTED
        self.conn: asyncssh.SSHClientConnection | None = None
        #: jump-host connections under ``conn``, closed with it
        self._hops: list[asyncssh.SSHClientConnection] = []
        self.forwards: dict[ForwardSpec, LocalForward] = {}
        #: set and replaced on every transition; waiters wake on any change
        self._changed = asyncio.Event()
        #: set to end a backoff wait early (a held client, or `reconnect`)
        self._kick = asyncio.Event()
        #: set by `reconnect` to retry from needs-auth / failed too
        self._retry = asyncio.Event()
        #: (interval, count_max) of keepalives on the live connection
        self._keepalive: tuple[float, int] = (settings.keepalive_interval,
                                              settings.keepalive_count_max)
        #: number of connection attempts finished (success or failure)
        self.attempts = 0
        #: set once by stop(); the loop ends at its next step
        self._stopping = False
        #: the supervisor loop; None iff not running
        self._task: asyncio.Task[None] | None = None

    # -- state -------------------------------------------------------------------------------

    def _set(self, new: HostState, why: str | None = None) -> None:
        if self._stopping and new is not HostState.STOPPED:
            return  # after stop() the only transition left is to STOPPED
        old = self.state
        self.state = check_host(old, new)
        self.since = time.time()
        if new is HostState.CONNECTED:
            self.last_error = None
        elif why:
            self.last_error = why
        suffix = f" ({why})" if why else ""
        level = logging.INFO if new in (HostState.CONNECTING, HostState.CONNECTED,
                                        HostState.STOPPED) else logging.WARNING
        log.log(level, "%s: %s -> %s%s", self.name, old, new, suffix)
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
            self._kick.set()
            await asyncio.wait({task}, timeout=5)
        await self._close_conn()
        for fwd in list(self.forwards.values()):
            await fwd.close()
        if self.state is not HostState.STOPPED:
            self._set(HostState.STOPPED)

    def reconnect(self) -> None:
        """Drop the connection (if any) and try again now, whatever the state."""
        self._retry.set()
        self._kick.set()
        if self.conn is not None:
            self.conn.close()

    def check_liveness(self) -> None:
        """Find out soon whether the link survived (after a sleep or a network change):
        a connected host gets quick keepalives for a while; a host in backoff retries now."""
        conn = self.conn
        if conn is not None and self.state is HostState.CONNECTED:
            conn.set_keepalive(LIVENESS_INTERVAL, LIVENESS_COUNT_MAX)
            loop = asyncio.get_running_loop()
            loop.call_later(LIVENESS_WINDOW, self._restore_keepalive, conn)
        elif self.state is HostState.BACKOFF:
            self._kick.set()

    def _restore_keepalive(self, conn: asyncssh.SSHClientConnection) -> None:
        if conn is self.conn and not conn.is_closed():
            conn.set_keepalive(*self._keepalive)

    async def wait_attempt(self, timeout: float) -> None:
        """Wait until the next connection attempt has finished (bounded)."""
        start = self.attempts
        deadline = time.monotonic() + timeout
        while self.attempts == start:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self.wait_change(left)

    async def _run(self) -> None:
        while not self._stopping:
            self._set(HostState.CONNECTING)
            self._kick.clear()
            self._retry.clear()
            try:
                client = await self._connect()
            except (AuthError, HostKeyError, ConfigError) as exc:
                self.attempts += 1
                self._set(HostState.FAILED if not isinstance(exc, AuthError)
                          else HostState.NEEDS_AUTH, str(exc))
                await self._retry.wait()
                continue
            except ConnectError as exc:
                self.attempts += 1
                delay = self.backoff.next_delay()
                self._set(HostState.BACKOFF, f"{exc}; retrying in {delay:.1f}s")
                await self._sleep(delay)
                continue
            self.attempts += 1
            up = time.monotonic()
            self._set(HostState.CONNECTED)
            exc = await client.lost
            await self._close_conn()
            if self._stopping:
                return
            if time.monotonic() - up >= self.backoff.stable_after:
                self.backoff.reset()
            if self._retry.is_set():
                why = "reconnect requested"
                delay = 0.0
            else:
                why = f"connection lost: {_describe(exc)}" if exc else "connection closed"
                delay = self.backoff.next_delay()
            self._set(HostState.BACKOFF, f"{why}; retrying in {delay:.1f}s")
            await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._kick.wait(), delay)
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

    async def connection_for_client(self) -> asyncssh.SSHClientConnection:
        """The live connection for a new client.  While the host is down the client is held
        (at most ``hold_timeout`` s) and cuts the backoff wait short.  Raises ConnectError."""
        if self.conn is not None and self.state is HostState.CONNECTED:
            return self.conn
        deadline = time.monotonic() + self.settings.hold_timeout
        while True:
            if self.state is HostState.CONNECTED and self.conn is not None:
                return self.conn
            if self.state in (HostState.NEEDS_AUTH, HostState.FAILED) or (
                    self.state is HostState.STOPPED and (self._task is None or self._stopping)):
                raise ConnectError(f"{self.name} is {self.state}: {self.last_error or ''}"
                                   .rstrip(": "))
            self._kick.set()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectError(f"{self.name} is still {self.state} after holding the "
                                   f"client {self.settings.hold_timeout:g}s"
                                   + (f" ({self.last_error})" if self.last_error else ""))
            await self.wait_change(left)

    # -- connecting --------------------------------------------------------------------------

    async def _connect(self) -> _Client:
        try:
            conn, client, hops = await asyncio.wait_for(
                self._open(self.name, None, 0), self.settings.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"{self.name}: no answer within "
                               f"{self.settings.connect_timeout:g}s (timed out)") from None
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

        def factory() -> _Client:
            client_box.append(_Client())
            return client_box[-1]

        try:
            conn = await asyncssh.connect(
                host, port=port if port else (), username=user or (),
                tunnel=tunnel if tunnel is not None else (), client_factory=factory,
                request_pty=False, x11_forwarding=False, agent_forwarding=False, **kwargs)
        except BaseException as exc:
            for h in reversed(hops):
                h.close()
            if isinstance(exc, Exception):
                offered = client_box[-1].offered_key if client_box else None
                raise self._map_error(exc, options, target, offered) from None
            raise
        return conn, client_box[-1], hops

    def _map_error(self, exc: Exception, options: Any, target: str,
                   offered: str | None = None) -> TunneldError:
        """Foreign error → a TunneldError whose message a user can act on.  ``offered``: the
        untrusted host key the server showed ("ssh-ed25519 SHA256:…"), if any."""
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

    # -- reporting ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state.value,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "last_error": self.last_error,
            "cipher": self.conn.get_extra_info("send_cipher") if self.conn else None,
            "forwards": [f.snapshot() for f in sorted(self.forwards.values(),
                                                      key=lambda f: f.spec)],
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


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
