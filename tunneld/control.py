"""Unix-socket JSON-lines control server: permissions, limits, dispatch to the manager.

Every request gets exactly one final reply (``wire.ok`` / ``wire.error``); a bad request
never takes the daemon down.  Only the socket owner's uid is served (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import __version__, wire
from .errors import LoginAbandoned, ProtocolError, TunneldError
from .handlers import Handlers
from .manager import Manager
from .peercred import peer_creds

log = logging.getLogger("tunneld")

#: a limit: seconds a refused peer (another uid) is read from before its connection closes
REFUSE_GRACE = 1.0
#: seconds an ended event stream gets to deliver its final line when the daemon stops
STREAM_END_GRACE = 1.0
#: commands answered while the daemon still restores the last run's forwards and sessions
ANSWERED_BEFORE_READY = frozenset({"status"})


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, if the OS tells."""
    return peer_creds(sock)[1]


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


class ControlServer:
    def __init__(self, manager: Manager, path: Path, on_stop: Callable[[], None],
                 on_reload: Callable[[str], Awaitable[Any]] | None = None):
        self.manager = manager
        self.path = path
        self._server: asyncio.base_events.Server | None = None
        #: tasks serving connected clients; cancelled by close()
        self._clients: set[asyncio.Task[Any]] = set()
        #: the subset of those that streamed events (close() lets them say goodbye first)
        self._streams: set[asyncio.Task[Any]] = set()
        self.handlers = Handlers(manager, str(path), on_stop, on_reload, self._streaming)
        assert set(self.handlers.by_command) == wire.COMMANDS

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
            if task is not None:
                self._clients.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        writer.write(wire.encode(msg))
        await writer.drain()

    def _streaming(self) -> None:
        """The current request streams until the daemon stops (close() lets it end)."""
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    async def _handle(self, line: bytes, peer: Peer) -> bytes:
        """The final reply line to the request ``line``."""
        try:
            cmd, raw = wire.parse_request(wire.decode(line))
            args = wire.parse_args(cmd, raw)
            if cmd not in ANSWERED_BEFORE_READY:
                # the forwards and sessions of the last run are restored first: a command
                # must never see (or save) half of them
                await self.manager.ready.wait()
            result = await self.handlers.by_command[cmd](args, peer)
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
