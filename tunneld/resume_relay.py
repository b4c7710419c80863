"""The relay of a resumable forward as tunneld sees it (``resume``): the program sent to the
server and started there, reached over the SSH connection (``direct-streamlocal``, or a
session where sshd refuses those), told to quit."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any, Protocol

import asyncssh

from . import relay
from .errors import TunneldError
from .forward import ForwardHost

log = logging.getLogger("tunneld")

#: seconds a keeper or a relay may take to say it listens
START_TIMEOUT = 20.0
#: seconds an end may take to answer AUTH
AUTH_TIMEOUT = 10.0
#: the shell text that runs the relay program given on stdin with the server's Python 3
RELAY_COMMAND = ('umask 077; p=$(command -v python3) || { echo "ERROR the server has no '
                 'python3 in PATH: a resumable forward runs its relay with it"; exit 127; }; '
                 'exec "$p" -')
#: where the server refuses ``direct-streamlocal`` (sshd_config AllowStreamLocalForwarding
#: no), the link to the relay's socket runs through this, in a session (``python3 -c``)
SPLICE = r"""
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def up():
    while True:
        d = os.read(0, 262144)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
out = sys.stdout.buffer
while True:
    d = s.recv(262144)
    if not d:
        break
    out.write(d)
    out.flush()
"""


#: the program's parts, in order (``relay``)
PARTS = ("relay.py", "relay_end.py", "relay_serve.py")
_FUTURE = "from __future__ import annotations\n"
_OWN_IMPORT = re.compile(r"^from \.\w+ import (?:\([^)]*\)|.*)\n", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def _source() -> str:
    """The relay program's modules as one text: their imports of each other dropped."""
    here = Path(relay.__file__).parent
    texts = [_OWN_IMPORT.sub("", (here / name).read_text()) for name in PARTS]
    return texts[0] + "".join(t.replace(_FUTURE, "", 1) for t in texts[1:])


def program(conf: dict[str, Any]) -> bytes:
    """The relay program with its configuration, for ``python3 -``."""
    return _source().replace(_FUTURE, f"{_FUTURE}_CONFIG = {conf!r}\n", 1).encode()


async def read_frame(reader: Any) -> tuple[int, dict[str, Any]]:
    """One JSON frame from an end (AUTH's answer, the keeper's STATUS): its type, its body."""
    t, _, n = relay.HEAD.unpack(await reader.readexactly(relay.HEAD.size))
    return t, dict(json.loads(await reader.readexactly(n)))


async def auth(reader: Any, writer: Any, secret: str, kind: str) -> dict[str, Any]:
    """Say AUTH on a new connection to an end; its answer (raises TunneldError)."""
    writer.write(relay.jframe(relay.AUTH, {"secret": secret, "kind": kind}))
    t, msg = await asyncio.wait_for(read_frame(reader), AUTH_TIMEOUT)
    if t != relay.AUTH or not msg.get("ok"):
        raise TunneldError(f"refused: {msg.get('error', 'no answer')}")
    return msg


class RelayStartError(TunneldError):
    """The server said why the relay cannot run (no python3, a directory it cannot make):
    the forward's streams cannot be served until that changes."""


class Owner(Protocol):
    """What a relay needs of its forward (``resume.ResumableForward``)."""

    #: ``forward.json``: the relay's id, the secret, its socket once started
    info: dict[str, Any]
    dir: Path
    host: ForwardHost
    spec: Any

    def limits(self) -> dict[str, Any]: ...

    def save(self) -> None:
        """Write ``info`` to ``forward.json``."""


class RelayEnd:
    """The relay of one resumable forward (``fwd``)."""

    def __init__(self, fwd: Owner) -> None:
        self.fwd = fwd
        #: the server refuses direct-streamlocal: the relay is reached through a session
        self.via_session = False

    async def open(self, conn: asyncssh.SSHClientConnection) -> tuple[Any, Any]:
        """A connection to this forward's relay on the server, after AUTH: the running one,
        else one started now."""
        started = False
        if not self.fwd.info.get("relay_path"):
            await self.start(conn)
            started = True
        while True:
            w = None
            try:
                r, w = await self.reach(conn, self.fwd.info["relay_path"], started)
                await auth(r, w, self.fwd.info["secret"], "link")
                return r, w
            except (asyncssh.ChannelOpenError, TunneldError, asyncio.IncompleteReadError):
                if w is not None:
                    w.close()
                if started:
                    raise
            except BaseException:
                if w is not None:
                    w.close()
                raise
            await self.start(conn)   # it has gone (its suspend limit, a reboot), or is not ours
            started = True

    async def reach(self, conn: asyncssh.SSHClientConnection, path: str,
                    fresh: bool, quitting: bool = False) -> tuple[Any, Any]:
        """A connection to the Unix socket ``path`` on the server: ``direct-streamlocal``, or
        where the server refuses that, a session that splices it (``SPLICE``).  ``fresh``: a
        relay said it listens there a moment ago, so a refused channel is the server's
        refusal (not taken as news when ``quitting``)."""
        if not self.via_session:
            try:
                return await asyncio.wait_for(conn.open_unix_connection(path), AUTH_TIMEOUT)
            except asyncssh.ChannelOpenError as exc:
                if not fresh:
                    raise
                if not quitting:
                    log.warning("%s: %s: the server refuses Unix-socket forwarding (%s; "
                                "sshd_config AllowStreamLocalForwarding): the relay is reached "
                                "through a session instead", self.fwd.host.name,
                                self.fwd.spec.listen, exc.reason)
                    self.via_session = True
        cmd = f"exec python3 -c {shlex.quote(SPLICE)} {shlex.quote(path)}"
        proc = await asyncio.wait_for(conn.create_process(cmd, encoding=None), AUTH_TIMEOUT)
        return proc.stdout, proc.stdin

    async def quit(self, conn: asyncssh.SSHClientConnection, path: str, secret: str,
                   fresh: bool = False) -> None:
        """Tell a relay to exit now rather than at its suspend limit (a former keeper's: its
        streams are gone; or the forward's, removed with no link up); one that has gone is
        fine.  ``fresh``: as ``reach``'s."""
        try:
            r, w = await self.reach(conn, path, fresh, quitting=True)
        except (OSError, asyncssh.Error, asyncio.TimeoutError):
            return
        try:
            await auth(r, w, secret, "ctrl")
            w.write(relay.jframe(relay.CMD, {"cmd": "quit"}))
            await asyncio.wait_for(w.drain(), AUTH_TIMEOUT)
        except (OSError, asyncssh.Error, TunneldError, asyncio.TimeoutError,
                asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            w.close()

    async def start(self, conn: asyncssh.SSHClientConnection) -> None:
        """Start this forward's relay on the server (``~/.tunneld/relay/ID/``; a home too
        deep for a socket path: ``/tmp/tunneld-UID/relay/ID/``), and note its socket."""
        rdir = f"~/.tunneld/relay/{self.fwd.info['relay']}"
        conf = dict(self.fwd.limits(), role="relay", dir=rdir, secret=self.fwd.info["secret"],
                    targets=[[self.fwd.spec.target_host, self.fwd.spec.target_port]])
        r = await asyncio.wait_for(conn.run(
            RELAY_COMMAND, input=program(conf).decode(), check=False, request_pty=False,
            term_type=None), START_TIMEOUT)
        out = str(r.stdout or "").strip()
        if not out.startswith("READY"):
            why = out.removeprefix("ERROR ") or str(r.stderr or "").strip()[-300:] or \
                f"exit status {r.exit_status}"
            raise RelayStartError(f"the relay did not start on the server: {why}")
        self.fwd.info["relay_path"] = out.split(None, 1)[1]
        self.fwd.save()
        log.info("%s: %s: started its relay on the server (%s)", self.fwd.host.name,
                 self.fwd.spec.listen, self.fwd.info["relay_path"])
