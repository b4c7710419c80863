"""Session against a "server" that is this machine without SSH: a stand-in connection runs the
remote text with ``sh -c`` in a temporary HOME.  For what the e2e tests cannot time: the start
command's answer lost to a dropped connection."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import asyncssh
import pytest

from tunneld import remote
from tunneld.session import Session
from tunneld.session_detached import DetachedSession
from tunneld.state import HostState

pytestmark = pytest.mark.timeout(60)


class LocalProcess:
    """What Session uses of asyncssh's SSHClientProcess, over a local ``sh -c``."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self._proc = proc
        self.stdin = SimpleNamespace(write_eof=self._close_stdin)
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def _close_stdin(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()

    async def wait(self, check: bool = False) -> None:
        await self._proc.wait()

    @property
    def exit_status(self) -> int | None:
        return self._proc.returncode

    def close(self) -> None:
        if self._proc.returncode is None:
            self._proc.kill()


class LocalConn:
    """Runs remote text here.  ``lose_answers``: that many ``run`` calls do their work and
    then fail as if the connection had dropped before the answer came; ``lose_requests``:
    that many fail before anything ran."""

    def __init__(self, home: Path, lose_answers: int = 0, lose_requests: int = 0):
        self.env = {"HOME": str(home), "PATH": os.environ["PATH"], "SHELL": "/bin/sh"}
        self.lose_answers = lose_answers
        self.lose_requests = lose_requests
        self.texts: list[str] = []

    def is_closed(self) -> bool:
        return False

    async def _spawn(self, text: str) -> asyncio.subprocess.Process:
        self.texts.append(text)
        return await asyncio.create_subprocess_exec(
            "sh", "-c", text, env=self.env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    async def run(self, text: str, **kw) -> SimpleNamespace:
        if self.lose_requests:
            self.lose_requests -= 1
            raise asyncssh.ConnectionLost("the connection was lost")
        proc = await self._spawn(text)
        out, err = await proc.communicate(b"")
        if self.lose_answers:
            self.lose_answers -= 1
            raise asyncssh.ConnectionLost("the connection was lost")
        return SimpleNamespace(stdout=out.decode(), stderr=err.decode(),
                               exit_status=proc.returncode)

    async def create_process(self, text: str, **kw) -> LocalProcess:
        return LocalProcess(await self._spawn(text))


class LocalHost:
    """What Session uses of a HostSupervisor: always connected to ``conn``."""

    name = "local"
    state = HostState.CONNECTED

    def __init__(self, conn: LocalConn):
        self.conn = conn

    async def connection_for_client(self) -> LocalConn:
        return self.conn

    def live_connection(self) -> LocalConn:
        return self.conn

    async def wait_change(self, timeout: float | None = None) -> None:
        await asyncio.sleep(0.05)


async def no_open(sess, ev) -> None:
    raise AssertionError(f"unexpected marker {ev}")


def run_session(tmp_path: Path, command: str, **losses: int) -> Session:
    home = tmp_path / "home"
    home.mkdir()
    conn = LocalConn(home, **losses)

    async def main() -> Session:
        sess = DetachedSession("s1", LocalHost(conn), [command],  # type: ignore[arg-type]
                               tmp_path / "local" / "s1.log", no_open)
        sess.start()
        try:
            await asyncio.wait_for(sess.done.wait(), 30)
        finally:
            for pid_file in home.glob(".tunneld/sessions/*/pid"):
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        return sess
    sess = asyncio.run(main())
    sess.texts = conn.texts  # type: ignore[attr-defined]
    return sess


def test_a_detached_session_runs_and_ends_with_its_status(tmp_path):
    sess = run_session(tmp_path, "echo one; echo two >&2; exit 4")
    assert (sess.state, sess.exit_status) == ("exited", 4)
    assert sess.log_path.read_bytes() == b"one\ntwo\n"
    assert sess.received == 8 and sess.pid and sess.server is not None


def test_a_start_whose_answer_was_lost_is_found_and_followed(tmp_path):
    """The start command ran, but its answer was lost with the connection: the session asks
    the server (once) instead of failing while its command runs on there unknown."""
    sess = run_session(tmp_path, "echo started; sleep 0.3; echo done; exit 2", lose_answers=1)
    assert (sess.state, sess.exit_status) == ("exited", 2), sess.error
    assert sess.log_path.read_bytes() == b"started\ndone\n"
    assert len([t for t in sess.texts if "setsid" in t]) == 1   # started once, not twice


def test_a_start_that_never_reached_the_server_fails_with_the_reason(tmp_path):
    sess = run_session(tmp_path, "true", lose_requests=1)
    assert sess.state == "failed" and sess.exit_status is None
    assert sess.error is not None and "could not be started on the server: the command " \
        "did not start in" in sess.error, sess.error


def test_taken_up_while_it_was_starting(tmp_path):
    """A daemon stopped (or killed) while the start command ran leaves a record with the
    session's id and no pid: the next one asks the server and follows it."""
    home = tmp_path / "home"
    home.mkdir()
    conn = LocalConn(home)

    async def main() -> Session:
        await conn.run(remote.detached_start_command("s1-0001", "echo hi; exit 6"))
        sess = DetachedSession("s1", LocalHost(conn), ["echo hi; exit 6"],  # type: ignore[arg-type]
                               tmp_path / "local" / "s1.log", no_open)
        sess.resume({"remote_id": "s1-0001", "pid": None, "started": 1.0})
        await asyncio.wait_for(sess.done.wait(), 30)
        return sess
    sess = asyncio.run(main())
    assert (sess.state, sess.exit_status) == ("exited", 6), sess.error
    assert sess.pid and sess.log_path.read_bytes() == b"hi\n"
