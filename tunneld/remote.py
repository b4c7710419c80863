"""Shell text run on the server: the session wrapper and the process-tree killer.  Pure.

sshd runs a command as ``$SHELL -c TEXT`` in a new session (it calls setsid()), so the shell's
pid is also the process-group id of everything the command starts, unless a child makes its
own group.  The wrapper reports that pid on its first output line; the killer signals the group
and every descendant found through ``ps`` (portable: Linux and macOS), then SIGKILLs what is
left after a grace period.  Only POSIX shell syntax is used (bash, zsh, dash, ksh).
"""

from __future__ import annotations

import re
import shlex

from .markers import BROWSER_ENV

#: first line of a session's stdout: this tag, the shell's pid, newline (removed from output)
PID_TAG = "\x1etunneld-pid:"
#: seconds the killer waits after SIGTERM before SIGKILL
KILL_GRACE = 5.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def session_command(command: str, env: dict[str, str] | None = None) -> str:
    """The text sshd's shell runs for a session: report our pid, export ``BROWSER`` (so
    Python's webbrowser, xdg-open and Jupyter print a marker) and ``env``, run ``command``.

    ``command`` is used as ssh uses its arguments: the remote shell interprets it."""
    exports = {"BROWSER": BROWSER_ENV, **(env or {})}
    parts = [f"printf '%s%s\\n' {shlex.quote(PID_TAG)} \"$$\""]
    for name, value in exports.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad environment variable name {name!r}")
        parts.append(f"{name}={shlex.quote(value)}; export {name}")
    parts.append(command)
    return "; ".join(parts)


def kill_tree_command(pid: int, grace: float = KILL_GRACE) -> str:
    """Text that stops process group ``pid`` and every descendant of ``pid``: SIGTERM, then
    SIGKILL after ``grace`` seconds for whatever is still alive.  Prints what it signalled."""
    if pid <= 1:
        raise ValueError(f"refusing to kill pid {pid}")
    steps = max(1, int(grace * 10))
    return f"""
root={pid}
pids=$(ps -e -o pid= -o ppid= -o pgid= 2>/dev/null | awk -v r="$root" '
  {{ pp[$1] = $2; pg[$1] = $3 }}
  END {{ for (x in pp) {{ if (pg[x] == r) {{ print x; continue }}
                         y = x; n = 0
                         while (y != "" && y > 1 && n < 256) {{
                           if (y == r) {{ print x; break }}
                           y = pp[y]; n++ }} }} }}')
[ -n "$pids" ] || pids=$root
echo "signalled: $pids"
kill -s TERM $pids 2>/dev/null
i=0
while [ $i -lt {steps} ]; do
  alive=
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && exit 0
  sleep 0.1 2>/dev/null || sleep 1
  i=$((i + 1))
done
kill -s KILL $alive 2>/dev/null
echo "killed:$alive"
exit 0
"""


def parse_pid_line(line: bytes) -> int | None:
    """The pid from the wrapper's first line, or None if ``line`` is not that line."""
    tag = PID_TAG.encode()
    if not line.startswith(tag):
        return None
    rest = line[len(tag):].strip()
    return int(rest) if rest.isdigit() else None
