"""Unix-socket JSON-lines control server: permissions, limits, dispatch to the manager.

Every request gets exactly one final reply (``wire.ok`` / ``wire.error``); a bad request
never takes the daemon down.  Only the socket owner's uid is served (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import codecs
import io
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import __version__, fastpath, wire
from .errors import LoginAbandoned, ProtocolError, TunneldError, UsageError
from .host import HostSupervisor, Prompter
from .manager import Manager, check_host_name
from .state import HostState

log = logging.getLogger("tunneld")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Emit], Awaitable[Any]]
#: bytes of session output per progress line
OUTPUT_CHUNK = 32 * 1024
#: a limit: bytes of a session log sent by `logs` without --all
LOGS_TAIL = 256 * 1024
#: a limit: seconds a refused peer (another uid) is read from before its connection closes
REFUSE_GRACE = 1.0
#: seconds between keep-alive lines on a quiet event stream (a gone client is noticed)
EVENTS_HEARTBEAT = 15.0
#: seconds an ended event stream gets to deliver its final line when the daemon stops
STREAM_END_GRACE = 1.0
#: commands answered while the daemon still restores the last run's forwards and sessions
ANSWERED_BEFORE_READY = frozenset({"status"})


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, if the OS tells."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    if hasattr(socket, "LOCAL_PEERCRED"):  # macOS / BSD: struct xucred {version, uid, ...}
        creds = sock.getsockopt(0, socket.LOCAL_PEERCRED, struct.calcsize("2I"))
        return struct.unpack("2I", creds)[1]
    return None


class ClientGone(ConnectionError):
    """The client of a request closed its end while the request ran: nobody to answer."""


class Peer:
    """The client of the request being served.  ``await peer(msg)`` sends a progress line;
    ``await peer.ask(question)`` relays a login prompt and reads the client's answer line (the
    socket is otherwise not read while a request runs).  Answers are returned, never kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        #: id of the last prompt sent on this connection
        self._last_id = 0
        #: one question at a time (two hosts of one `reconnect` may need answers together)
        self._asking = asyncio.Lock()

    async def __call__(self, msg: dict[str, Any]) -> None:
        try:
            self.writer.write(wire.encode(msg))
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:  # uvloop: RuntimeError once closed
            raise ClientGone(str(exc)) from None

    async def ask(self, question: dict[str, Any]) -> list[str]:
        """Ask the person at the client (``question``: wire.prompt's fields).  Raises
        LoginAbandoned on cancel, EOF, a closed socket, a bad answer or ANSWER_TIMEOUT."""
        async with self._asking:
            self._last_id += 1
            pid = self._last_id
            try:
                await self(wire.prompt(pid, **question))
            except (ConnectionError, OSError):
                raise LoginAbandoned("tunnelctl went away") from None
            deadline = time.monotonic() + wire.ANSWER_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                try:
                    line = await asyncio.wait_for(self.reader.readline(), max(left, 0))
                except asyncio.TimeoutError:
                    raise LoginAbandoned(f"no answer within {wire.ANSWER_TIMEOUT:g}s") from None
                except (ValueError, asyncio.LimitOverrunError, ConnectionError, OSError):
                    raise LoginAbandoned("the answer could not be read") from None
                if not line:
                    raise LoginAbandoned("tunnelctl went away (^C or its terminal closed)")
                try:
                    msg = wire.decode(line)
                    late = msg.get("answer")
                    if isinstance(late, dict) and isinstance(late.get("id"), int) and \
                            not isinstance(late.get("id"), bool) and late["id"] < pid:
                        continue   # the answer to an earlier prompt that timed out
                    responses = wire.parse_answer(msg, pid, len(question["prompts"]))
                except ProtocolError as exc:   # its message never contains a response
                    raise LoginAbandoned(f"unreadable answer: {exc}") from None
                if responses is None:
                    raise LoginAbandoned("cancelled by the user")
                return responses


def _prompter(args: dict[str, Any], peer: Emit) -> Prompter | None:
    """The ask of a client that can answer login prompts (it said "interactive": true)."""
    return peer.ask if args.get("interactive") is True and isinstance(peer, Peer) else None


def _host_result(sup: HostSupervisor) -> dict[str, Any]:
    return {"name": sup.name, "state": sup.state.value, "last_error": sup.last_error}


def _empty() -> io.BytesIO:
    return io.BytesIO()


def _open_fds() -> int | None:
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return None


class ControlServer:
    def __init__(self, manager: Manager, path: Path, on_stop: Callable[[], None],
                 on_reload: Callable[[str], Awaitable[Any]] | None = None):
        self.manager = manager
        self.path = path
        self.on_stop = on_stop
        #: re-reads the config and applies it (the daemon's); None: reload is not offered
        self.on_reload = on_reload
        self.started = time.time()
        self._server: asyncio.base_events.Server | None = None
        #: tasks serving connected clients; cancelled by close()
        self._clients: set[asyncio.Task[Any]] = set()
        #: the subset of those that streamed events (close() lets them say goodbye first)
        self._streams: set[asyncio.Task[Any]] = set()
        self.handlers: dict[str, Handler] = {
            "add": self._add, "remove": self._remove, "list": self._list,
            "status": self._status, "stop": self._stop, "reconnect": self._reconnect,
            "run": self._run, "sessions": self._sessions, "logs": self._logs,
            "kill": self._kill, "open": self._open, "reload": self._reload,
            "events": self._events, "login": self._login, "forget": self._forget,
        }
        assert set(self.handlers) <= wire.COMMANDS

    async def start(self) -> None:
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=wire.MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        streams = [t for t in self._streams if t in self._clients]
        if streams:
            await asyncio.wait(streams, timeout=STREAM_END_GRACE)
        clients = [t for t in self._clients if t is not asyncio.current_task()]
        for t in clients:
            t.cancel()
        if clients:
            await asyncio.wait(clients, timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if uid is not None and uid != os.getuid():
                log.warning("control: refused a connection from uid %d (only uid %d may "
                            "control this daemon)", uid, os.getuid())
                await self._send(writer, wire.error(__version__, ProtocolError(
                    f"permission denied: this tunneld belongs to uid {os.getuid()}")))
                # take (and ignore) what the client sends for a moment, so that its request
                # write does not fail with EPIPE before it reads the refusal
                try:
                    await asyncio.wait_for(reader.read(wire.MAX_LINE), REFUSE_GRACE)
                except (asyncio.TimeoutError, ValueError):
                    pass
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), wire.REQUEST_TIMEOUT)
                except asyncio.TimeoutError:
                    await self._send(writer, wire.error(__version__, ProtocolError(
                        f"no complete request within {wire.REQUEST_TIMEOUT:g}s; closing")))
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, wire.error(__version__, ProtocolError(
                        f"request longer than {wire.MAX_LINE} bytes; closing")))
                    return
                if not line:
                    return
                writer.write(await self._handle(line, Peer(reader, writer)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the daemon is stopping
        finally:
            self._clients.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(wire.encode(msg))
        await writer.drain()

    async def _handle(self, line: bytes, emit: Emit) -> bytes:
        """The final reply line to the request ``line``."""
        try:
            cmd, args = wire.parse_request(wire.decode(line))
            if cmd not in ANSWERED_BEFORE_READY:
                # the forwards and sessions of the last run are restored first: a command
                # must never see (or save) half of them
                await self.manager.ready.wait()
            result = await self.handlers[cmd](args, emit)
            # one that cannot go on the wire (too long) is an error reply, not a crash
            return wire.encode(wire.ok(__version__, result))
        except TunneldError as exc:
            return wire.encode(wire.error(__version__, exc))
        except ClientGone:
            raise   # _serve closes the connection; there is nobody to reply to
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("control: internal error")
            return wire.encode(wire.error(__version__, TunneldError(
                f"internal error ({type(exc).__name__}: {exc}); see the daemon log")))

    # -- commands ----------------------------------------------------------------------------

    async def _add(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.manager.add(args.get("host"), args.get("specs"),
                                      public=args.get("public") is True,  # not "false"
                                      remote=args.get("remote"), socks=args.get("socks"),
                                      prompter=_prompter(args, emit),
                                      force=args.get("force") is True)

    async def _remove(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.manager.remove(args.get("host"), args.get("specs") or None,
                                         remote=args.get("remote") or None,
                                         socks=args.get("socks") or None)

    async def _list(self, args: dict[str, Any], emit: Emit) -> Any:
        return self.manager.snapshot()

    async def _status(self, args: dict[str, Any], emit: Emit) -> Any:
        return {"version": __version__, "pid": os.getpid(),
                "uptime": round(time.time() - self.started, 3), "socket": str(self.path),
                "hosts": len(self.manager.hosts),
                "forwards": sum(len(h.forwards) for h in self.manager.hosts.values()),
                # for leak checks: both return to their baseline after outages
                "tasks": len(asyncio.all_tasks()), "fds": _open_fds(),
                "fastpath": fastpath.status()}

    async def _stop(self, args: dict[str, Any], emit: Emit) -> Any:
        asyncio.get_running_loop().call_soon(self.on_stop)
        # open connections get up to "drain" seconds to finish before the daemon exits
        return {"stopping": True, "pid": os.getpid(),
                "drain": self.manager.config.defaults.stop_timeout}

    async def _reconnect(self, args: dict[str, Any], emit: Emit) -> Any:
        host = args.get("host")
        if host is None:
            sups = list(self.manager.hosts.values())
        else:
            sup = self.manager.hosts.get(host) if isinstance(host, str) else None
            if sup is None:
                raise UsageError(f"{host!r} has no forwards; nothing to reconnect")
            sups = [sup]
        ask, timeout = _prompter(args, emit), self.manager.config.defaults.connect_timeout + 1
        await asyncio.gather(*(sup.next_attempt(ask, timeout, retry=True) for sup in sups))
        return {"hosts": [_host_result(s) for s in sups]}

    async def _login(self, args: dict[str, Any], emit: Emit) -> Any:
        """Log in to a host now, answering its prompts through the client.  A host with
        forwards or sessions reconnects (unless it is connected: that login stands); a host
        with none connects once to check the login, and is released again."""
        host = check_host_name(args.get("host"))
        known = host in self.manager.hosts
        sup = self.manager.host_for(host)   # started: its attempt begins at the next await
        try:
            if sup.state is HostState.CONNECTED:
                return {"hosts": [_host_result(sup)], "already": True}
            await sup.next_attempt(_prompter(args, emit),
                                   self.manager.config.defaults.connect_timeout + 1, retry=known)
            return {"hosts": [_host_result(sup)], "kept": bool(known)}
        finally:
            if not known:
                await self.manager.release_host(host)

    async def _logged_in(self, host: Any, args: dict[str, Any], emit: Emit) -> None:
        """Before a command that needs ``host``'s connection (run, open): when the client can
        answer login prompts and the host is not connected, let it answer them now (a host in
        needs-auth is tried again) and wait for that attempt.  Without a prompter: nothing."""
        ask = _prompter(args, emit)
        if ask is not None:
            await self.manager.host_for(check_host_name(host)).next_attempt(
                ask, self.manager.config.defaults.connect_timeout + 1)

    async def _run(self, args: dict[str, Any], emit: Emit) -> Any:
        host = args.get("host")
        try:
            return await self.manager.run(host, args.get("command"),
                                          name=args.get("name"), port=args.get("port"),
                                          detach=args.get("detach", True),
                                          prompter=_prompter(args, emit),
                                          follow=args.get("follow") is True)
        except BaseException:
            if isinstance(host, str) and host in self.manager.hosts:
                await self.manager.release_host(host)   # no session: nothing may use it
            raise

    async def _sessions(self, args: dict[str, Any], emit: Emit) -> Any:
        return self.manager.sessions_snapshot()

    async def _forget(self, args: dict[str, Any], emit: Emit) -> Any:
        names = args.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError("'names' must be a list of session names")
        ended = args.get("ended") is True
        if not names and not ended:
            raise UsageError("forget needs session names, or --ended for every ended one")
        return self.manager.forget(names, ended)

    async def _kill(self, args: dict[str, Any], emit: Emit) -> Any:
        return await self.manager.kill(args.get("name"))

    async def _open(self, args: dict[str, Any], emit: Emit) -> Any:
        host, url = args.get("host"), args.get("url")
        if not isinstance(url, str):
            raise UsageError("open needs a URL, e.g. `tunnelctl open HOST http://localhost:8888/`")
        node = args.get("node")
        if node is not None and not isinstance(node, str):
            raise UsageError("'node' must be a host name")
        self.manager.host_for(check_host_name(host))
        try:
            await self._logged_in(host, args, emit)
            return await self.manager.opener.open(host, url, node, "tunnelctl open")
        finally:
            await self.manager.release_host(host)

    async def _logs(self, args: dict[str, Any], emit: Emit) -> Any:
        """Stream a session's log (its tail, or all of it), then, with ``follow``, new output
        until the session ends.  Output travels as ``{"output": text}`` progress lines."""
        sess = self.manager.session(args.get("name"))
        follow = bool(args.get("follow"))
        queue = sess.follow() if follow else None
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            size = sess.log_path.stat().st_size if sess.log_path.exists() else 0
            start = 0 if args.get("all") else max(0, size - LOGS_TAIL)
            with open(sess.log_path, "rb") if size else _empty() as f:
                f.seek(start)
                remaining = size - start
                while remaining > 0:
                    chunk = f.read(min(OUTPUT_CHUNK, remaining))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    await emit({"output": text.decode(chunk)})
            while queue is not None:
                data = await queue.get()
                if data is None:
                    break
                for i in range(0, len(data), OUTPUT_CHUNK):
                    await emit({"output": text.decode(data[i:i + OUTPUT_CHUNK])})
        finally:
            if queue is not None:
                sess.unfollow(queue)
        return sess.snapshot()

    async def _reload(self, args: dict[str, Any], emit: Emit) -> Any:
        if self.on_reload is None:
            raise UsageError("this daemon cannot reload its config; restart it")
        return await self.on_reload("tunnelctl reload")

    async def _events(self, args: dict[str, Any], emit: Emit) -> Any:
        """Stream state changes as ``{"event": {...}}`` progress lines until the client goes
        away or the daemon stops (then the final reply says why the stream ended).  A quiet
        stream gets ``{"heartbeat": true}`` lines every ``EVENTS_HEARTBEAT`` s."""
        sub = self.manager.events.subscribe()
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
        try:
            await emit({"subscribed": True})
            while True:
                try:
                    event = await asyncio.wait_for(sub.get(), EVENTS_HEARTBEAT)
                except asyncio.TimeoutError:
                    await emit({"heartbeat": True})
                    continue
                if event is None:
                    break
                await emit({"event": event})
        finally:
            sub.close()
        if sub.dropped:
            raise TunneldError(sub.dropped)
        return {"ended": "the daemon is stopping"}
