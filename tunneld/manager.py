"""Registry of host supervisors: add/remove forwards, snapshot, persistence.

Invariants: a host is in ``hosts`` iff it has at least one forward; every forward in a host's
``forwards`` has a bound listener; the state file holds exactly the forwards of origin
"added", written after every change.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

from . import __version__
from . import spec as specmod
from .config import Config, StateFile, load_state, save_state
from .errors import BindError, NotFound, UsageError
from .forward import LocalForward
from .host import HostSupervisor
from .spec import ForwardSpec
from .state import HostState, slept_for

log = logging.getLogger("tunneld")

#: seconds between two clock readings of the sleep detector
CLOCK_TICK = 2.0

#: an ssh host alias: what `ssh NAME` would accept as a destination, without options
_HOST_RE = re.compile(r"^(?!-)[A-Za-z0-9_.@%+\[\]:-]{1,255}$")


def check_host_name(name: Any) -> str:
    if not isinstance(name, str) or not _HOST_RE.match(name):
        raise UsageError(f"{name!r} is not a host name; use a Host alias from ~/.ssh/config "
                         "or a host name as for ssh")
    return name


class Manager:
    def __init__(self, config: Config, state_path: Path):
        self.config = config
        self.state_path = state_path
        #: host name → supervisor; a host is here iff it has forwards
        self.hosts: dict[str, HostSupervisor] = {}

    # -- start / stop ------------------------------------------------------------------------

    async def restore(self) -> None:
        """Bind the forwards of config.toml and of the state file.  Failures are logged; the
        daemon starts anyway."""
        wanted: list[tuple[str, ForwardSpec, str]] = []
        for host, specs in self.config.forwards().items():
            wanted += [(host, s, "config") for s in specs]
        saved = load_state(self.state_path)
        for host, texts in saved.hosts.items():
            for s in specmod.parse_all(texts, self.config.defaults.bind):
                wanted.append((host, s, "added"))
        seen: set[tuple[str, int]] = set()
        for host, s, origin in wanted:
            key = (s.bind_host, s.bind_port)
            if key in seen:
                continue
            seen.add(key)
            try:
                await self._bind(host, s, origin)
            except BindError as exc:
                log.error("%s: could not restore forward %s: %s", host, s, exc)
        for sup in self.hosts.values():
            sup.start()
        n = sum(len(h.forwards) for h in self.hosts.values())
        log.info("restored %d forward(s) on %d host(s)", n, len(self.hosts))

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

    async def close(self) -> None:
        for sup in list(self.hosts.values()):
            await sup.stop()
        self.hosts.clear()

    # -- commands ----------------------------------------------------------------------------

    def _find(self, bind_host: str, bind_port: int) -> tuple[HostSupervisor, LocalForward] | None:
        for sup in self.hosts.values():
            for fwd in sup.forwards.values():
                if (fwd.spec.bind_host, fwd.spec.bind_port) == (bind_host, bind_port):
                    return sup, fwd
        return None

    async def _bind(self, host: str, s: ForwardSpec, origin: str) -> LocalForward:
        sup = self.hosts.get(host)
        if sup is None:
            sup = HostSupervisor(host, self.config.defaults)
        fwd = LocalForward(s, sup, origin)
        await fwd.bind()
        self.hosts[host] = sup
        sup.forwards[s] = fwd
        return fwd

    async def add(self, host: str, texts: list[str], public: bool = False) -> dict[str, Any]:
        """Add forwards to ``host``: all bound, or none (BindError names the port)."""
        check_host_name(host)
        if not isinstance(texts, list) or not texts or \
                not all(isinstance(t, str) for t in texts):
            raise UsageError("add needs at least one forward spec, e.g. 8090 or 8090-8092")
        specs = specmod.parse_all(texts, self.config.defaults.bind)
        if not public:
            exposed = [s for s in specs if s.is_public]
            if exposed:
                raise UsageError(
                    f"{exposed[0].listen} is reachable from other machines; anyone who can "
                    f"reach it reaches {host}'s {exposed[0].target}. Pass --public if that is "
                    f"what you want, or bind to 127.0.0.1")
        new: list[ForwardSpec] = []
        existing: list[str] = []
        for s in specs:
            found = self._find(s.bind_host, s.bind_port)
            if found is None:
                new.append(s)
            elif found[0].name == host and found[1].spec == s:
                existing.append(str(s))
            else:
                other_sup, other = found
                raise BindError(f"cannot listen on {s.listen}: tunneld already forwards it to "
                                f"{other_sup.name} {other.spec.target}; remove that first "
                                f"(`tunnelctl remove {other_sup.name} {other.spec}`) or pick "
                                "another local port")
        bound: list[LocalForward] = []
        try:
            for s in new:
                bound.append(await self._bind(host, s, "added"))
        except BaseException:
            for fwd in bound:
                await self._unbind(host, fwd)
            raise
        for s in new:
            if s.is_public:
                log.warning("%s: %s is listening on a public address", host, s.listen)
        if new:
            log.info("%s: added %s", host, " ".join(str(s) for s in new))
            self.save()
        result: dict[str, Any] = {"host": host, "added": [str(s) for s in new],
                                  "existing": existing}
        sup = self.hosts[host]
        sup.start()
        if sup.state is not HostState.CONNECTED:
            # report the first attempt's outcome; the forwards stay either way
            await sup.wait_attempt(self.config.defaults.connect_timeout + 1)
        result["state"] = sup.state.value
        result["last_error"] = sup.last_error
        return result

    async def _unbind(self, host: str, fwd: LocalForward) -> None:
        sup = self.hosts.get(host)
        if sup is None:
            return
        sup.forwards.pop(fwd.spec, None)
        await fwd.close()
        if not sup.forwards:
            del self.hosts[host]
            await sup.stop()

    async def remove(self, host: str, texts: list[str] | None = None) -> dict[str, Any]:
        """Remove the named forwards of ``host`` (all of them when none are named)."""
        check_host_name(host)
        sup = self.hosts.get(host)
        if sup is None:
            raise NotFound(f"{host} has no forwards; `tunnelctl list` shows what there is")
        if texts:
            if not all(isinstance(t, str) for t in texts):
                raise UsageError("remove takes forward specs as strings")
            chosen: list[LocalForward] = []
            for text in texts:
                for s in specmod.parse(text, self.config.defaults.bind):
                    fwd = sup.forwards.get(s) or self._by_local_port(sup, text, s)
                    if fwd is None:
                        have = " ".join(str(f) for f in sorted(sup.forwards)) or "none"
                        raise NotFound(f"{host} has no forward {s}; its forwards: {have}")
                    if fwd not in chosen:
                        chosen.append(fwd)
        else:
            chosen = list(sup.forwards.values())
        for fwd in chosen:
            await self._unbind(host, fwd)
        removed = [str(f.spec) for f in chosen]
        config_ones = [str(f.spec) for f in chosen if f.origin == "config"]
        log.info("%s: removed %s", host, " ".join(removed))
        self.save()
        result: dict[str, Any] = {"host": host, "removed": removed}
        if config_ones:
            result["note"] = (f"{' '.join(config_ones)} declared in the config file come back "
                              "at the next start; delete them there to remove them for good")
        return result

    @staticmethod
    def _by_local_port(sup: HostSupervisor, text: str, s: ForwardSpec) -> LocalForward | None:
        """A bare PORT also names the forward listening on that port (`remove barhal 18090`)."""
        if not text.strip().isdigit():
            return None
        for fwd in sup.forwards.values():
            if fwd.spec.bind_port == s.bind_port:
                return fwd
        return None

    # -- persistence and reporting -----------------------------------------------------------

    def save(self) -> None:
        hosts = {name: [str(f.spec) for f in sorted(sup.forwards.values(), key=lambda f: f.spec)
                        if f.origin == "added"]
                 for name, sup in sorted(self.hosts.items())}
        try:
            save_state(self.state_path, StateFile(hosts={h: v for h, v in hosts.items() if v}))
        except OSError as exc:
            log.error("could not write the state file %s: %s; forwards added now will not "
                      "survive a restart", self.state_path, exc.strerror or exc)

    def snapshot(self) -> dict[str, Any]:
        return {"version": __version__,
                "hosts": [self.hosts[h].snapshot() for h in sorted(self.hosts)]}
