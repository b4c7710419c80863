"""Shell text run on the server: session wrappers, the follower and the process-tree killer.
Pure.

Two kinds of session.  An attached one (``run --no-detach``) is ``session_command``: the
command runs in the SSH channel's shell and dies with the connection.  A detached one (the
default) is started by ``detached_start_command`` in a directory of its own on the server and
outlives the connection and the daemon; ``follow_command`` streams its log from a byte offset,
``tail_command`` fetches what a follower missed, ``detached_kill_command`` stops it.

sshd runs a command as ``$SHELL -c TEXT`` in a new session (it calls setsid()), so the shell's
pid is also the process-group id of everything the command starts, unless a child makes its
own group.  The wrapper reports that pid on its first output line; the killer signals the group
and every descendant found through ``ps`` (portable: Linux and macOS), then SIGKILLs what is
left after a grace period.  Only POSIX shell syntax is used (bash, zsh, dash, ksh).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from .markers import BROWSER_ENV
from .spool import HELPER_SCRIPT, HOSTNAME_EXPR

#: first line of a session's stdout: this tag, the shell's pid, newline (removed from output)
PID_TAG = "\x1etunneld-pid:"
#: seconds the killer waits after SIGTERM before SIGKILL
KILL_GRACE = 5.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def shell_text(words: list[str], values: dict[str, str] | None = None,
               shell_vars: dict[str, str] | None = None) -> str:
    """The text the remote shell runs for a command given as ``words`` (tmux's rule): one
    word is a shell command line (pipes, ``&&``, ``$VAR``, ``~``, globs work); several words
    arrive each exactly as given (quoted for the POSIX shell).  ``{NAME}`` is replaced by
    ``values[NAME]`` (``{port}``, ``{sock}``) in the words, quoted in a shell line (so not
    inside quotes there: ``"$SOCK"`` is the way to quote it yourself); or, for a name in
    ``shell_vars``, by that shell variable's value when the text runs (``{port}`` of a batch
    job → ``"$PORT"``, chosen on its node)."""
    if not words:
        raise ValueError("no command")
    values = values or {}
    later = {"{" + k + "}": f'"${v}"' for k, v in (shell_vars or {}).items()}
    if len(words) == 1:
        text = words[0]
        for key, value in values.items():
            if "{" + key + "}" not in later:
                text = text.replace("{" + key + "}", shlex.quote(value))
        for key, expansion in later.items():
            text = text.replace(key, expansion)
        return text
    argv = list(words)
    for key, value in values.items():
        if "{" + key + "}" not in later:
            argv = [w.replace("{" + key + "}", value) for w in argv]
    if not later:
        return " ".join(shlex.quote(w) for w in argv)
    split = re.compile("(" + "|".join(re.escape(k) for k in later) + ")")
    return " ".join("".join(later[p] if p in later else shlex.quote(p)
                            for p in split.split(w) if p) or "''" for w in argv)


def shown(words: list[str]) -> str:
    """The command as `tunnelctl sessions` shows it: pasted back after ``--`` it gives the
    same words (one word stays one word, quoted)."""
    return shlex.join(words)


def session_command(command: str, env: dict[str, str] | None = None) -> str:
    """The text sshd's shell runs for an attached session: report our pid, install the
    BROWSER helper and export ``BROWSER`` (so Python's webbrowser, xdg-open and Jupyter print
    a marker naming the host they ran on, as in a detached session) and ``env``, run
    ``command``.

    ``command`` is shell text (``shell_text``): the remote shell interprets it."""
    return "\n".join([f"printf '%s%s\\n' {shlex.quote(PID_TAG)} \"$$\"",
                      "um=$(umask)", "umask 077", 'base="$HOME"/.tunneld',
                      *_BROWSER_HELPER, 'umask "$um"', *_exports(env), _OWNER, command])


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
kill -s TERM -- -$root 2>/dev/null  # the group at once: none of it outlives a signalled part
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

# -- detached sessions ---------------------------------------------------------------------------
#
# A detached session lives in a private directory on the server, ``$HOME/SESSIONS_DIR/<id>``
# (0700, files 0600):
#
#   pid     the runner's pid (= its session and process-group id), written once it runs
#   log     the command's stdout and stderr, appended
#   status  the command's exit status, written atomically (temp file, rename) when it ends;
#           absent while it runs and when the runner itself was killed
#
# The runner is ``sh -c RUNNER`` started in a session of its own (setsid(1), else perl's or
# python3's setsid, else a job-control process group), stdin </dev/null, so neither a dropped
# connection nor a stopped daemon reaches it.  It traps TERM/INT/HUP with a no-op handler (not
# an ignore, which the command would inherit), so ``kill_tree_command`` ends the command and
# the runner still records its status.

#: where session directories live on the server, relative to ``$HOME``
SESSIONS_DIR = ".tunneld/sessions"
#: the BROWSER helper on the server, relative to ``$HOME`` (homes are shared with compute
#: nodes on clusters, so jobs started with srun/sbatch find it too)
HELPER_PATH = ".tunneld/bin/open-on-local"
#: the line the start command prints: this tag, pid TAB server hostname TAB session dir
START_TAG = "\x1etunneld-detached:"
#: the line (on stderr) a follower ends with: this tag, log size SPACE exit status or ``-``;
#: or this tag and ``gone`` when the session directory does not exist
END_TAG = "\x1etunneld-end:"
#: seconds the start command waits for the runner to record its pid
START_WAIT = 10.0
#: seconds between a follower's looks at whether the runner still runs
FOLLOW_POLL = 0.5

#: a session id as used in a directory name (checked before it reaches a shell)
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")

# the host name, reduced to what a marker's NODE may hold
_HOSTNAME = HOSTNAME_EXPR

# installs the BROWSER helper (in "$base"/bin, with umask 077) and exports BROWSER: the helper's
# path, or the plain marker command where the helper cannot be written or named
_BROWSER_HELPER = [
    f'helper="$HOME"/{HELPER_PATH}',
    f'if mkdir -p "$base/bin" 2>/dev/null && chmod 700 "$base" "$base/bin" && '
    f'printf %s {shlex.quote(HELPER_SCRIPT)} > "$helper.$$" && chmod 700 "$helper.$$" '
    '&& mv -f "$helper.$$" "$helper"; then',
    # webbrowser splits BROWSER at ':' and shlex-splits each part: a plain path only
    '  case $helper in *[!A-Za-z0-9_./-]*) BROWSER=' + shlex.quote(BROWSER_ENV) + ';; '
    '*) BROWSER=$helper;; esac',
    'else BROWSER=' + shlex.quote(BROWSER_ENV) + '; fi',
    'export BROWSER',
]

#: a session with a socket directory (``SOCK_DIR_ENV`` set) records who uses it: this host
#: and the pid of the shell that runs the command until it ends (``sock_dir_command`` sweeps
#: the directories of ended owners)
SOCK_DIR_ENV = "TUNNELD_SOCK_DIR"
_OWNER = (f'[ -z "${SOCK_DIR_ENV}" ] || printf \'%s %s\\n\' "{_HOSTNAME}" "$$" '
          f'> "${SOCK_DIR_ENV}/owner"')

_RUNNER = """dir=$1
trap : TERM INT HUP
echo $$ > "$dir/pid.tmp" && mv -f "$dir/pid.tmp" "$dir/pid"
""" + _OWNER + """
umask "$3"
"${SHELL:-/bin/sh}" -c "$2" </dev/null >>"$dir/log" 2>&1
st=$?
umask 077
printf '%s\\n' "$st" > "$dir/status.tmp" && mv -f "$dir/status.tmp" "$dir/status"
"""


def _dir(session_id: str) -> str:
    if not isinstance(session_id, str) or not ID_RE.match(session_id):
        raise ValueError(f"bad session id {session_id!r}")
    return f'dir="$HOME"/{SESSIONS_DIR}/{session_id}'


def _exports(env: dict[str, str] | None) -> list[str]:
    parts = []
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad environment variable name {name!r}")
        parts.append(f"{name}={shlex.quote(value)}; export {name}")
    return parts


def detached_start_command(session_id: str, command: str,
                           env: dict[str, str] | None = None) -> str:
    """Text that starts ``command`` detached in session directory ``session_id`` (which must
    not exist yet), installs the BROWSER helper and prints one ``START_TAG`` line (see
    ``parse_start_line``).  Exits 125 with a message on stderr when it cannot."""
    wait_steps = max(1, int(START_WAIT * 10))
    return "\n".join([
        "um=$(umask)",   # the command gets the user's umask; tunneld's files are private
        "umask 077",
        'base="$HOME"/.tunneld',
        _dir(session_id),
        'mkdir -p "$base/bin" "$base/sessions" && chmod 700 "$base" "$base/bin" '
        '"$base/sessions" && mkdir "$dir" || { echo "cannot create $dir" >&2; exit 125; }',
        *_BROWSER_HELPER,
        *_exports(env),
        ': > "$dir/log"',
        f"cmd={shlex.quote(command)}",
        f"runner={shlex.quote(_RUNNER)}",
        'if command -v setsid >/dev/null 2>&1; then',
        '  setsid sh -c "$runner" sh "$dir" "$cmd" "$um" </dev/null >/dev/null 2>&1 &',
        'elif command -v perl >/dev/null 2>&1; then',
        "  perl -MPOSIX -e 'POSIX::setsid(); exec @ARGV or die' sh -c \"$runner\" sh "
        '"$dir" "$cmd" "$um" </dev/null >/dev/null 2>&1 &',
        'elif command -v python3 >/dev/null 2>&1; then',
        "  python3 -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "
        'sh -c "$runner" sh "$dir" "$cmd" "$um" </dev/null >/dev/null 2>&1 &',
        'else',   # a process group of its own where the shell does job control (bash, zsh)
        '  set -m; nohup sh -c "$runner" sh "$dir" "$cmd" "$um" </dev/null >/dev/null 2>&1 &',
        'fi',
        'i=0',
        f'while [ ! -s "$dir/pid" ] && [ $i -lt {wait_steps} ]; do',
        '  sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1)); done',
        *_REPORT_START,
    ])


# prints the START_TAG line of the session in $dir, or says on stderr that it did not start
_REPORT_START = [
    'pid=$(cat "$dir/pid" 2>/dev/null)',
    '[ -n "$pid" ] || { echo "the command did not start in $dir" >&2; exit 125; }',
    f"printf '%s%s\\t%s\\t%s\\n' {shlex.quote(START_TAG)} \"$pid\" \"{_HOSTNAME}\" \"$dir\"",
]


def probe_start_command(session_id: str) -> str:
    """Text that prints the ``START_TAG`` line of a session whose start command's answer was
    lost (the connection dropped while it ran), as that command would have; exits 125 if
    the session never started."""
    return "\n".join([_dir(session_id), *_REPORT_START])


@dataclass(frozen=True)
class Started:
    """What the start command reported."""

    pid: int
    #: the server's host name (the login node), as a marker's NODE would name it; may be ""
    server: str
    #: the session directory on the server
    dir: str


def parse_start_line(text: str) -> Started | None:
    """The ``START_TAG`` line's values in the start command's output, or None."""
    for line in text.split("\n"):   # not splitlines(): it splits at the tag's \x1e
        if line.startswith(START_TAG):
            fields = line[len(START_TAG):].split("\t", 2)
            if len(fields) == 3 and fields[0].isdigit() and int(fields[0]) > 1:
                return Started(int(fields[0]), fields[1], fields[2])
    return None


def follow_command(session_id: str, offset: int) -> str:
    """Text that writes the session's log from byte ``offset`` to stdout while its runner
    runs, then ends with an ``END_TAG`` line on stderr (see ``parse_end_line``).  It may stop
    short of the log's end: the caller fetches the rest with ``tail_command``.  It exits at
    once, without that line, when the connection that started it is gone."""
    if offset < 0:
        raise ValueError("negative offset")
    return "\n".join([
        _dir(session_id),
        f'[ -d "$dir" ] || {{ printf \'%sgone\\n\' {shlex.quote(END_TAG)} >&2; exit 0; }}',
        'pid=$(cat "$dir/pid" 2>/dev/null)',
        f'tail -c +{offset + 1} -f "$dir/log" &',
        't=$!',
        'while [ ! -e "$dir/status" ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do',
        # our sshd is gone (connection dropped): stop, or this loop outlives it
        '  kill -0 $PPID 2>/dev/null || { kill $t 2>/dev/null; exit 0; }',
        f'  sleep {FOLLOW_POLL} 2>/dev/null || sleep 1',
        'done',
        'sleep 0.2 2>/dev/null || sleep 1',
        'kill $t 2>/dev/null; wait $t 2>/dev/null',
        "size=$(wc -c < \"$dir/log\" | tr -d ' ')",
        'st=$(cat "$dir/status" 2>/dev/null)',
        f"printf '%s%s %s\\n' {shlex.quote(END_TAG)} \"$size\" \"${{st:--}}\" >&2",
    ])


def parse_end_line(text: str) -> tuple[int, int | None] | str | None:
    """From a follower's stderr: (log size, exit status or None), ``"gone"``, or None when
    the follower did not finish (connection lost)."""
    for line in text.split("\n"):   # not splitlines(): it splits at the tag's \x1e
        if line.startswith(END_TAG):
            rest = line[len(END_TAG):].strip()
            if rest == "gone":
                return "gone"
            size, _, status = rest.partition(" ")
            if size.isdigit():
                status = status.strip()
                return int(size), int(status) if status.isdigit() else None
    return None


def tail_command(session_id: str, offset: int) -> str:
    """Text that writes the session's log from byte ``offset`` to its end, once."""
    return f'{_dir(session_id)}\ntail -c +{offset + 1} "$dir/log"'


def detached_kill_command(session_id: str, pid: int, grace: float = KILL_GRACE) -> str:
    """``kill_tree_command`` for a detached session, unless it has already ended (its pid
    may have been reused since)."""
    kill = kill_tree_command(pid, grace)
    return (f'{_dir(session_id)}\n'
            f'if [ -e "$dir/status" ]; then echo "already ended"; exit 0; fi\n{kill}')


def forget_command(session_ids: list[str]) -> str:
    """Text that removes the given session directories (and nothing else)."""
    dirs = " ".join(f'"$HOME"/{SESSIONS_DIR}/{_check_id(i)}' for i in session_ids)
    return f"rm -rf -- {dirs}" if dirs else "true"


def _check_id(session_id: str) -> str:
    _dir(session_id)
    return session_id


# -- private sockets (`run --sock auto`) ---------------------------------------------------------
#
# A session's socket lives in a 0700 directory of its own, ``BASE/NAME.XXXXXX/web.sock``: BASE is
# ``$XDG_RUNTIME_DIR/tunneld`` where the server has a usable runtime directory (a tmpfs only
# its user reaches, emptied at logout), else ``$HOME/SOCK_DIR``.  Nobody else can connect to it,
# unlike a TCP port on a shared login node's loopback.

#: where socket directories live on the server without ``$XDG_RUNTIME_DIR``, under ``$HOME``
SOCK_DIR = ".tunneld/sock"
#: the socket's file name in its directory
SOCK_NAME = "web.sock"
#: the line the socket-directory command prints: this tag, the directory
SOCK_TAG = "\x1etunneld-sock:"
#: the longest socket path a server can listen on (Linux's sun_path: 108 bytes with its NUL)
SOCK_PATH_MAX = 107
#: a socket directory made by ``sock_dir_command`` (checked before ``rm -rf`` reaches a shell)
_SOCK_DIR_RE = re.compile(r"^/[^\0\n]*/(?:tunneld|\.tunneld/sock)/[A-Za-z0-9][A-Za-z0-9_.-]*"
                          r"\.[A-Za-z0-9]{6}\Z")


def sock_dir_command(name: str, outlives_login: bool) -> str:
    """Text that makes a private directory for session ``name``'s socket and prints
    ``SOCK_TAG`` + its path; first it removes the directories whose owner (``_OWNER``) on
    this host has ended, and those left without an owner for 10 minutes.
    ``outlives_login``: the session outlives its SSH connection (detached), so
    ``$XDG_RUNTIME_DIR`` is used only where systemd keeps it after the last login ends
    (lingering): else logind empties it when the connection drops."""
    _dir(name)
    keep = '[ -e "/var/lib/systemd/linger/$(id -un)" ]' if outlives_login else "true"
    return "\n".join([
        "umask 077",
        'if [ -n "$XDG_RUNTIME_DIR" ] && [ -d "$XDG_RUNTIME_DIR" ] && '
        f'[ -w "$XDG_RUNTIME_DIR" ] && [ -O "$XDG_RUNTIME_DIR" ] && {keep}; then',
        '  base="$XDG_RUNTIME_DIR/tunneld"',
        "else",
        f'  base="$HOME/{SOCK_DIR}"',
        "fi",
        'mkdir -p -- "$base" && chmod 700 -- "$base" || exit 1',
        f'me="{_HOSTNAME}"',
        'for old in "$base"/*.??????; do',
        '  [ -d "$old" ] || continue',
        '  if [ -f "$old/owner" ]; then',
        '    read -r h o < "$old/owner" || continue',
        '    case "$o" in ""|*[!0-9]*) continue ;; esac',
        # a home shared by several login nodes: only this host's pids can be asked after
        '    [ "$h" = "$me" ] && ! kill -0 "$o" 2>/dev/null && rm -rf -- "$old"',
        # never started (the daemon or the connection went between mktemp and the start)
        '  elif [ -n "$(find "$old" -maxdepth 0 -mmin +10 2>/dev/null)" ]; then',
        '    rm -rf -- "$old"',
        "  fi",
        "done",
        f'd=$(mktemp -d "$base/{name}.XXXXXX") && chmod 700 -- "$d" || exit 1',
        f"printf '%s%s\\n' {shlex.quote(SOCK_TAG)} \"$d\"",
    ])


def parse_sock_dir(text: str) -> str | None:
    """The directory ``sock_dir_command`` printed, or None."""
    for line in text.split("\n"):   # (not splitlines: it splits at the tag's \x1e too)
        if line.startswith(SOCK_TAG):
            d = line[len(SOCK_TAG):]
            return d if _SOCK_DIR_RE.match(d) and "/../" not in d else None
    return None


def sock_remove_command(directory: str) -> str:
    """Text that removes a socket directory ``sock_dir_command`` made (and nothing else)."""
    if not _SOCK_DIR_RE.match(directory) or "/../" in directory:
        raise ValueError(f"not a socket directory of tunneld's: {directory!r}")
    return f"rm -rf -- {shlex.quote(directory)}"


# -- who listens on a port of the server (a printed loopback URL) ---------------------------------

#: the first line of ``listener_uids_command``'s answer: this tag, the user's uid, and then one
#: uid per listening socket of the port; ``-`` instead when the server has no /proc/net/tcp
LISTENERS_TAG = "\x1etunneld-listeners:"


def listener_uids_command(port: int) -> str:
    """Text that prints who listens on TCP ``port`` of the server (Linux's /proc/net/tcp and
    tcp6: state 0A is LISTEN, field 8 the owner's uid)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"bad port {port}")
    return "\n".join([
        f"tag={shlex.quote(LISTENERS_TAG)}",
        '[ -r /proc/net/tcp ] || { printf "%s-\\n" "$tag"; exit 0; }',
        f"uids=$(awk '$4 == \"0A\" && $2 ~ /:{port:04X}$/ {{ print $8 }}' "
        "/proc/net/tcp /proc/net/tcp6 2>/dev/null | tr '\\n' ' ')",
        'printf "%s%s %s\\n" "$tag" "$(id -u)" "$uids"',
    ])


def parse_listeners(text: str) -> tuple[int, list[int]] | None:
    """(the user's uid, the uids listening) from ``listener_uids_command``'s answer; None
    when the server cannot say (no /proc/net/tcp, or no answer)."""
    for line in text.split("\n"):
        if line.startswith(LISTENERS_TAG):
            fields = line[len(LISTENERS_TAG):].split()
            if not fields or not all(f.isdigit() for f in fields):
                return None
            return int(fields[0]), [int(f) for f in fields[1:]]
    return None
