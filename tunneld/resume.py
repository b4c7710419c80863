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
import hashlib
import json
import logging
import os
import shutil
import signal
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
from .resume_relay import (
    AUTH_TIMEOUT,
    START_TIMEOUT,
    RelayEnd,
    RelayStartError,
    auth,
    program,
    read_frame,
)
from .state import ForwardEvent, ForwardState, forward_follow, forward_next, is_connected

log = logging.getLogger("tunneld")

#: seconds between two tries of a link that failed (doubling up to the second)
LINK_RETRY = (0.5, 5.0)
SPLICE_CHUNK = 1 << 18


def keeper_dir(host: str, listen: str) -> Path:
    return paths.runtime_dir() / "resume" / hashlib.sha256(
        f"{host}\n{listen}".encode()).hexdigest()[:16]


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
        self.relay = RelayEnd(self)
        #: relays of a former keeper (their socket, their secret), to be told to quit
        self._stale: list[tuple[str, str]] = []

    def save(self) -> None:
        paths.atomic_write(self.dir / "forward.json", json.dumps(self.info).encode())

    def limits(self) -> dict[str, Any]:
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
            await self._quit_keeper()   # (``_spawn`` notes its relay, to be told to quit)
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
            if self.info.get("relay_path") and self.info.get("secret"):   # a former keeper's
                self._stale.append((self.info["relay_path"], self.info["secret"]))
            # a relay per secret: one of a former keeper's never shares its directory
            self.info = {"spec": str(spec), "secret": os.urandom(32).hex(),
                         "relay": os.urandom(8).hex()}
            conf = dict(self.limits(), role="keeper", dir=str(self.dir), fd=sock.fileno(),
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
        self.save()
        await self._connect_ctrl()

    async def _connect_ctrl(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.dir / "sock")), AUTH_TIMEOUT)
        try:
            await auth(reader, writer, self.info["secret"], "ctrl")
            self._on_report((await read_frame(reader))[1])
        except BaseException:
            writer.close()
            raise
        self._ctrl = reader, writer
        self._ctrl_task = asyncio.get_running_loop().create_task(self._follow_keeper(reader))

    async def _quit_keeper(self) -> None:
        """Tell the keeper to end its streams and exit; wait until it has (else kill it)."""
        task, ctrl = self._ctrl_task, self._ctrl
        self._ctrl_task = self._ctrl = None   # its end is no news: not followed, not replaced
        if task is None or ctrl is None:
            return
        ctrl[1].write(relay.jframe(relay.CMD, {"cmd": "quit"}))
        try:
            await asyncio.wait_for(task, 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(OSError, TypeError, ValueError):
                os.kill(int(self.info.get("pid")), signal.SIGKILL)  # type: ignore[arg-type]
        ctrl[1].close()
        self.report = {}

    async def _follow_keeper(self, reader: Any) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError, ValueError):
            while True:
                self._on_report((await read_frame(reader))[1])
        if self._ctrl_task is not asyncio.current_task():
            return   # let go (``_quit_keeper``, ``close``)
        self._ctrl = self._ctrl_task = None
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
            t0 = time.monotonic()
            try:
                await self._link_once(conn)
                if time.monotonic() - t0 > 10 * LINK_RETRY[1]:   # a link that held
                    delay = LINK_RETRY[0]
            except asyncio.CancelledError:
                raise
            except (OSError, asyncssh.Error, TunneldError, asyncio.TimeoutError,
                    asyncio.IncompleteReadError, ValueError) as exc:
                if self.host.live_connection() is conn and not self._closing:
                    self.fail(f"{self.spec.listen}: no link to the relay: {exc}",
                              key=f"{self.spec.listen}: no link to the relay")
                if isinstance(exc, RelayStartError) and self._ctrl is not None:
                    # no relay to resume them on: the clients are told now, not at the limit
                    self._ctrl[1].write(relay.jframe(relay.CMD, {"cmd": "reset",
                                                                 "why": str(exc)}))
            if self.host.live_connection() is conn and not self._closing:
                await asyncio.sleep(delay)
                delay = min(2 * delay, LINK_RETRY[1])

    async def _link_once(self, conn: asyncssh.SSHClientConnection) -> None:
        while self._stale:
            await self.relay.quit(conn, *self._stale.pop())
        # the keeper first: a relay reached but not linked would wait for nothing
        keep_r, keep_w = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.dir / "sock")), AUTH_TIMEOUT)
        try:
            await auth(keep_r, keep_w, self.info["secret"], "link")
            rel_r, rel_w = await self.relay.open(conn)
        except BaseException:
            keep_w.close()
            raise
        try:
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

    # -- the end ------------------------------------------------------------------------------

    async def retire(self) -> None:
        """The forward is removed: its keeper ends its streams, tells the relay, and exits."""
        self._closing = True
        linked = self.link_up   # then the keeper tells the relay over the link
        await self._quit_keeper()
        conn = self.host.live_connection()
        if conn is not None:
            if self.info.get("relay_path") and not linked:
                await self.relay.quit(conn, self.info["relay_path"], self.info["secret"],
                                      fresh=True)
            for path, secret in self._stale:
                await self.relay.quit(conn, path, secret)
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

