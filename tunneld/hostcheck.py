"""Is a host name a typo?  A name that ``~/.ssh/config`` does not know and that does not
resolve is almost always one (``hcp`` for ``hpc``); `tunnelctl add` refuses it, with the
closest names it knows, unless ``--force`` is given (a host reached only once a VPN is up).

A name counts as known when a ``Host`` line of the user's ssh config names it literally, or
when the config gives it a ``HostName``, ``ProxyJump`` or ``ProxyCommand`` (then the name is
resolved elsewhere, if at all).  Otherwise it is resolved here, bounded by
``RESOLVE_TIMEOUT``; a resolver that cannot answer now (no network: ``EAI_AGAIN``) is not
taken as a typo.
"""

from __future__ import annotations

import asyncio
import difflib
import socket

import asyncssh

from .errors import UsageError
from .sshconfig import config_aliases

#: seconds allowed for resolving a new host's name
RESOLVE_TIMEOUT = 5.0
#: resolver answers that mean "no such name" (anything else: cannot tell now)
_NO_SUCH_NAME = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL")
                 if hasattr(socket, n)}


def suggest(name: str, candidates: list[str]) -> list[str]:
    """The names of ``candidates`` closest to ``name`` (a typo's likely meaning).  Pure."""
    return difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.5)


async def check_new_host(name: str, known: list[str]) -> None:
    """Raise UsageError if ``name`` looks like a typo: not in ~/.ssh/config and it does not
    resolve.  ``known``: other names tunneld knows (for the suggestion)."""
    aliases = config_aliases()
    if name in aliases:
        return
    user, _, bare = name.rpartition("@")
    try:
        options = asyncssh.SSHClientConnectionOptions(config=(), host=bare.split(":")[0])
    except (ValueError, asyncssh.Error):
        return   # a bad config is reported by the connection attempt, with the reason
    cfg = options.config
    if options.host != bare.split(":")[0] or cfg.get("ProxyJump") or cfg.get("ProxyCommand"):
        return
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.getaddrinfo(options.host, 22, type=socket.SOCK_STREAM),
                               RESOLVE_TIMEOUT)
        return
    except socket.gaierror as exc:
        if exc.errno not in _NO_SUCH_NAME:
            return   # the resolver cannot answer now (offline?): not a typo
    except (asyncio.TimeoutError, OSError, UnicodeError):
        return
    close = suggest(name, aliases + known)
    hint = (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else
            "; add it to ~/.ssh/config (Host and HostName) if it is reached by another name")
    raise UsageError(f"no host {name!r} in ~/.ssh/config and the name does not resolve"
                     f"{hint} (`--force` adds it anyway, e.g. for a host that resolves only "
                     "once a VPN is up)")
