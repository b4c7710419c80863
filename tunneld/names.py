"""The rules for names, in one place.  Pure: no I/O.

- A **host alias** is what ``ssh NAME`` takes as a destination without options: a Host alias
  of ``~/.ssh/config``, ``[user@]host``, an address (``check_host_alias``).
- A **host name** is a DNS-style name (letters, digits, ``.``, ``-``, ``_``; at most
  ``MAX_HOST_LEN`` characters; not starting with ``-``): forward targets, the hosts of URLs,
  the node a marker names (``is_host_name``), and what the server's ``hostname`` is reduced to
  (``reduce_host_name``, the same rule as the BROWSER helper's shell text).
- A **session name** (``check_session_name``) is a short word for ``tunnelctl logs NAME``.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UsageError

#: the batch schedulers ``run --job`` knows (``jobs``); here, so that the control protocol's
#: argument check (``wire``) and the thin client need not import the job texts
SCHEDULERS = ("slurm", "pbs", "lsf")

#: longest host name accepted (DNS limit)
MAX_HOST_LEN = 253

#: an ssh host alias: what `ssh NAME` would accept as a destination, without options
_ALIAS_RE = re.compile(r"^(?!-)[A-Za-z0-9_.@%+\[\]:-]{1,255}\Z")
#: a host name (case-insensitive)
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")
#: what a host name may not hold: removed by reduce_host_name
_NOT_HOST = re.compile(r"[^A-Za-z0-9_.-]")
#: a session name
SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_host_alias(name: Any) -> str:
    """``name`` if it is a host alias; else UsageError."""
    if not isinstance(name, str) or not _ALIAS_RE.match(name):
        raise UsageError(f"{name!r} is not a host name; use a Host alias from ~/.ssh/config "
                         "or a host name as for ssh")
    return name


def is_host_name(name: str) -> bool:
    """True if ``name`` is a host name (see the module docstring)."""
    return not name.startswith("-") and has_host_chars(name)


def has_host_chars(name: str) -> bool:
    """True if ``name`` has a host name's characters and length (a forward's target host:
    the server resolves it, whatever it starts with)."""
    return 0 < len(name) <= MAX_HOST_LEN and _HOST_RE.fullmatch(name) is not None


def reduce_host_name(text: str) -> str | None:
    """A host name from what ``hostname`` printed (what a marker's NODE may hold), or None."""
    return _NOT_HOST.sub("", text)[:MAX_HOST_LEN] or None


def check_session_name(name: Any) -> str:
    """``name`` if it is a session name; else UsageError."""
    if not isinstance(name, str) or not SESSION_RE.match(name):
        raise UsageError(f"{name!r} is not a session name; use letters, digits, '.', '_' or "
                         "'-' (at most 64), starting with a letter or digit")
    return name
