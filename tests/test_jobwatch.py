"""The job watch's schedule and its one query per host, with stand-in sessions and a
stand-in connection (the real thing: tests/e2e/test_e2e_jobs.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tunneld import jobs, jobwatch
from tunneld.jobs import JobInfo
from tunneld.state import SessionState

pytestmark = pytest.mark.timeout(20)


class FakeJob:
    def __init__(self, job_id: str, state: SessionState = SessionState.PENDING,
                 job_state: str = "pending", due: float | None = None) -> None:
        self.job_id, self.remote_id, self.scheduler = job_id, f"s{job_id}-1-0000", "slurm"
        self.state, self.job_state, self.running, self.detaching = state, job_state, True, False
        self.due_at = due
        self.seen: list[tuple] = []
        self.poke = lambda: None

    def due(self, now: float) -> float | None:
        return self.due_at

    def saw_job(self, info, run, status, now) -> None:
        self.seen.append((info, run, status))


class FakeConn:
    def __init__(self, answer: str) -> None:
        self.answer, self.commands = answer, []

    async def run(self, command, **kw):
        self.commands.append(command)
        return SimpleNamespace(stdout=self.answer, stderr="", exit_status=0)


def _watch(*sessions: FakeJob) -> jobwatch.JobWatch:
    w = jobwatch.JobWatch(SimpleNamespace(name="cluster"))
    w.sessions = set(sessions)
    return w


def test_pending_jobs_are_polled_less_and_less_often_running_ones_seldom():
    w = _watch(FakeJob("1"))
    delays = [w.next_delay(0) for _ in range(8)]
    assert delays[:3] == [5.0, 7.5, 11.25] and delays[-1] == jobwatch.POLL_MAX
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    w.poke()
    assert w.next_delay(0) == jobwatch.POLL_SOON       # a job started, was cancelled
    assert w.next_delay(0) == jobwatch.POLL_PENDING    # and the backoff starts again
    w = _watch(FakeJob("1", SessionState.RUNNING, "running"))
    assert w.next_delay(0) == jobwatch.POLL_RUNNING
    w = _watch(FakeJob("1", SessionState.RUNNING, "running", due=100.0))
    assert w.next_delay(95.0) == 5.5                   # woken for the walltime warning


def test_one_query_covers_every_job_of_the_host():
    a, b = FakeJob("11", SessionState.RUNNING, "running"), FakeJob("12")
    conn = FakeConn("11|RUNNING|None|tdnode1|4:00:00|3:59:00\n12|PENDING|Priority||1:00|1:00\n"
                    "\x1etunneld-queue:0\n\x1etunneld-files\n")
    asyncio.run(_watch(a, b)._poll(conn))
    assert len(conn.commands) == 1 and "-j 11,12 " in conn.commands[0]
    assert a.seen == [(JobInfo("running", "", "tdnode1", 14400, 14340), None, None)]
    assert b.seen == [(JobInfo("pending", "Priority", "", 60, None), None, None)]


def test_a_failed_query_ends_no_job():
    a = FakeJob("11", SessionState.RUNNING, "running")
    conn = FakeConn("slurm_load_jobs error: Unable to contact slurm controller\n"
                    "\x1etunneld-queue:1\n\x1etunneld-files\n")
    asyncio.run(_watch(a)._poll(conn))
    assert a.seen == [] and len(conn.commands) == 1


def test_a_job_the_queue_forgot_is_asked_of_the_accounting_then_its_status_file():
    a = FakeJob("11", SessionState.RUNNING, "running")
    conn = FakeConn("\x1etunneld-queue:0\n\x1etunneld-files\n\x1etunneld-status:11\t0\n")
    asyncio.run(_watch(a)._poll(conn))
    assert len(conn.commands) == 2 and conn.commands[1].startswith("sacct ")
    assert a.seen == [(None, None, 0)]


def _job_session(tmp_path, monkeypatch):
    from tunneld import session_job
    sent: list[str] = []
    from tunneld import session_jobstate
    monkeypatch.setattr(session_jobstate, "notify", lambda title, text: sent.append(text))
    host = SimpleNamespace(name="cluster")

    async def on_open(sess, ev):
        pass
    sess = session_job.JobSession("lab-1", host, ["jupyter", "lab"], tmp_path / "lab-1.log",
                                  on_open, scheduler="slurm", warn_minutes=lambda: 10.0)
    sess.job_id, sess.remote_id, sess.job_state = "81723", "lab-1-0000", "pending"
    sess.state = SessionState.PENDING
    return sess, sent


def test_a_job_session_follows_what_the_scheduler_says(tmp_path, monkeypatch):
    sess, sent = _job_session(tmp_path, monkeypatch)
    sess.saw_job(JobInfo("pending", "Priority"), None, None, 1000.0)
    assert sess.state is SessionState.PENDING and sess.job()["reason"] == "Priority"
    sess.saw_job(JobInfo("running", "", "gpu012", 14400, 14000), None, None, 1000.0)
    assert sess.state is SessionState.RUNNING and sess.node == "gpu012"
    assert sess.ends == 15000.0 and sent == ["lab-1 is running on gpu012"]
    # the warning: due 10 min before the end, sent once
    assert sess.due(1000.0) == 15000.0 - 600
    assert sess.due(14400.0) is None and sess.due(14500.0) is None
    assert sent[1:] == ["lab-1 on gpu012 ends in 10 min: save your work"]
    # seen again (a daemon restart takes the record up): nothing sent twice
    sess.saw_job(JobInfo("running", "", "gpu012", 14400, 500), None, None, 14500.0)
    assert len(sent) == 2
    # a node failure may be requeued: not yet an end; seen again later it is
    sess.saw_job(JobInfo("node failure", "", "gpu012", 14400), None, None, 14600.0)
    assert not sess._final.is_set()
    sess.saw_job(JobInfo("running", "", "gpu012", 14400, 300), None, None, 14700.0)
    assert sess._end_first is None
    # the scheduler ends it: timeout is a failure naming the limit
    sess.saw_job(JobInfo("timeout", "TimeLimit", "gpu012", 14400), None, None, 15000.0)
    assert sess._final.is_set()
    sess._end_from_scheduler()
    assert sess.state is SessionState.FAILED
    assert sess.error == "job 81723 reached its time limit"


def test_a_requeued_job_is_pending_again_and_an_unknown_end_is_lost(tmp_path, monkeypatch):
    sess, _ = _job_session(tmp_path, monkeypatch)
    sess.saw_job(JobInfo("running", "", "gpu012", None, None), None, None, 0.0)
    sess.saw_job(JobInfo("pending", "BeginTime"), None, None, 0.0)
    assert sess.state is SessionState.PENDING
    sess.saw_job(None, None, None, 0.0)   # gone from queue and accounting, no status file
    assert not sess._final.is_set()
    sess.saw_job(None, None, None, 60.0)
    sess._end_from_scheduler()
    assert sess.state is SessionState.LOST and "left the queue without" in sess.error


def test_an_end_the_status_file_does_not_tell_must_still_hold_later(tmp_path, monkeypatch):
    """A job the scheduler calls failed without a status file seen (NFS may not show it
    yet), a node failure (Slurm may requeue it), a job gone from the queue (Torque's qstat
    -x answers in XML): taken only once it still holds CONFIRM_WAIT s later."""
    from tunneld.session_jobstate import CONFIRM_WAIT
    sess, _ = _job_session(tmp_path, monkeypatch)
    sess.saw_job(JobInfo("running", "", "gpu012"), None, None, 0.0)
    sess.saw_job(JobInfo("failed", "NonZeroExitCode", "gpu012"), None, None, 100.0)
    assert not sess._final.is_set() and sess.due(101.0) == 100.0 + CONFIRM_WAIT
    sess.saw_job(JobInfo("failed", "NonZeroExitCode", "gpu012"), None, None, 101.0)
    assert not sess._final.is_set()
    sess.saw_job(JobInfo("failed", "NonZeroExitCode", "gpu012"), None, None,
                 100.0 + CONFIRM_WAIT)
    assert sess._final.is_set()
    sess._end_from_scheduler()
    assert sess.state is SessionState.FAILED and "failed before its command ran" in sess.error


def test_a_fixed_port_is_forwarded_whoever_learns_the_node_first(tmp_path, monkeypatch):
    """The poll may see the node before the job's run file: the --port forward is made
    then; a requeue to another node forwards again."""
    sess, _ = _job_session(tmp_path, monkeypatch)
    forwarded: list[tuple] = []
    sess._on_running = lambda s: forwarded.append((s.node, s.job_port))
    sess.job_port = 8888
    sess.saw_job(JobInfo("running", "", "gpu012", 600, 590), None, None, 0.0)
    sess.saw_run(jobs.Run("gpu012", None, 1.0))
    assert forwarded == [("gpu012", 8888)]
    sess.saw_job(JobInfo("pending", "BeginTime"), None, None, 10.0)   # requeued
    sess.saw_run(jobs.Run("gpu013", None, 20.0))
    assert forwarded == [("gpu012", 8888), ("gpu013", 8888)]


def test_a_stale_end_sends_no_warning(tmp_path, monkeypatch):
    sess, sent = _job_session(tmp_path, monkeypatch)
    sess.saw_job(JobInfo("running", "", "gpu012", 600, 100), None, None, 0.0)
    assert sess.due(500.0) is None and sent == ["lab-1 is running on gpu012"]


def test_a_drain_that_fails_backs_off_and_a_gone_directory_ends_the_session(tmp_path,
                                                                            monkeypatch):
    from tunneld import session_job
    sess, _ = _job_session(tmp_path, monkeypatch)
    sess._final.set()
    answers = iter([False, False, False, "gone"])
    delays: list[float] = []

    async def drain(conn):
        return next(answers)

    async def connected():
        return object()

    async def sleep(d):
        delays.append(d)
    monkeypatch.setattr(sess, "_drain", drain)
    monkeypatch.setattr(sess, "_connected", connected)
    monkeypatch.setattr(session_job.asyncio, "sleep", sleep)
    asyncio.run(sess._attach_until_end())
    assert delays == [1.0, 2.0, 4.0]
    assert sess.state is SessionState.LOST and "is gone" in sess.error
