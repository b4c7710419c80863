"""The home directory on the server, learnt once per connection, for the ``~/`` paths of
forwards to Unix sockets.

sshd does not expand ``~`` in a ``direct-streamlocal@openssh.com`` path: OpenSSH 9.2 connects
to ``~/x.sock`` literally ("connect to ~/x.sock port -2 failed: No such file or directory" in
its log).  So tunneld asks the server once per connection (``printf %s "$HOME"``, the home a
login there has) and opens ``HOME/x.sock``; the answer is kept with the connection (a new
connection asks again: a ProxyJump target, a changed home).
"""

from __future__ import annotations

import asyncio
import weakref

import asyncssh

from . import sshrun
from .errors import TunneldError
from .spec import expand_home

#: seconds the server has to say its home directory
HOME_TIMEOUT = 15.0
#: what is run to learn it (any login shell: sh, bash, zsh, csh, fish)
HOME_COMMAND = 'printf %s "$HOME"'

#: connection → its home directory (a future: concurrent clients share one question)
_homes: weakref.WeakKeyDictionary[asyncssh.SSHClientConnection, asyncio.Future[str]] = \
    weakref.WeakKeyDictionary()


def expanded(conn: asyncssh.SSHClientConnection, path: str) -> str | None:
    """``path`` with ``~/`` expanded for ``conn``'s server, or None if its home is not known
    yet (``await home(conn)`` first).  Raises SpecError if the result is too long."""
    if not path.startswith("~/"):
        return path
    fut = _homes.get(conn)
    if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
        return None
    return expand_home(path, fut.result())


async def home(conn: asyncssh.SSHClientConnection) -> str:
    """The home directory on ``conn``'s server (asked once per connection).  Raises
    TunneldError saying why it could not be learnt (a failed ask is asked again next time)."""
    fut = _homes.get(conn)
    if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
        fut = asyncio.get_running_loop().create_task(_ask(conn))
        # its clients may all be gone (reset, cancelled) before it fails: the failure is
        # theirs to report, not the loop's "exception was never retrieved"
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        _homes[conn] = fut
    return await asyncio.shield(fut)


async def _ask(conn: asyncssh.SSHClientConnection) -> str:
    why = None
    try:
        r = await sshrun.run(conn, HOME_COMMAND, HOME_TIMEOUT)
    except asyncio.TimeoutError:
        why = f"no answer within {HOME_TIMEOUT:g}s"
    except (OSError, asyncssh.Error) as exc:
        why = str(exc) or type(exc).__name__
    else:
        out = r.stdout if isinstance(r.stdout, str) else ""
        if r.exit_status != 0:
            why = f"`{HOME_COMMAND}` exited with status {r.exit_status}"
        elif not out.startswith("/"):
            why = f"`{HOME_COMMAND}` printed {out[:80]!r}, not an absolute path"
        else:
            return out
    raise TunneldError(f"could not learn the home directory on the server to expand ~ ({why});"
                       " write the socket's absolute path instead")
