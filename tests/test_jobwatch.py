"""The job watch's schedule and its one query per host, with stand-in sessions and a
stand-in connection (the real thing: tests/e2e/test_e2e_jobs.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tunneld import jobwatch
from tunneld.jobs import JobInfo
from tunneld.state import SessionState

pytestmark = pytest.mark.timeout(20)


class FakeJob:
    def __init__(self, job_id: str, state: SessionState = SessionState.PENDING,
                 job_state: str = "pending", due: float | None = None) -> None:
        self.job_id, self.remote_id, self.scheduler = job_id, f"s{job_id}-1-0000", "slurm"
        self.state, self.job_state, self.running, self.detaching = state, job_state, True, False
        self.due = due
        self.seen: list[tuple] = []
        self.poke = lambda: None

    def warn_due(self, now: float) -> float | None:
        return self.due

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
    monkeypatch.setattr(session_job, "notify", lambda title, text: sent.append(text))
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
    assert sess.warn_due(1000.0) == 15000.0 - 600
    assert sess.warn_due(14400.0) is None and sess.warn_due(14500.0) is None
    assert sent[1:] == ["lab-1 on gpu012 ends in 10 min: save your work"]
    # seen again (a daemon restart takes the record up): nothing sent twice
    sess.saw_job(JobInfo("running", "", "gpu012", 14400, 500), None, None, 14500.0)
    assert len(sent) == 2
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
    sess._end_from_scheduler()
    assert sess.state is SessionState.LOST and "left the queue without" in sess.error


def test_a_job_the_scheduler_calls_failed_without_a_status_is_asked_once_more(tmp_path,
                                                                             monkeypatch):
    sess, _ = _job_session(tmp_path, monkeypatch)
    sess.saw_job(JobInfo("running", "", "gpu012"), None, None, 0.0)
    sess.saw_job(JobInfo("failed", "NonZeroExitCode", "gpu012"), None, None, 0.0)
    assert not sess._final.is_set()          # its status file may just not be seen yet
    sess.saw_job(JobInfo("failed", "NonZeroExitCode", "gpu012"), None, None, 0.0)
    assert sess._final.is_set()
    sess._end_from_scheduler()
    assert sess.state is SessionState.FAILED and "failed before its command ran" in sess.error
