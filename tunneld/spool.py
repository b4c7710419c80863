"""The browser-open spool on the server: the BROWSER helper's text, the reader's text, and the
parsers of what they write.  Pure: no I/O, no clock.

A program that opens a browser on the server (Python's ``webbrowser``, ``xdg-open`` through
``$BROWSER``) runs tunneld's helper, ``~/.tunneld/bin/open-on-local URL`` (``HELPER_SCRIPT``).
It prints a marker, ``OPEN_ON_LOCAL(HOST)[URL]``, for a tunneld session that reads the
program's output, **and** appends the request to the spool, one line per request::

    ~/.tunneld/spool/           0700
        opens                   0600   EPOCH <TAB> HOST <TAB> URL <NL>   (server time, seconds)
        opens.1                        the previous file, once ``opens`` passed ``SPOOL_MAX``

``HOST`` is the host name it ran on, reduced as a marker's NODE (``names.reduce_host_name``);
a URL with a tab, a line break or more than ``markers.MAX_URL`` bytes is not spooled (the
helper says so on stderr).  Rotation is ``mv opens opens.1`` under a ``mkdir`` lock, once the
file is larger than ``SPOOL_MAX``: two files of at most about that size.

For every connected host the daemon runs one reader (``reader_command``): a shell loop that
only reads (it waits, polling every ``WAIT_POLL`` s, for the directory to exist) and reports
new complete lines with the file's inode and the byte offset after each, and the server's
clock.  It starts from the position the daemon kept (``Position``): the inode and offset of
the file being read and of the previous one, so a rotation while the daemon was away loses
nothing it can see, and an entry is reported once.  Reader lines (``parse_reader_line``)::

    TAG E <TAB> INODE <TAB> END <TAB> NOW <TAB> LINE     an entry (LINE as the helper wrote it)
    TAG N <TAB> INODE       now reading this file (a new ``opens``)
    TAG L <TAB> INODE       the file being read is gone (rotated twice, or removed)
    TAG T <TAB> INODE       the file being read shrank (truncated): read again from 0
    TAG S <TAB> INODE <TAB> END    skipped an over-long line
    TAG W                   waiting: ``~/.tunneld/spool`` does not exist (yet)
    TAG F                   following: the directory exists
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace

from .markers import MAX_URL
from .names import MAX_HOST_LEN

#: the spool directory and its files on the server, relative to ``$HOME``
SPOOL_DIR = ".tunneld/spool"
SPOOL_FILE = "opens"
#: a limit: the spool file is rotated (to ``opens.1``) once it is larger than this (bytes)
SPOOL_MAX = 256 * 1024
#: a limit: bytes the reader reports per look at a file (a larger backlog takes several)
CHUNK = 64 * 1024
#: seconds between the reader's looks at the spool, and while the directory does not exist
POLL = 1.0
WAIT_POLL = 2.0
#: the reader's loops between two heartbeat lines (``H``: ignored by the daemon; a write that
#: fails ends a reader nobody reads any more)
HEARTBEAT = 10
#: a limit: the longest reader line the daemon keeps (an entry of the longest URL fits)
MAX_LINE = MAX_URL + 1024
#: the tag every reader line starts with
TAG = "\x1etunneld-spool:"

#: the host name, reduced to what a marker's NODE may hold (``names.reduce_host_name``)
HOSTNAME_EXPR = ("$( (hostname || uname -n) 2>/dev/null | tr -cd 'A-Za-z0-9_.-' | "
                 f"cut -c1-{MAX_HOST_LEN})")


def helper_script(limit: int = SPOOL_MAX) -> str:
    """The BROWSER helper (``HELPER_SCRIPT``), rotating its spool past ``limit`` bytes."""
    return f"""#!/bin/sh
# tunneld's BROWSER helper: asks the local browser (through tunneld) to open "$1", naming
# the host this runs on, so a URL printed on a compute node is forwarded to that node.  It
# prints a marker (for a tunneld session reading this output) and adds the request to the
# spool that tunneld follows for every connected host: ~/{SPOOL_DIR}/{SPOOL_FILE}.
[ -n "$1" ] || {{ echo "usage: $0 URL" >&2; exit 2; }}
h={HOSTNAME_EXPR}
if [ -n "$h" ]; then printf 'OPEN_ON_LOCAL(%s)[%s]\\n' "$h" "$1"
else printf 'OPEN_ON_LOCAL[%s]\\n' "$1"; fi
d="$HOME/{SPOOL_DIR}"; f="$d/{SPOOL_FILE}"
say() {{ printf 'open-on-local: %s; tunneld sees this request only in this output\\n' "$1" >&2
  exit 0; }}
[ -n "$HOME" ] || say "not added to tunneld's spool: HOME is not set"
tab=$(printf '\\t'); cr=$(printf '\\r')
case $1 in *"$tab"*|*"$cr"*|*'
'*) say "not added to tunneld's spool $f: the URL holds a tab or a line break";; esac
[ ${{#1}} -le {MAX_URL} ] || say "not added to tunneld's spool $f: the URL is longer than \\
{MAX_URL} bytes"
err=$( {{ umask 077; mkdir -p "$d" && chmod 700 "$d" &&
  printf '%s\\t%s\\t%s\\n' "$(date +%s)" "$h" "$1" >> "$f"; }} 2>&1 ) ||
  say "could not add it to tunneld's spool $f${{err:+ (${{err##*: }})}}"
s=$(wc -c < "$f" 2>/dev/null | tr -d ' ')
if [ "${{s:-0}}" -gt {limit} ]; then
  if mkdir "$d/rotating" 2>/dev/null; then
    s=$(wc -c < "$f" 2>/dev/null | tr -d ' ')
    [ "${{s:-0}}" -le {limit} ] || mv -f "$f" "$f.1"
    rmdir "$d/rotating"
  elif [ -n "$(find "$d/rotating" -maxdepth 0 -mmin +1 2>/dev/null)" ]; then
    rmdir "$d/rotating" 2>/dev/null   # left by a helper that was killed
  fi
fi
exit 0
"""


HELPER_SCRIPT = helper_script()


@dataclass(frozen=True)
class Position:
    """Where the daemon is in a host's spool: the file being read (inode, offset after the
    last entry taken) and the previous one (read on while a late writer may still add to
    it after a rotation).  Inode 0: none."""

    inode: int = 0
    offset: int = 0
    prev_inode: int = 0
    prev_offset: int = 0

    def took(self, inode: int, end: int) -> Position:
        """After an entry of file ``inode`` that ended at byte ``end``."""
        if inode == self.inode:
            return replace(self, offset=end)
        if inode == self.prev_inode:
            return replace(self, prev_offset=end)
        return Position(inode, end, self.inode, self.offset)

    def switched(self, inode: int) -> Position:
        """The reader moved on to a new file ``inode`` (``N``)."""
        if inode == self.inode:
            return self
        return Position(inode, 0, self.inode, self.offset)

    def restarted(self, inode: int) -> Position:
        """File ``inode`` shrank (``T``): it is read again from its start."""
        return self.took(inode, 0)

    def to_json(self) -> dict[str, int]:
        return {"inode": self.inode, "offset": self.offset, "prev_inode": self.prev_inode,
                "prev_offset": self.prev_offset}

    @classmethod
    def from_json(cls, data: object) -> Position:
        """A position as ``to_json`` wrote it; ValueError for anything else."""
        if not isinstance(data, dict) or set(data) != {"inode", "offset", "prev_inode",
                                                       "prev_offset"}:
            raise ValueError("not a spool position")
        values = [data[k] for k in ("inode", "offset", "prev_inode", "prev_offset")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError("not a spool position")
        return cls(*values)


def reader_command(pos: Position, poll: float = POLL, wait: float = WAIT_POLL,
                   chunk: int = CHUNK) -> str:
    """Text that follows the spool from ``pos`` and reports what it finds (module docstring)
    until the connection that started it is gone.  It creates and changes nothing."""
    values = (pos.inode, pos.offset, pos.prev_inode, pos.prev_offset)
    if not all(isinstance(v, int) and v >= 0 for v in values) or chunk < 1:
        raise ValueError(f"bad spool position {pos!r}")
    naps = f"sleep {poll:g} 2>/dev/null || sleep 1"
    return f"""LC_ALL=C; export LC_ALL
d="$HOME/{SPOOL_DIR}"; f="$d/{SPOOL_FILE}"; g="$f.1"
t={shlex.quote(TAG)}
ci={pos.inode} co={pos.offset} pi={pos.prev_inode} po={pos.prev_offset} said=
chunk() {{  # FILE INODE FROM SIZE: report its complete lines from byte FROM; n: the new offset
  fl=$1 in=$2 from=$3 m=$(($4 - $3))
  [ "$m" -le {chunk} ] || m={chunk}
  now=$(date +%s)
  r=$(tail -c +$((from + 1)) "$fl" 2>/dev/null | head -c "$m" | awk -v t="$t" -v i="$in" \\
      -v o="$from" -v m="$m" -v now="$now" -v max={chunk} '
    {{ n = length($0) + 1; if (p + n > m) exit; p += n
      printf "%sE\\t%s\\t%d\\t%s\\t%s\\n", t, i, o + p, now, $0 }}
    END {{ if (p == 0 && m >= max) {{ p = m; printf "%sS\\t%s\\t%d\\n", t, i, o + p }}
          printf "%sP%d", t, o + p }}')
  set -- $(ls -di "$fl" 2>/dev/null)
  [ "${{1:-}}" = "$in" ] || return 1   # replaced while it was read: look again
  n=${{r##*"${{t}}P"}}
  case $n in ''|*[!0-9]*) return 1;; esac
  printf '%s' "${{r%"${{t}}P"*}}"
}}
hb=0
while :; do
  kill -0 $PPID 2>/dev/null || exit 0   # our sshd is gone (the connection dropped)
  # a line now and then: once nobody reads (the connection is gone, whoever the parent now
  # is, even where init leaves the old one a zombie) the write ends this reader
  hb=$((hb + 1))
  if [ $hb -ge {HEARTBEAT} ]; then printf '%sH\n' "$t" || exit 0; hb=0; fi
  if [ ! -d "$d" ]; then
    [ "$said" = W ] || {{ printf '%sW\\n' "$t"; said=W; }}
    sleep {wait:g} 2>/dev/null || sleep 2
    continue
  fi
  [ "$said" = F ] || {{ printf '%sF\\n' "$t"; said=F; }}
  : < "$f" 2>/dev/null   # an open: NFS revalidates what it cached of the file
  ni= ns=0 oi= os=0
  out=$(ls -lni "$f" "$g" 2>/dev/null)
  while read -r i _ _ _ _ s rest; do
    case $rest in */{SPOOL_FILE}.1) oi=$i os=$s;; */{SPOOL_FILE}) ni=$i ns=$s;; esac
  done <<EOF
$out
EOF
  if [ -n "$ni" ] && [ "$ni" != "$ci" ]; then
    if [ "$ci" != 0 ] && [ "$oi" = "$ci" ]; then pi=$ci po=$co
    elif [ "$ci" != 0 ] && [ "$ci" != "$pi" ]; then printf '%sL\\t%s\\n' "$t" "$ci"; fi
    ci=$ni co=0
    printf '%sN\\t%s\\n' "$t" "$ci"
  fi
  if [ -n "$oi" ] && [ "$oi" = "$pi" ] && [ "$os" -gt "$po" ]; then
    was=$po
    chunk "$g" "$pi" "$po" "$os" && po=$n
    # the old file to its end first (in order), unless it makes no progress
    if [ "$po" -lt "$os" ] && [ "$po" != "$was" ]; then {naps}; continue; fi
  fi
  if [ -n "$ni" ] && [ "$ni" = "$ci" ]; then
    if [ "$ns" -lt "$co" ]; then printf '%sT\\t%s\\n' "$t" "$ci"; co=0; fi
    if [ "$ns" -gt "$co" ]; then chunk "$f" "$ci" "$co" "$ns" && co=$n; fi
  fi
  {naps}
done
"""


@dataclass(frozen=True)
class Entry:
    """A browser-open request from the spool."""

    #: when it was asked for, on the clock of the host it ran on (epoch seconds)
    time: int
    #: the host it ran on (as a marker's NODE), or None
    node: str | None
    url: str


@dataclass(frozen=True)
class Seen:
    """An ``E`` line: an entry (or why its line is not one), where it ends, the server's
    clock when it was read."""

    inode: int
    end: int
    now: int
    entry: Entry | None
    #: why the line is not an entry (None when it is)
    bad: str | None = None

    @property
    def age(self) -> int | None:
        """Seconds between the request and the reader seeing it (None: no entry)."""
        return None if self.entry is None else max(0, self.now - self.entry.time)


@dataclass(frozen=True)
class Note:
    """Any other reader line: ``kind`` is N, L, T, S, W or F."""

    kind: str
    inode: int = 0
    end: int = 0


_NODE_RE = re.compile(r"[A-Za-z0-9_.-]{0,%d}" % MAX_HOST_LEN)
_DIGITS = re.compile(r"[0-9]{1,19}")
_BAD_URL = re.compile(r"[\x00-\x20\x7f-\x9f]|\s")


def parse_entry(line: str) -> Entry | str:
    """A spool line (without its newline) → its Entry, or why it is not one."""
    fields = line.split("\t")
    if len(fields) != 3:
        return "not three tab-separated fields"
    when, node, url = fields
    if not _DIGITS.fullmatch(when):
        return "the time is not a number of seconds"
    if not _NODE_RE.fullmatch(node):
        return "the host name holds other characters than letters, digits, '.', '_', '-'"
    if not url or len(url.encode()) > MAX_URL or _BAD_URL.search(url):
        return "the URL is empty, too long, or holds a space or a control character"
    return Entry(int(when), node or None, url)


def parse_reader_line(line: bytes) -> Seen | Note | None:
    """One line of the reader's output (without its newline), or None if it is none of
    its lines."""
    if not line.startswith(TAG.encode()):
        return None
    text = line[len(TAG):].decode("utf-8", "replace")
    kind, _, rest = text.partition("\t")
    if kind == "E":
        parts = rest.split("\t", 3)
        if len(parts) != 4 or not all(_DIGITS.fullmatch(p) for p in parts[:3]):
            return None
        inode, end, now = (int(p) for p in parts[:3])
        entry = parse_entry(parts[3])
        if isinstance(entry, str):
            return Seen(inode, end, now, None, entry)
        return Seen(inode, end, now, entry)
    if kind in ("W", "F") and not rest:
        return Note(kind)
    parts = rest.split("\t")
    if kind in ("N", "L", "T") and len(parts) == 1 and _DIGITS.fullmatch(parts[0]):
        return Note(kind, int(parts[0]))
    if kind == "S" and len(parts) == 2 and all(_DIGITS.fullmatch(p) for p in parts):
        return Note(kind, int(parts[0]), int(parts[1]))
    return None


class Lines:
    """Bytes of the reader's stdout → its complete lines, each at most ``MAX_LINE`` bytes
    (the rest of a longer line is dropped; ``overflowed`` counts such lines)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._dropping = False
        self.overflowed = 0

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        while data:
            cut = data.find(b"\n")
            piece, data = (data, b"") if cut < 0 else (data[:cut], data[cut + 1:])
            if not self._dropping:
                self._buf += piece
                if len(self._buf) > MAX_LINE:
                    self._dropping = True
                    self.overflowed += 1
                    self._buf.clear()
            if cut >= 0:
                if not self._dropping:
                    out.append(bytes(self._buf))
                self._buf.clear()
                self._dropping = False
        return out
