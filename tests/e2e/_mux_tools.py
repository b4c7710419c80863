"""Helpers of the control-socket tests: the real OpenSSH client riding tunneld's connection."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import Daemon

#: seconds one ssh/scp/rsync/git command of a test may take
CMD_TIMEOUT = 60.0


def mux_path(d: Daemon, host: str | None = None) -> Path:
    """Where tunneld serves ``host``'s control socket in this daemon's runtime directory."""
    r = subprocess.run(
        [os.sys.executable, "-c",
         f"from tunneld import paths; print(paths.mux_socket({(host or d.server.host)!r}))"],
        env=d.env, capture_output=True, text=True, check=True)
    return Path(r.stdout.strip())


def ssh_opts(d: Daemon, host: str | None = None) -> list[str]:
    """The options every test gives: this sshd's config, tunneld's socket, never a master
    of its own, and never a login of its own (a refused master must show as a failure)."""
    return ["-F", str(d.server.ssh_config), "-o", f"ControlPath={mux_path(d, host)}",
            "-o", "ControlMaster=no", "-o", "BatchMode=yes"]


def mux_ssh(d: Daemon, *args: str, input: bytes | None = None, host: str | None = None,
            timeout: float = CMD_TIMEOUT, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh", *ssh_opts(d, host), *args], input=input,
                          capture_output=True, timeout=timeout, env=env or d.env)


def start_socket(d: Daemon, host: str | None = None) -> Path:
    """Make tunneld use ``host`` (a login: its control socket appears) and wait for it."""
    d.ctl("login", host or d.server.host)
    p = mux_path(d, host)
    d.wait_for(p.is_socket, 10, f"the control socket {p}")
    return p


def sessions_logged(d: Daemon) -> int:
    """How many passengers the daemon's log names so far (``HOST: ssh client (pid N): …``)."""
    return sum(1 for line in d.log(None).splitlines()
               if ": ssh client (pid " in line and "): ended (" not in line)


def passengers(d: Daemon, host: str | None = None) -> list[dict]:
    return d.host(host)["mux"]


def wait_passengers(d: Daemon, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(passengers(d)) == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} passengers expected: {json.dumps(passengers(d))}")


class PtySsh:
    """``ssh ARGS`` with a pseudo-terminal as its stdin, stdout, stderr and controlling
    terminal, of ``cols`` x ``rows``, as a person runs it."""

    def __init__(self, env: dict[str, str], args: list[str], cols: int = 100,
                 rows: int = 30) -> None:
        import fcntl
        import pty
        import signal
        import struct
        import termios
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once, never return into pytest
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))
                os.execvpe("ssh", ["ssh", *args], env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.out, self.seen, self.status = pid, fd, b"", 0, None

    def _read(self, timeout: float) -> bool:
        import errno
        import select
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return False
            raise
        self.out += data
        return bool(data)

    def expect(self, needle: str, timeout: float = 30.0) -> None:
        want, deadline = needle.encode(), time.monotonic() + timeout
        while want not in self.out[self.seen:]:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)) and want not in self.out[self.seen:]:
                raise AssertionError(f"no {needle!r} on ssh's terminal:\n{self.text}")
        self.seen += self.out[self.seen:].index(want) + len(want)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def resize(self, cols: int, rows: int) -> None:
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2):
            pass
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"ssh did not end within {timeout}s:\n{self.text}")

    def kill(self) -> None:
        import signal
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                os.close(self.fd)
            except OSError:
                pass
            self.status = -9

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")
