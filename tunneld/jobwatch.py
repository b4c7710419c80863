"""One watcher per host of its batch jobs: a single scheduler query for all of them, gentle
on a shared login node.

It polls while the host has a job session that has not ended: every ``POLL_PENDING`` s at
first while a job waits (growing to ``POLL_MAX``), every ``POLL_RUNNING`` s while they run;
sooner when a session pokes it (its job started, it was cancelled) or a walltime warning is
due.  A query that fails (the scheduler's controller is down) says nothing about the jobs:
it is retried later, never taken for their end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import asyncssh

from . import jobpoll, jobs, sshrun
from .config import Config
from .errors import TunneldError, UsageError
from .events import EventHub
from .session import OnOpen, Session, SessionHost
from .state import SessionState

if TYPE_CHECKING:
    from .forwards import Forwards
    from .session_job import JobSession
    from .session_jobstate import JobStates

log = logging.getLogger("tunneld")

#: seconds between polls while a job waits in the queue: the first, then ×1.5 to the max
POLL_PENDING = 5.0
POLL_MAX = 60.0
#: seconds between polls while every job runs (their ends come from the job's own status
#: file at once; a poll sees the scheduler's ends: time limit, cancel, node failure)
POLL_RUNNING = 30.0
#: seconds between polls soon after a poke (a job started, was cancelled)
POLL_SOON = 1.0
#: seconds a poll may take
POLL_TIMEOUT = 30.0


class JobWatch:
    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.sessions: set[JobSession] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending_delay = POLL_PENDING
        #: poked since the last poll: the next one comes soon
        self._soon = False
        #: the last failed query's message (logged once per run of failures)
        self._failing = ""

    def track(self, sess: JobSession) -> None:
        self.sessions.add(sess)
        sess.poke = self.poke
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"jobwatch:{self.host.name}")

    def poke(self) -> None:
        self._pending_delay = POLL_PENDING
        self._soon = True
        self._wake.set()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            self.sessions = {s for s in self.sessions if s.running and not s.detaching}
            if not self.sessions:
                return
            conn = self.host.live_connection()
            if conn is None:
                await self.host.wait_change(POLL_MAX)
                continue
            await self._poll(conn)
            delay = self.next_delay(time.time())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def next_delay(self, now: float) -> float:
        """Seconds until the next poll (and the walltime warnings due by then are sent)."""
        dues = [d for s in self.sessions if (d := s.due(now)) is not None]
        if self._soon:
            delay, self._soon = POLL_SOON, False
        elif any(s.state in (SessionState.STARTING, SessionState.PENDING) or
                 s.job_state == "pending" for s in self.sessions):
            delay = self._pending_delay
            self._pending_delay = min(POLL_MAX, self._pending_delay * 1.5)
        else:
            delay = POLL_RUNNING
        if dues:
            delay = max(0.5, min(delay, min(dues) - now + 0.5))
        return delay

    async def _poll(self, conn: asyncssh.SSHClientConnection) -> None:
        by_sched: dict[str, dict[str, JobSession]] = {}
        for s in self.sessions:
            if s.job_id is not None and s.remote_id is not None and s.scheduler is not None:
                by_sched.setdefault(s.scheduler, {})[s.job_id] = s
        for sched, sessions in by_sched.items():
            jobs = {j: s.remote_id for j, s in sessions.items() if s.remote_id is not None}
            try:
                r = await sshrun.run(conn, jobpoll.poll_command(sched, jobs), POLL_TIMEOUT)
            except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
                log.info("%s: asking %s about its jobs failed: %s", self.host.name, sched, exc)
                return
            answer = jobpoll.parse_poll(sched, str(r.stdout or ""))
            if not answer.conclusive:
                if answer.said != self._failing:
                    log.warning("%s: the scheduler did not answer about the jobs (%s); asking "
                                "again later", self.host.name, answer.said or "no answer")
                self._failing = answer.said
                continue
            self._failing = ""
            queue = dict(answer.queue)
            missing = [j for j in sessions if j not in queue]
            account = jobpoll.account_command(sched, missing) if missing else None
            if account is not None:
                try:
                    r = await sshrun.run(conn, account, POLL_TIMEOUT)
                    queue |= jobpoll.parse_sacct(str(r.stdout or ""))
                except (asyncio.TimeoutError, asyncssh.Error, OSError):
                    pass   # (then the job's own status file says how it ended)
            now = time.time()
            for job_id, sess in sessions.items():
                sess.saw_job(queue.get(job_id), answer.runs.get(job_id),
                             answer.statuses.get(job_id), now)


class Jobs:
    """The batch-job part of the sessions service: makes ``JobSession``s, keeps one
    ``JobWatch`` per host, forwards a job's ``--port`` to its node once it runs, and
    publishes the job's state changes as session events."""

    def __init__(self, forwards: Forwards, events: EventHub, config: Callable[[], Config],
                 on_open: OnOpen, changed: Callable[[Session], None]) -> None:
        self.forwards, self.events, self._config = forwards, events, config
        self._on_open, self._changed = on_open, changed
        self.watches: dict[str, JobWatch] = {}
        #: session name → (job state, node) last published
        self._published: dict[str, tuple[str, str | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def check_run(self, job: str | None, scheduler: str | None, detach: bool,
                  sock: str | None) -> list[str]:
        """``run``'s job arguments checked: the scheduler's options (split)."""
        if job is None:
            if scheduler is not None:
                raise UsageError("--scheduler goes with --job: `tunnelctl run HOST --job "
                                 "'OPTIONS' --scheduler NAME -- COMMAND`")
            return []
        if not detach:
            raise UsageError("--job and --no-detach: a batch job outlives the connection by "
                             "nature; leave out --no-detach")
        if sock is not None:
            raise UsageError("--job and --sock: a job's node has its own files; use --port "
                             "auto (the port is chosen on the node)")
        try:
            # the scheduler's own options are checked once it is known (found on the server)
            return jobs.job_options(job, scheduler or "slurm")
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def new(self, name: str, sup: SessionHost, words: list[str], log_path: Path,
            env: dict[str, str], values: dict[str, str], port: int | str | None,
            scheduler: str | None, options: list[str]) -> JobSession:
        from .session_job import JobSession
        sess = JobSession(name, sup, words, log_path, self._on_open, env=env,
                          on_change=self._job_changed, values=values, scheduler=scheduler,
                          options=options, port_auto=port == "auto",
                          warn_minutes=lambda: self._config().defaults.job_warning,
                          on_running=self._forward_port)
        if isinstance(port, int):
            sess.job_port = port
        return sess

    def track(self, sess: Session) -> None:
        """Watch ``sess``'s job (a running ``JobSession``; other sessions are not jobs)."""
        from .session_job import JobSession
        if not isinstance(sess, JobSession) or not sess.running:
            return
        watch = self.watches.get(sess.host.name)
        if watch is None or watch.host is not sess.host:
            watch = self.watches[sess.host.name] = JobWatch(sess.host)
        watch.track(sess)
        self._published[sess.name] = (sess.job_state, sess.node)
        if sess.job_port and sess.node:
            self._forward_port(sess)   # (taken up: its forward is restored, or made again)

    def _job_changed(self, sess: Session) -> None:
        from .session_job import JobSession
        assert isinstance(sess, JobSession)
        now = (sess.job_state, sess.node)
        if self._published.get(sess.name) != now:
            self._published[sess.name] = now
            self.events.publish("session", host=sess.host.name, name=sess.name, event="job",
                                state=sess.state.value, exit_status=sess.exit_status,
                                job=sess.job())
        self._changed(sess)

    def _forward_port(self, sess: JobStates) -> None:
        async def forward() -> None:
            assert sess.node is not None and sess.job_port is not None
            try:
                fwd = await self.forwards.ensure_forward(sess.host.name, sess.node,
                                                         sess.job_port)
            except TunneldError as exc:
                log.warning("%s: session %s: its port %s on %s is not forwarded: %s",
                            sess.host.name, sess.name, sess.job_port, sess.node, exc)
                return
            if str(fwd.spec) not in sess.forwards:
                sess.forwards.append(str(fwd.spec))
                log.info("%s: session %s: job's port %s on %s is forwarded at "
                         "127.0.0.1:%d", sess.host.name, sess.name, sess.job_port, sess.node,
                         fwd.spec.bind_port)
                self._changed(sess)
        sess.background(forward())

    def stop(self) -> None:
        for w in self.watches.values():
            w.stop()
