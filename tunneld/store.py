"""The daemon's own files: the state file (forwards added at run time, ``forwards.json``) and
the sessions file (detached sessions, ``sessions.json`` beside it).

Both are written atomically (temp file, fsync, rename, fsync of the directory) with mode 0600,
after every change; a file that cannot be read is set aside as ``NAME.corrupt-STAMP`` (logged)
and the daemon starts without it.  A write that fails raises (``save_forwards``: StateError, so
that the command that made the change can refuse it); temp files a killed daemon left behind
are removed at start (``clean``, only while holding the daemon lock).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from . import spec as specmod
from .config import Strict
from .errors import SpecError, StateError, TunneldError
from .paths import atomic_write

log = logging.getLogger("tunneld")

STATE_VERSION = 1
#: format of the sessions file
SESSIONS_VERSION = 1


class StateFile(Strict):
    version: int = STATE_VERSION
    #: host → canonical specs added at run time
    hosts: dict[str, list[str]] = {}


def load_state(path: Path) -> StateFile:
    """Read the state file.  Missing or empty → empty state.  Corrupt → set aside, logged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return StateFile()
    except OSError as exc:
        log.error("state file %s cannot be read (%s); starting with no saved forwards",
                  path, exc.strerror)
        return StateFile()
    if not data.strip():
        log.warning("state file %s is empty; starting with no saved forwards", path)
        return StateFile()
    try:
        state = StateFile.model_validate(json.loads(data))
        if state.version > STATE_VERSION:
            raise ValueError(f"it was written by a newer tunneld (format {state.version}, "
                             f"this one reads {STATE_VERSION})")
        for host, texts in state.hosts.items():
            specmod.parse_all(texts)
        return state
    except (ValueError, ValidationError, SpecError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            exc = ValueError("nested too deeply")
        aside = set_aside(path)
        first = str(exc).splitlines()[0]
        log.error("state file %s is corrupt (%s); kept it as %s and started with no saved "
                  "forwards", path, first, aside)
        return StateFile()


def set_aside(path: Path) -> Path:
    """Move an unreadable file out of the way, kept for the user as
    ``NAME.corrupt-STAMP`` (``-N`` added if that exists); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, aside)
    return aside


def set_aside_said(path: Path) -> str:
    """``set_aside`` for a log line: where the file went, or that it could not be moved."""
    try:
        return str(set_aside(path))
    except OSError:
        return "(could not move it)"


#: the files atomic_write() writes in the state directory (their temp files: ``.NAME.*``)
STATE_FILES = ("forwards.json", "sessions.json", "opens.json")


def remove_stale_temp_files(directory: Path, names: tuple[str, ...] = STATE_FILES) -> int:
    """Remove the temp files of ``atomic_write`` that a killed daemon left behind (call only
    while holding the daemon lock: no other writer exists).  Returns how many it removed."""
    removed = 0
    for name in names:
        for tmp in directory.glob(f".{name}.*"):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                continue
    if removed:
        log.info("removed %d temp file(s) left in %s by a daemon that was killed", removed,
                 directory)
    return removed


def save_state(path: Path, state: StateFile) -> None:
    atomic_write(path, (state.model_dump_json(indent=2) + "\n").encode())


class Store:
    """The state file at ``state_path`` and the sessions file beside it."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.sessions_path = state_path.with_name("sessions.json")

    def clean(self) -> None:
        """Remove the temp files of a daemon that was killed while writing."""
        remove_stale_temp_files(self.state_path.parent)

    def load_forwards(self) -> dict[str, list[str]]:
        """host → the specs saved for it (a corrupt file is set aside, logged)."""
        return dict(load_state(self.state_path).hosts)

    def save_forwards(self, hosts: dict[str, list[str]]) -> None:
        """Write the state file; raises StateError (the file on disk is unchanged then)."""
        try:
            save_state(self.state_path, StateFile(hosts={h: v for h, v in hosts.items() if v}))
        except OSError as exc:
            log.error("could not write the state file %s: %s", self.state_path,
                      exc.strerror or exc)
            raise StateError(f"could not save the forwards to {self.state_path}: "
                             f"{exc.strerror or exc}"
                             + (" (the disk is full)" if exc.errno == errno.ENOSPC else ""))

    def save_sessions(self, records: list[dict[str, Any]]) -> None:
        """Write the sessions file (a failure is logged: the sessions run on)."""
        data = {"version": SESSIONS_VERSION, "sessions": records}
        try:
            atomic_write(self.sessions_path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as exc:
            log.error("could not write the sessions file %s: %s; detached sessions started "
                      "now will not be re-attached after a restart", self.sessions_path,
                      exc.strerror or exc)

    def load_sessions(self, keys: tuple[str, ...], check: Callable[[dict[str, Any]], None],
                      limit: int) -> list[dict[str, Any]]:
        """The sessions file's records (the last ``limit``): those with only ``keys`` that
        ``check`` accepts (it raises ValueError or a TunneldError for a malformed one, which
        is skipped, logged).  A corrupt file is set aside (logged)."""
        try:
            data = json.loads(self.sessions_path.read_bytes() or b"{}")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:
            log.error("sessions file %s is unreadable (%s); kept it as %s; detached sessions "
                      "are not re-attached (they still run on their servers)",
                      self.sessions_path, str(exc).splitlines()[0],
                      set_aside_said(self.sessions_path))
            return []
        if not isinstance(data, dict) or data.get("version", SESSIONS_VERSION) \
                > SESSIONS_VERSION:
            log.error("sessions file %s has a format this tunneld does not read; detached "
                      "sessions are not re-attached", self.sessions_path)
            return []
        out = []
        for rec in data.get("sessions") or []:
            if not isinstance(rec, dict) or set(rec) - set(keys):
                continue
            try:
                check(rec)
            except (ValueError, TypeError, TunneldError):
                log.warning("sessions file %s: skipped a malformed record",
                            self.sessions_path)
                continue
            out.append(rec)
        return out[-limit:]
