"""`tunnelctl ssh-config`: the text that lets the user's own OpenSSH (``ssh``, ``scp``,
``rsync``, ``git``) ride tunneld's connections through its per-host control sockets.  Pure:
text in, text out (``sshinstall`` reads and writes the files).

Two texts:

- ``~/.ssh/tunneld.conf``, which tunneld owns (``conf_text``): for each host tunneld manages
  ``Host NAME`` / ``ControlPath <its socket>`` / ``ControlMaster no``; or, with
  ``all_hosts``, one ``Host *`` block whose ``ControlPath`` is ``<mux dir>/%n`` (the name as
  typed), after blocks of their own for the names the daemon hashes (``mux/h-HASH``).
- ``~/.ssh/config``, which the user owns: one ``Include ~/.ssh/tunneld.conf`` line (and a
  comment) at its very top (``add_include``), since OpenSSH takes the first value it obtains
  and an ``Include`` after a ``Host``/``Match`` line would be inside that block;
  ``remove_include`` takes it out again, giving back the text as it was.

OpenSSH's rules followed here: ``Include`` expands ``~`` with ``$HOME`` (glob's
``GLOB_TILDE``), a relative path is relative to ``~/.ssh``; ``ControlPath`` expands ``%``
tokens (a literal ``%`` is ``%%``) and ``${VAR}``; a value with spaces is double-quoted; a
socket path must stay under ``sun_path``'s size (104 bytes on macOS, 108 on Linux: ssh exits
with "ControlPath too long" past it, so ``Host *`` leaves out names that long).
"""

from __future__ import annotations

import os
import re
import shlex

#: how the Include line names tunneld's file (``~`` is ``$HOME`` for ssh's Include, as for us)
CONF_REF = "~/.ssh/tunneld.conf"
#: the line added to ~/.ssh/config
INCLUDE_LINE = f"Include {CONF_REF}"
#: the comment before it; a comment starting so is ours (``remove_include``)
COMMENT_PREFIX = "# added by tunnelctl ssh-config --install"
COMMENT = (f"{COMMENT_PREFIX}: ssh, scp, rsync and git ride tunneld's connections "
           "(`tunnelctl ssh-config --uninstall` removes it)")
#: the first lines of tunneld.conf
HEADER = (
    "# Written by `tunnelctl ssh-config --install`; do not edit it: every --install rewrites",
    "# it, and `tunnelctl ssh-config --uninstall` removes it and its Include line in",
    "# ~/.ssh/config.  ssh, scp, rsync and git to these hosts ride tunneld's connection",
    "# through its control socket; with tunneld down, ssh makes its own connection as before.",
)
#: Unix socket paths stay under this many bytes (as ``tunneld.paths.MAX_SOCKET_PATH``)
MAX_SOCKET_PATH = 104
#: a name usable as an ssh ``Host`` pattern and ``%n``: a host alias without ``user@``
_HOST_OK = re.compile(r"^(?!-)[A-Za-z0-9_.%+\[\]:-]{1,255}\Z")
#: what no ssh_config value of ours may hold: quotes and backslashes (read differently by
#: older OpenSSH), control characters, ``${`` (ssh would expand an environment variable)
_UNQUOTABLE = re.compile(r'["\\\x00-\x1f\x7f]|\$\{')
#: what makes a value need double quotes
_NEEDS_QUOTES = re.compile(r"[\s#'=]")
#: a keyword line of an ssh config: the keyword, then a space or ``=``, then the arguments
_KEYWORD = re.compile(r"^\s*([A-Za-z]+)(?:\s*=\s*|\s+|$)(.*)$")


def quote(value: str) -> str:
    """``value`` as one ssh_config argument: bare, or double-quoted when it holds spaces (or
    ``#``, ``'``, ``=``).  ValueError for what cannot be written in every OpenSSH."""
    if not value or _UNQUOTABLE.search(value):
        raise ValueError(f"{value!r} cannot be written in an ssh config (quotes, backslashes, "
                         "control characters and '${' are not understood the same way by "
                         "every OpenSSH)")
    return f'"{value}"' if _NEEDS_QUOTES.search(value) else value


def control_path(path: str, token: str = "") -> str:
    """The ``ControlPath`` argument for the socket ``path`` (its ``%`` doubled), with a
    ``%`` token appended unescaped (``/%n``)."""
    return quote(path.replace("%", "%%") + token)


def host_problem(name: str) -> str | None:
    """Why ``name`` cannot have a ``Host`` block, or None."""
    if "@" in name:
        return (f"{name}: not served through ssh's config (a Host line matches the host part "
                f"only): `ssh {name}` rides tunneld's connection to "
                f"{name.rpartition('@')[2]} if tunneld has one")
    if not _HOST_OK.match(name):
        return f"{name!r}: not a name ssh's Host lines can match; left out"
    return None


def _block(pattern: str, path: str) -> list[str]:
    return ["", f"Host {pattern}", f"    ControlPath {path}", "    ControlMaster no"]


def star_limit(mux_dir: str) -> int:
    """The length from which a name's ``<mux dir>/NAME`` reaches ``MAX_SOCKET_PATH`` bytes:
    such names are hashed by the daemon, and left out of ``Host *`` here."""
    return MAX_SOCKET_PATH - len((mux_dir.rstrip("/") + "/").encode())


def conf_text(sockets: dict[str, str], mux_dir: str, all_hosts: bool = False) -> str:
    """tunneld.conf: ``sockets`` is each host's control socket (``paths.mux_socket``).
    Without ``all_hosts`` one block per host; with it one ``Host *`` block using ``%n``, after
    blocks of their own for the hosts whose socket is not ``<mux dir>/NAME`` (hashed).  The
    ``Host *`` block leaves out names from ``star_limit`` characters on (their path would pass
    the socket limit; ssh would refuse it) and ``h-*`` (the hashed sockets' own names).
    ValueError for a path that cannot be written (``quote``)."""
    lines = list(HEADER)
    base = mux_dir.rstrip("/")
    for name in sorted(sockets):
        if all_hosts and sockets[name] == f"{base}/{name}" and \
                len(name.encode()) < star_limit(base) and not name.startswith("h-"):
            continue
        lines += _block(name, control_path(sockets[name]))
    if all_hosts:
        limit = star_limit(base)
        if limit > 1:
            lines += _block(f"* !h-* !{'?' * limit}*", control_path(base + "/", "%n"))
    return "\n".join(lines) + "\n"


# -- ~/.ssh/config -------------------------------------------------------------------------------

def _keyword(line: str) -> tuple[str, str] | None:
    """(keyword in lower case, the rest) of a config line; None for a blank or comment."""
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    m = _KEYWORD.match(s)
    return (m.group(1).lower(), m.group(2)) if m else None


def _words(rest: str) -> list[str]:
    try:
        return shlex.split(rest, comments=True)
    except ValueError:
        return rest.split()


def _quoted(word: str) -> str:
    try:
        return quote(word)
    except ValueError:
        return word


def _names_conf(word: str, conf_path: str, home: str) -> bool:
    """True if an Include argument names ``conf_path`` (``~/``: ``home``; relative: under
    ``home/.ssh``, as for ssh)."""
    if word == "~" or word.startswith("~/"):
        word = home + word[1:]
    elif not word.startswith("/"):
        word = os.path.join(home, ".ssh", word)
    return os.path.normpath(word) == os.path.normpath(conf_path)


def first_block(text: str) -> int | None:
    """The index of the first ``Host``/``Match`` line (lines split on ``\\n``), or None."""
    for i, line in enumerate(text.split("\n")):
        kw = _keyword(line)
        if kw and kw[0] in ("host", "match"):
            return i
    return None


def find_includes(text: str, conf_path: str, home: str) -> list[int]:
    """The indices of the ``Include`` lines that name ``conf_path`` (among others or alone)."""
    out = []
    for i, line in enumerate(text.split("\n")):
        kw = _keyword(line)
        if kw and kw[0] == "include" and \
                any(_names_conf(w, conf_path, home) for w in _words(kw[1])):
            out.append(i)
    return out


def installed(text: str, conf_path: str, home: str) -> int | None:
    """The index of an Include line of ``conf_path`` that counts (before any ``Host`` or
    ``Match`` line: outside every block), or None."""
    first = first_block(text)
    for i in find_includes(text, conf_path, home):
        if first is None or i < first:
            return i
    return None


def add_include(text: str, conf_path: str, home: str) -> str:
    """``text`` with the comment and ``INCLUDE_LINE`` (and a blank line) at its top; the text
    itself when it includes ``conf_path`` already where it counts (idempotent)."""
    if installed(text, conf_path, home) is not None:
        return text
    if text == "":
        return f"{COMMENT}\n{INCLUDE_LINE}\n"
    return f"{COMMENT}\n{INCLUDE_LINE}\n\n{text}"


def remove_include(text: str, conf_path: str, home: str) -> str:
    """``text`` without its Include lines of ``conf_path``: the one ``add_include`` put there
    goes with its comment and blank line (the text as it was before), one of the user's own
    with nothing else; a line that also names other files keeps them."""
    lines = text.split("\n")
    drop: set[int] = set()
    for i in find_includes(text, conf_path, home):
        kw = _keyword(lines[i])
        assert kw is not None
        others = [w for w in _words(kw[1]) if not _names_conf(w, conf_path, home)]
        if others:
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
            lines[i] = f"{indent}Include {' '.join(_quoted(w) for w in others)}"
            continue
        drop.add(i)
        if i > 0 and lines[i - 1].startswith(COMMENT_PREFIX):
            drop.add(i - 1)
            if i + 1 < len(lines) and lines[i + 1] == "":
                drop.add(i + 1)
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


def misplaced(text: str, conf_path: str, home: str) -> list[int]:
    """Include lines of ``conf_path`` inside a ``Host``/``Match`` block (they count only for
    that block's hosts): their indices."""
    first = first_block(text)
    return [i for i in find_includes(text, conf_path, home)
            if first is not None and i > first]
