"""Batch jobs as sessions (``run --job``): submitted to the server's scheduler, watched in its
queue, their output followed from the first byte, cancelled by ``kill``.

A ``JobSession`` is a detached session whose command runs in a job script (``jobs``) on a
compute node instead of under a runner on the login node.  What it shares with
``DetachedSession``: the session directory on the server, the local log as the copy of the
remote one (``received``), the scanner across re-attaches, the sessions file and the take-up
by the next daemon.  What differs:

- the start is a submission (``jobs.submit_command``); the session is ``pending`` until the
  job runs, then ``running`` (``node`` says where);
- the job's state comes from the scheduler, asked by the host's ``jobwatch.JobWatch`` (one
  query for all the host's jobs), and from the job's own ``run`` and ``status`` files, which
  the follower reports as soon as they appear;
- a job the scheduler ended (time limit, cancel, node failure) writes no status: once a poll
  says it ended, the follower is stopped and the log fetched to its end;
- markers and printed URLs in the log were printed on the job's node (``Session.node``);
- ``--port`` is forwarded to NODE:PORT once the job runs (with ``--port auto`` the job
  chooses PORT on its node);
- a notification when it starts running, and ``job_warning`` minutes before its time limit.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import asyncssh

from . import jobs, remote, sshrun
from .errors import ConnectError
from .session import READ_SIZE
from .session_detached import MAX_FOLLOW_STDERR, REATTACH_DELAY, REATTACH_DELAY_MAX, START_TIMEOUT
from .session_jobstate import JobStates
from .state import SessionEvent, SessionState

log = logging.getLogger("tunneld")

#: seconds the follower may still deliver the log's last bytes once the job has ended
END_GRACE = 2.0
#: seconds a submission whose answer was lost is asked after
PROBE_WAIT = 300.0


class JobSession(JobStates):
    """See the module docstring."""

    # -- submitting --------------------------------------------------------------------------

    async def _body(self) -> None:
        if self.remote_id is None:
            try:
                await self._submit()
            except BaseException:
                if self.job_id is None:
                    self.job_state = "not submitted"
                raise
        elif self.job_id is None:
            # taken up from a daemon that stopped while submitting: was it submitted?
            self._submitted(await self._probe_submit())
        await self._attach_until_end()

    async def _submit(self) -> None:
        conn = await self.host.connection_for_client()
        if self.scheduler is None:
            self.scheduler = await self._detect(conn)
        try:
            jobs.check_options(self.options, self.scheduler)
        except ValueError as exc:
            raise ConnectError(f"{exc} ({self.scheduler})") from None
        self.remote_id = f"{self.name}-{secrets.token_hex(4)}"
        self._changed()   # recorded before it may be submitted: a daemon killed now can look
        command = remote.shell_text(self.words, self.values,
                                    {"port": "PORT"} if self.port_auto else None)
        script = jobs.job_script(self.remote_id, command, self.env, self.port_auto,
                                 self.scheduler)
        text = jobs.submit_command(self.remote_id, self.name, self.scheduler, self.options,
                                   script)
        try:
            result = await sshrun.run(conn, text, START_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            log.info("%s: session %s: no answer from the submission (%s); asking the server "
                     "once connected", self.host.name, self.name, str(exc) or type(exc).__name__)
            result = await self._probe_submit()
        if result.exit_status == jobs.REFUSED:
            said = str(result.stderr or "").strip() or "no reason given"
            self.remote_id = None   # (the submission removed its directory)
            raise ConnectError(said)
        self._submitted(result)

    async def _detect(self, conn: asyncssh.SSHClientConnection) -> str:
        try:
            r = await sshrun.run(conn, jobs.detect_command(), START_TIMEOUT)
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            raise ConnectError(f"{self.host.name}: cannot ask which batch scheduler it has: "
                               f"{exc}") from None
        found = str(r.stdout or "").strip()
        if found not in jobs.SCHEDULERS:
            raise ConnectError(f"{self.host.name} has no batch scheduler tunneld knows "
                               "(neither sbatch, bsub nor qsub is on the PATH of its "
                               "non-interactive shell); name one with --scheduler "
                               "slurm|pbs|lsf, or run the command without --job")
        return found

    async def _probe_submit(self) -> asyncssh.SSHCompletedProcess:
        """The submission's answer, asked of the server after it was lost: once connected,
        again while the submitter still runs there, at most ``PROBE_WAIT`` s."""
        assert self.remote_id is not None
        deadline = time.monotonic() + PROBE_WAIT
        while True:
            conn = await self._connected()
            try:
                r = await sshrun.run(conn, jobs.probe_submit_command(self.remote_id),
                                     START_TIMEOUT)
                if jobs.SUBMITTING_TAG not in str(r.stdout or ""):
                    return r
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                pass
            if time.monotonic() > deadline:
                raise ConnectError(
                    f"{self.host.name}: session {self.name}: the submission's answer was lost "
                    f"and the server did not say within {PROBE_WAIT:g}s whether the job was "
                    f"submitted: look for a job named {self.name} in the queue (squeue --me "
                    f"-n {self.name}) and in ~/{remote.SESSIONS_DIR}/{self.remote_id}")
            await asyncio.sleep(2.0)

    def _submitted(self, result: Any) -> None:
        assert self.scheduler is not None
        found = jobs.parse_job_line(self.scheduler, str(result.stdout or ""))
        if found is None:
            said = str(result.stderr or "").strip().splitlines()
            hint = f"; if it was, its name is {self.name}: look in the queue (squeue --me -n " \
                   f"{self.name})" if not said else ""
            raise ConnectError(f"{self.host.name}: session {self.name}: the job was not "
                               f"submitted ({said[-1] if said else 'no job id came back'}){hint}")
        self.job_id, self.server, self.remote_dir = found.job_id, found.server, found.dir
        self.job_state = "pending"
        self._to(SessionEvent.QUEUED)
        log.info("%s: session %s: submitted job %s (%s, %s): %s", self.host.name, self.name,
                 self.job_id, self.scheduler, self.remote_dir, self.command)
        self.up.set()   # `run` returns: the job is in the queue
        self.poke()     # its first state (and reason) soon
        self._changed()

    # -- following ---------------------------------------------------------------------------

    async def _attach_until_end(self) -> None:
        delay = REATTACH_DELAY
        while True:
            conn = await self._connected()
            if self._final.is_set():
                drained = await self._drain(conn)
                if drained == "gone":
                    self._gone(f"job {self.job_id} ended; ")
                    return
                if not drained:   # (never a hot loop: the next try waits, longer each time)
                    await asyncio.sleep(delay)
                    delay = min(REATTACH_DELAY_MAX, delay * 2)
                    continue
                self._end_from_scheduler()
                return
            end = await self._follow(conn)
            if end == "final":
                continue   # fetch the rest, then end
            if end is None:
                delay = await self._follower_lost(conn, delay)
                continue
            delay = REATTACH_DELAY
            if isinstance(end, str):   # "gone"
                self._gone()
                return
            size, status = end
            if self.received < size and not await self._catch_up(conn, size):
                continue
            # the job's own status came first; after our scancel it is the cancel's (143)
            self.job_state = ("cancelled" if self._kill_requested else
                              "completed" if status == 0 else "failed")
            self.poke()
            self._ended_with(status, lost="it ended without an exit status")
            return

    async def _follow(self, conn: asyncssh.SSHClientConnection
                      ) -> tuple[int, int | None] | str | None:
        """Stream the log from ``received`` until the job's status is written (the end
        line's values), the scheduler ended it (``"final"``), or the connection was lost
        (None)."""
        assert self.remote_id is not None
        try:
            proc = await sshrun.start(conn, jobs.follow_command(self.remote_id, self.received))
        except (asyncssh.Error, OSError) as exc:
            log.info("%s: session %s: cannot follow: %s", self.host.name, self.name, exc)
            return None
        self._proc = proc
        out = asyncio.ensure_future(self._pump(proc))
        err = asyncio.ensure_future(self._pump_err(proc))
        final = asyncio.ensure_future(self._final.wait())
        try:
            if self.state is SessionState.DISCONNECTED:
                self._to(SessionEvent.REATTACHED if self.job_state == "running" else
                         SessionEvent.QUEUED, f"following again at byte {self.received}",
                         quiet=False)
            await asyncio.wait({out, final}, return_when=asyncio.FIRST_COMPLETED)
            if not out.done():   # the scheduler ended it: the last bytes, then stop
                await asyncio.wait({out}, timeout=END_GRACE)
                return "final"
            out.result()
            said = await asyncio.wait_for(err, 10)
            await asyncio.wait_for(proc.wait(check=False), 10)
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            log.info("%s: session %s: following stopped: %s", self.host.name, self.name, exc)
            return None
        finally:
            for t in (out, err, final):
                t.cancel()
            self._proc = None
            proc.close()
        return remote.parse_end_line(said)

    async def _pump(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        while True:
            data = await proc.stdout.read(READ_SIZE)
            if not data:
                return
            self._take(data)

    async def _pump_err(self, proc: asyncssh.SSHClientProcess[bytes]) -> str:
        kept = ""
        while True:
            line = await proc.stderr.readline()
            if not line:
                return kept
            text = line.decode("utf-8", "replace")
            if text.startswith(jobs.RUN_TAG):
                run = jobs.parse_run(text)
                if run is not None:
                    self.saw_run(run)
            elif len(kept) < MAX_FOLLOW_STDERR and not text.startswith(jobs.ALIVE_TAG):
                kept += text

    async def _drain(self, conn: asyncssh.SSHClientConnection) -> bool | str:
        """Fetch the log from ``received`` to its end: True; False if that failed (the
        connection dropped); ``"gone"`` if the session directory is."""
        assert self.remote_id is not None
        text = remote.tail_command(self.remote_id, self.received).replace(
            "\ntail ", '\n[ -d "$dir" ] || exit 3\ntail ', 1)
        try:
            proc = await sshrun.start(conn, text)
            try:
                await self._pump(proc)
                await asyncio.wait_for(proc.wait(check=False), 10)
            finally:
                proc.close()
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            log.info("%s: session %s: fetching the log's end failed: %s", self.host.name,
                     self.name, exc)
            return False
        return "gone" if proc.exit_status == 3 else proc.exit_status == 0

    # -- kill --------------------------------------------------------------------------------

    async def _kill(self) -> str:
        if self.job_id is None:
            deadline = time.monotonic() + START_TIMEOUT
            while self.job_id is None and self.running and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.job_id is None:
                self._stop_task()
                return f"session {self.name} stopped before its job was submitted"
        assert self.scheduler is not None
        try:
            conn = await self.host.connection_for_client()
        except ConnectError as exc:
            self._kill_requested = False
            raise ConnectError(f"{exc}; job {self.job_id} of session {self.name} was not "
                               "cancelled: kill it again once the host is connected") from None
        text = jobs.cancel_command(self.scheduler, self.job_id)
        try:
            r = await sshrun.run(conn, text, 30)
            said = (str(r.stdout or "") + str(r.stderr or "")).strip()
            ok = r.exit_status == 0
        except (asyncio.TimeoutError, asyncssh.Error, OSError) as exc:
            said, ok = f"{text.split()[0]} failed: {exc}", False
        log.info("%s: session %s: %s: %s", self.host.name, self.name, text,
                 said.replace("\n", "; ") or "done")
        if not ok and self.running:
            self._kill_requested = False
            raise ConnectError(f"{self.host.name}: {text} failed: {said or 'no reason given'}")
        self.poke()
        try:
            await asyncio.wait_for(asyncio.shield(self.done.wait()), 60)
        except asyncio.TimeoutError:
            return f"{text}: done; the scheduler has not ended the job yet"
        return f"{text}: job {self.job_id} cancelled"

