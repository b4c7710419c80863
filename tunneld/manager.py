"""Registry of host supervisors and sessions: forwards, sessions, snapshot, persistence.

Invariants: a host is in ``hosts`` iff it has at least one forward or running session, or
an open request is using it; every forward in a host's ``forwards`` has a bound listener; the
state file holds exactly the forwards of origin "added", written after every change.
Forwards of origin "auto" (made for a browser-open marker or ``run --port auto``) are not
persisted, except with the detached session they were made for: the sessions file
(``sessions.json`` beside the state file) holds every detached session, running and ended,
written after every change, so the next daemon takes them up (``restore_sessions``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

from . import __version__, hostcheck, remote
from . import spec as specmod
from .config import (Config, StateFile, atomic_write, load_state, remove_stale_temp_files,
                     save_state, set_aside)
import asyncssh

from .errors import (BindError, ConnectError, NotFound, SessionError, SpecError, StateError,
                     TunneldError, UsageError)
from .events import EventHub
from .forward import LocalForward
from .host import HostSupervisor, Prompter
from .remote_forward import RemoteForward
from .socks_forward import SocksForward
from .markers import BrowserOpen
from .opener import Opener
from .session import (MAX_SESSIONS, RECORD_KEYS, START_TIMEOUT, Session, check_name,
                      default_name)
from .spec import ForwardSpec, is_loopback
from .state import HostState, slept_for, state_phrase

log = logging.getLogger("tunneld")

#: any forward a host has: a local listener (LocalForward, SocksForward) or a server's one
Forward = LocalForward | RemoteForward
#: seconds `add` waits for the server's answer to new remote forwards once a host connected
REMOTE_ANSWER_WAIT = 10.0

#: seconds between two clock readings of the sleep detector
CLOCK_TICK = 2.0
#: seconds allowed for ending every session when the daemon stops
KILL_ALL_TIMEOUT = 15.0
#: seconds between two looks at the open connections while a stopping daemon drains them
DRAIN_POLL = 0.05
#: format of the sessions file (detached sessions, kept across daemon restarts)
SESSIONS_VERSION = 1
#: seconds allowed for removing a forgotten session's directory on its server
FORGET_TIMEOUT = 15.0
#: seconds a new session's command is watched for a failure at once (not found, syntax
#: error) before `run` says it started
START_CHECK = 1.5
#: a limit: forwards remembered per session (made for its markers; restored with it)
MAX_SESSION_FORWARDS = 16
#: where `run --port auto` looks for a free port, and how many it tries
FREE_PORT_RANGE = (20000, 60000)
FREE_PORT_TRIES = 50


def _locally_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False

#: an ssh host alias: what `ssh NAME` would accept as a destination, without options
_HOST_RE = re.compile(r"^(?!-)[A-Za-z0-9_.@%+\[\]:-]{1,255}\Z")


def check_host_name(name: Any) -> str:
    if not isinstance(name, str) or not _HOST_RE.match(name):
        raise UsageError(f"{name!r} is not a host name; use a Host alias from ~/.ssh/config "
                         "or a host name as for ssh")
    return name


def _spec_texts(texts: Any, prefix: str) -> list[str]:
    """A wire list of spec strings (None: none), each with ``prefix`` (``-R ``/``-D ``)."""
    if texts is None:
        return []
    if not isinstance(texts, list) or not all(isinstance(x, str) for x in texts):
        raise UsageError("forward specs must be a list of strings")
    return [prefix + x for x in texts]


def _shell(spec: ForwardSpec) -> str:
    """A spec as one shell word (``-R 9000:…`` contains a space)."""
    text = str(spec)
    return f"'{text}'" if " " in text else text


def _public_message(host: str, s: ForwardSpec) -> str:
    if s.kind == "remote":
        return (f"-R {s.listen}: the server {host} would listen on an address other machines "
                f"reach; anyone who can reach it reaches this machine's {s.target}. Pass "
                "--public if that is what you want, or let the server listen on 127.0.0.1")
    if s.kind == "socks":
        return (f"-D {s.listen} is reachable from other machines; anyone who can reach it can "
                f"use {host} as a proxy to anywhere {host} can connect. Pass --public if that "
                "is what you want, or bind to 127.0.0.1")
    return (f"{s.listen} is reachable from other machines; anyone who can "
            f"reach it reaches {host}'s {s.target}. Pass --public if that is "
            f"what you want, or bind to 127.0.0.1")


class Manager:
    def __init__(self, config: Config, state_path: Path, session_dir: Path | None = None):
        self.config = config
        self.state_path = state_path
        self.session_dir = session_dir or state_path.parent / "sessions"
        #: detached sessions (running and ended), rewritten atomically on every change
        self.sessions_path = state_path.with_name("sessions.json")
        #: detached session name → its state when last saved (for disconnect/re-attach events)
        self._session_states: dict[str, str] = {}
        #: False while the daemon stops: sessions that end then are not written any more
        self._saving_sessions = True
        #: host name → supervisor (see the module docstring for when a host is here)
        self.hosts: dict[str, HostSupervisor] = {}
        #: session name → session (running ones, and ended ones until MAX_SESSIONS)
        self.sessions: dict[str, Session] = {}
        #: tasks waiting for sessions to end
        self._reapers: set[asyncio.Task[None]] = set()
        self.opener = Opener(self, config.defaults.browser, config.defaults.ready_timeout)
        #: state changes for `tunnelctl events` (host/forward transitions, sessions, opens)
        self.events = EventHub()
        #: held by every change of the registry (restore, add, remove, reload, automatic
        #: forwards, releasing a host): changes never interleave, so a command sees the
        #: registry and the state file as one consistent thing.  Methods named ``_…`` expect
        #: it held.
        self._lock = asyncio.Lock()
        #: set once the forwards and sessions of the last run are restored; the control
        #: server answers commands only after that (status excepted)
        self.ready = asyncio.Event()

    # -- start / stop ------------------------------------------------------------------------

    async def restore(self) -> None:
        """Bind the forwards of config.toml and of the state file, take up the detached
        sessions, then set ``ready``.  Failures are logged; the daemon starts anyway."""
        async with self._lock:
            remove_stale_temp_files(self.state_path.parent)
            await self._restore()
        self.ready.set()

    async def _restore(self) -> None:
        wanted: list[tuple[str, ForwardSpec, str]] = []
        for host, specs in self.config.forwards().items():
            wanted += [(host, s, "config") for s in specs]
        saved = load_state(self.state_path)
        for host, texts in saved.hosts.items():
            for s in specmod.parse_all(texts, self.config.defaults.bind):
                wanted.append((host, s, "added"))
        seen: set[tuple[str, str, int]] = set()
        for host, s, origin in wanted:
            # local listeners share this machine's ports; a remote one is its server's
            key = (host if s.kind == "remote" else "", s.bind_host, s.bind_port)
            if key in seen:
                continue
            seen.add(key)
            try:
                await self._bind(host, s, origin)
            except BindError as exc:
                log.error("%s: could not restore forward %s: %s", host, s, exc)
                continue
            if s.is_public:
                where = f"{host}'s server" if s.kind == "remote" else "this machine"
                log.warning("%s: %s is listening on a public address of %s (%s)", host,
                            s.listen, where, "config file" if origin == "config" else
                            "added with --public")
        for sup in self.hosts.values():
            sup.start()
        n = sum(len(h.forwards) for h in self.hosts.values())
        log.info("restored %d forward(s) on %d host(s)", n, len(self.hosts))
        await self._restore_sessions()

    def check_liveness(self, why: str) -> None:
        """After a sleep or a network change: every host checks its link now."""
        if self.hosts:
            log.info("%s: checking %d connection(s)", why, len(self.hosts))
        for sup in self.hosts.values():
            sup.check_liveness()

    async def watch_clock(self) -> None:
        """Detect a sleep (wall clock ran ahead of the monotonic one) and check liveness."""
        wall, mono = time.time(), time.monotonic()
        while True:
            await asyncio.sleep(CLOCK_TICK)
            w, m = time.time(), time.monotonic()
            slept = slept_for(wall, mono, w, m)
            wall, mono = w, m
            if slept is not None:
                self.check_liveness(f"the clock jumped {slept:.0f}s (the machine slept?)")

    async def end_sessions(self) -> None:
        """Kill every running attached session (bounded by ``KILL_ALL_TIMEOUT``); leave the
        detached ones running on their servers (the sessions file has them for the next
        start)."""
        detached = [sess for sess in self.sessions.values()
                    if sess.running and sess.detached and not sess.detaching]
        if detached:
            self.save_sessions()
            self._saving_sessions = False
            log.info("leaving %d detached session(s) running: %s", len(detached),
                     " ".join(sess.name for sess in detached))
            for sess in detached:
                sess.detach()
        running = [sess for sess in self.sessions.values() if sess.running and
                   not sess.detached]
        if running:
            log.info("ending %d session(s)", len(running))
            await asyncio.wait([asyncio.ensure_future(sess.kill()) for sess in running],
                               timeout=KILL_ALL_TIMEOUT)

    async def close(self) -> None:
        await self.end_sessions()
        for sup in list(self.hosts.values()):
            await sup.stop()
        self.hosts.clear()

    # -- commands ----------------------------------------------------------------------------

    def _find(self, bind_host: str, bind_port: int) -> tuple[HostSupervisor, Forward] | None:
        """The forward listening on this machine's ``bind_host:bind_port`` (not a remote
        forward: the server listens for those)."""
        for sup in self.hosts.values():
            for fwd in sup.forwards.values():
                if fwd.spec.kind != "remote" and \
                        (fwd.spec.bind_host, fwd.spec.bind_port) == (bind_host, bind_port):
                    return sup, fwd
        return None

    def _find_spec(self, host: str, s: ForwardSpec) -> tuple[HostSupervisor, Forward] | None:
        """The forward whose listener ``s`` would need: on this machine for a local or SOCKS
        spec, on ``host``'s server for a remote one."""
        if s.kind != "remote":
            return self._find(s.bind_host, s.bind_port)
        sup = self.hosts.get(host)
        for fwd in (sup.forwards.values() if sup else ()):
            if fwd.spec.kind == "remote" and \
                    (fwd.spec.bind_host, fwd.spec.bind_port) == (s.bind_host, s.bind_port):
                return sup, fwd  # type: ignore[return-value]
        return None

    def host_for(self, host: str) -> HostSupervisor:
        """The supervisor of ``host``, created and started if needed."""
        sup = self._supervisor(host)
        sup.start()
        return sup

    def _supervisor(self, host: str) -> HostSupervisor:
        """``host``'s one supervisor: the registered one, or a new one registered at once
        (never a second one for a host: its forwards would be lost from the registry)."""
        check_host_name(host)
        sup = self.hosts.get(host)
        if sup is None:
            sup = self.hosts[host] = HostSupervisor(host, self.config.defaults,
                                                    events=self.events)
        return sup

    async def _bind(self, host: str, s: ForwardSpec, origin: str) -> Forward:
        """Make the forward for ``s`` take effect (a local listener bound; a remote one asked
        of the server now if ``host`` is connected) and register it.  Raises BindError (the
        host is released again if nothing else uses it)."""
        sup = self._supervisor(host)
        fwd: Forward
        if s.kind == "remote":
            fwd = RemoteForward(s, sup, origin)
        elif s.kind == "socks":
            fwd = SocksForward(s, sup, origin)
        else:
            fwd = LocalForward(s, sup, origin)
        try:
            await fwd.bind()
        except BaseException:
            await self._release_host(host)
            raise
        sup.forwards[fwd.spec] = fwd
        self.events.publish("forward", host=host, spec=str(fwd.spec), event="added",
                            origin=origin, old=None, new=fwd.state.value)
        return fwd

    async def ensure_forward(self, host: str, target_host: str,
                             target_port: int) -> LocalForward:
        """A forward of ``host`` to ``target_host:target_port``: an existing one, or a new
        automatic one on the same local port if that is free, else on a free port."""
        async with self._lock:
            return await self._ensure_forward(host, target_host, target_port)

    async def _ensure_forward(self, host: str, target_host: str,
                              target_port: int) -> LocalForward:
        sup = self.host_for(host)
        loop_target = is_loopback(target_host)
        for fwd in sup.forwards.values():
            t = fwd.spec
            if t.kind == "local" and t.target_port == target_port and (
                    t.target_host == target_host or (loop_target and is_loopback(t.target_host))):
                return fwd
        # a forward made because a remote program printed a URL is never public, whatever
        # defaults.bind says: exposing a port is a person's decision (`add --public`)
        bind = self.config.defaults.bind
        if not is_loopback(bind):
            bind = specmod.DEFAULT_BIND
        for port in (target_port, 0):
            if port and self._find(bind, port) is not None:
                continue
            try:
                fwd = await self._bind(host, ForwardSpec(bind, port, target_host, target_port),
                                       "auto")
            except BindError:
                continue
            log.info("%s: added automatic forward %s", host, fwd.spec)
            return fwd
        raise BindError(f"{host}: no local port could be bound for {target_host}:{target_port}")

    async def release_host(self, host: str) -> None:
        """Stop ``host``'s supervisor when nothing uses it any more."""
        async with self._lock:
            await self._release_host(host)

    async def _release_host(self, host: str) -> None:
        sup = self.hosts.get(host)
        if sup is None or sup.forwards or any(
                sess.host is sup and sess.running for sess in self.sessions.values()):
            return
        del self.hosts[host]
        await sup.stop()

    async def add(self, host: str, texts: list[str] | None, public: bool = False,
                  remote: list[str] | None = None, socks: list[str] | None = None,
                  prompter: Prompter | None = None, force: bool = False) -> dict[str, Any]:
        """Add forwards to ``host``: local specs ``texts``, remote forwards ``remote`` (-R)
        and SOCKS proxies ``socks`` (-D).  All or none: every local listener bound and, if the
        host is connected, every remote listener granted by the server — else nothing is left
        and BindError names the port.  Remote forwards of a host that is not connected are
        accepted (waiting) and asked for when it connects.  ``prompter`` answers the login
        prompts of the first attempt (a host in needs-auth is retried with it).  The state
        file is written before the command returns; if it cannot be, nothing is added and
        StateError says why.  A new host that looks like a typo (``hostcheck``) is refused
        unless ``force``."""
        specs = self._add_specs(host, texts, public, remote, socks)
        if not force:
            await self.check_new_host(host)
        async with self._lock:
            result, bound = await self._add(host, specs)
            sup = self.hosts[host]
            sup.start()
        if sup.state is not HostState.CONNECTED:
            # report the next attempt's outcome (the forwards stay either way) ...
            await sup.next_attempt(prompter, self.config.defaults.connect_timeout + 1)
            # ... and the server's first answer to new remote forwards
            for fwd in bound:
                if isinstance(fwd, RemoteForward) and sup.state is HostState.CONNECTED:
                    await fwd.wait_answer(REMOTE_ANSWER_WAIT)
        result["state"] = sup.state.value
        result["last_error"] = sup.last_error
        result["forwards"] = [{"spec": str(f.spec), "kind": f.spec.kind,
                               "state": f.state.value, "last_error": f.last_error}
                              for f in bound]
        return result

    async def check_new_host(self, host: str) -> None:
        """Refuse a host tunneld does not know yet whose name looks like a typo."""
        check_host_name(host)
        if host in self.hosts or host in self.config.hosts:
            return
        await hostcheck.check_new_host(host, sorted({*self.hosts, *self.config.hosts}))

    def _add_specs(self, host: str, texts: list[str] | None, public: bool,
                   remote: list[str] | None, socks: list[str] | None) -> list[ForwardSpec]:
        """The specs of an `add`, checked (grammar, the public-bind policy)."""
        check_host_name(host)
        texts = (_spec_texts(texts, "") + _spec_texts(remote, "-R ")
                 + _spec_texts(socks, "-D "))
        if not texts:
            raise UsageError("add needs at least one forward spec, e.g. 8090, 8090-8092, "
                             "-R 9000:localhost:8000 or -D 1080")
        specs = specmod.parse_all(texts, self.config.defaults.bind)
        if not public:
            exposed = [s for s in specs if s.is_public]
            if exposed:
                raise UsageError(_public_message(host, exposed[0]))
        return specs

    async def _add(self, host: str, specs: list[ForwardSpec]
                   ) -> tuple[dict[str, Any], list[Forward]]:
        new: list[ForwardSpec] = []
        existing: list[str] = []
        kept: list[Forward] = []     # automatic forwards that this makes saved ones
        for s in specs:
            found = self._find_spec(host, s)
            if found is None:
                new.append(s)
            elif found[0].name == host and found[1].spec == s:
                if found[1].origin == "auto":
                    kept.append(found[1])
                else:
                    existing.append(str(s))
            elif s.kind == "remote":
                other = found[1]
                raise BindError(f"{host}: the server already listens on {s.listen} for "
                                f"tunneld's {other.spec}; remove that first "
                                f"(`tunnelctl remove {host} -R {s.bind_port}`) or pick "
                                "another remote port")
            else:
                other_sup, other = found
                what = ("as a SOCKS proxy for" if other.spec.kind == "socks" else
                        "to")
                target = "" if other.spec.kind == "socks" else f" {other.spec.target}"
                raise BindError(f"cannot listen on {s.listen}: tunneld already forwards it "
                                f"{what} {other_sup.name}{target}; remove that first "
                                f"(`tunnelctl remove {other_sup.name} {_shell(other.spec)}`) "
                                "or pick another local port")
        # local listeners first: a remote refusal is the likelier failure, and a bound local
        # listener is cheap to take back
        new.sort(key=lambda s: s.kind == "remote")
        bound: list[Forward] = []
        try:
            for s in new:
                bound.append(await self._bind(host, s, "added"))
        except BaseException:
            for fwd in bound:
                await self._unbind(host, fwd)
            raise
        for fwd in kept:
            fwd.origin = "added"
        try:
            self._write_state()
        except StateError as exc:
            for fwd in kept:
                fwd.origin = "auto"
            for fwd in bound:
                await self._unbind(host, fwd)
            raise StateError(f"{exc}; nothing was added") from None
        for s in new:
            if s.is_public:
                where = f"{host}'s server" if s.kind == "remote" else "this machine"
                log.warning("%s: %s is listening on a public address of %s", host, s.listen,
                            where)
        if new:
            log.info("%s: added %s", host, " ".join(str(s) for s in new))
        if kept:
            log.info("%s: saved the automatic forward(s) %s", host,
                     " ".join(str(f.spec) for f in kept))
        result: dict[str, Any] = {"host": host, "added": [str(s) for s in new],
                                  "saved": [str(f.spec) for f in kept], "existing": existing}
        return result, bound

    async def _unbind(self, host: str, fwd: Forward) -> None:
        sup = self.hosts.get(host)
        if sup is None:
            return
        sup.forwards.pop(fwd.spec, None)
        await fwd.close()
        self.events.publish("forward", host=host, spec=str(fwd.spec), event="removed",
                            origin=fwd.origin, old=None, new=fwd.state.value)
        await self._release_host(host)

    async def remove(self, host: str, texts: list[str] | None = None,
                     remote: list[str] | None = None,
                     socks: list[str] | None = None) -> dict[str, Any]:
        """Remove the named forwards of ``host`` (all of them when none are named): local
        specs ``texts`` (which may also be ``-R …``/``-D …`` strings, as `list` shows them),
        remote forwards ``remote`` and SOCKS proxies ``socks``.  The state file is written
        first: if it cannot be, nothing is removed and StateError says why."""
        async with self._lock:
            return await self._remove(host, texts, remote, socks)

    async def _remove(self, host: str, texts: list[str] | None, remote: list[str] | None,
                      socks: list[str] | None) -> dict[str, Any]:
        check_host_name(host)
        texts = (_spec_texts(texts, "") + _spec_texts(remote, "-R ")
                 + _spec_texts(socks, "-D "))
        sup = self.hosts.get(host)
        if sup is None or not sup.forwards:
            raise NotFound(f"{host} has no forwards; `tunnelctl list` shows what there is")
        if texts:
            chosen: list[Forward] = []
            for text in texts:
                try:
                    specs = specmod.parse_any(text, self.config.defaults.bind)
                except SpecError:
                    by_port = self._by_local_port(sup, text)  # `-R 9000`
                    if by_port is None:
                        raise
                    found = [by_port]
                else:
                    found = []
                    for s in specs:
                        fwd = sup.forwards.get(s) or self._by_local_port(sup, text)
                        if fwd is None:
                            have = ", ".join(str(f) for f in sorted(sup.forwards)) or "none"
                            raise NotFound(f"{host} has no forward {s}; its forwards: {have}")
                        found.append(fwd)
                for fwd in found:
                    if fwd not in chosen:
                        chosen.append(fwd)
        else:
            chosen = list(sup.forwards.values())
        try:
            self._write_state(without=chosen)
        except StateError as exc:
            raise StateError(f"{exc}; nothing was removed") from None
        for fwd in chosen:
            await self._unbind(host, fwd)
        removed = [str(f.spec) for f in chosen]
        config_ones = [str(f.spec) for f in chosen if f.origin == "config"]
        log.info("%s: removed %s", host, ", ".join(removed))
        result: dict[str, Any] = {"host": host, "removed": removed}
        if config_ones:
            result["note"] = (f"{' '.join(config_ones)} declared in the config file come back "
                              "at the next start; delete them there to remove them for good")
        return result

    @staticmethod
    def _by_local_port(sup: HostSupervisor, text: str) -> Forward | None:
        """A bare PORT also names the forward listening on that port here (`remove barhal
        18090`); ``-D PORT`` the SOCKS proxy on that port, ``-R PORT`` the remote forward
        its server listens on that port for."""
        body, kind = text.strip(), None
        if body[:2] in ("-R", "-D"):
            kind = "remote" if body[:2] == "-R" else "socks"
            body = body[2:].strip()
        if not body.isdigit():
            return None
        port = int(body)
        for fwd in sup.forwards.values():
            k = fwd.spec.kind
            if fwd.spec.bind_port == port and (k == kind if kind else k != "remote"):
                return fwd
        return None

    # -- sessions ----------------------------------------------------------------------------

    async def run(self, host: str, command: Any, name: Any = None,
                  port: Any = None, detach: Any = True,
                  prompter: Prompter | None = None, follow: bool = False) -> dict[str, Any]:
        """Start ``command`` on ``host`` as a session.  ``port``: None, "auto" or a number;
        it replaces ``{port}`` in the command, is exported as ``PORT`` and is forwarded.
        ``detach``: the command outlives the connection and the daemon (else it runs in the
        SSH channel and ends with it).  Returns once the command runs on the server: a host
        that cannot be connected now (``prompter`` answers its login) raises ConnectError
        and makes no session; a command that fails at once (not found, a syntax error)
        raises SessionError with its first lines of output (the ended session is listed),
        unless the client ``follow``s the output itself (then it sees how the command ends)."""
        check_host_name(host)
        if not isinstance(detach, bool):
            raise UsageError(f"'detach' must be true or false, not {detach!r}")
        if isinstance(command, str):
            command = [command]
        if not isinstance(command, list) or not command or \
                not all(isinstance(a, str) for a in command) or not "".join(command).strip():
            raise UsageError("run needs a command, e.g. `tunnelctl run HOST -- jupyter lab`")
        replaced: Session | None = None
        if name is not None:
            check_name(name)
            old = self.sessions.get(name)
            if old is not None and old.running:
                raise UsageError(f"a session named {name} is running on {old.host.name}; "
                                 f"pick another --name or `tunnelctl kill {name}`")
            replaced = old
        else:
            name = default_name(" ".join(command),
                                {n for n, s in self.sessions.items() if s.running} |
                                set(self.sessions))
        if port is not None and port != "auto" and (
                isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
            raise UsageError(f"--port takes 'auto' or a port number, not {port!r}")
        await self.check_new_host(host)
        sup = self.host_for(host)
        if sup.state is not HostState.CONNECTED:
            await sup.next_attempt(prompter, self.config.defaults.connect_timeout + 1)
            if sup.state is not HostState.CONNECTED:
                raise ConnectError(f"{host} {state_phrase(sup.state)}: the command was not "
                                   f"started" + (f": {sup.why()}" if sup.last_error else ""))
        env: dict[str, str] = {}
        fwd = None
        if port is not None:
            try:
                if port == "auto":
                    port = await self._free_remote_port(sup)
                fwd = await self.ensure_forward(host, "localhost", port)
            except Exception:
                await self.release_host(host)   # no session: the host may have nothing left
                raise
            command = [a.replace("{port}", str(port)) for a in command]
            env["PORT"] = str(port)
        text = " ".join(command)
        sess = Session(name, sup, text, self.session_dir / f"{name}.log", self._on_open,
                       env=env, port=port, detached=detach, on_change=self._session_changed)
        self.sessions[name] = sess
        if replaced is not None:
            self._forget_remote(replaced)   # the new session took its name
        self._forget_old_sessions()
        sess.start()
        self.events.publish("session", host=host, name=name, event="started",
                            state=sess.state, exit_status=None)
        self._start_reaper(sess)
        why = await sess.wait_started(
            self.config.defaults.hold_timeout + START_TIMEOUT + 5, 0 if follow else START_CHECK)
        if why is not None:
            raise SessionError(f"{host}: session {name} did not start: {why}\n(`tunnelctl "
                               f"logs {name}` shows all of it)")
        result: dict[str, Any] = {"name": name, "host": host, "command": text,
                                  "detached": detach, "state": sess.state}
        if fwd is not None:
            result.update(port=port, forward=str(fwd.spec),
                          url=f"http://127.0.0.1:{fwd.spec.bind_port}/")
        return result

    def _start_reaper(self, sess: Session) -> None:
        reaper = asyncio.get_running_loop().create_task(self._reap(sess))
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)

    async def _on_open(self, sess: Session, ev: BrowserOpen) -> None:
        try:
            r = await self.opener.open(sess.host.name, ev.url, ev.node, f"session {sess.name}",
                                       server=sess.server)
        except TunneldError as exc:
            log.warning("%s", exc)
            return
        fwd = r.get("forward")
        if sess.detached and fwd and fwd not in sess.forwards and \
                len(sess.forwards) < MAX_SESSION_FORWARDS:
            sess.forwards.append(fwd)
        self._session_changed(sess)   # opens and forwards are kept in the sessions file

    def _session_changed(self, sess: Session) -> None:
        if not sess.detached:
            return
        was = self._session_states.get(sess.name)
        self._session_states[sess.name] = sess.state
        if sess.state == "disconnected" and was != "disconnected":
            self.events.publish("session", host=sess.host.name, name=sess.name,
                                event="disconnected", state=sess.state, exit_status=None)
        elif sess.state == "running" and was == "disconnected":
            self.events.publish("session", host=sess.host.name, name=sess.name,
                                event="re-attached", state=sess.state, exit_status=None)
        self.save_sessions()

    def save_sessions(self) -> None:
        """Write the sessions file: every detached session (running and ended)."""
        if not self._saving_sessions:
            return
        records = [s.record() for s in sorted(self.sessions.values(), key=lambda s: s.started)
                   if s.detached]
        data = {"version": SESSIONS_VERSION, "sessions": records}
        try:
            atomic_write(self.sessions_path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as exc:
            log.error("could not write the sessions file %s: %s; detached sessions started "
                      "now will not be re-attached after a restart", self.sessions_path,
                      exc.strerror or exc)

    def _load_sessions(self) -> list[dict[str, Any]]:
        """The sessions file's records; a corrupt file is set aside (logged)."""
        try:
            data = json.loads(self.sessions_path.read_bytes() or b"{}")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:
            try:
                aside: Path | str = set_aside(self.sessions_path)
            except OSError:
                aside = "(could not move it)"
            log.error("sessions file %s is unreadable (%s); kept it as %s; detached sessions "
                      "are not re-attached (they still run on their servers)",
                      self.sessions_path, str(exc).splitlines()[0], aside)
            return []
        if not isinstance(data, dict) or data.get("version", SESSIONS_VERSION) \
                > SESSIONS_VERSION:
            log.error("sessions file %s has a format this tunneld does not read; detached "
                      "sessions are not re-attached", self.sessions_path)
            return []
        out = []
        for rec in data.get("sessions") or []:
            if not isinstance(rec, dict) or set(rec) - set(RECORD_KEYS):
                continue
            try:
                check_name(rec.get("name"))
                check_host_name(rec.get("host"))
                if not isinstance(rec.get("command"), str):
                    raise UsageError("bad record")
            except UsageError:
                log.warning("sessions file %s: skipped a malformed record",
                            self.sessions_path)
                continue
            out.append(rec)
        return out[-MAX_SESSIONS:]

    async def _restore_sessions(self) -> None:
        """Take up the detached sessions of the sessions file: ended ones are listed, running
        ones re-attach (with their ``--port`` forward and the forwards made for their
        markers)."""
        records = self._load_sessions()
        running = 0
        for rec in records:
            name, host = rec["name"], rec["host"]
            if name in self.sessions:
                continue
            port = rec.get("port")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                port = None
            # an ended session only names its host; a running one needs its supervisor
            sup = self.hosts.get(host) or HostSupervisor(host, self.config.defaults,
                                                         events=self.events)
            # the log is where this daemon puts a session's log, whatever the file says
            sess = Session(name, sup, rec["command"], self.session_dir / f"{name}.log",
                           self._on_open,
                           port=port, detached=True, on_change=self._session_changed)
            try:
                sess.resume(rec)
            except (OSError, ValueError, TypeError) as exc:
                log.error("%s: session %s cannot be taken up: %s", host, name, exc)
                continue
            self.sessions[name] = sess
            if not sess.running:
                continue
            running += 1
            sess.host = sup = self._supervisor(host)
            sup.start()
            for text in [*sess.forwards, *([str(port)] if port else [])]:
                await self._restore_session_forward(host, text, port if text == str(port)
                                                    else None)
            self._start_reaper(sess)
        if records:
            log.info("took up %d detached session(s), %d of them running", len(records),
                     running)
            self.save_sessions()

    async def _restore_session_forward(self, host: str, text: str, port: int | None) -> None:
        try:
            if port is not None:
                await self._ensure_forward(host, "localhost", port)
                return
            (s,) = specmod.parse(text)
            if self._find_spec(host, s) is None:
                await self._bind(host, s, "auto")
        except (TunneldError, ValueError) as exc:
            log.warning("%s: forward %s of a session was not restored: %s", host, text, exc)

    async def _free_remote_port(self, sup: HostSupervisor) -> int:
        """A port nothing listens on, on the server's loopback, and free here too."""
        conn = await sup.connection_for_client()
        rng = random.Random()
        for _ in range(FREE_PORT_TRIES):
            port = rng.randrange(*FREE_PORT_RANGE)
            if self._find(self.config.defaults.bind, port) is not None or \
                    not _locally_free(self.config.defaults.bind, port):
                continue
            try:
                _, writer = await conn.open_connection("localhost", port)
            except asyncssh.ChannelOpenError:
                return port  # refused: nothing listens there
            writer.close()
        raise ConnectError(f"{sup.name}: found no free port on the server in "
                           f"{FREE_PORT_TRIES} tries; pass --port NUMBER")

    def _forget_old_sessions(self) -> None:
        ended = sorted((s for s in self.sessions.values() if not s.running),
                       key=lambda s: s.ended or 0)
        while len(self.sessions) > MAX_SESSIONS and ended:
            old = ended.pop(0)
            del self.sessions[old.name]
            self._forget_remote(old)

    def _forget_remote(self, sess: Session) -> None:
        """Remove an ended, forgotten detached session's directory on its server, in the
        background, if tunneld has that host now (it does not connect just for this; else the
        directory stays there)."""
        sup = self.hosts.get(sess.host.name)
        if not sess.detached or sess.remote_id is None or sup is None:
            return
        text = remote.forget_command([sess.remote_id])

        async def forget() -> None:
            try:
                conn = await sup.connection_for_client()
                await asyncio.wait_for(conn.run(text, check=False, request_pty=False,
                                                term_type=None), FORGET_TIMEOUT)
            except (ConnectError, asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
                log.info("%s: could not remove %s on the server: %s", sup.name,
                         sess.remote_dir, exc)
        task = asyncio.get_running_loop().create_task(forget())
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def session(self, name: Any) -> Session:
        if not isinstance(name, str) or name not in self.sessions:
            known = " ".join(sorted(self.sessions)) or "none"
            raise NotFound(f"no session named {name!r}; sessions: {known}")
        return self.sessions[name]

    def forget(self, names: list[str], ended: bool = False) -> dict[str, Any]:
        """Remove ended sessions from the list (and their logs, here and on the server):
        those named, or with ``ended`` every ended one.  A running one is refused."""
        chosen = [self.session(n) for n in names]
        running = [s.name for s in chosen if s.running]
        if running:
            raise UsageError(f"session {running[0]} is still running; `tunnelctl kill "
                             f"{running[0]}` first")
        if ended:
            chosen += [s for s in self.sessions.values() if not s.running and s not in chosen]
        for sess in chosen:
            del self.sessions[sess.name]
            self._session_states.pop(sess.name, None)
            self._forget_remote(sess)
            try:
                sess.log_path.unlink()
            except OSError:
                pass
        if chosen:
            log.info("forgot session(s) %s", " ".join(s.name for s in chosen))
            self.save_sessions()
        return {"forgotten": [s.name for s in chosen]}

    async def kill(self, name: Any) -> dict[str, Any]:
        sess = self.session(name)
        if not sess.running:
            raise UsageError(f"session {sess.name} had already ended ({sess.state}); "
                             f"`tunnelctl forget {sess.name}` removes it from the list")
        said = await sess.kill()
        return {"name": sess.name, "state": sess.state, "said": said}

    async def _reap(self, sess: Session) -> None:
        """When a session ends: drop its `--port auto` forward, release its host."""
        await sess.done.wait()
        self.events.publish("session", host=sess.host.name, name=sess.name, event="ended",
                            state=sess.state, exit_status=sess.exit_status)
        await sess.settle(self.config.defaults.ready_timeout + 30)
        async with self._lock:
            if sess.port is not None:
                await self._drop_session_forward(sess)
            await self._release_host(sess.host.name)

    async def _drop_session_forward(self, sess: Session) -> None:
        for fwd in list(sess.host.forwards.values()):
            if fwd.origin == "auto" and fwd.spec.target_port == sess.port and \
                    is_loopback(fwd.spec.target_host):
                await self._unbind(sess.host.name, fwd)

    # -- persistence and reporting -----------------------------------------------------------

    def _write_state(self, without: list[Forward] = []) -> None:
        """Write the state file: every forward of origin "added" (less ``without``).
        Raises StateError (the file on disk is unchanged then)."""
        gone = {id(f) for f in without}
        hosts = {name: [str(f.spec) for f in sorted(sup.forwards.values(), key=lambda f: f.spec)
                        if f.origin == "added" and id(f) not in gone]
                 for name, sup in sorted(self.hosts.items())}
        try:
            save_state(self.state_path, StateFile(hosts={h: v for h, v in hosts.items() if v}))
        except OSError as exc:
            log.error("could not write the state file %s: %s", self.state_path,
                      exc.strerror or exc)
            raise StateError(f"could not save the forwards to {self.state_path}: "
                             f"{exc.strerror or exc}"
                             + (" (the disk is full)" if exc.errno == errno.ENOSPC else ""))


    def snapshot(self) -> dict[str, Any]:
        return {"version": __version__,
                "hosts": [self.hosts[h].snapshot() for h in sorted(self.hosts)]}

    def sessions_snapshot(self) -> dict[str, Any]:
        return {"version": __version__,
                "sessions": [s.snapshot() for s in sorted(self.sessions.values(),
                                                           key=lambda s: s.started)]}

    # -- reload and graceful stop ------------------------------------------------------------

    async def reload(self, config: Config) -> dict[str, Any]:
        """Apply a new (already validated) config.

        Forwards of origin "config" that it still declares keep their listeners and open
        connections; the ones it no longer declares are removed; new ones are bound.
        Forwards of origin "added" and "auto" are left alone.  New defaults apply to the next
        connection and the next client.  Nothing changes when a new forward cannot be bound
        or collides with a forward tunneld already has: BindError names it and the running
        config stays.  (A new forward that takes over the address of a removed one can only
        be bound after that removal; if that fails, it is logged and reported in "failed".)
        """
        def where(host: str, s: ForwardSpec) -> tuple[str, ...]:
            """The listening address ``s`` takes: here, or on ``host``'s server."""
            if s.kind == "remote":
                return (host, "remote", s.bind_host, str(s.bind_port))
            return ("here", s.bind_host, str(s.bind_port))

        async with self._lock:
            current = {(name, fwd.spec): fwd for name, sup in self.hosts.items()
                       for fwd in sup.forwards.values() if fwd.origin == "config"}
            wanted: list[tuple[str, ForwardSpec]] = []
            seen: set[tuple[str, ...]] = set()
            for host, specs in config.forwards().items():
                for s in specs:
                    key = where(host, s)
                    if key in seen:  # declared twice: the first one wins, as at start
                        log.warning("config: %s %s: %s is declared twice; ignored", host, s,
                                    s.listen)
                        continue
                    seen.add(key)
                    wanted.append((check_host_name(host), s))
            keep = set(wanted)
            gone = [(name, fwd) for (name, spec), fwd in current.items()
                    if (name, spec) not in keep]
            freed = {where(name, fwd.spec) for name, fwd in gone}
            first: list[tuple[str, ForwardSpec]] = []   # bound before anything is removed
            after: list[tuple[str, ForwardSpec]] = []   # on the address of a removed one
            existing: list[str] = []
            for host, s in wanted:
                if (host, s) in current:
                    continue
                if where(host, s) in freed:
                    after.append((host, s))
                    continue
                found = self._find_spec(host, s)
                if found is not None:
                    sup, fwd = found
                    if sup.name == host and fwd.spec == s:
                        existing.append(f"{host} {s}")  # added at run time: leave it as is
                        continue
                    raise BindError(
                        f"config not applied (the running one stays): {host} {s} cannot "
                        f"listen on {s.listen}: tunneld already forwards it to {sup.name} "
                        f"{fwd.spec.target}; remove that first (`tunnelctl remove {sup.name} "
                        f"{fwd.spec}`) or change the config")
                first.append((host, s))
            bound: list[tuple[str, Forward]] = []
            try:
                for host, s in first:
                    bound.append((host, await self._bind(host, s, "config")))
            except BindError as exc:
                for host, fwd in bound:
                    await self._unbind(host, fwd)
                raise BindError(f"config not applied (the running one stays): {exc}") \
                    from None
            # from here on the new config is the running one
            self.config = config
            self.opener.configure(config.defaults.browser, config.defaults.ready_timeout)
            for host, fwd in gone:
                await self._unbind(host, fwd)
            failed: list[dict[str, str]] = []
            for host, s in after:
                try:
                    bound.append((host, await self._bind(host, s, "config")))
                except BindError as exc:
                    log.error("%s: could not add forward %s from the config: %s", host, s, exc)
                    failed.append({"host": host, "spec": str(s), "error": str(exc)})
            for sup in self.hosts.values():
                sup.settings = config.defaults
            for host, _ in bound:
                if host in self.hosts:
                    self.hosts[host].start()
            added = [f"{host} {fwd.spec}" for host, fwd in bound]
            removed = [f"{host} {fwd.spec}" for host, fwd in gone]
            kept = len(current) - len(gone)
            log.info("config reloaded: %s added, %s removed, %d unchanged%s",
                     " ".join(added) or "nothing", " ".join(removed) or "nothing", kept,
                     f", {len(failed)} failed" if failed else "")
            self.events.publish("daemon", event="reloaded", added=added, removed=removed,
                                failed=[f"{f['host']} {f['spec']}" for f in failed])
            return {"added": added, "removed": removed, "unchanged": kept,
                    "existing": existing, "failed": failed}

    def open_connections(self) -> int:
        """Client connections open through forwards, right now."""
        return sum(len(getattr(fwd, "conns", ())) for sup in self.hosts.values()
                   for fwd in sup.forwards.values())

    async def shutdown(self, drain_timeout: float) -> None:
        """Graceful stop: close every listener at once (no new clients), end the sessions,
        give open connections up to ``drain_timeout`` seconds to finish, then close all."""
        closing = [asyncio.ensure_future(fwd.close(abort_clients=False))
                   for sup in self.hosts.values() for fwd in list(sup.forwards.values())]
        ending = asyncio.ensure_future(self.end_sessions())
        n = self.open_connections()
        if n:
            log.info("stopping: listeners closed; waiting up to %gs for %d open "
                     "connection(s) to finish", drain_timeout, n)
            deadline = time.monotonic() + drain_timeout
            while self.open_connections() and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL)
            left = self.open_connections()
            if left:
                log.warning("stopping: closing %d connection(s) still open after %gs", left,
                            drain_timeout)
            else:
                log.info("stopping: every open connection finished")
        # a listener's wait_closed() may wait for its clients (Python 3.12): don't wait on it
        if closing:
            await asyncio.wait(closing, timeout=1.0)
        await ending
        await self.close()
