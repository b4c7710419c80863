"""The Host aliases of the user's ssh config: the literal names of its ``Host`` lines (no
patterns), following ``Include`` as ssh does.  Standard library only (tunnelctl's completion
uses it too); reading files is all it does.
"""

from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path

#: a limit: ssh config files read for Host aliases (Include chains), and lines per file
MAX_CONFIG_FILES = 64
MAX_CONFIG_LINES = 100_000


def default_path() -> Path:
    return Path(os.path.expanduser("~/.ssh/config"))


def host_aliases(text: str) -> tuple[list[str], list[str]]:
    """The literal names of the ``Host`` lines of an ssh config text (no wildcards, no
    negations), and the paths its ``Include`` lines name (as written).  Pure."""
    names: list[str] = []
    includes: list[str] = []
    for line in text.splitlines()[:MAX_CONFIG_LINES]:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.replace("=", " ", 1).partition(" ")
        try:
            words = shlex.split(rest, comments=True)
        except ValueError:
            continue
        key = key.lower()
        if key == "host":
            names += [w for w in words if not any(c in w for c in "*?!")]
        elif key == "include":
            includes += words
    return names, includes


def config_aliases(path: Path | None = None) -> list[str]:
    """The literal Host names of the ssh config at ``path`` (default ``~/.ssh/config``) and
    of the files it includes (relative paths are relative to ``~/.ssh``, as for ssh)."""
    names: list[str] = []
    path = path or default_path()
    todo: list[Path] = [path]
    seen: set[Path] = set()
    ssh_dir = default_path().parent
    while todo and len(seen) < MAX_CONFIG_FILES:
        f = todo.pop(0)
        if f in seen:
            continue
        seen.add(f)
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        found, includes = host_aliases(text)
        names += [n for n in found if n not in names]
        for inc in includes:
            pattern = os.path.expanduser(inc)
            if not os.path.isabs(pattern):
                pattern = str(ssh_dir / pattern)   # as ssh: relative to ~/.ssh
            todo += [Path(p) for p in sorted(glob.glob(pattern))]
    return names
