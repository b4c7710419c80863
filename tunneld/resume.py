"""A resumable forward (``--resume``): its keeper on this machine, its relay on the server (both
``relay``), and the link tunneld splices between them while the host is connected.

The keeper holds the forward's listener and every local client, so a client survives an
outage and a daemon restart (kill -9, a crash, ``tunnelctl stop``: the keeper lives on for
``resume_suspend`` seconds and the next tunneld adopts it); only ``tunnelctl remove`` ends
them.  Its private directory ``<state>/resume/KEY/`` (0700) holds its socket and
``forward.json`` (the secret, the relay's id, the spec; 0600).  The relay's directory is
``~/.tunneld/relay/ID/`` on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh

from . import paths, relay
from .bindfail import bind_failure
from .errors import BindError, TunneldError
from .forward import LISTEN_BACKLOG, ForwardHost, ForwardReport
from .state import ForwardEvent, ForwardState, forward_follow, forward_next, is_connected

log = logging.getLogger("tunneld")

#: seconds a keeper or a relay may take to say it listens
START_TIMEOUT = 20.0
#: seconds an end may take to answer AUTH
AUTH_TIMEOUT = 10.0
#: seconds between two tries of a link that failed (doubling up to the second)
LINK_RETRY = (0.5, 5.0)
SPLICE_CHUNK = 1 << 18
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


def keeper_dir(host: str, listen: str) -> Path:
    return paths.runtime_dir() / "resume" / hashlib.sha256(
        f"{host}\n{listen}".encode()).hexdigest()[:16]


async def _auth(reader: Any, writer: Any, secret: str, kind: str) -> dict[str, Any]:
    """Say AUTH on a new connection to an end; its answer (raises TunneldError)."""
    writer.write(relay.jframe(relay.AUTH, {"secret": secret, "kind": kind}))
    head = await asyncio.wait_for(reader.readexactly(relay.HEAD.size), AUTH_TIMEOUT)
    t, _, n = relay.HEAD.unpack(head)
    msg = json.loads(await asyncio.wait_for(reader.readexactly(n), AUTH_TIMEOUT))
    if t != relay.AUTH or not msg.get("ok"):
        raise TunneldError(f"refused: {msg.get('error', 'no answer')}")
    return dict(msg)


async def _pump(reader: Any, writer: Any, fwd: ForwardReport, field: str) -> None:
    """Copy until EOF; ``fwd``'s ``field`` counts the bytes (frames) copied."""
    while True:
        data = await reader.read(SPLICE_CHUNK)
        if not data:
            return
        setattr(fwd, field, getattr(fwd, field) + len(data))
        writer.write(data)
        await writer.drain()


class ResumableForward(ForwardReport):
    """A local forward whose connections survive reconnects: its keeper and relay."""

    def __init__(self, spec: Any, host: ForwardHost, origin: str = "added") -> None:
        super().__init__(spec, host, origin)
        self.dir = keeper_dir(host.name, spec.listen)
        self.info: dict[str, Any] = {}
        #: the keeper's last report (``relay.End.status`` and its events)
        self.report: dict[str, Any] = {}
        #: since when the link is down with streams open (None: up, or nothing suspended)
        self.suspended_since: float | None = None
        self._ctrl: tuple[Any, Any] | None = None
        self._ctrl_task: asyncio.Task[None] | None = None
        self._link: asyncio.Task[None] | None = None
        self._closing = False
        self.link_up = False
        #: the server refuses direct-streamlocal: the link runs through a session
        self._via_session = False
        #: relays of a former keeper (their socket, their secret), to be told to quit
        self._stale: list[tuple[str, str]] = []

    def _limits(self) -> dict[str, Any]:
        s = self.host.settings
        return {"suspend": s.resume_suspend, "stream_buffer": s.resume_buffer,
                "buffer": s.resume_total_buffer, "max_streams": s.resume_max_streams}

    # -- the keeper ---------------------------------------------------------------------------

    async def bind(self) -> None:
        """Adopt the keeper a former tunneld left for this forward, or bind the listener and
        start one.  Raises BindError."""
        if not await self._adopt():
            await self._spawn()
        self.state = forward_next(self.state, ForwardEvent.BIND)
        self.follow_host()

    async def _adopt(self) -> bool:
        try:
            info = json.loads((self.dir / "forward.json").read_text())
        except (OSError, ValueError):
            return False
        self.info = info
        try:
            await self._connect_ctrl()
        except (OSError, TunneldError, asyncio.TimeoutError, ValueError,
                asyncio.IncompleteReadError):
            return False
        if info.get("spec") != str(self.spec):   # the forward changed: its keeper goes
            log.info("%s: %s: the forward changed (%s, was %s): its keeper ends", self.host.name,
                     self.spec.listen, self.spec, info.get("spec"))
            await self._quit_keeper()
            if info.get("relay_path"):
                self._stale.append((info["relay_path"], info["secret"]))
            return False
        log.info("%s: %s: took over its keeper (pid %s) and its %d stream(s)", self.host.name,
                 self.spec.listen, info.get("pid"), self.report.get("streams_open", 0))
        return True

    async def _spawn(self) -> None:
        spec = self.spec
        family = socket.AF_INET6 if ":" in spec.bind_host else socket.AF_INET
        try:
            sock = socket.create_server((spec.bind_host, spec.bind_port), family=family,
                                        backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise BindError(await bind_failure(spec, exc)) from None
        with sock:
            if spec.bind_port == 0:
                self.spec = spec = dataclasses.replace(spec, bind_port=sock.getsockname()[1])
                self.dir = keeper_dir(self.host.name, spec.listen)
            shutil.rmtree(self.dir, ignore_errors=True)
            paths.ensure_private_dir(self.dir)
            if self.info.get("relay_path") and self.info.get("secret"):
                self._stale.append((self.info["relay_path"], self.info["secret"]))
            # a relay per secret: one of a former keeper's never shares its directory
            self.info = {"spec": str(spec), "secret": os.urandom(32).hex(),
                         "relay": os.urandom(8).hex()}
            conf = dict(self._limits(), role="keeper", dir=str(self.dir), fd=sock.fileno(),
                        secret=self.info["secret"], name=f"{self.host.name} {spec.listen}")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, pass_fds=(sock.fileno(),))
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(program(conf))
            proc.stdin.close()
            try:
                line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode()
            except asyncio.TimeoutError:
                line = f"ERROR no answer in {START_TIMEOUT:g} s"
                proc.kill()
            await proc.wait()
        if not line.startswith("READY"):
            raise BindError(f"{spec.listen}: the keeper of the resumable forward did not "
                            f"start: {line.strip() or 'it exited'}")
        self.info["pid"] = int((self.dir / "pid").read_text())
        paths.atomic_write(self.dir / "forward.json", json.dumps(self.info).encode())
        await self._connect_ctrl()

    async def _connect_ctrl(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.dir / "sock")), AUTH_TIMEOUT)
        try:
            await _auth(reader, writer, self.info["secret"], "ctrl")
            self._on_report(await self._read_frame(reader))
        except BaseException:
            writer.close()
            raise
        self._ctrl = reader, writer
        self._ctrl_task = asyncio.get_running_loop().create_task(self._follow_keeper(reader))

    @staticmethod
    async def _read_frame(reader: Any) -> dict[str, Any]:
        t, _, n = relay.HEAD.unpack(await reader.readexactly(relay.HEAD.size))
        return dict(json.loads(await reader.readexactly(n)))

    async def _quit_keeper(self) -> None:
        """Tell the adopted keeper to end its streams and exit; wait until it has."""
        if self._ctrl is None:
            return
        self._closing = True
        self._ctrl[1].write(relay.jframe(relay.CMD, {"cmd": "quit"}))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._ctrl_task), 5)  # type: ignore
        self._closing = False
        self.report = {}

    async def _follow_keeper(self, reader: Any) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError, ValueError):
            while True:
                self._on_report(await self._read_frame(reader))
        self._ctrl = None
        if not self._closing:
            self.fail(f"{self.spec.listen}: the keeper of the resumable forward exited; its "
                      "streams are gone. Starting a new one.")
            try:
                await self._spawn()
            except (BindError, OSError) as exc:
                self.fail(f"{self.spec.listen}: could not start a new keeper: {exc}")

    def _on_report(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        self.report.update({k: v for k, v in msg.items() if k not in ("event", "sid", "why")})
        self.total = int(msg.get("total", self.total))
        was = self.suspended_since
        if msg.get("link") or not msg.get("streams_open"):
            self.suspended_since = None
        elif was is None:
            self.suspended_since = time.time()
        name, listen = self.host.name, self.spec.listen
        if event == "reset":
            log.warning("%s: %s: resumable stream %s closed: %s", name, listen, msg.get("sid"),
                        msg.get("why"))
        elif event == "refused":
            self.fail(f"{listen}: {msg.get('why')}")
        elif event == "resumed" and msg.get("streams_open"):
            log.info("%s: %s: %d stream(s) resumed after %.1f s", name, listen,
                     msg["streams_open"], msg.get("after", 0))
        if event in ("suspended", "resumed", "reset") and self.host.events is not None and \
                (msg.get("streams_open") or event == "reset"):
            self.host.events.publish("resume", host=name, spec=str(self.spec), event=event,
                                     streams=msg.get("streams_open"), why=msg.get("why"),
                                     after=msg.get("after"))

    # -- the link -----------------------------------------------------------------------------

    def follow_host(self) -> None:
        if self.state is ForwardState.CLOSED:
            return
        self.host_changed()
        self.state = forward_follow(self.state, is_connected(self.host.state))
        if self.host.live_connection() is not None and \
                (self._link is None or self._link.done()) and not self._closing:
            self._link = asyncio.get_running_loop().create_task(self._keep_link())

    async def _keep_link(self) -> None:
        """Link the ends while the host is connected (over whichever connection it has now:
        a reconnect while this waits to try again is taken at the next try)."""
        delay = LINK_RETRY[0]
        while not self._closing and (conn := self.host.live_connection()) is not None:
            try:
                await self._link_once(conn)
                delay = LINK_RETRY[0]
            except asyncio.CancelledError:
                raise
            except (OSError, asyncssh.Error, TunneldError, asyncio.TimeoutError,
                    asyncio.IncompleteReadError, ValueError) as exc:
                if self.host.live_connection() is conn and not self._closing:
                    self.fail(f"{self.spec.listen}: no link to the relay: {exc}",
                              key=f"{self.spec.listen}: no link to the relay")
            if self.host.live_connection() is conn and not self._closing:
                await asyncio.sleep(delay)
                delay = min(2 * delay, LINK_RETRY[1])

    async def _link_once(self, conn: asyncssh.SSHClientConnection) -> None:
        rel_r, rel_w = await self._open_relay(conn)
        while self._stale:
            await self._quit_relay(conn, *self._stale.pop())
        try:
            keep_r, keep_w = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.dir / "sock")), AUTH_TIMEOUT)
        except BaseException:
            rel_w.close()
            raise
        try:
            await _auth(keep_r, keep_w, self.info["secret"], "link")
            self.link_up = True
            self.last_error = None
            pumps = [asyncio.ensure_future(_pump(keep_r, rel_w, self, "bytes_in")),
                     asyncio.ensure_future(_pump(rel_r, keep_w, self, "bytes_out"))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self.link_up = False
            keep_w.close()
            rel_w.close()

    async def _open_relay(self, conn: asyncssh.SSHClientConnection) -> tuple[Any, Any]:
        """A connection to this forward's relay on the server, after AUTH: the running one,
        else one started now."""
        started = False
        if not self.info.get("relay_path"):
            await self._start_relay(conn)
            started = True
        while True:
            try:
                r, w = await self._reach(conn, self.info["relay_path"], started)
            except asyncssh.ChannelOpenError:
                if started:
                    raise
                await self._start_relay(conn)   # it has gone (its suspend limit, a reboot)
                started = True
                continue
            try:
                await _auth(r, w, self.info["secret"], "link")
                return r, w
            except (TunneldError, asyncio.IncompleteReadError):
                w.close()
                if started:
                    raise
                await self._start_relay(conn)
                started = True
            except BaseException:
                w.close()
                raise

    async def _reach(self, conn: asyncssh.SSHClientConnection, path: str,
                     fresh: bool) -> tuple[Any, Any]:
        """A connection to the Unix socket ``path`` on the server: ``direct-streamlocal``,
        or where the server refuses that, a session that splices it (``SPLICE``)."""
        if not self._via_session:
            try:
                return await asyncio.wait_for(conn.open_unix_connection(path), AUTH_TIMEOUT)
            except asyncssh.ChannelOpenError as exc:
                if not fresh:
                    raise
                # the relay said it listens there a moment ago: the server refuses the channel
                log.warning("%s: %s: the server refuses Unix-socket forwarding (%s; sshd_config "
                            "AllowStreamLocalForwarding): the relay is reached through a "
                            "session instead", self.host.name, self.spec.listen, exc.reason)
                self._via_session = True
        cmd = f"exec python3 -c {shlex.quote(SPLICE)} {shlex.quote(path)}"
        proc = await asyncio.wait_for(conn.create_process(cmd, encoding=None), AUTH_TIMEOUT)
        return proc.stdout, proc.stdin

    async def _quit_relay(self, conn: asyncssh.SSHClientConnection, path: str,
                          secret: str) -> None:
        """Tell a relay (a former keeper's: its streams are gone) to exit now rather than at
        its suspend limit; one that has gone already is fine."""
        try:
            r, w = await self._reach(conn, path, False)
        except (OSError, asyncssh.Error, asyncio.TimeoutError):
            return
        try:
            await _auth(r, w, secret, "ctrl")
            w.write(relay.jframe(relay.CMD, {"cmd": "quit"}))
            await asyncio.wait_for(w.drain(), AUTH_TIMEOUT)
        except (OSError, asyncssh.Error, TunneldError, asyncio.TimeoutError,
                asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            w.close()

    async def _start_relay(self, conn: asyncssh.SSHClientConnection) -> None:
        """Start this forward's relay on the server (``~/.tunneld/relay/ID/``; a home too
        deep for a socket path: ``/tmp/tunneld-UID/relay/ID/``), and note its socket."""
        rdir = f"~/.tunneld/relay/{self.info['relay']}"
        conf = dict(self._limits(), role="relay", dir=rdir, secret=self.info["secret"],
                    targets=[[self.spec.target_host, self.spec.target_port]])
        r = await asyncio.wait_for(conn.run(
            RELAY_COMMAND, input=program(conf).decode(), check=False, request_pty=False,
            term_type=None), START_TIMEOUT)
        out = str(r.stdout or "").strip()
        if not out.startswith("READY"):
            why = out.removeprefix("ERROR ") or str(r.stderr or "").strip()[-300:] or \
                f"exit status {r.exit_status}"
            raise TunneldError(f"the relay did not start on the server: {why}")
        self.info["relay_path"] = out.split(None, 1)[1]
        paths.atomic_write(self.dir / "forward.json", json.dumps(self.info).encode())
        log.info("%s: %s: started its relay on the server (%s)", self.host.name,
                 self.spec.listen, self.info["relay_path"])

    # -- the end ------------------------------------------------------------------------------

    async def retire(self) -> None:
        """The forward is removed: its keeper ends its streams, tells the relay, and exits."""
        await self._quit_keeper()
        self._closing = True
        conn = self.host.live_connection()
        if conn is not None:   # the keeper told it over the link, if one was up; else now
            if self.info.get("relay_path"):
                self._stale.append((self.info["relay_path"], self.info["secret"]))
            for path, secret in self._stale:
                await self._quit_relay(conn, path, secret)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def close(self, abort_clients: bool = True) -> None:
        """tunneld stops (or the forward is removed, after ``retire``): the keeper lives on
        for ``resume_suspend`` seconds, with its streams."""
        self._closing = True
        if self.state is not ForwardState.CLOSED:
            self.state = forward_next(self.state, ForwardEvent.CLOSE)
        for task in (self._link, self._ctrl_task):
            if task is not None:
                task.cancel()
        if self._ctrl is not None:
            self._ctrl[1].close()
            self._ctrl = None

    def snapshot(self) -> dict[str, Any]:
        d = super().snapshot()
        d["active"] = int(self.report.get("streams_open", 0))
        streams = self.report.get("streams", [])
        d["resume"] = {
            "link": self.link_up and bool(self.report.get("link")),
            "suspended": d["active"] if self.suspended_since is not None else 0,
            "suspended_since": self.suspended_since,
            "suspend_limit": self.host.settings.resume_suspend,
            "keeper_pid": self.info.get("pid"), "relay_path": self.info.get("relay_path"),
            "streams": streams if isinstance(streams, list) else [],
        }
        return d

