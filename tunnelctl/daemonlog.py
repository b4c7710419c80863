"""`tunnelctl logs --daemon [-f]`: the daemon's own log file, read directly (no daemon needed).

Standard library only.  The daemon rotates the file (``tunneld.log`` → ``tunneld.log.1``, a new
``tunneld.log``); a follower notices the new file by its inode (or a shrunk size), finishes the
old one and goes on with the new one from its start.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable

#: lines shown without --lines / --all
TAIL_LINES = 50
#: a limit: bytes read from the end of the file to find its last lines
TAIL_BYTES = 1 << 20
#: seconds between two looks at a followed file
FOLLOW_POLL = 0.2


def tail(f: BinaryIO, lines: int | None) -> bytes:
    """The last ``lines`` lines of the open file ``f`` (None: all of it); ``f`` is left at
    its end."""
    if lines is None:
        return f.read()
    size = f.seek(0, io.SEEK_END)
    start = max(0, size - TAIL_BYTES)
    f.seek(start)
    data = f.read()
    parts = data.splitlines(keepends=True)
    if start > 0 and parts:
        parts = parts[1:]  # the first one is cut
    return b"".join(parts[-lines:]) if lines > 0 else b""


def _write(out: BinaryIO, data: bytes) -> None:
    out.write(data)
    out.flush()


def follow(path: Path, out: BinaryIO, f: BinaryIO | None = None,
           keep_going: Callable[[], bool] = lambda: True, poll: float = FOLLOW_POLL) -> None:
    """Copy what is appended to ``path`` to ``out`` until ``keep_going()`` is false (or ^C),
    across rotations, going on from ``f`` (``path`` already open) if given.  A missing file
    is waited for; a file opened here is read from its start."""
    ino = os.fstat(f.fileno()).st_ino if f is not None else None
    try:
        while keep_going():
            if f is None:
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    time.sleep(poll)
                    continue
                ino = os.fstat(f.fileno()).st_ino
            data = f.read()
            if data:
                _write(out, data)
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is None or st.st_ino != ino or st.st_size < f.tell():
                rest = f.read()  # what was written just before the rotation
                if rest:
                    _write(out, rest)
                f.close()
                f = None
                continue
            time.sleep(poll)
    finally:
        if f is not None:
            f.close()


def show(path: Path, lines: int | None, follow_it: bool) -> int:
    """The command: print the tail (or all) of the log, then follow it with ``follow_it``."""
    out = sys.stdout.buffer
    try:
        f: BinaryIO | None = open(path, "rb")
    except FileNotFoundError:
        if not follow_it:
            print(f"tunnelctl: no daemon log at {path} yet (tunneld writes it while it "
                  "runs)", file=sys.stderr)
            return 1
        print(f"tunnelctl: waiting for {path} to appear", file=sys.stderr)
        f = None
    except OSError as exc:
        print(f"tunnelctl: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if f is not None:
        _write(out, tail(f, lines))
    if follow_it:
        follow(path, out, f)
    elif f is not None:
        f.close()
    return 0
