"""Login prompts on a passenger's terminal: when an ``ssh`` arrives at a host that must log in
first, the password, code or passphrase prompts of that login are asked on the terminal the
client passed (its stdin and stderr), as ``tunnelctl`` asks them and as ssh itself would: no
echo for secrets, the host's name in front.  The client waits for its session meanwhile, with
its terminal as it was (ssh makes it raw only once the session is open).

The answer is read only while the client is there: when its socket closes (^C), the question
is abandoned at once, so that no later line typed into the user's shell is taken.
"""

from __future__ import annotations

import asyncio
import os
import termios
from typing import Any

from . import muxio
from .errors import LoginAbandoned
from .login import Prompter
from .wire import ANSWER_TIMEOUT

#: a limit: the longest answer line read
MAX_ANSWER = 4096


def tty_prompter(fd_in: int, fd_err: int, gone: asyncio.Event) -> Prompter:
    """A prompter asking on the terminal ``fd_in`` (and writing to ``fd_err``) until
    ``gone`` is set."""

    async def ask(q: dict[str, Any]) -> list[str]:
        lines = []
        if q["attempt"] > 1:
            lines.append("Bad passphrase, try again." if q["kind"] == "passphrase" else
                         "Permission denied, please try again.")
        lines += [t.rstrip("\n") for t in (q["name"], q["instructions"]) if t]
        if lines:
            _write(fd_err, "".join(line + "\n" for line in lines))
        answers: list[str] = []
        for text, echo in q["prompts"]:
            shown = text if q["kind"] == "passphrase" else f"({q['host']}) {text}"
            answers.append(await _read_line(fd_in, fd_err, shown, echo, gone))
        return answers
    return ask


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        raise LoginAbandoned("the terminal of the ssh client is gone") from None


async def _read_line(fd: int, fd_err: int, prompt: str, echo: bool,
                     gone: asyncio.Event) -> str:
    """The answer to ``prompt``; a secret's echo is off before the prompt shows (as
    getpass does: what is typed after it never appears)."""
    old = None
    if not echo:
        try:
            old = termios.tcgetattr(fd)
            new = list(old)
            new[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        except termios.error:
            old = None
    _write(fd_err, prompt)
    try:
        reading = asyncio.ensure_future(_line(fd))
        waiting = asyncio.ensure_future(gone.wait())
        done, _ = await asyncio.wait({reading, waiting}, timeout=ANSWER_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        for t in (reading, waiting):
            t.cancel()
        if reading not in done:
            raise LoginAbandoned("the ssh client went away" if gone.is_set() else
                                 f"no answer within {ANSWER_TIMEOUT:g}s")
        line = reading.result()
        if line is None:
            raise LoginAbandoned("the terminal of the ssh client closed")
        return line
    finally:
        if old is not None:
            try:
                termios.tcsetattr(fd, termios.TCSADRAIN, old)
            except termios.error:
                pass
            _write_quiet(fd_err, "\n")


def _write_quiet(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


async def _line(fd: int) -> str | None:
    """One line of the terminal (canonical mode gives whole lines); None at its end."""
    buf = b""
    while not buf.endswith(b"\n"):
        await muxio.ready(fd)
        try:
            data = os.read(fd, MAX_ANSWER)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            data = b""
        if not data:
            return None
        buf += data
        if len(buf) > MAX_ANSWER:
            raise LoginAbandoned("an answer line too long")
    return buf.rstrip(b"\r\n").decode(errors="replace")
