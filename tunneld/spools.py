"""The spool readers: for every connected host, one process on the server follows the
browser-open spool (``spool.reader_command``) and tunneld acts on its new entries with the
usual rules (``opener.Opener.open``: the URL rules, node routing, the readiness probe, dedup
and the rate limit), unless an entry is older than ``open_max_age`` when tunneld first sees
it: then it is only listed (`tunnelctl opens`) and can be opened from there (`tunnelctl open
--request N`).

Each host's position in its spool (``spool.Position``) and the list of recent requests
(``openlog.Requests``) are kept in ``opens.json`` in the state directory (atomic writes, mode
0600), so a reconnect or a daemon restart resumes where the last reader stopped: an entry is
acted on once.  A reader is started when its host becomes connected and ends with the
connection; the next connection starts the next one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import asyncssh

from . import rcfile, spool, sshrun
from .config import Config
from .errors import ConnectError, TunneldError, UsageError
from .host import HostSupervisor, Prompter
from .opener import Opener
from .openlog import Request, describe_age
from .registry import Hosts
from .state import HostState
from .store import atomic_write, set_aside_said
from .wire import iso_time

log = logging.getLogger("tunneld")

#: the file beside the state file
OPENS_FILE = "opens.json"
OPENS_VERSION = 1
#: bytes read from a reader's stdout at a time
READ_SIZE = 64 * 1024
#: seconds before a reader that ended on a live connection is started again (grows to max)
RETRY = 2.0
RETRY_MAX = 60.0
#: seconds between the changes of the list and positions and their write to the file
SAVE_DELAY = 0.2
#: seconds: a session's marker seen at most this long before a spool entry was asked for is
#: taken as that entry's twin (the same request, printed and spooled by the helper)
TWIN_SLACK = 30.0
#: a limit: entries acted on at once per host (more wait for one to finish)
MAX_ACTING = 8


class Spools:
    def __init__(self, hosts: Hosts, opener: Opener, path: Path,
                 config: Callable[[], Config]) -> None:
        self.hosts = hosts
        self.opener = opener
        self.path = path
        self._config = config
        self.requests = opener.requests
        self.requests.on_change = self._save_soon
        #: host → where its reader stands in the spool
        self.positions: dict[str, spool.Position] = {}
        #: host → (what its reader does, since when)
        self.status: dict[str, tuple[str, float]] = {}
        #: host → (the supervisor followed, its task)
        self._tasks: dict[str, tuple[HostSupervisor, asyncio.Task[None]]] = {}
        self._acting: dict[str, set[asyncio.Task[None]]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        #: host → spool entries listed as too old since the last log line about them
        self._old: dict[str, int] = {}
        self._save_handle: asyncio.TimerHandle | None = None
        self._closing = False
        hosts.watchers.append(self._host_changed)

    # -- the file ----------------------------------------------------------------------------

    def load(self) -> None:
        """Take the positions and the list of the last run (a corrupt file is set aside)."""
        try:
            data = json.loads(self.path.read_bytes() or b"{}")
            if not isinstance(data, dict) or data.get("version", OPENS_VERSION) \
                    > OPENS_VERSION:
                raise ValueError("a format this tunneld does not read")
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            log.error("%s is unreadable (%s); kept it as %s; the spools are read again from "
                      "their start (old requests are listed, not opened)", self.path,
                      str(exc).splitlines()[0], set_aside_said(self.path))
            return
        for host, pos in (data.get("spools") or {}).items():
            try:
                self.positions[str(host)] = spool.Position.from_json(pos)
            except ValueError:
                log.warning("%s: skipped a malformed spool position of %s", self.path, host)
        if self.requests.load(data.get("requests")):
            log.warning("%s: skipped malformed request records", self.path)

    def _save_soon(self) -> None:
        if self._save_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._save_handle = loop.call_later(SAVE_DELAY, self.save)

    def save(self) -> None:
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        data = {"version": OPENS_VERSION,
                "spools": {h: p.to_json() for h, p in sorted(self.positions.items())},
                "requests": self.requests.to_json()}
        try:
            atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as exc:
            log.error("could not write %s: %s; after a restart some spool entries may be "
                      "seen again", self.path, exc.strerror or exc)

    # -- readers -----------------------------------------------------------------------------

    def _host_changed(self, sup: HostSupervisor) -> None:
        if self._closing or sup.state is not HostState.CONNECTED:
            return
        have = self._tasks.get(sup.name)
        # (a reader of a supervisor the host no longer has ends on its own)
        if have is None or have[1].done() or have[0] is not sup:
            self._tasks[sup.name] = (sup, asyncio.get_running_loop().create_task(
                self._follow(sup), name=f"spool:{sup.name}"))

    def _say(self, host: str, what: str) -> None:
        if self.status.get(host, ("",))[0] != what:
            self.status[host] = (what, time.time())

    async def _follow(self, sup: HostSupervisor) -> None:
        """Readers for ``sup`` while it is the host's supervisor: one per connection."""
        name, delay = sup.name, RETRY
        try:
            while not self._closing and self.hosts.get(name) is sup:
                conn = sup.live_connection()
                if conn is None:
                    if sup.state is HostState.STOPPED:
                        return
                    self._say(name, "waiting for the connection")
                    await sup.wait_change(10)
                    continue
                await self._read(sup, conn)
                deadline = time.monotonic() + delay
                while sup.live_connection() is conn and not self._closing and \
                        time.monotonic() < deadline:
                    await sup.wait_change(deadline - time.monotonic())
                delay = min(RETRY_MAX, delay * 2) if sup.live_connection() is conn else RETRY
        finally:
            have = self._tasks.get(name)
            if have is not None and have[1] is asyncio.current_task():
                del self._tasks[name]
                self._say(name, "not followed (the host is not connected)")

    async def _read(self, sup: HostSupervisor, conn: asyncssh.SSHClientConnection) -> None:
        """One reader on ``conn``, until it ends."""
        name = sup.name
        pos = self.positions.get(name, spool.Position())
        try:
            proc = await sshrun.start(conn, spool.reader_command(pos))
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: cannot follow the browser-open spool: %s", name, exc)
            self._say(name, f"cannot start the reader: {exc}")
            return
        lines = spool.Lines()
        try:
            while True:
                data = await proc.stdout.read(READ_SIZE)
                if not data:
                    break
                for line in lines.feed(data):
                    self._line(sup, line)
                self._save_soon()
                old = self._old.pop(name, 0)
                if old:
                    log.info("%s: %d browser-open request(s) in the spool were older than "
                             "open_max_age: listed (`tunnelctl opens`), not opened", name, old)
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: the spool reader stopped: %s", name, exc)
        finally:
            proc.close()
        if lines.overflowed:
            log.warning("%s: skipped %d over-long line(s) of the spool", name, lines.overflowed)
        if sup.live_connection() is conn:
            self._say(name, "the reader ended; starting it again")

    def _line(self, sup: HostSupervisor, line: bytes) -> None:
        name = sup.name
        ev = spool.parse_reader_line(line)
        pos = self.positions.get(name, spool.Position())
        if isinstance(ev, spool.Note):
            if ev.kind == "W":
                self._say(name, f"waiting for ~/{spool.SPOOL_DIR} (nothing has used the "
                                "BROWSER helper on this server yet)")
            elif ev.kind == "F":
                self._say(name, f"following ~/{spool.SPOOL_DIR}/{spool.SPOOL_FILE}")
            elif ev.kind == "N":
                self.positions[name] = pos.switched(ev.inode)
            elif ev.kind == "T":
                log.warning("%s: the spool ~/%s/%s shrank; reading it again from its start",
                            name, spool.SPOOL_DIR, spool.SPOOL_FILE)
                self.positions[name] = pos.restarted(ev.inode)
            elif ev.kind == "L":
                log.warning("%s: the spool file tunneld was reading is gone (rotated twice "
                            "while tunneld was away, or removed); requests in it may be lost",
                            name)
            elif ev.kind == "S":
                log.warning("%s: skipped an over-long line of the spool", name)
                self.positions[name] = pos.took(ev.inode, ev.end)
            return
        if ev is None:
            return
        self.positions[name] = pos.took(ev.inode, ev.end)
        if ev.entry is None:
            log.warning("%s: skipped a malformed line of the spool (%s)", name, ev.bad)
            return
        self._entry(sup, ev)

    def _entry(self, sup: HostSupervisor, ev: spool.Seen) -> None:
        assert ev.entry is not None and ev.age is not None
        name, entry = sup.name, ev.entry
        req = self.requests.add(time.time(), name, entry.url, entry.node, "spool",
                                asked=entry.time, age=ev.age)
        limit = self._config().open_max_age(name)
        if ev.age > limit:
            self.requests.done(req, "old", f"older than open_max_age ({describe_age(ev.age)} "
                                           f"> {describe_age(limit)}); `tunnelctl open "
                                           f"--request {req.n}` opens it")
            self._old[name] = self._old.get(name, 0) + 1
            return
        twin = self._twin(req, time.time() - ev.age)
        if twin is not None:
            self.requests.done(req, "duplicate", f"the same request as {twin.n}, seen in the "
                                                 f"output of {twin.source}")
            return
        acting = self._acting.setdefault(name, set())
        slots = self._slots.setdefault(name, asyncio.Semaphore(MAX_ACTING))
        task = asyncio.get_running_loop().create_task(self._act(name, req, slots))
        acting.add(task)
        task.add_done_callback(acting.discard)

    def _twin(self, req: Request, asked: float) -> Request | None:
        """The marker a session read for the same request (the helper prints one and spools
        it): same host, URL and node, seen since about when it was asked (this machine's
        clock; the list is saved, so this holds across a daemon restart too)."""
        for r in reversed(list(self.requests)):
            if r.seen < asked - TWIN_SLACK:
                return None
            if r is not req and r.source.startswith("session ") and r.host == req.host and \
                    r.url == req.url and (r.node == req.node or None in (r.node, req.node)):
                return r
        return None

    async def _act(self, host: str, req: Request, slots: asyncio.Semaphore) -> None:
        async with slots:
            try:
                await self.opener.open(host, req.url, req.node, "spool", request=req)
            except TunneldError as exc:
                log.warning("%s", exc)

    # -- commands ----------------------------------------------------------------------------

    async def open_request(self, n: int, prompter: Prompter | None) -> dict[str, Any]:
        """`tunnelctl open --request N`: open a listed request, through the normal path."""
        req = self.requests.get(n)
        try:
            await self.hosts.logged_in(req.host, prompter)
            r = await self.opener.open(req.host, req.url, req.node,
                                       f"tunnelctl open --request {n}", explicit=True,
                                       note=False)
        finally:
            await self.hosts.release(req.host)
        self.requests.done(req, "opened", f"opened by `tunnelctl open --request {n}`",
                           r.get("url"), r.get("forward"))
        return r | {"request": n}

    async def setup_remote(self, host: str, apply: bool, shell_file: str | None,
                           prompter: Prompter | None) -> dict[str, Any]:
        """`tunnelctl setup-remote HOST`: the BROWSER line and the file it goes in; with
        ``apply``, the helper installed and the line added (once; after a backup)."""
        try:
            text = rcfile.setup_command(shell_file or "", apply)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            sup = await self.hosts.logged_in(host, prompter)
            conn = await sup.connection_for_client()
            result = await sshrun.run(conn, text, 30)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            raise ConnectError(f"{host}: setup-remote: the server did not answer "
                               f"({exc or 'timed out'}); nothing was changed") from None
        finally:
            await self.hosts.release(host)
        setup = rcfile.parse_setup(str(result.stdout or ""))
        if setup is None:
            said = str(result.stderr or "").strip().splitlines()
            raise ConnectError(f"{host}: setup-remote: the server's shell did not run the "
                               f"setup ({said[-1] if said else 'no answer'}); it needs a "
                               "POSIX login shell")
        if setup.failed:
            raise UsageError(f"{host}: setup-remote: {setup.failed}; nothing else was changed")
        if setup.added:
            log.info("%s: setup-remote added the BROWSER line to %s (backup: %s)", host,
                     setup.path, setup.backup or "none: the file was new")
        return {"host": host, "line": rcfile.BROWSER_LINE, "apply": apply,
                **{k: v for k, v in setup.__dict__.items()}}

    def snapshot(self) -> dict[str, Any]:
        reqs = []
        for r in self.requests:
            j = r.to_json()
            j["seen"] = iso_time(r.seen)
            j["asked"] = None if r.asked is None else iso_time(r.asked)
            reqs.append(j)
        spools = [{"host": h, "state": what, "since": iso_time(since),
                   "position": self.positions[h].to_json() if h in self.positions else None}
                  for h, (what, since) in sorted(self.status.items())]
        return {"requests": reqs, "spools": spools}

    async def close(self) -> None:
        """The daemon stops: end the readers, write the file."""
        self._closing = True
        tasks = [t for _, t in self._tasks.values()] + \
            [t for s in self._acting.values() for t in s]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.save()
