"""Talking to the daemon: connecting to its socket (starting the daemon when none runs), and the
one request loop every request goes through: progress lines, login prompts, the final reply.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from tunnelctl import prompt
from tunneld import __version__, paths, wire

if TYPE_CHECKING:
    import subprocess

#: seconds to wait for an auto-started daemon's socket
START_TIMEOUT = 15.0

#: called with every progress line of a request
Progress = Callable[[dict[str, Any]], None]


class Unreachable(Exception):
    """The daemon could not be reached or started, or its answer could not be read."""


class Failed(Exception):
    """The command failed.  ``type`` is the name of the daemon's error class (a
    ``TunneldError`` subclass: ``BindError``, ``NotFound``…) when the daemon reported it, None
    when tunnelctl found the failure itself; ``str()`` is the message alone."""

    def __init__(self, message: str, type: str | None = None):
        super().__init__(message)
        self.type = type


def connect(path: str, timeout: float | None = None) -> socket.socket:
    """A connection to the socket at ``path``; each operation on it (this connect included)
    gives up after ``timeout`` seconds (None: never).  Raises ``OSError``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


def _start_daemon(path: str) -> socket.socket:
    if os.environ.get("TUNNELD_NO_AUTOSTART") == "1":
        raise Unreachable(f"tunneld is not running (no socket at {path}) and "
                          "TUNNELD_NO_AUTOSTART=1; start it with `tunneld` or "
                          "`tunnelctl service install`")
    import subprocess  # here, not at the top: every other command starts faster without it
    import tempfile
    with tempfile.TemporaryFile() as err:
        # -P: the current directory is not put on sys.path, so a `tunneld/` folder there (a
        # clone of this project, say) cannot shadow the installed package
        proc = subprocess.Popen([sys.executable, "-P", "-m", "tunneld", "--detach-stderr"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        exited_at: float | None = None
        while time.monotonic() < deadline:
            try:
                sock = connect(path)
            except OSError:
                pass
            else:
                _drop_straggler(proc)
                return sock
            if proc.poll() is not None:
                # it may have lost a start race to another daemon: give that one a moment
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 1.0:
                    break
            time.sleep(0.02)
        err.seek(0)
        detail = err.read().decode(errors="replace").strip()
    if proc.poll() is None:
        raise Unreachable(f"tunneld was started but its socket {path} did not appear within "
                          f"{START_TIMEOUT:g}s; see {paths.log_file()}")
    raise Unreachable("could not start tunneld" + (f":\n{detail}" if detail else
                                                   f"; see {paths.log_file()}"))


def _drop_straggler(proc: subprocess.Popen[bytes]) -> None:
    """If another daemon won a start race and answered, end ours: left alone it could take
    over later (say, after that one is stopped) and serve nobody's request."""
    if proc.poll() is not None:
        return
    try:
        with connect(str(paths.socket_path())) as s:
            pid = (exchange(s, "status", {}, quiet=True) or {}).get("pid")
    except (OSError, Unreachable, Failed):
        return
    if pid is not None and pid != proc.pid:
        proc.terminate()


def open_socket(autostart: bool, timeout: float | None = None) -> socket.socket:
    """A connection to the daemon, started first when none runs and ``autostart``;
    ``timeout`` as for ``connect`` (a daemon started here is connected to without one)."""
    path = str(paths.socket_path())
    try:
        return connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        if not autostart:
            raise Unreachable(f"tunneld is not running (no daemon at {path})") from None
        return _start_daemon(path)
    except OSError as exc:
        raise Unreachable(f"cannot reach tunneld at {path}: {exc.strerror or exc}") from None


def call(cmd: str, autostart: bool = True, on_progress: Progress | None = None,
         **args: Any) -> Any:
    """One request on a connection of its own (see ``exchange``)."""
    with open_socket(autostart) as s:
        return exchange(s, cmd, args, on_progress)


def _write_output(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def exchange(s: socket.socket, cmd: str, args: dict[str, Any],
             on_progress: Progress | None = None, quiet: bool = False) -> Any:
    """Send one request on ``s`` and read up to its final line: every progress line goes to
    ``on_progress`` and is shown (messages on stderr, session output on stdout), login
    prompts are asked on the terminal.  ``quiet``: a probe whose caller owns the output, so
    nothing is shown (no progress, no version warning).  Returns the result; raises
    ``Failed`` (the daemon's error, its type kept) or ``Unreachable``."""
    try:
        line = wire.encode(wire.request(cmd, **args))
    except wire.ProtocolError as exc:   # e.g. a command line of more than MAX_LINE bytes
        raise Failed(f"the request cannot be sent: {exc}", "ProtocolError") from None
    try:
        s.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon already closed (it refused us): its reply is still readable
    f = s.makefile("rb")
    while True:
        try:
            line = f.readline(wire.MAX_LINE + 1)
        except OSError as exc:
            raise Unreachable(f"lost the connection to tunneld ({exc.strerror or exc}); "
                              f"see {paths.log_file()}") from None
        if not line:
            raise Unreachable("tunneld closed the connection without answering; see "
                              f"{paths.log_file()}")
        try:
            msg = wire.decode(line)
        except wire.ProtocolError as exc:
            raise Unreachable(f"tunneld sent a reply tunnelctl cannot read ({exc})") from None
        if wire.is_prompt(msg):
            _answer(s, msg)
            continue
        if not wire.is_final(msg):
            if on_progress is not None:
                on_progress(msg)
            if not quiet and "message" in msg:
                print(msg["message"], file=sys.stderr)
            if not quiet and "output" in msg:
                _write_output(msg["output"])
            continue
        version = msg.get("version")
        if version and version != __version__ and not quiet:
            print(f"tunnelctl: warning: this tunnelctl is {__version__} but the daemon is "
                  f"{version}; restart it (`tunnelctl stop`) to run the same version",
                  file=sys.stderr)
        if msg.get("ok"):
            return msg.get("result")
        err = msg.get("error") or {}
        raise Failed(err.get("message") or "the daemon reported an error", err.get("type"))


def _answer(s: socket.socket, msg: dict[str, Any]) -> None:
    """Ask the terminal's person the daemon's login questions and send the answer back (a
    cancel on ^C or a closed terminal).  The answers are not kept."""
    try:
        p = wire.parse_prompt(msg)
    except wire.ProtocolError as exc:
        raise Unreachable(f"tunneld sent a prompt tunnelctl cannot read ({exc})") from None
    try:
        reply = wire.answer(p["id"], prompt.ask(p))
    except KeyboardInterrupt:
        _send_quietly(s, wire.cancel(p["id"]))
        raise
    except (OSError, EOFError):
        reply = wire.cancel(p["id"])  # the terminal is gone
    _send_quietly(s, reply)


def _send_quietly(s: socket.socket, msg: dict[str, Any]) -> None:
    try:
        s.sendall(wire.encode(msg))
    except OSError:
        pass  # the daemon went away: the final read reports it
