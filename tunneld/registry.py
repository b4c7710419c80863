"""The host registry: one supervisor per host name, and the lock every change of the
registry holds.

Invariants: a host is here iff it has at least one forward or a running session (``busy``), or
a request is using it right now (it calls ``host_for`` and ``release`` when done); there is
never a second supervisor for a name (``supervisor`` registers a new one before anything can
await).  Methods named ``_…`` expect ``lock`` held; the public ones take it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterator

from .config import Defaults
from .errors import UsageError
from .events import EventHub
from .host import HostForward, HostSupervisor, Prompter
from .names import check_host_alias
from .spec import ForwardSpec
from .state import HostState

log = logging.getLogger("tunneld")

#: any forward a host has: a local listener (LocalForward, SocksForward) or a server's one
#: (RemoteForward)
Forward = HostForward


class Hosts:
    """Supervisors by host name (a read-only mapping to everyone but this class)."""

    def __init__(self, settings: Callable[[], Defaults], events: EventHub) -> None:
        #: the defaults a new supervisor starts with (the running config's)
        self._settings = settings
        self.events = events
        self._by_name: dict[str, HostSupervisor] = {}
        #: held by every change of the registry (restore, add, remove, reload, automatic
        #: forwards, releasing a host): changes never interleave, so a command sees the
        #: registry and the state file as one consistent thing
        self.lock = asyncio.Lock()
        #: True while something other than forwards uses the host (a running session); set by
        #: the manager
        self.busy: Callable[[HostSupervisor], bool] = lambda sup: False
        #: called after every transition of every host (the spool readers follow them)
        self.watchers: list[Callable[[HostSupervisor], None]] = []

    # -- the mapping -------------------------------------------------------------------------

    def get(self, name: str) -> HostSupervisor | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[HostSupervisor]:
        """The supervisors, by name."""
        return iter([self._by_name[n] for n in sorted(self._by_name)])

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def forwards(self) -> Iterator[tuple[HostSupervisor, Forward]]:
        for sup in self:
            for fwd in list(sup.forwards.values()):
                yield sup, fwd

    # -- supervisors -------------------------------------------------------------------------

    def supervisor(self, name: str) -> HostSupervisor:
        """``name``'s one supervisor: the registered one, or a new one registered at once."""
        check_host_alias(name)
        sup = self._by_name.get(name)
        if sup is None:
            sup = self._by_name[name] = HostSupervisor(name, self._settings(),
                                                       on_change=self._changed,
                                                       events=self.events)
        return sup

    def _changed(self, sup: HostSupervisor) -> None:
        for watch in list(self.watchers):
            watch(sup)

    def host_for(self, name: str) -> HostSupervisor:
        """The supervisor of ``name``, created and started if needed."""
        sup = self.supervisor(name)
        sup.start()
        return sup

    async def release(self, name: str) -> None:
        """Stop ``name``'s supervisor when nothing uses it any more."""
        async with self.lock:
            await self._release(name)

    async def _release(self, name: str) -> None:
        sup = self._by_name.get(name)
        if sup is None or sup.forwards or self.busy(sup):
            return
        del self._by_name[name]
        await sup.stop()

    async def close(self) -> None:
        """Stop every supervisor (the daemon stops)."""
        for sup in list(self._by_name.values()):
            await sup.stop()
        self._by_name.clear()

    def configure(self, settings: Defaults) -> None:
        """New defaults: for the next connection and the next held client of every host."""
        for sup in self._by_name.values():
            sup.settings = settings

    # -- listeners ---------------------------------------------------------------------------

    def find_listener(self, bind_host: str, bind_port: int
                      ) -> tuple[HostSupervisor, Forward] | None:
        """The forward listening on this machine's ``bind_host:bind_port`` (not a remote
        forward: the server listens for those)."""
        for sup, fwd in self.forwards():
            if fwd.spec.kind != "remote" and \
                    (fwd.spec.bind_host, fwd.spec.bind_port) == (bind_host, bind_port):
                return sup, fwd
        return None

    def find_spec(self, host: str, s: ForwardSpec) -> tuple[HostSupervisor, Forward] | None:
        """The forward whose listener ``s`` would need: on this machine for a local or SOCKS
        spec, on ``host``'s server for a remote one."""
        if s.kind != "remote":
            return self.find_listener(s.bind_host, s.bind_port)
        sup = self._by_name.get(host)
        for fwd in (sup.forwards.values() if sup else ()):
            if fwd.spec.kind == "remote" and \
                    (fwd.spec.bind_host, fwd.spec.bind_port) == (s.bind_host, s.bind_port):
                assert sup is not None
                return sup, fwd
        return None

    def open_connections(self) -> int:
        """Client connections open through forwards, right now."""
        return sum(len(fwd.conns) for _, fwd in self.forwards())

    # -- connections -------------------------------------------------------------------------

    def check_liveness(self, why: str) -> None:
        """After a sleep or a network change: every host checks its link now."""
        if self._by_name:
            log.info("%s: checking %d connection(s)", why, len(self._by_name))
        for sup in self._by_name.values():
            sup.check_liveness()

    async def reconnect(self, name: str | None, ask: Prompter | None) -> list[HostSupervisor]:
        """Drop and re-establish ``name``'s connection (every host's with None), ``ask``
        answering the logins, and wait for the attempts.  Raises UsageError for a host
        tunneld does not have."""
        if name is None:
            sups = list(self)
        else:
            sup = self._by_name.get(name)
            if sup is None:
                raise UsageError(f"{name!r} has no forwards; nothing to reconnect")
            sups = [sup]
        timeout = self._settings().connect_timeout + 1
        await asyncio.gather(*(s.next_attempt(ask, timeout, retry=True) for s in sups))
        return sups

    async def login(self, name: str, ask: Prompter | None) -> dict[str, Any]:
        """Log in to ``name`` now, ``ask`` answering its prompts.  A host with forwards or
        sessions reconnects (unless it is connected: that login stands); a host with none
        connects once to check the login, and is released again."""
        known = name in self._by_name
        sup = self.host_for(name)   # started: its attempt begins at the next await
        try:
            if sup.state is HostState.CONNECTED:
                return {"hosts": [host_result(sup)], "already": True}
            await sup.next_attempt(ask, self._settings().connect_timeout + 1, retry=known)
            return {"hosts": [host_result(sup)], "kept": known}
        finally:
            if not known:
                await self.release(name)

    async def logged_in(self, name: str, ask: Prompter | None) -> HostSupervisor:
        """``name``'s supervisor, started; when ``ask`` can answer login prompts and the host
        is not connected, the attempt it answers has been made (a host in needs-auth is tried
        again)."""
        sup = self.host_for(name)
        if ask is not None:
            await sup.next_attempt(ask, self._settings().connect_timeout + 1)
        return sup

    def snapshot(self) -> list[dict[str, Any]]:
        return [sup.snapshot() for sup in self]


def host_result(sup: HostSupervisor) -> dict[str, Any]:
    """A host's name, state and error, as `reconnect` and `login` report them."""
    return {"name": sup.name, "state": sup.state.value, "last_error": sup.last_error}
