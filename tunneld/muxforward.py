"""Forwards an ssh client asks for through a control socket (``ssh -O forward|cancel -L/-R/-D
…``, ``MUX_C_OPEN_FWD``/``MUX_C_CLOSE_FWD``): forwards of origin "mux", shown by `list`, never
saved (the client's own ssh would not keep them past its master either), refused on a public
address as `add` refuses one without ``--public``."""

from __future__ import annotations

import logging

from . import spec as specmod
from .errors import NotFound, UsageError
from .forwards import Forwards, public_message, taken

log = logging.getLogger("tunneld")


class MuxForwards:
    def __init__(self, forwards: Forwards) -> None:
        self.f = forwards

    async def add_mux(self, host: str, text: str) -> None:
        """``ssh -O forward -L/-R/-D …`` through ``host``'s control socket: a forward of
        origin "mux" (not saved; shown by `list`), or nothing when the same one exists.
        Raises SpecError, UsageError (a public address), BindError."""
        specs = specmod.parse_any(text, self.f._config().defaults.bind)
        exposed = [s for s in specs if s.is_public]
        if exposed:
            raise UsageError(public_message(host, exposed[0]))
        async with self.f.hosts.lock:
            new = []
            for s in specs:
                found = self.f.hosts.find_spec(host, s)
                if found is None:
                    new.append(s)
                elif found[0].name != host or found[1].spec != s:
                    raise taken(host, s, *found)
            for s in new:
                await self.f._bind(host, s, "mux")
                log.info("%s: added %s (asked by an ssh client)", host, s)
            self.f.hosts.host_for(host)     # supervised: connected while it has forwards

    async def remove_mux(self, host: str, text: str) -> None:
        """``ssh -O cancel …``: remove the forward an ssh client asked for.  Raises
        NotFound for one it did not (OpenSSH's "port not forwarded")."""
        specs = specmod.parse_any(text, self.f._config().defaults.bind)
        async with self.f.hosts.lock:
            sup = self.f.hosts.get(host)
            fwds = [sup.forwards.get(s) for s in specs] if sup is not None else [None]
            if any(f is None or f.origin != "mux" for f in fwds):
                raise NotFound(f"port not forwarded: {host} has no forward {text} asked by "
                               "an ssh client (`tunnelctl list` shows its forwards; "
                               "`tunnelctl remove` removes any of them)")
            for f in fwds:
                assert f is not None
                await self.f._unbind(host, f)
                log.info("%s: removed %s (asked by an ssh client)", host, f.spec)
