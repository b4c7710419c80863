"""A program with a pseudo-terminal as its stdin, stdout, stderr and controlling terminal, as
a person runs it: what it writes is read back, what a person types is sent, its window can be
resized (the kernel then sends it SIGWINCH)."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import signal
import struct
import termios
import time


class PtyProc:
    """``argv`` (found on PATH) in a new pty of ``cols`` x ``rows``."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int = 80,
                 rows: int = 24) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec at once, never return into pytest
            try:
                # as from an interactive shell: ^C interrupts (a test run started in the
                # background of a non-interactive shell inherits SIGINT ignored)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.out = pid, fd, b""
        #: bytes of ``out`` already matched by expect()
        self.seen = 0
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False at EOF."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:  # the child closed the terminal
                return False
            raise
        self.out += data
        return bool(data)

    def expect(self, needle: str, timeout: float = 30.0) -> None:
        """Wait for ``needle`` in the output after the previous match."""
        want, deadline = needle.encode(), time.monotonic() + timeout
        while want not in self.out[self.seen:]:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.5)) and want not in self.out[self.seen:]:
                raise AssertionError(f"no {needle!r} on the terminal:\n{self.text}")
        self.seen += self.out[self.seen:].index(want) + len(want)

    def send(self, data: str | bytes) -> None:
        os.write(self.fd, data.encode() if isinstance(data, str) else data)

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))

    def wait(self, timeout: float = 60.0) -> int:
        """Read to the end; the exit status."""
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
        raise AssertionError(f"{self.pid} did not end within {timeout}s:\n{self.text}")

    def kill(self) -> None:
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
