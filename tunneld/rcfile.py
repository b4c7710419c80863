"""`tunnelctl setup-remote HOST`: the line that makes every program started on the server use
tunneld's BROWSER helper, the shell start-up file it goes in, and the shell text that shows
or adds it.  Pure.

The file is the login shell's (``$SHELL``, which sshd sets from the password database):
``~/.bashrc`` for bash (read by its interactive shells, and by ``~/.bash_profile`` on most
systems), ``~/.zshrc`` for zsh, ``~/.profile`` otherwise (POSIX login shells); or the one
given.  ``--apply`` installs the helper, and appends the line only if the file has no
``BROWSER=…open-on-local`` line yet (idempotent), after a backup copy
``FILE.tunneld-backup-YYYYmmddHHMMSS``.  Nothing is changed without ``--apply``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from .remote import _BROWSER_HELPER, HELPER_PATH

#: the line added to the start-up file
BROWSER_LINE = f"export BROWSER=$HOME/{HELPER_PATH}"
#: the comment before it
COMMENT = "# added by tunnelctl setup-remote: programs started here open URLs in the local " \
          "browser through tunneld"
#: the tag of the lines the text prints
TAG = "\x1etunneld-setup:"
#: a limit: the longest --shell-file accepted
MAX_PATH = 1024
#: a line that sets BROWSER to the helper already (not commented out)
_PRESENT = r"^[^#]*BROWSER=.*\.tunneld/bin/open-on-local"


def check_shell_file(path: str | None) -> str:
    """``--shell-file``: ``""`` (the login shell's), a path under the home (``~/x`` or
    ``x``) or an absolute one; ValueError saying what is wrong."""
    if not path:
        return ""
    if len(path) > MAX_PATH or re.search(r"[\x00-\x1f\x7f]", path):
        raise ValueError(f"--shell-file: {path[:80]!r} is not a usable path (control "
                         f"characters, or longer than {MAX_PATH})")
    path = path[2:] if path.startswith("~/") else path
    if not path or path.endswith("/") or path in (".", ".."):
        raise ValueError(f"--shell-file: {path!r} names a directory, not a file; e.g. "
                         "--shell-file ~/.bash_profile")
    if path.startswith("~"):
        raise ValueError(f"--shell-file: {path!r}: only your own ~/ is understood; give "
                         "an absolute path")
    return path


def setup_command(shell_file: str = "", apply: bool = False) -> str:
    """Text that says which file the line goes in and whether it is there; with ``apply``
    also installs the helper and adds the line (see the module docstring).  Lines printed:
    ``TAG file SHELL PATH WHY``, ``TAG already``, ``TAG helper PATH`` / ``TAG helper-failed``,
    ``TAG backup PATH``, ``TAG added``, ``TAG failed WHY``."""
    rc = check_shell_file(shell_file)
    lines = [
        f"t={shlex.quote(TAG)}",
        'sh_=${SHELL##*/}',
        'case $sh_ in',
        '  bash) rc=.bashrc why="your login shell there is bash: its interactive shells '
        'read ~/.bashrc (and on most systems ~/.bash_profile reads it for login shells)";;',
        '  zsh) rc=.zshrc why="your login shell there is zsh: every interactive zsh reads '
        '~/.zshrc";;',
        '  *) rc=.profile why="your login shell there is ${sh_:-unknown}: POSIX login '
        'shells read ~/.profile";;',
        'esac',
    ]
    if rc:
        lines.append(f'rc={shlex.quote(rc)} why="as given with --shell-file"')
    lines += [
        'case $rc in /*) p=$rc;; *) p=$HOME/$rc;; esac',
        r"""printf '%sfile\t%s\t%s\t%s\n' "$t" "${sh_:-unknown}" "$p" "$why" """.strip(),
        f"if [ -f \"$p\" ] && grep -q {shlex.quote(_PRESENT)} \"$p\" 2>/dev/null; then",
        "  printf '%salready\\n' \"$t\"; present=1",
        "fi",
    ]
    if not apply:
        return "\n".join(lines)
    fail = "{ printf '%sfailed\\t%s\\n' \"$t\" \"$1\"; exit 0; }"
    lines += [
        f"fail() {fail}",
        "um=$(umask)", "umask 077", 'base="$HOME"/.tunneld',
        *_BROWSER_HELPER,
        'umask "$um"',
        'if [ "$BROWSER" = "$helper" ]; then printf \'%shelper\\t%s\\n\' "$t" "$helper"',
        "else printf '%shelper-failed\\n' \"$t\"; fi",
        '[ -z "$present" ] || exit 0',
        '[ ! -d "$p" ] || fail "$p is a directory"',
        'if [ -e "$p" ]; then',
        '  b="$p.tunneld-backup-$(date +%Y%m%d%H%M%S)"',
        '  err=$(cp -p "$p" "$b" 2>&1) || fail "could not copy $p to $b: ${err##*: }"',
        "  printf '%sbackup\\t%s\\n' \"$t\" \"$b\"",
        'fi',
        f"err=$( {{ printf '\\n%s\\n%s\\n' {shlex.quote(COMMENT)} "
        f"{shlex.quote(BROWSER_LINE)} >> \"$p\"; }} 2>&1 ) || "
        'fail "could not write $p: ${err##*: }"',
        "printf '%sadded\\n' \"$t\"",
    ]
    return "\n".join(lines)


@dataclass
class Setup:
    """What ``setup_command`` reported."""

    shell: str = ""
    path: str = ""
    why: str = ""
    already: bool = False
    helper: str | None = None
    helper_failed: bool = False
    backup: str | None = None
    added: bool = False
    failed: str | None = None
    #: the lines appended (when ``added``)
    lines: list[str] = field(default_factory=list)


def parse_setup(text: str) -> Setup | None:
    """``setup_command``'s answer, or None if it printed no ``file`` line."""
    out = Setup()
    seen = False
    for line in text.split("\n"):
        if not line.startswith(TAG):
            continue
        kind, _, rest = line[len(TAG):].partition("\t")
        if kind == "file":
            parts = rest.split("\t", 2)
            if len(parts) == 3:
                out.shell, out.path, out.why = parts
                seen = True
        elif kind == "already":
            out.already = True
        elif kind == "helper":
            out.helper = rest
        elif kind == "helper-failed":
            out.helper_failed = True
        elif kind == "backup":
            out.backup = rest
        elif kind == "added":
            out.added = True
            out.lines = ["", COMMENT, BROWSER_LINE]
        elif kind == "failed":
            out.failed = rest
    return out if seen else None
