"""One handler per control command; each is one call into the manager's services.

A handler gets the request's arguments already checked and typed (``wire.parse_args``) and the
``Peer`` of the request (progress lines; login prompts for a client that said it can answer
them).  It returns the final reply's result or raises a TunneldError.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import os
import time
from typing import Any, Awaitable, Callable, Protocol

from . import __version__, fastpath
from .errors import TunneldError, UsageError
from .host import Prompter
from .manager import Manager
from .registry import host_result
from .state import SessionState

#: bytes of session output per progress line
OUTPUT_CHUNK = 32 * 1024
#: a limit: bytes of a session log sent by `logs` without --all
LOGS_TAIL = 256 * 1024
#: seconds between keep-alive lines on a quiet event stream (a gone client is noticed)
EVENTS_HEARTBEAT = 15.0

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class Peer(Protocol):
    """The client of the request being served (``control.Peer``)."""

    async def __call__(self, msg: dict[str, Any]) -> None: ...

    async def ask(self, question: dict[str, Any]) -> list[str]: ...


Handler = Callable[[dict[str, Any], Peer], Awaitable[Any]]


def _prompter(args: dict[str, Any], peer: Peer) -> Prompter | None:
    """The ask of a client that can answer login prompts (it said "interactive": true)."""
    return peer.ask if args.get("interactive") else None


def _open_fds() -> int | None:
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return None


class Handlers:
    def __init__(self, manager: Manager, socket_path: str, on_stop: Callable[[], None],
                 on_reload: Callable[[str], Awaitable[Any]] | None,
                 on_stream: Callable[[], None]) -> None:
        self.m = manager
        self.socket_path = socket_path
        self.on_stop = on_stop
        #: re-reads the config and applies it (the daemon's); None: reload is not offered
        self.on_reload = on_reload
        #: called by a handler that streams until the daemon stops (events)
        self.on_stream = on_stream
        self.started = time.time()
        self.by_command: dict[str, Handler] = {
            "add": self.add, "remove": self.remove, "list": self.list, "status": self.status,
            "stop": self.stop, "reconnect": self.reconnect, "login": self.login,
            "run": self.run, "sessions": self.sessions, "logs": self.logs, "kill": self.kill,
            "forget": self.forget, "open": self.open, "reload": self.reload,
            "events": self.events, "opens": self.opens, "setup-remote": self.setup_remote,
        }

    async def add(self, a: dict[str, Any], peer: Peer) -> Any:
        return await self.m.forwards.add(a["host"], a["specs"], a["remote"], a["socks"],
                                         public=a["public"], prompter=_prompter(a, peer),
                                         force=a["force"])

    async def remove(self, a: dict[str, Any], peer: Peer) -> Any:
        return await self.m.forwards.remove(a["host"], a["specs"], a["remote"], a["socks"])

    async def list(self, a: dict[str, Any], peer: Peer) -> Any:
        return self.m.snapshot()

    async def status(self, a: dict[str, Any], peer: Peer) -> Any:
        return {"version": __version__, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3), "socket": self.socket_path,
                "hosts": len(self.m.hosts),
                "forwards": sum(len(h.forwards) for h in self.m.hosts),
                # for leak checks: both return to their baseline after outages
                "tasks": len(asyncio.all_tasks()), "fds": _open_fds(),
                "fastpath": fastpath.status()}

    async def stop(self, a: dict[str, Any], peer: Peer) -> Any:
        asyncio.get_running_loop().call_soon(self.on_stop)
        # open connections get up to "drain" seconds to finish before the daemon exits
        return {"stopping": True, "pid": os.getpid(),
                "drain": self.m.config.defaults.stop_timeout}

    async def reconnect(self, a: dict[str, Any], peer: Peer) -> Any:
        sups = await self.m.hosts.reconnect(a["host"], _prompter(a, peer))
        return {"hosts": [host_result(s) for s in sups]}

    async def login(self, a: dict[str, Any], peer: Peer) -> Any:
        return await self.m.hosts.login(a["host"], _prompter(a, peer))

    async def run(self, a: dict[str, Any], peer: Peer) -> Any:
        return await self.m.sessions.run(a["host"], a["command"], name=a["name"],
                                         port=a["port"], detach=a["detach"],
                                         prompter=_prompter(a, peer), follow=a["follow"],
                                         sock=a["sock"], job=a["job"],
                                         scheduler=a["scheduler"])

    async def sessions(self, a: dict[str, Any], peer: Peer) -> Any:
        return self.m.sessions_snapshot()

    async def kill(self, a: dict[str, Any], peer: Peer) -> Any:
        return await self.m.sessions.kill(a["name"])

    async def forget(self, a: dict[str, Any], peer: Peer) -> Any:
        return self.m.sessions.forget(a["names"], a["ended"])

    async def open(self, a: dict[str, Any], peer: Peer) -> Any:
        if a["request"] is not None:
            if a["session"] is not None or a["url"] is not None or a["list"]:
                raise UsageError("open --request N takes no session, URL or --list")
            return await self.m.spools.open_request(a["request"], _prompter(a, peer))
        if a["session"] is not None:
            return await self.m.sessions.urls(a["session"], not a["list"])
        host = a["host"]
        if host is None or a["url"] is None:
            raise UsageError("open needs a session name, or a host and a URL")
        try:
            await self.m.hosts.logged_in(host, _prompter(a, peer))
            return await self.m.opener.open(host, a["url"], a["node"], "tunnelctl open")
        finally:
            await self.m.hosts.release(host)   # kept only if something else uses it

    async def opens(self, a: dict[str, Any], peer: Peer) -> Any:
        return {"version": __version__, **self.m.spools.snapshot()}

    async def setup_remote(self, a: dict[str, Any], peer: Peer) -> Any:
        return await self.m.spools.setup_remote(a["host"], a["apply"], a["shell_file"],
                                                _prompter(a, peer))

    async def reload(self, a: dict[str, Any], peer: Peer) -> Any:
        if self.on_reload is None:
            raise UsageError("this daemon cannot reload its config; restart it")
        return await self.on_reload("tunnelctl reload")

    async def logs(self, a: dict[str, Any], peer: Peer) -> Any:
        """Stream a session's log (its tail, or all of it), then, with ``follow``, new output
        until the session ends.  Output travels as ``{"output": text}`` progress lines."""
        sess = self.m.sessions.session(a["name"])
        queue = sess.follow() if a["follow"] else None
        if sess.state is SessionState.PENDING:   # (a batch job waiting in the queue)
            job = sess.snapshot()["job"]
            reason = f" ({job['reason']})" if job.get("reason") else ""
            await peer({"message": f"tunnelctl: session {sess.name}: job {job['id']} is "
                                   f"pending{reason}; its output comes when it runs"
                                   + ("; following" if a["follow"] else "")})
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            size = sess.log_path.stat().st_size if sess.log_path.exists() else 0
            start = 0 if a["all"] else max(0, size - LOGS_TAIL)
            with open(sess.log_path, "rb") if size else io.BytesIO() as f:
                f.seek(start)
                remaining = size - start
                while remaining > 0:
                    chunk = f.read(min(OUTPUT_CHUNK, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    await peer({"output": text.decode(chunk)})
            while queue is not None:
                data = await queue.get()
                if data is None:
                    break
                for i in range(0, len(data), OUTPUT_CHUNK):
                    await peer({"output": text.decode(data[i:i + OUTPUT_CHUNK])})
        finally:
            if queue is not None:
                sess.unfollow(queue)
        return sess.snapshot()

    async def events(self, a: dict[str, Any], peer: Peer) -> Any:
        """Stream state changes as ``{"event": {...}}`` progress lines until the client goes
        away or the daemon stops (then the final reply says why the stream ended).  A quiet
        stream gets ``{"heartbeat": true}`` lines every ``EVENTS_HEARTBEAT`` s."""
        sub = self.m.events.subscribe()
        self.on_stream()
        try:
            await peer({"subscribed": True})
            while True:
                try:
                    event = await asyncio.wait_for(sub.get(), EVENTS_HEARTBEAT)
                except asyncio.TimeoutError:
                    await peer({"heartbeat": True})
                    continue
                if event is None:
                    break
                await peer({"event": event})
        finally:
            sub.close()
        if sub.dropped:
            raise TunneldError(sub.dropped)
        return {"ended": "the daemon is stopping"}
