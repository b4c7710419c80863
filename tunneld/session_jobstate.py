"""A batch job's session, its state half: what the job is (``job()``, the sessions file's
record), and what the scheduler's polls and the job's own files say of it (``saw_job``,
``saw_run``, ``due``: the walltime warning and the confirmation of an end), with the
notifications.  The other half, ``session_job.JobSession``, submits, follows and cancels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from . import jobs
from .jobs import JOB_ENDED, JobInfo, Run
from .markers import BrowserOpen
from .notify import notify
from .printed import PrintedUrl
from .session_detached import DetachedSession
from .state import SessionEvent, SessionState

log = logging.getLogger("tunneld")

#: seconds a marker or URL in the job's output waits for the job's node to be known
PLACED_WAIT = 30.0
#: seconds an end that the job's own status file does not tell must still hold before it is
#: taken (a status file NFS has not shown yet, a requeue, a queue that answered without it)
CONFIRM_WAIT = 15.0
#: the states that need that confirmation
_CONFIRM = ("node failure", "preempted", "ended")
#: seconds the expected end may move before the sessions file is written again
ENDS_SLACK = 5.0
#: the job's states that end the session, and how
_FAILED = {"timeout": "reached its time limit",
           "cancelled": "was cancelled (not by `tunnelctl kill`)",
           "node failure": "ended with a failure of its node", "out of memory": "ran out of memory",
           "preempted": "was preempted"}

#: called when the job runs on a node with a port to forward (``--port``)
OnRunning = Callable[["JobStates"], None]


class JobStates(DetachedSession):
    """A job session's state (see the module docstring); ``job()`` is what ``sessions
    --json`` shows of the job."""

    def __init__(self, *args: Any, scheduler: str | None = None, options: list[str] = [],
                 port_auto: bool = False, warn_minutes: Callable[[], float] = lambda: 10.0,
                 on_running: OnRunning | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheduler = scheduler
        self.options = list(options)
        self.port_auto = port_auto
        self.job_id: str | None = None
        self.job_state = "submitting"
        self.reason = ""
        self.time_limit: int | None = None
        #: wall-clock times: the job started on its node, its time limit ends
        self.job_started: float | None = None
        self.ends: float | None = None
        #: the port the program listens on, on the node (``--port``; auto: chosen there)
        self.job_port: int | None = None
        #: notifications sent ("running", "warning"), once each, kept across restarts
        self.notified: list[str] = []
        self._warn_minutes = warn_minutes
        self._on_running = on_running
        #: set once a poll says the job has left the queue (or ended) without a status
        self._final = asyncio.Event()
        self._final_status: int | None = None
        #: when a poll first saw an end that needs confirming (``saw_job``)
        self._end_first: float | None = None
        #: (node, port) the job's ``--port`` was last forwarded to
        self._forwarded: tuple[str, int | None] | None = None
        #: called to make the host's watch look again soon (set by the watch)
        self.poke: Callable[[], None] = lambda: None
        #: set once the job's node is known (its output's URLs wait for it)
        self._placed = asyncio.Event()

    # -- what is shown and kept --------------------------------------------------------------

    def job(self) -> dict[str, Any]:
        from .wire import iso_time
        return {"id": self.job_id, "scheduler": self.scheduler, "state": self.job_state,
                "reason": self.reason or None, "node": self.node, "time_limit": self.time_limit,
                "started": iso_time(self.job_started) if self.job_started else None,
                "ends": iso_time(self.ends) if self.ends and self.running else None,
                "port": self.job_port}

    def snapshot(self) -> dict[str, Any]:
        return super().snapshot() | {"job": self.job(), "port": self.job_port}

    def record(self) -> dict[str, Any]:
        return super().record() | {"job": {
            "id": self.job_id, "scheduler": self.scheduler, "options": self.options,
            "port_auto": self.port_auto, "state": self.job_state, "reason": self.reason,
            "node": self.node, "time_limit": self.time_limit, "started": self.job_started,
            "ends": self.ends, "port": self.job_port, "notified": self.notified}}

    def resume(self, record: dict[str, Any]) -> None:
        job = jobs.checked_record(record.get("job") or {})   # raises ValueError
        self.job_id, self.scheduler, self.options = job["id"], job["scheduler"], job["options"]
        self.port_auto, self.job_state, self.reason = job["port_auto"], job["state"], \
            job["reason"]
        self.node, self.time_limit, self.job_port = job["node"], job["time_limit"], job["port"]
        self.job_started, self.ends, self.notified = job["started"], job["ends"], \
            job["notified"]
        if self.node is not None:
            self._placed.set()
        super().resume(record)

    # -- what the scheduler and the job's files say ----------------------------------------

    def _open(self, ev: BrowserOpen | PrintedUrl) -> None:
        """A marker or a printed URL in the job's output: acted on once the job's node is
        known (the follower reports it on another stream, which may come later)."""
        if self._placed.is_set():
            super()._open(ev)
            return
        if isinstance(ev, BrowserOpen):
            self.opens += 1

        async def placed() -> None:
            try:
                await asyncio.wait_for(self._placed.wait(), PLACED_WAIT)
            except asyncio.TimeoutError:
                log.info("%s: session %s: the job's node is not known; its output's URLs are "
                         "taken as the server's", self.host.name, self.name)
            await self._open_one(ev)
        self.background(placed())

    def saw_run(self, run: Run) -> None:
        """The job's ``run`` file: it runs on ``run.node`` (with ``--port auto``: on
        ``run.port``)."""
        port = run.port if self.port_auto and run.port else self.job_port
        if (run.node, port) == (self.node, self.job_port) and self.job_started:
            return
        self.job_started = run.started or time.time()
        self.job_port = port
        if self.job_state == "pending":
            self.job_state = "running"
        log.info("%s: session %s: job %s runs on %s%s", self.host.name, self.name, self.job_id,
                 run.node, f", port {self.job_port}" if self.job_port else "")
        self._placed_on(run.node)
        self.poke()
        self._changed()

    def _placed_on(self, node: str) -> None:
        """The job runs on ``node`` (its run file, or the scheduler says so): running, its
        output's URLs mean that node, its ``--port`` is forwarded there (again, if the node
        or port changed: a requeued job)."""
        self.node = node
        self._placed.set()
        if self.state is SessionState.PENDING:
            self._to(SessionEvent.STARTED, f"job {self.job_id} on {node}", quiet=False)
        self._notify_once("running", f"{self.name} is running on {node}")
        target = (node, self.job_port)
        if self.job_port and target != self._forwarded and self._on_running is not None:
            self._forwarded = target
            self._on_running(self)

    def saw_job(self, info: JobInfo | None, run: Run | None, status: int | None,
                now: float) -> None:
        """A poll's answer about this job (None: the scheduler no longer knows it)."""
        if not self.running or self._final.is_set():
            return
        if run is not None:
            self.saw_run(run)
        if info is None or info.state in _CONFIRM or (
                info.state in ("completed", "failed") and status is None and
                info.exit_code is None):
            # an end the job's own status file does not tell: the job's status file may not
            # be visible yet (NFS), the job may be requeued (node failure, preemption), a
            # queue may answer without it (Torque's qstat -x): taken once it still holds
            # CONFIRM_WAIT s later
            if self._end_first is None:
                self._end_first = now
            if now - self._end_first < CONFIRM_WAIT and status is None:
                return
        else:
            self._end_first = None
        if info is None:
            self._final_status = status
            self.job_state = ("completed" if status == 0 else "failed" if status is not None
                              else "ended")
            self._final.set()
            return
        before = (self.job_state, self.reason, self.node, self.ends)
        self.job_state, self.reason = info.state, info.reason
        self.time_limit = info.time_limit or self.time_limit
        if info.state == "running":
            if info.time_left is not None and (
                    self.ends is None or abs(now + info.time_left - self.ends) > ENDS_SLACK):
                self.ends = now + info.time_left
            if info.node and (self.state is SessionState.PENDING or info.node != self.node):
                self._placed_on(info.node)
        elif info.state == "pending" and self.state is SessionState.RUNNING:
            self._to(SessionEvent.QUEUED, f"job {self.job_id} was requeued", quiet=False)
        if info.state in JOB_ENDED:
            if info.node:
                self.node = info.node
            self._final_status = status if status is not None else info.exit_code
            if info.state in ("completed", "failed") and self._final_status is not None:
                self.job_state = "completed" if self._final_status == 0 else "failed"
            self._final.set()
        if before != (self.job_state, self.reason, self.node, self.ends):
            self._changed()

    def due(self, now: float) -> float | None:
        """When this job wants the next poll (wall-clock): its walltime warning, or the
        confirmation of an end; None if it wants none sooner.  Sends the warning once due."""
        if self._end_first is not None:
            return self._end_first + CONFIRM_WAIT
        if self.ends is None or "warning" in self.notified or not self.running or \
                self.job_state != "running" or now >= self.ends:
            return None   # (an end already past: a stale record, the next poll says more)
        minutes = self._warn_minutes()
        due = self.ends - minutes * 60
        if now < due:
            return due
        left = max(0, round((self.ends - now) / 60))
        self._notify_once("warning", f"{self.name} on {self.node} ends in {left} min: save "
                                     "your work")
        self._changed()
        return None

    def _notify_once(self, what: str, text: str) -> None:
        if what in self.notified:
            return
        self.notified.append(what)
        log.info("%s: session %s: %s", self.host.name, self.name, text)
        notify("tunneld", text)

    def _end_from_scheduler(self) -> None:
        state = self.job_state
        status = self._final_status
        if self._kill_requested:
            self.job_state = "cancelled"
            self.exit_status = status
            self._to(SessionEvent.KILLED)
        elif state in _FAILED:
            self.error = f"job {self.job_id} {_FAILED[state]}"
            self._to(SessionEvent.FAILED)
        elif status is None and state in ("completed", "failed"):
            # the scheduler says how, the job wrote no status (its script did not get there)
            self.exit_status = 0 if state == "completed" else None
            self.error = None if state == "completed" else \
                f"job {self.job_id} failed before its command ran (`tunnelctl logs {self.name}`)"
            self._to(SessionEvent.EXITED if state == "completed" else SessionEvent.FAILED)
        else:
            self._ended_with(status, lost=f"job {self.job_id} left the queue without an "
                                          "exit status (the scheduler keeps no record of it)")
