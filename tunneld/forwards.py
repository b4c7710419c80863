"""The forwards service: add, remove, automatic forwards, the restore at start and the reload.

Invariants: every forward in a host's ``forwards`` has a bound listener (a remote one: it is
requested whenever its host is connected); the state file holds exactly the forwards of
origin "added" (plus saved ones that could not be bound at start: they are kept, not lost),
written before `add` or `remove` return — a change that cannot be saved is not made.
Forwards of origin "auto" (made for a browser open or ``run --port``) are not saved; "config"
ones come from config.toml.  Every change holds ``hosts.lock``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from . import hostcheck
from . import spec as specmod
from .config import Config
from .errors import BindError, NotFound, SpecError, StateError, UsageError
from .events import EventHub
from .forward import LocalForward
from .host import Prompter
from .registry import Forward, Hosts
from .reload import Listener, plan_reload
from .remote_forward import RemoteForward
from .resume import ResumableForward
from .socks_forward import SocksForward
from .spec import ForwardSpec, is_loopback, join_host_port
from .state import HostState
from .store import Store

log = logging.getLogger("tunneld")

#: seconds `add` waits for the server's answer to new remote forwards once a host connected
REMOTE_ANSWER_WAIT = 10.0


class Forwards:
    def __init__(self, hosts: Hosts, store: Store, events: EventHub,
                 config: Callable[[], Config]) -> None:
        self.hosts = hosts
        self.store = store
        self.events = events
        #: the running config
        self._config = config
        #: host → saved specs that could not be bound at start (kept in the state file)
        self._unbound: dict[str, list[ForwardSpec]] = {}

    # -- the restore at start ----------------------------------------------------------------

    async def _restore(self) -> None:
        """Bind the forwards of config.toml and of the state file (hosts.lock held).
        Failures are logged; the daemon starts anyway."""
        config = self._config()
        wanted: list[tuple[str, ForwardSpec, str]] = []
        for host, specs in config.forwards().items():
            wanted += [(host, s, "config") for s in specs]
        for host, texts in self.store.load_forwards().items():
            for s in specmod.parse_all(texts, config.defaults.bind):
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
                log.error("%s: could not restore forward %s: %s%s", host, s, exc,
                          "; it stays saved and is tried again at the next start"
                          if origin == "added" else "")
                if origin == "added":
                    self._unbound.setdefault(host, []).append(s)
                continue
            if s.is_public:
                where = f"{host}'s server" if s.kind == "remote" else "this machine"
                log.warning("%s: %s is listening on a public address of %s (%s)", host,
                            s.listen, where, "config file" if origin == "config" else
                            "added with --public")
        for sup in self.hosts:
            sup.start()
        n = sum(len(sup.forwards) for sup in self.hosts)
        log.info("restored %d forward(s) on %d host(s)", n, len(self.hosts))

    # -- binding -----------------------------------------------------------------------------

    async def _bind(self, host: str, s: ForwardSpec, origin: str) -> Forward:
        """Make the forward for ``s`` take effect (a local listener bound; a remote one asked
        of the server now if ``host`` is connected) and register it.  Raises BindError (the
        host is released again if nothing else uses it)."""
        sup = self.hosts.supervisor(host)
        fwd: Forward
        if s.kind == "remote":
            fwd = RemoteForward(s, sup, origin)
        elif s.kind == "socks":
            fwd = SocksForward(s, sup, origin)
        elif s.kind == "resume":
            fwd = ResumableForward(s, sup, origin)
        else:
            fwd = LocalForward(s, sup, origin)
        try:
            await fwd.bind()
        except BaseException:
            await self.hosts._release(host)
            raise
        sup.forwards[fwd.spec] = fwd
        self.events.publish("forward", host=host, spec=str(fwd.spec), event="added",
                            origin=origin, old=None, new=fwd.state.value)
        return fwd

    async def _unbind(self, host: str, fwd: Forward) -> None:
        sup = self.hosts.get(host)
        if sup is None:
            return
        sup.forwards.pop(fwd.spec, None)
        if isinstance(fwd, ResumableForward):
            await fwd.retire()   # its streams end with it (close alone leaves them)
        await fwd.close()
        self.events.publish("forward", host=host, spec=str(fwd.spec), event="removed",
                            origin=fwd.origin, old=None, new=fwd.state.value)
        await self.hosts._release(host)

    async def ensure_forward(self, host: str, target_host: str, target_port: int,
                             path: str = "") -> LocalForward:
        """A forward of ``host`` to ``target_host:target_port`` (or to the Unix socket
        ``path`` on the server): an existing one, or a new automatic one on the same local
        port if that is free, else on a free port."""
        async with self.hosts.lock:
            return await self._ensure_forward(host, target_host, target_port, path)

    async def _ensure_forward(self, host: str, target_host: str, target_port: int,
                              path: str = "") -> LocalForward:
        sup = self.hosts.host_for(host)
        loop_target = is_loopback(target_host)
        for fwd in sup.forwards.values():
            t = fwd.spec
            if isinstance(fwd, LocalForward) and t.kind == "local" and (
                    t.target_path == path if path else not t.target_path and
                    t.target_port == target_port and (
                        t.target_host == target_host or
                        (loop_target and is_loopback(t.target_host)))):
                return fwd
        # a forward made because a remote program printed a URL is never public, whatever
        # defaults.bind says: exposing a port is a person's decision (`add --public`)
        bind = self._config().defaults.bind
        if not is_loopback(bind):
            bind = specmod.DEFAULT_BIND
        for port in (target_port, 0):
            if port and self.hosts.find_listener(bind, port) is not None:
                continue
            try:
                fwd = await self._bind(host, ForwardSpec(bind, port, target_host, target_port,
                                                         target_path=path), "auto")
            except BindError:
                continue
            assert isinstance(fwd, LocalForward)
            log.info("%s: added automatic forward %s", host, fwd.spec)
            return fwd
        raise BindError(f"{host}: no local port could be bound for "
                        f"{path or join_host_port(target_host, target_port)}")

    async def drop_auto(self, host: str, port: int | None, specs: list[str] = [],
                        keep: set[str] = set(), keep_ports: set[int] = set()) -> None:
        """A session ended: remove ``host``'s automatic forwards to its loopback's ``port``
        (its ``--port`` forward) and those of ``specs`` (made for its markers and printed
        URLs), except the ``keep`` ones and those to the loopback's ``keep_ports`` (other
        running sessions'); then release the host if it is unused.  A forward someone
        `add`ed meanwhile is not automatic any more."""
        async with self.hosts.lock:
            sup = self.hosts.get(host)
            for fwd in list(sup.forwards.values()) if sup else []:
                text, t = str(fwd.spec), fwd.spec
                to_port = t.kind == "local" and not t.target_path and is_loopback(t.target_host)
                if fwd.origin != "auto" or text in keep or \
                        (to_port and t.target_port in keep_ports):
                    continue
                if text in specs or (to_port and t.target_port == port):
                    await self._unbind(host, fwd)
            await self.hosts._release(host)

    async def restore_auto(self, host: str, text: str) -> None:
        """Bind an automatic forward a detached session had (``hosts.lock`` held), unless
        its listener exists."""
        (s,) = specmod.parse(text)
        if self.hosts.find_spec(host, s) is None:
            await self._bind(host, s, "auto")

    # -- add ---------------------------------------------------------------------------------

    async def add(self, host: str, specs: list[str], remote: list[str], socks: list[str],
                  public: bool = False, prompter: Prompter | None = None,
                  force: bool = False) -> dict[str, Any]:
        """Add forwards to ``host``: local ``specs``, remote forwards ``remote`` (-R) and
        SOCKS proxies ``socks`` (-D).  All or none: every local listener bound and, if the
        host is connected, every remote listener granted by the server — else nothing is left
        and BindError names the port.  Remote forwards of a host that is not connected are
        accepted (waiting) and asked for when it connects.  ``prompter`` answers the login
        prompts of the first attempt (a host in needs-auth is retried with it).  The state
        file is written before this returns; if it cannot be, nothing is added and
        StateError says why.  A new host that looks like a typo (``hostcheck``) is refused
        unless ``force``."""
        parsed = self._add_specs(host, specs + [f"-R {x}" for x in remote] +
                                 [f"-D {x}" for x in socks], public)
        if not force:
            await self.check_new_host(host)
        async with self.hosts.lock:
            result, bound = await self._add(host, parsed)
            sup = self.hosts.host_for(host)
        if sup.state is not HostState.CONNECTED:
            # report the next attempt's outcome (the forwards stay either way) ...
            await sup.next_attempt(prompter, self._config().defaults.connect_timeout + 1)
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
        if host in self.hosts or host in self._config().hosts:
            return
        await hostcheck.check_new_host(host, sorted({*self.hosts.names(),
                                                     *self._config().hosts}))

    def _add_specs(self, host: str, texts: list[str], public: bool) -> list[ForwardSpec]:
        """The specs of an `add`, checked (grammar, the public-bind policy)."""
        if not texts:
            raise UsageError("add needs at least one forward spec, e.g. 8090, 8090-8092, "
                             "-R 9000:localhost:8000 or -D 1080")
        specs = specmod.parse_all(texts, self._config().defaults.bind)
        if not public:
            exposed = [s for s in specs if s.is_public]
            if exposed:
                raise UsageError(public_message(host, exposed[0]))
        return specs

    async def _add(self, host: str, specs: list[ForwardSpec]
                   ) -> tuple[dict[str, Any], list[Forward]]:
        new: list[ForwardSpec] = []
        existing: list[str] = []
        kept: list[Forward] = []     # automatic forwards that this makes saved ones
        for s in specs:
            found = self.hosts.find_spec(host, s)
            if found is None:
                new.append(s)
            elif found[0].name == host and found[1].spec == s:
                if found[1].origin == "auto":
                    kept.append(found[1])
                else:
                    existing.append(str(s))
            else:
                raise taken(host, s, *found)
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
            self._save()
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

    # -- remove ------------------------------------------------------------------------------

    async def remove(self, host: str, specs: list[str], remote: list[str],
                     socks: list[str]) -> dict[str, Any]:
        """Remove the named forwards of ``host`` (all of them when none are named): local
        ``specs`` (which may also be ``-R …``/``-D …`` strings, as `list` shows them),
        remote forwards ``remote`` and SOCKS proxies ``socks``.  The state file is written
        first: if it cannot be, nothing is removed and StateError says why."""
        texts = specs + [f"-R {x}" for x in remote] + [f"-D {x}" for x in socks]
        async with self.hosts.lock:
            return await self._remove(host, texts)

    async def _remove(self, host: str, texts: list[str]) -> dict[str, Any]:
        sup = self.hosts.get(host)
        unbound = self._unbound.get(host, [])
        if (sup is None or not sup.forwards) and not unbound:
            raise NotFound(f"{host} has no forwards; `tunnelctl list` shows what there is")
        chosen: list[Forward] = []
        dropped: list[ForwardSpec] = []   # saved, never bound at this start
        forwards = sup.forwards if sup is not None else {}
        for text in texts:
            found: list[Forward] = []
            try:
                parsed = specmod.parse_any(text, self._config().defaults.bind)
            except SpecError:
                by_port = self._by_local_port(forwards.values(), text)  # `-R 9000`
                if by_port is None:
                    raise
                found = [by_port]
            else:
                for s in parsed:
                    fwd = forwards.get(s) or self._by_local_port(forwards.values(), text)
                    if fwd is None and s in unbound:
                        dropped.append(s)
                        continue
                    if fwd is None:
                        have = ", ".join(str(f) for f in sorted(forwards)) or "none"
                        raise NotFound(f"{host} has no forward {s}; its forwards: {have}")
                    found.append(fwd)
            chosen += [f for f in found if f not in chosen]
        if not texts:
            chosen, dropped = list(forwards.values()), list(unbound)
        try:
            self._save(without=chosen, dropped={host: dropped})
        except StateError as exc:
            raise StateError(f"{exc}; nothing was removed") from None
        self._unbound[host] = [x for x in unbound if x not in dropped]
        for fwd in chosen:
            await self._unbind(host, fwd)
        removed = [str(s) for s in [f.spec for f in chosen] + dropped]
        config_ones = [str(f.spec) for f in chosen if f.origin == "config"]
        log.info("%s: removed %s", host, ", ".join(removed))
        result: dict[str, Any] = {"host": host, "removed": removed}
        if config_ones:
            result["note"] = (f"{' '.join(config_ones)} declared in the config file come back "
                              "at the next start; delete them there to remove them for good")
        return result

    @staticmethod
    def _by_local_port(forwards: Any, text: str) -> Forward | None:
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
        for fwd in forwards:
            k = fwd.spec.kind
            if fwd.spec.bind_port == port and (k == kind if kind else k != "remote"):
                return fwd
        return None

    def _save(self, without: list[Forward] = [],
              dropped: dict[str, list[ForwardSpec]] | None = None) -> None:
        """Write the state file: every forward of origin "added" (less ``without``) and the
        saved ones not bound at this start (less ``dropped``).  Raises StateError."""
        gone = {id(f) for f in without}
        hosts: dict[str, list[ForwardSpec]] = {}
        for sup, fwd in self.hosts.forwards():
            if fwd.origin == "added" and id(fwd) not in gone:
                hosts.setdefault(sup.name, []).append(fwd.spec)
        for host, specs in self._unbound.items():
            hosts.setdefault(host, []).extend(
                s for s in specs if s not in (dropped or {}).get(host, []))
        self.store.save_forwards({h: [str(s) for s in sorted(v)]
                                  for h, v in sorted(hosts.items())})

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, config: Config, apply: Callable[[Config], None]) -> dict[str, Any]:
        """Apply a new (already validated) config (see ``reload.py`` for what changes).
        Nothing changes when a new forward cannot be bound or collides with a forward tunneld
        already has: BindError names it and the running config stays.  Once the new forwards
        are bound the config is the running one (``apply(config)``); a new forward on the
        address of a removed one that then fails is logged and reported in "failed"."""
        async with self.hosts.lock:
            have = [Listener(sup.name, fwd.spec, fwd.origin)
                    for sup, fwd in self.hosts.forwards()]
            plan = plan_reload(have, config.forwards())
            for host, s in plan.duplicates:
                log.warning("config: %s %s: %s is declared twice; ignored", host, s, s.listen)
            by_key = {(sup.name, fwd.spec): fwd for sup, fwd in self.hosts.forwards()}
            bound: list[tuple[str, Forward]] = []
            try:
                for host, s in plan.first:
                    bound.append((host, await self._bind(host, s, "config")))
            except BindError as exc:
                for host, fwd in bound:
                    await self._unbind(host, fwd)
                raise BindError(f"config not applied (the running one stays): {exc}") \
                    from None
            # from here on the new config is the running one
            apply(config)
            for host, s in plan.gone:
                await self._unbind(host, by_key[(host, s)])
            failed: list[dict[str, str]] = []
            for host, s in plan.after:
                try:
                    bound.append((host, await self._bind(host, s, "config")))
                except BindError as exc:
                    log.error("%s: could not add forward %s from the config: %s", host, s, exc)
                    failed.append({"host": host, "spec": str(s), "error": str(exc)})
            self.hosts.configure(config.defaults)
            for host, _ in bound:
                sup = self.hosts.get(host)
                if sup is not None:
                    sup.start()
        added = [f"{host} {fwd.spec}" for host, fwd in bound]
        removed = [f"{host} {s}" for host, s in plan.gone]
        log.info("config reloaded: %s added, %s removed, %d unchanged%s",
                 " ".join(added) or "nothing", " ".join(removed) or "nothing", plan.kept,
                 f", {len(failed)} failed" if failed else "")
        self.events.publish("daemon", event="reloaded", added=added, removed=removed,
                            failed=[f"{f['host']} {f['spec']}" for f in failed])
        return {"added": added, "removed": removed, "unchanged": plan.kept,
                "existing": plan.existing, "failed": failed}


def taken(host: str, s: ForwardSpec, other_sup: Any, other: Forward) -> BindError:
    """The refusal of ``s`` whose listener another forward holds."""
    if s.kind == "remote":
        return BindError(f"{host}: the server already listens on {s.listen} for "
                         f"tunneld's {other.spec}; remove that first "
                         f"(`tunnelctl remove {host} -R {s.bind_port}`) or pick "
                         "another remote port")
    what = "as a SOCKS proxy for" if other.spec.kind == "socks" else "to"
    target = "" if other.spec.kind == "socks" else f" {other.spec.target}"
    return BindError(f"cannot listen on {s.listen}: tunneld already forwards it "
                     f"{what} {other_sup.name}{target}; remove that first "
                     f"(`tunnelctl remove {other_sup.name} {_shell(other.spec)}`) "
                     "or pick another local port")


def _shell(spec: ForwardSpec) -> str:
    """A spec as one shell word (``-R 9000:…`` contains a space)."""
    text = str(spec)
    return f"'{text}'" if " " in text else text


def public_message(host: str, s: ForwardSpec) -> str:
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
