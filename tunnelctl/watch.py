"""`tunnelctl watch` and `tunnelctl ssh`: copy a byte stream unchanged, act on markers in it.

Standard library only (plus the pure ``tunneld.markers``).  Opening a URL can take a while (the
daemon waits for the remote port), so each open runs in a thread: the stream never stalls.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from typing import Callable

from tunneld.markers import BrowserOpen, Scanner

OpenURL = Callable[[str, str, "str | None"], None]

#: bytes copied per read
CHUNK = 65536
#: seconds `watch` waits at end of input for opens still under way
DRAIN_TIMEOUT = 70.0


class _Opener:
    """Runs ``open_url`` for each marker in a background thread."""

    def __init__(self, host: str, open_url: OpenURL):
        self.host = host
        self.open_url = open_url
        self.scanner = Scanner()
        self.threads: list[threading.Thread] = []

    def feed(self, data: bytes) -> None:
        for ev in self.scanner.feed(data):   # markers only (no ``urls``)
            if isinstance(ev, BrowserOpen):
                self._start(ev.url, ev.node)

    def close(self, timeout: float) -> None:
        for ev in self.scanner.close():
            if isinstance(ev, BrowserOpen):
                self._start(ev.url, ev.node)
        for t in self.threads:
            t.join(timeout)

    def _start(self, url: str, node: str | None) -> None:
        t = threading.Thread(target=self.open_url, args=(self.host, url, node), daemon=True)
        t.start()
        self.threads = [x for x in self.threads if x.is_alive()] + [t]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


def watch(host: str, open_url: OpenURL) -> int:
    """stdin → stdout unchanged; markers in it are opened.  Exit 0 at end of input."""
    opener = _Opener(host, open_url)
    while True:
        try:
            data = os.read(0, CHUNK)
        except InterruptedError:
            continue
        if not data:
            break
        try:
            _write_all(1, data)
        except BrokenPipeError:
            # the reader went away; keep watching for markers like `tee` would not, but
            # stay silent about it
            pass
        opener.feed(data)
    opener.close(DRAIN_TIMEOUT)
    return 0


def _copy_winsize(src: int, dst: int) -> None:
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def ssh(host: str, args: list[str], open_url: OpenURL) -> int:
    """The user's own ``ssh HOST ARGS...`` in a pseudo-terminal, fully transparent; its
    output is scanned for markers.  Returns ssh's exit status."""
    exe = shutil.which("ssh")
    if exe is None:
        print("tunnelctl: ssh was not found on PATH", file=sys.stderr)
        return 255
    argv = [exe, host, *args]
    pid, master = pty.fork()
    if pid == 0:  # child: ssh on the new terminal
        try:
            os.execv(exe, argv)
        finally:
            os._exit(255)
    opener = _Opener(host, open_url)
    stdin_tty = os.isatty(0)
    saved = termios.tcgetattr(0) if stdin_tty else None
    old_winch = None
    if stdin_tty:
        _copy_winsize(0, master)
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: _copy_winsize(0, master))
        tty.setraw(0)
    fds = [0, master]
    try:
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, CHUNK)
                except OSError as exc:  # EIO: ssh closed the terminal
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    break
                _write_all(1, data)
                opener.feed(data)
            if 0 in ready:
                data = os.read(0, CHUNK)
                if not data:
                    fds = [master]  # end of our input; ssh keeps running
                    if not stdin_tty:
                        _write_all(master, b"\x04")  # pass the EOF on, as a terminal would
                else:
                    _write_all(master, data)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        os.close(master)
    _, status = os.waitpid(pid, 0)
    opener.close(5.0)
    return os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) \
        else 128 + os.WTERMSIG(status)
