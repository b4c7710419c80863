"""The daemon's services, wired together: a thin facade for the daemon and the control server.

- ``hosts`` (``registry.Hosts``): one supervisor per host, and the lock of every change;
- ``forwards`` (``forwards.Forwards``): add, remove, automatic forwards, reload;
- ``sessions`` (``sessions.Sessions``): run, kill, forget, detached sessions taken up;
- ``opener`` (``opener.Opener``): browser opens; ``events``: state changes for `tunnelctl
  events`; ``store``: the state and sessions files; ``spools`` (``spools.Spools``): the
  browser-open spool of every connected host and the list of recent requests; ``mux``
  (``muxserver.MuxServers``): the control socket of every host used, where the user's own
  ssh, scp, rsync and git ride its connection.

The manager itself only starts (``restore``: ``ready`` is set once the last run's forwards and
sessions are back, and the control server answers commands only after that), reloads, stops
(``shutdown``) and reports (``snapshot``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .events import EventHub
from .forwards import Forwards
from .host import HostSupervisor
from .muxforward import MuxForwards
from .muxserver import MuxServers
from .opener import Opener
from .registry import Hosts
from .sessions import Sessions
from .spools import OPENS_FILE, Spools
from .store import Store

log = logging.getLogger("tunneld")

#: seconds between two looks at the open connections while a stopping daemon drains them
DRAIN_POLL = 0.05


class Manager:
    def __init__(self, config: Config, state_path: Path, session_dir: Path | None = None):
        #: the running config (``reload`` replaces it)
        self.config = config
        #: state changes for `tunnelctl events` (host/forward transitions, sessions, opens)
        self.events = EventHub()
        self.store = Store(state_path)
        self.hosts = Hosts(lambda: self.config.defaults, self.events)
        self.forwards = Forwards(self.hosts, self.store, self.events, lambda: self.config)
        self.opener = Opener(self.hosts.host_for, self.forwards.ensure_forward, self.events,
                             config.defaults.browser, config.defaults.ready_timeout)
        self.sessions = Sessions(self.hosts, self.forwards, self.store, self.events,
                                 self.opener, lambda: self.config,
                                 session_dir or state_path.parent / "sessions")
        #: the control sockets of the hosts used (the user's own ssh rides them)
        self.mux = MuxServers(_MuxServices(self.hosts, self.forwards),
                              lambda: self.config.defaults.connect_timeout,
                              lambda: self.config.defaults.mux_persist)
        self.hosts.busy = lambda sup: self.sessions.uses(sup) or self.mux.uses(sup)
        self.hosts.watchers.append(self.mux.watch)
        #: the browser-open spool of every connected host, and the list of recent requests
        self.spools = Spools(self.hosts, self.opener, state_path.with_name(OPENS_FILE),
                             lambda: self.config)
        #: set once the forwards and sessions of the last run are restored
        self.ready = asyncio.Event()

    async def restore(self) -> None:
        """Bind the forwards of config.toml and of the state file, take up the detached
        sessions, then set ``ready``.  Failures are logged; the daemon starts anyway."""
        self.mux.clear_stale()
        self.mux.make_listed()
        async with self.hosts.lock:
            self.store.clean()
            self.spools.load()
            await self.forwards._restore()
            await self.sessions._restore()
        self.ready.set()

    async def reload(self, config: Config) -> dict[str, Any]:
        """Apply a new (already validated) config (``Forwards.reload``)."""
        return await self.forwards.reload(config, self._configure)

    def _configure(self, config: Config) -> None:
        self.config = config
        self.opener.configure(config.defaults.browser, config.defaults.ready_timeout)

    async def shutdown(self, drain_timeout: float) -> None:
        """Graceful stop: close every listener at once (no new clients), end the sessions,
        give open connections up to ``drain_timeout`` seconds to finish, then close all."""
        closing = [asyncio.ensure_future(fwd.close(abort_clients=False))
                   for _, fwd in self.hosts.forwards()]
        ending = asyncio.ensure_future(self.sessions.end_all())
        n = self.hosts.open_connections()
        if n:
            log.info("stopping: listeners closed; waiting up to %gs for %d open "
                     "connection(s) to finish", drain_timeout, n)
            deadline = time.monotonic() + drain_timeout
            while self.hosts.open_connections() and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL)
            left = self.hosts.open_connections()
            if left:
                log.warning("stopping: closing %d connection(s) still open after %gs", left,
                            drain_timeout)
            else:
                log.info("stopping: every open connection finished")
        # a listener's wait_closed() may wait for its clients (Python 3.12): don't wait on it
        if closing:
            await asyncio.wait(closing, timeout=1.0)
        await ending
        await self.mux.close()
        await self.spools.close()
        await self.hosts.close()

    def snapshot(self) -> dict[str, Any]:
        hosts = self.hosts.snapshot()
        for h in hosts:
            h["mux"] = self.mux.snapshot(h["name"])
        return {"version": __version__, "hosts": hosts}

    def sessions_snapshot(self) -> dict[str, Any]:
        return {"version": __version__, "sessions": self.sessions.snapshot()}


class _MuxServices:
    """What the control sockets ask of the services (``muxserver.MuxHost``)."""

    def __init__(self, hosts: Hosts, forwards: Forwards) -> None:
        self.hosts, self.forwards = hosts, MuxForwards(forwards)

    def host_for(self, name: str) -> HostSupervisor:
        return self.hosts.host_for(name)

    async def release(self, name: str) -> None:
        await self.hosts.release(name)

    async def open_forward(self, host: str, spec: str) -> int | None:
        await self.forwards.add_mux(host, spec)
        return None

    async def close_forward(self, host: str, spec: str) -> None:
        await self.forwards.remove_mux(host, spec)
