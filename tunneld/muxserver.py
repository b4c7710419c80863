"""tunneld as the ControlMaster of the user's own OpenSSH clients: one control socket per
host (``paths.mux_socket``), the master's side of ``PROTOCOL.mux`` on each (``mux``).

A socket is made when its host is first used and kept while the daemon runs (sockets of an
earlier daemon are removed at start: tunneld holds its lock, so nobody serves them).  The
directory is 0700 and every socket 0600; a client of another uid is dropped before the HELLO
(its ssh then makes its own connection).  A client is read message by message, exactly: the
descriptors of a session follow its request on the socket.  A malformed message, a message
too long, a HELLO of another version or no HELLO in time drops that client and is logged;
nothing a client sends reaches another.  ``ssh -O exit`` and ``-O stop`` are refused: the
daemon serves every host and every passenger, and `tunnelctl stop` stops it.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from . import mux, paths
from .errors import TunneldError
from .host import HostSupervisor
from .login import Prompter
from .muxsession import Passenger
from .muxtty import tty_prompter
from .peercred import peer_creds

log = logging.getLogger("tunneld")

#: a limit: seconds a new client has to send its HELLO, and an idle one its next request
REQUEST_WAIT = 30.0
#: a limit: clients connected to one host's socket at once
MAX_CLIENTS = 256
#: the listen backlog of a control socket (OpenSSH's)
BACKLOG = 64
#: what `ssh -O exit` and `ssh -O stop` are told
REFUSED_STOP = ("tunneld serves every ssh of this host and its forwards; it is not stopped "
                "from here: `tunnelctl stop` stops the daemon, `tunnelctl reconnect HOST` "
                "makes a new connection")


class MuxHost(Protocol):
    """What the control sockets need of the daemon's services."""

    def host_for(self, name: str) -> HostSupervisor: ...

    async def release(self, name: str) -> None: ...

    async def open_forward(self, host: str, spec: str) -> int | None: ...

    async def close_forward(self, host: str, spec: str) -> None: ...


class MuxServers:
    """The control sockets of every host used, and their passengers."""

    def __init__(self, services: MuxHost, connect_timeout: Callable[[], float],
                 persist: Callable[[], float]) -> None:
        self.services = services
        self._connect_timeout = connect_timeout
        #: seconds a host stays after its last passenger (``mux_persist``)
        self._persist = persist
        #: host name → monotonic time its last passenger ended
        self._last: dict[str, float] = {}
        #: host name → the timer of its release after ``mux_persist``
        self._timers: dict[str, asyncio.TimerHandle] = {}
        #: the accept loops, one per socket (cancelled by close: an accept on a closed
        #: socket may never return)
        self._accepting: list[asyncio.Task[None]] = []
        #: host name → listening socket
        self._socks: dict[str, socket.socket] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: host name → clients connected now
        self._clients: dict[str, set["MuxClient"]] = {}
        self._sids = itertools.count(1)
        self._closing = False

    # -- sockets -----------------------------------------------------------------------------

    def clear_stale(self) -> None:
        """Remove the sockets an earlier daemon left (the caller holds the daemon's lock)."""
        d = paths.mux_dir()
        if not d.is_dir():
            return
        for p in d.iterdir():
            if p.is_socket():
                p.unlink(missing_ok=True)

    def make_listed(self) -> None:
        """At start: the sockets of the hosts ``~/.ssh/tunneld.conf`` names (`tunnelctl
        ssh-config --install`), so that the first ssh after a restart rides tunneld (and is
        asked for the login) instead of logging in by itself."""
        try:
            text = paths.ssh_conf().read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            words = line.split()
            if len(words) == 2 and words[0].lower() == "host" and \
                    not any(c in words[1] for c in "*?!,\"%"):
                self.ensure(words[1])

    def watch(self, sup: HostSupervisor) -> None:
        """A ``Hosts.watchers`` hook: a host in use has its control socket."""
        if sup.name not in self._socks and not self._closing:
            self.ensure(sup.name)

    def ensure(self, host: str) -> Path | None:
        """Make ``host``'s control socket if it has none (logged, never raised, on
        failure: ssh then makes its own connection)."""
        path = paths.mux_socket(host)
        if host in self._socks:
            return path
        try:
            paths.ensure_private_dir(path.parent)
            if path.is_socket() or path.is_symlink():
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            log.warning("%s: no control socket for ssh at %s: %s", host, path, exc)
            return None
        self._socks[host] = sock
        self._accepting.append(asyncio.get_running_loop().create_task(self._accept(host, sock)))
        log.info("%s: control socket for ssh at %s", host, path)
        return path

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, host: str, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if self._closing:
                    return
                log.warning("%s: control socket: %s", host, exc)
                await asyncio.sleep(0.5)
                continue
            sock.setblocking(False)
            clients = self._clients.setdefault(host, set())
            pid, uid = peer_creds(sock)
            if uid is not None and uid != os.getuid():
                log.warning("%s: control socket: refused a client of uid %d (only uid %d may "
                            "use it)", host, uid, os.getuid())
                sock.close()
                continue
            if len(clients) >= MAX_CLIENTS:
                log.warning("%s: control socket: refused a client: %d are connected (the "
                            "limit)", host, MAX_CLIENTS)
                sock.close()
                continue
            client = MuxClient(self, host, sock, pid)
            clients.add(client)
            self._spawn(client.serve())

    # -- passengers --------------------------------------------------------------------------

    def next_sid(self) -> int:
        return next(self._sids)

    def gone(self, client: "MuxClient") -> None:
        self._clients.get(client.host, set()).discard(client)

    def passengers(self, host: str) -> list[Passenger]:
        return [c.passenger for c in self._clients.get(host, ()) if c.passenger is not None]

    def uses(self, sup: HostSupervisor) -> bool:
        """True while a passenger rides (or waits for) ``sup``'s connection, and for
        ``mux_persist`` seconds after the last one ended."""
        if any(c.using for c in self._clients.get(sup.name, ())):
            return True
        last = self._last.get(sup.name)
        return last is not None and time.monotonic() - last < self._persist()

    def ended(self, host: str) -> None:
        """A passenger of ``host`` ended: the host is released (if nothing else uses it)
        once ``mux_persist`` has passed without another."""
        self._last[host] = time.monotonic()
        old = self._timers.pop(host, None)
        if old is not None:
            old.cancel()
        self._timers[host] = asyncio.get_running_loop().call_later(
            self._persist() + 0.05, lambda: self._spawn(self.services.release(host)))

    def snapshot(self, host: str) -> list[dict[str, Any]]:
        return [p.snapshot() for p in sorted(self.passengers(host), key=lambda p: p.started)]

    def window_changed(self) -> None:
        """SIGWINCH (an ssh client relays its own): every terminal passenger's size again."""
        for clients in self._clients.values():
            for c in clients:
                if c.passenger is not None:
                    c.passenger.resize()

    async def close(self) -> None:
        """The daemon stops: no new client; passengers end with a line saying so."""
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        for task in self._accepting:
            task.cancel()
        for host, sock in self._socks.items():
            sock.close()
            paths.mux_socket(host).unlink(missing_ok=True)
        self._socks.clear()
        for clients in self._clients.values():
            for c in list(clients):
                c.stop("tunneld is stopping")
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=3)
            for t in pending:
                t.cancel()


class MuxClient:
    """One connection to a control socket: a HELLO, then requests until it closes."""

    def __init__(self, servers: MuxServers, host: str, sock: socket.socket,
                 pid: int | None) -> None:
        self.servers, self.host, self.sock, self.pid = servers, host, sock, pid
        self.passenger: Passenger | None = None
        #: True while this client's passenger waits for or rides the host's connection
        self.using = False
        self._write = asyncio.Lock()
        self._stopped: str | None = None
        #: set when the client's socket closed (a login prompt on its terminal stops)
        self.gone = asyncio.Event()
        self._ride_task: asyncio.Task[None] | None = None

    def _who(self) -> str:
        return f"{self.host}: ssh client" + (f" (pid {self.pid})" if self.pid else "")

    # -- the socket --------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        async with self._write:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (BlockingIOError, InterruptedError):
                await _readable(self.sock)
                continue
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    async def _message(self, timeout: float | None) -> bytes:
        header = await asyncio.wait_for(self._recv(4), timeout)
        return await asyncio.wait_for(self._recv(mux.body_length(header)), REQUEST_WAIT)

    async def _recv_fd(self) -> int:
        """One descriptor sent with SCM_RIGHTS (OpenSSH's ``mm_send_fd``: one byte)."""
        size = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(1, size)
            except (BlockingIOError, InterruptedError):
                await asyncio.wait_for(_readable(self.sock), REQUEST_WAIT)
                continue
            break
        fds: list[int] = []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(raw[:len(raw) - len(raw) % a.itemsize])
                fds += list(a)
        if not data or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise mux.MuxError("no file descriptor where one was due" if data else
                               "closed before its file descriptors")
        return fds[0]

    # -- the conversation --------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self.send(mux.hello())
            first = mux.parse(await self._message(REQUEST_WAIT))
            if not isinstance(first, mux.Hello):
                raise mux.MuxError(f"{mux.NAMES.get(first.type, hex(first.type))} before "
                                   "HELLO")
            if first.version != mux.VERSION:
                raise mux.MuxError(f"protocol version {first.version} (tunneld speaks "
                                   f"{mux.VERSION})")
            while self._stopped is None:
                busy = self.passenger is not None
                try:
                    body = await self._message(None if busy else REQUEST_WAIT)
                except asyncio.TimeoutError:
                    return    # an idle client: closed, as a request it never sends
                await self._handle(mux.parse(body))
        except EOFError:
            pass
        except (mux.MuxError, asyncio.TimeoutError) as exc:
            why = str(exc) or "no complete message in time"
            log.warning("%s: dropped: %s", self._who(), why)
        except (ConnectionError, OSError) as exc:
            log.debug("%s: %s", self._who(), exc)
        finally:
            self.gone.set()
            p = self.passenger
            if p is not None:
                if p.opened:
                    p.end("its ssh went away")
                elif self._ride_task is not None:
                    self._ride_task.cancel()   # still waiting for the connection
            self.servers.gone(self)
            self.sock.close()

    async def _handle(self, req: Any) -> None:
        if isinstance(req, mux.Hello):
            raise mux.MuxError("HELLO twice")
        if req.type == mux.C_ALIVE_CHECK:
            await self.send(mux.alive(req.rid, os.getpid()))
        elif req.type in (mux.C_TERMINATE, mux.C_STOP_LISTENING):
            log.info("%s: refused %s", self._who(), mux.NAMES[req.type])
            await self.send(mux.denied(req.rid, REFUSED_STOP))
        elif isinstance(req, mux.Forward):
            await self._forward(req)
        elif isinstance(req, (mux.NewSession, mux.StdioForward)):
            await self._session(req)
        else:
            name = mux.NAMES.get(req.type, f"0x{req.type:08x}")
            log.info("%s: refused the request %s (not supported)", self._who(), name)
            await self.send(mux.failure(req.rid, f"tunneld does not support {name} requests"))

    async def _forward(self, req: mux.Forward) -> None:
        try:
            spec = mux.spec_of(req)
            if req.type == mux.C_OPEN_FWD:
                port = await self.servers.services.open_forward(self.host, spec)
            else:
                await self.servers.services.close_forward(self.host, spec)
                port = None
        except (mux.MuxError, TunneldError) as exc:
            await self.send(mux.failure(req.rid, f"tunneld: {exc}"))
            return
        await self.send(mux.remote_port(req.rid, port) if port is not None else
                        mux.ok(req.rid))

    async def _session(self, req: mux.NewSession | mux.StdioForward) -> None:
        n = 3 if isinstance(req, mux.NewSession) else 2
        fds: list[int] = []
        try:
            for _ in range(n):
                fds.append(await self._recv_fd())
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if self.passenger is not None:
            for fd in fds:
                os.close(fd)
            await self.send(mux.failure(req.rid, "Multiple sessions not supported"))
            return
        p = Passenger(self.host, self.servers.next_sid(), req, fds, self.send, self.pid)
        self.passenger = p
        self.servers.services.host_for(self.host)
        self._ride_task = task = self.servers._spawn(self._ride(p))
        task.add_done_callback(lambda t: self._ended())

    def _ended(self) -> None:
        """The passenger is done: the client's socket closes (its ssh then exits)."""
        self._stopped = self._stopped or "ended"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass   # closed already

    async def _ride(self, p: Passenger) -> None:
        self.using = True
        try:
            conn = await self._connection(p)
            if conn is None:
                return
            try:
                await p.open(conn)
            except Exception:   # noqa: BLE001 - told to the client by open()
                return
            log.debug("%s: %s", self._who(), p.command)
            await p.pump()
        finally:
            if p.opened:
                log.info("%s: ended (%s): %s", self._who(), p.outcome, p.command)
            self.using = False
            p.close_fds()
            self.passenger = None
            self.servers.ended(self.host)

    async def _connection(self, p: Passenger) -> Any:
        """The host's live connection for ``p``: at once, after the login ``p``'s terminal
        answers, or after waiting while the host is in backoff (``hold_timeout``).  None, with
        the refusal sent, when there is none: the client then makes its own connection."""
        sup = self.servers.services.host_for(self.host)
        conn = sup.live_connection()
        if conn is not None:
            return conn
        ask: Prompter | None = tty_prompter(p.fds[0], p.fds[2], self.gone) \
            if not p.stdio and os.isatty(p.fds[0]) else None
        try:
            if ask is not None:
                await sup.next_attempt(ask, self.servers._connect_timeout() + 1)
            return await sup.connection_for_client()
        except TunneldError as exc:
            await self.send(mux.failure(p.req.rid, f"tunneld: {exc}"))
            return None

    def stop(self, why: str) -> None:
        self._stopped = why
        p = self.passenger
        if p is not None and p.opened:
            p.end(why)
        elif self._ride_task is not None:
            self._ride_task.cancel()
        else:
            self._ended()


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)
    loop.add_reader(fd, done)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
