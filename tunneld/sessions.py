"""The sessions service: run, kill, forget, the reaper, the sessions file and the restore.

Invariants: ``by_name`` holds the running sessions and the ended ones until there are more
than ``MAX_SESSIONS`` (the oldest ended ones are forgotten, their directories on the server
removed); the sessions file holds every detached session of ``by_name``, written after every
change, so the next daemon takes them up (``_restore``).  A session's ``--port`` forward and
the forwards made for its markers are of origin "auto": the first goes with the session, the
others are restored with a detached session that is taken up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from pathlib import Path
from typing import Any, Callable

import asyncssh

from . import remote, sshrun
from .config import Config
from .errors import ConnectError, NotFound, SessionError, TunneldError, UsageError
from .events import EventHub
from .forwards import Forwards
from .host import HostSupervisor, Prompter
from .jobwatch import Jobs
from .names import check_host_alias, check_session_name
from .opener import Opener
from .registry import Hosts
from .session import MAX_SESSIONS, AttachedSession, Session, SessionHost, default_name
from .session_detached import RECORD_KEYS, START_TIMEOUT, DetachedSession
from .session_job import JobSession
from .session_urls import SessionUrls
from .state import SessionState, is_connected, state_phrase
from .store import Store

log = logging.getLogger("tunneld")

#: seconds allowed for ending every session when the daemon stops
KILL_ALL_TIMEOUT = 15.0
#: seconds allowed for removing a forgotten session's directory on its server
FORGET_TIMEOUT = 15.0
#: seconds a new session's command is watched for a failure at once (not found, syntax
#: error) before `run` says it started
START_CHECK = 1.5
#: where `run --port auto` looks for a free port, and how many it tries
FREE_PORT_RANGE = (20000, 60000)
FREE_PORT_TRIES = 50


class Sessions:
    def __init__(self, hosts: Hosts, forwards: Forwards, store: Store, events: EventHub,
                 opener: Opener, config: Callable[[], Config], session_dir: Path) -> None:
        self.hosts = hosts
        self.forwards = forwards
        self.store = store
        self.events = events
        self.opener = opener
        self._config = config
        #: markers, printed URLs and sockets of the sessions' output
        self.links = SessionUrls(opener, events, config, self._changed)
        #: batch jobs: their sessions and each host's watch of them
        self.jobs = Jobs(forwards, events, config, self.links.on_open, self._changed)
        self.session_dir = session_dir
        #: session name → session (see the module docstring)
        self.by_name: dict[str, Session] = {}
        #: detached session name → its state when last saved (for disconnect/re-attach events)
        self._states: dict[str, SessionState] = {}
        #: False while the daemon stops: sessions that end then are not written any more
        self._saving = True
        #: tasks waiting for sessions to end, and removing forgotten directories
        self._tasks: set[asyncio.Task[None]] = set()

    def uses(self, sup: HostSupervisor) -> bool:
        """True while a running session needs ``sup`` (the registry keeps it then)."""
        return any(s.host is sup and s.running for s in self.by_name.values())

    def session(self, name: str) -> Session:
        if name not in self.by_name:
            known = " ".join(sorted(self.by_name)) or "none"
            raise NotFound(f"no session named {name!r}; sessions: {known}")
        return self.by_name[name]

    # -- run ---------------------------------------------------------------------------------

    async def run(self, host: str, command: list[str], name: str | None = None,
                  port: int | str | None = None, detach: bool = True,
                  prompter: Prompter | None = None, follow: bool = False,
                  sock: str | None = None, job: str | None = None,
                  scheduler: str | None = None) -> dict[str, Any]:
        """Start ``command`` on ``host`` as a session.  ``port``: None, "auto" or a number;
        it replaces ``{port}`` in the command, is exported as ``PORT`` and is forwarded.
        ``sock="auto"``: a socket path in a private directory made on the server replaces
        ``{sock}``, is exported as ``SOCK`` and is forwarded once something listens on it.
        ``detach``: the command outlives the connection and the daemon (else it runs in the
        SSH channel and ends with it).  Returns once the command runs on the server: a host
        that cannot be connected now (``prompter`` answers its login) raises ConnectError
        and makes no session; a command that fails at once (not found, a syntax error)
        raises SessionError with its first lines of output (the ended session is listed),
        unless the client ``follow``s the output itself (then it sees how the command ends).
        ``job``: the command runs as a batch job with these scheduler options (``session_job``;
        ``scheduler``: the server's, else the one it has); ``run`` returns once it is queued."""
        options = self.jobs.check_run(job, scheduler, detach, sock)
        replaced: Session | None = None
        if name is not None:
            old = self.by_name.get(name)
            if old is not None and old.running:
                raise UsageError(f"a session named {name} is running on {old.host.name}; "
                                 f"pick another --name or `tunnelctl kill {name}`")
            replaced = old
        else:
            name = default_name(command, set(self.by_name))
        await self.forwards.check_new_host(host)
        sup = self.hosts.host_for(host)
        fwd = None
        try:
            if not is_connected(sup.state):
                await sup.next_attempt(prompter, self._config().defaults.connect_timeout + 1)
                if not is_connected(sup.state):
                    raise ConnectError(f"{host} {state_phrase(sup.state)}: the command was not"
                                       " started" + (f": {sup.why()}" if sup.last_error else ""))
            # Python programs' output arrives as printed (their URLs with it), as on a terminal
            env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
            values: dict[str, str] = {}   # {port} and {sock} in the command
            if port is not None and job is not None:
                # a job's port is on its node: forwarded once the job runs there
                if port != "auto":
                    values["port"] = env["PORT"] = str(port)
            elif port is not None:
                if port == "auto":
                    port = await self._free_remote_port(sup)
                assert isinstance(port, int)
                fwd = await self.forwards.ensure_forward(host, "localhost", port)
                values["port"] = env["PORT"] = str(port)
            sock_dir = None if sock is None else await self._sock_dir(sup, name, detach)
            if sock_dir is not None:
                sock = values["sock"] = env["SOCK"] = f"{sock_dir}/{remote.SOCK_NAME}"
                env[remote.SOCK_DIR_ENV] = sock_dir   # (its owner is recorded there)
        except BaseException:
            # no session: not its --port forward either, and the host may have nothing left
            if fwd is not None:
                await self.forwards.drop_auto(host, fwd.spec.target_port, keep_ports={
                    s.port for s in self.by_name.values()
                    if s.running and s.port is not None and s.host.name == host})
            else:
                await self.hosts.release(host)
            raise
        log_path = self.session_dir / f"{name}.log"
        if job is not None:
            sess: Session = self.jobs.new(name, sup, command, log_path, env, values, port,
                                          scheduler, options)
        else:
            cls = DetachedSession if detach else AttachedSession
            sess = cls(name, sup, command, log_path, self.links.on_open, env=env, port=port,
                       on_change=self._changed, values=values)
        sess.sock, sess.sock_dir = sock, sock_dir
        self.by_name[name] = sess
        if replaced is not None:
            self._forget_remote(replaced)   # the new session took its name
        self._forget_old()
        sess.start()
        self.events.publish("session", host=host, name=name, event="started",
                            state=sess.state.value, exit_status=None)
        self._start_reaper(sess)
        self.jobs.track(sess)
        if sock is not None:
            sess.background(self.links.wait_socket(sess))
        why = await sess.wait_started(self._config().defaults.hold_timeout + START_TIMEOUT + 5,
                                      0 if follow else START_CHECK)
        if isinstance(sess, JobSession) and sess.job_id is None and not sess.running:
            # refused by the scheduler (its own words), or it could not be submitted
            raise SessionError(f"{host}: session {name}: the job was not submitted:\n"
                               f"{sess.error or sess.state}")
        if why is not None:
            raise SessionError(f"{host}: session {name} did not start: {why}\n(`tunnelctl "
                               f"logs {name}` shows all of it)")
        result: dict[str, Any] = {"name": name, "host": host, "command": sess.command,
                                  "detached": detach, "state": sess.state.value}
        if fwd is not None:
            result.update(port=port, forward=str(fwd.spec),
                          url=f"http://127.0.0.1:{fwd.spec.bind_port}/")
        if sock is not None:
            result.update(sock=sock)
        if isinstance(sess, JobSession):
            result.update(job=sess.job())
        return result

    async def _sock_dir(self, sup: HostSupervisor, name: str, detached: bool) -> str:
        """A private directory on ``sup``'s server for session ``name``'s socket."""
        conn = await sup.connection_for_client()
        try:
            r = await sshrun.run(conn, remote.sock_dir_command(name, detached), FORGET_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            raise SessionError(f"{sup.name}: could not make a directory for the socket: "
                               f"{exc}") from None
        found = remote.parse_sock_dir(str(r.stdout or ""))
        if found is None:
            raise SessionError(f"{sup.name}: could not make a private directory for the "
                               f"socket under $XDG_RUNTIME_DIR/tunneld or ~/{remote.SOCK_DIR}: "
                               f"{str(r.stderr or '').strip() or 'no answer'}")
        size = len(f"{found}/{remote.SOCK_NAME}".encode())
        if size > remote.SOCK_PATH_MAX:
            await self._remove_sock_dir(sup, found)
            base = found.rsplit("/", 1)[0]
            fits = len(f"{base}/x.XXXXXX/{remote.SOCK_NAME}".encode()) <= remote.SOCK_PATH_MAX
            raise SessionError(
                f"{sup.name}: a socket for this session would be {size} bytes long under "
                f"{base}/ (a Unix socket path has at most {remote.SOCK_PATH_MAX}); nothing was "
                "started. " + ("Pick a shorter --name, or use --port auto." if fits else
                               "That directory is too long for any name (the server gives no "
                               "usable $XDG_RUNTIME_DIR): use --port auto, or start the "
                               "program on a socket in a short directory of your own and "
                               "forward it: tunnelctl add HOST LPORT:/short/dir/app.sock"))
        return found

    async def _remove_sock_dir(self, sup: SessionHost, directory: str) -> None:
        """Remove a session's socket directory on its server, if the host is connected now
        (else it stays; `forget` tries again)."""
        conn = sup.live_connection()
        try:
            if conn is not None:
                await sshrun.run(conn, remote.sock_remove_command(directory), FORGET_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            log.info("%s: could not remove %s on the server: %s", sup.name, directory, exc)

    async def _free_remote_port(self, sup: HostSupervisor) -> int:
        """A port nothing listens on, on the server's loopback, and free here too."""
        conn = await sup.connection_for_client()
        bind = self._config().defaults.bind
        rng = random.Random()
        for _ in range(FREE_PORT_TRIES):
            port = rng.randrange(*FREE_PORT_RANGE)
            if self.hosts.find_listener(bind, port) is not None or not _locally_free(bind, port):
                continue
            try:
                _, writer = await conn.open_connection("localhost", port)
            except asyncssh.ChannelOpenError:
                return port  # refused: nothing listens there
            writer.close()
        raise ConnectError(f"{sup.name}: found no free port on the server in "
                           f"{FREE_PORT_TRIES} tries; pass --port NUMBER")

    async def urls(self, name: str, open_newest: bool) -> dict[str, Any]:
        """Session ``name``'s URLs; with ``open_newest`` its newest one is opened."""
        return await self.links.urls(self.session(name), open_newest)

    # -- the end of a session ----------------------------------------------------------------

    def _start_reaper(self, sess: Session) -> None:
        self._spawn(self._reap(sess))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, sess: Session) -> None:
        """When a session ends: drop its `--port` forward, release its host."""
        await sess.done.wait()
        self.events.publish("session", host=sess.host.name, name=sess.name, event="ended",
                            state=sess.state.value, exit_status=sess.exit_status)
        await sess.settle(self._config().defaults.ready_timeout + 30)
        if sess.sock_dir is not None:   # (while the host is still connected)
            await self._remove_sock_dir(sess.host, sess.sock_dir)
        # its forwards go with it, but those another running session still uses
        others = [s for s in self.by_name.values() if s is not sess and s.running and
                  s.host.name == sess.host.name]
        keep = {f for s in others for f in s.forwards}
        await self.forwards.drop_auto(sess.host.name, sess.port, sess.forwards, keep,
                                      {s.port for s in others if s.port is not None})

    async def kill(self, name: str) -> dict[str, Any]:
        sess = self.session(name)
        if not sess.running:
            raise UsageError(f"session {sess.name} had already ended ({sess.state}); "
                             f"`tunnelctl forget {sess.name}` removes it from the list")
        said = await sess.kill()
        return {"name": sess.name, "state": sess.state.value, "said": said,
                "job": sess.job() if isinstance(sess, JobSession) else None}

    def forget(self, names: list[str], ended: bool = False) -> dict[str, Any]:
        """Remove ended sessions from the list (and their logs, here and on the server):
        those named, or with ``ended`` every ended one.  A running one is refused."""
        if not names and not ended:
            raise UsageError("forget needs session names, or --ended for every ended one")
        chosen = [self.session(n) for n in names]
        running = [s.name for s in chosen if s.running]
        if running:
            raise UsageError(f"session {running[0]} is still running; `tunnelctl kill "
                             f"{running[0]}` first")
        if ended:
            chosen += [s for s in self.by_name.values() if not s.running and s not in chosen]
        for sess in chosen:
            del self.by_name[sess.name]
            self._states.pop(sess.name, None)
            self._forget_remote(sess)
            try:
                sess.log_path.unlink()
            except OSError:
                pass
        if chosen:
            log.info("forgot session(s) %s", " ".join(s.name for s in chosen))
            self.save()
        return {"forgotten": [s.name for s in chosen]}

    def _forget_old(self) -> None:
        ended = sorted((s for s in self.by_name.values() if not s.running),
                       key=lambda s: s.ended or 0)
        while len(self.by_name) > MAX_SESSIONS and ended:
            old = ended.pop(0)
            del self.by_name[old.name]
            self._forget_remote(old)

    def _forget_remote(self, sess: Session) -> None:
        """Remove an ended, forgotten detached session's directory on its server, in the
        background, if tunneld has that host now (it does not connect just for this; else the
        directory stays there)."""
        sup = self.hosts.get(sess.host.name)
        if not isinstance(sess, DetachedSession) or sess.remote_id is None or sup is None:
            return
        text = remote.forget_command([sess.remote_id])
        if sess.sock_dir is not None:
            text += "; " + remote.sock_remove_command(sess.sock_dir)

        async def forget() -> None:
            try:
                conn = await sup.connection_for_client()
                await sshrun.run(conn, text, FORGET_TIMEOUT)
            except (ConnectError, asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
                log.info("%s: could not remove %s on the server: %s", sup.name,
                         sess.remote_dir, exc)
        self._spawn(forget())

    async def end_all(self) -> None:
        """Kill every running attached session (bounded by ``KILL_ALL_TIMEOUT``); leave the
        detached ones running on their servers (the sessions file has them for the next
        start)."""
        detached = [s for s in self.by_name.values() if isinstance(s, DetachedSession) and
                    s.running and not s.detaching]
        if detached:
            self.save()
            self._saving = False
            log.info("leaving %d detached session(s) running: %s", len(detached),
                     " ".join(s.name for s in detached))
            for sess in detached:
                sess.detach()
        running = [s for s in self.by_name.values() if s.running and not s.detached]
        if running:
            log.info("ending %d session(s)", len(running))
            await asyncio.wait([asyncio.ensure_future(s.kill()) for s in running],
                               timeout=KILL_ALL_TIMEOUT)

    # -- the sessions file -------------------------------------------------------------------

    def _changed(self, sess: Session) -> None:
        if not sess.detached:
            return
        was = self._states.get(sess.name)
        self._states[sess.name] = sess.state
        if sess.state is SessionState.DISCONNECTED and was is not SessionState.DISCONNECTED:
            self.events.publish("session", host=sess.host.name, name=sess.name,
                                event="disconnected", state=sess.state.value, exit_status=None)
        elif sess.state is SessionState.RUNNING and was is SessionState.DISCONNECTED:
            self.events.publish("session", host=sess.host.name, name=sess.name,
                                event="re-attached", state=sess.state.value, exit_status=None)
        self.save()

    def save(self) -> None:
        """Write the sessions file: every detached session (running and ended)."""
        if self._saving:
            self.store.save_sessions([s.record() for s in sorted(self.by_name.values(),
                                                                  key=lambda s: s.started)
                                      if isinstance(s, DetachedSession)])

    async def _restore(self) -> None:
        """Take up the detached sessions of the sessions file (``hosts.lock`` held): ended
        ones are listed, running ones re-attach (with their ``--port`` forward and the
        forwards made for their markers)."""
        records = self.store.load_sessions(RECORD_KEYS, _check_record, MAX_SESSIONS)
        running = 0
        for rec in records:
            name, host = rec["name"], rec["host"]
            if name in self.by_name:
                continue
            port = rec.get("port")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                port = None
            # an ended session only names its host; a running one needs its supervisor
            sup = self.hosts.get(host) or HostSupervisor(host, self._config().defaults,
                                                         events=self.events)
            # the log is where this daemon puts a session's log, whatever the file says
            # a record of a daemon before `words` ran its command as one shell line
            words = rec.get("words")
            if not (isinstance(words, list) and words and all(isinstance(w, str) for w in words)):
                words = [rec["command"]]
            log_path = self.session_dir / f"{name}.log"
            sess = self.jobs.new(name, sup, words, log_path, {}, {}, None, None, []) \
                if rec.get("job") is not None else \
                DetachedSession(name, sup, words, log_path, self.links.on_open, port=port,
                                on_change=self._changed)
            try:
                sess.resume(rec)
            except (OSError, ValueError, TypeError) as exc:
                log.error("%s: session %s cannot be taken up: %s", host, name, exc)
                continue
            self.by_name[name] = sess
            if not sess.running:
                continue
            running += 1
            sess.host = sup = self.hosts.supervisor(host)
            sup.start()
            if sess.sock is not None and sess.sock not in sess.url_ports:
                sess.background(self.links.wait_socket(sess))   # not listening yet then
            for text in sess.forwards:
                await self._restore_forward(host, text, None)
            if port:
                await self._restore_forward(host, str(port), port)
            self._start_reaper(sess)
            self.jobs.track(sess)
        if records:
            log.info("took up %d detached session(s), %d of them running", len(records),
                     running)
            self.save()

    async def _restore_forward(self, host: str, text: str, port: int | None) -> None:
        try:
            if port is not None:
                await self.forwards._ensure_forward(host, "localhost", port)
            else:
                await self.forwards.restore_auto(host, text)
        except (TunneldError, ValueError) as exc:
            log.warning("%s: forward %s of a session was not restored: %s", host, text, exc)

    def snapshot(self) -> list[dict[str, Any]]:
        return [s.snapshot() for s in sorted(self.by_name.values(), key=lambda s: s.started)]


def _check_record(rec: dict[str, Any]) -> None:
    """Raise for a sessions-file record whose name, host or command is malformed."""
    check_session_name(rec.get("name"))
    check_host_alias(rec.get("host"))
    if not isinstance(rec.get("command"), str):
        raise ValueError("bad record")


def _locally_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
