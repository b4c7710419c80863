"""Login prompts (a password, a verification code, a key passphrase) asked on /dev/tty as ssh
asks them: secrets without echo.  The answers are returned, never kept.
"""

from __future__ import annotations

import os
from typing import Any


def have_tty() -> bool:
    """True if this process has a controlling terminal, where a person can answer."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def ask(p: dict[str, Any]) -> list[str]:
    """Ask the prompts of ``p`` (as ``wire.parse_prompt`` returns it) on /dev/tty, no echo
    unless the server allows it: one answer per prompt.  Raises ``OSError`` or ``EOFError``
    when the terminal is gone, ``KeyboardInterrupt`` on ^C."""
    import getpass
    import io
    # as getpass does: a tty is not seekable, so no open(..., "r+")
    with io.TextIOWrapper(io.FileIO(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY), "w+")) as tty:
        if p["attempt"] > 1:
            tty.write("Bad passphrase, try again.\n" if p["kind"] == "passphrase" else
                      "Permission denied, please try again.\n")
        for text in (p["name"], p["instructions"]):
            if text:
                tty.write(text.rstrip("\n") + "\n")
        tty.flush()
        answers: list[str] = []
        for text, echo in p["prompts"]:
            shown = text if p["kind"] == "passphrase" else f"({p['host']}) {text}"
            if echo:
                tty.write(shown)
                tty.flush()
                line = tty.readline()
                if not line:
                    raise EOFError
                answers.append(line.rstrip("\n"))
            else:
                answers.append(getpass.getpass(shown, stream=tty))
        return answers
