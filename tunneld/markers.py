"""Browser-open markers in a byte stream → ``BrowserOpen`` events.  Pure: no I/O, no clock.

A remote program asks for a local browser by printing a marker anywhere in a line::

    OPEN_ON_LOCAL[URL]            the anvi'o recipe's format
    OPEN_ON_LOCAL(NODE)[URL]      the same, naming the host the program ran on

``NODE`` is ``[A-Za-z0-9_.-]{1,253}``.  ``URL`` may hold brackets itself (``http://[::1]:8888/``):
the marker ends at the ``]`` that closes its opening ``[``.  A line ends at ``\\n`` or ``\\r``.
ANSI escape sequences (CSI, OSC and other string sequences, two-byte ``ESC x``) are removed
from a line before it is searched, so colour codes around or inside a marker do not hide it.
Several markers on one line give several events, in order.

A marker's URL is dropped (no event) when it is empty, longer than ``MAX_URL`` bytes, or holds
whitespace or a control character once surrounding whitespace is stripped; every other check
belongs to the URL rules (``urls.plan``).  Bytes are scanned as bytes; only the URL and node
are decoded (UTF-8, ``errors="replace"``).

Use::

    scanner = Scanner()
    for chunk in stream:
        for event in scanner.feed(chunk):   # events of the lines this chunk completed
            act_on(event)
    for event in scanner.close():           # the unterminated last line, if any
        act_on(event)

``Scanner(urls=True)`` also gives a ``printed.PrintedUrl`` for each http(s) URL with a port
printed on a line without a marker (``printed.find_urls``: Jupyter with ``--no-browser``,
Flask's "Running on …").

The caller must act on (or drop) the events ``feed`` returns: the scanner keeps none.  A marker
split across ``feed`` calls at any byte yields one event, once, when its line is complete.
Memory is bounded: of a line longer than ``MAX_LINE`` only its last ``MAX_LINE`` bytes are
kept, and ``overflowed`` counts such lines, so the caller can log one line about them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .printed import PrintedUrl, find_urls

MARKER = b"OPEN_ON_LOCAL"
#: a security limit: longest line (bytes) kept while looking for a marker
MAX_LINE = 64 * 1024
#: a security limit: longest URL (bytes) accepted inside a marker
MAX_URL = 8192
#: longest node name in ``OPEN_ON_LOCAL(NODE)[URL]`` (DNS limit)
MAX_NODE = 253

#: the value exported as ``$BROWSER`` on the server.  No ``:`` in it: Python's ``webbrowser``
#: splits ``BROWSER`` on ``os.pathsep``.  ``webbrowser`` and ``xdg-open`` substitute the URL for
#: ``%s`` and run ``echo`` without a shell.
BROWSER_ENV = "echo OPEN_ON_LOCAL[%s]"

_LINE_END = re.compile(rb"[\r\n]")
# ESC followed by: CSI (ESC [ params intermediates final); a string sequence (OSC ESC ],
# DCS ESC P, SOS ESC X, PM ESC ^, APC ESC _) ended by BEL, ST (ESC \) or the end of the line;
# an nF/Fp/Fe/Fs escape (ESC intermediates* final, which covers the two-byte ESC x); or a
# lone ESC.
_ANSI = re.compile(
    rb"\x1b(?:"
    rb"\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    rb"|[\]PX^_](?:[^\x07\x1b]|\x1b(?!\\))*(?:\x07|\x1b\\|\Z)"
    rb"|[\x20-\x2f]*[\x30-\x7e]"
    rb"|)")
_OPENING = re.compile(rb"OPEN_ON_LOCAL(?:\(([A-Za-z0-9_.-]{1,%d})\))?\[" % MAX_NODE)
_BRACKET = re.compile(rb"[\[\]]")
# after stripping surrounding whitespace: any ASCII whitespace or control byte refuses a URL
_BAD_BYTE = re.compile(rb"[\x00-\x20\x7f]")
_SPACE = b" \t\x0b\x0c"


@dataclass(frozen=True)
class BrowserOpen:
    """A request, printed on the server, to open ``url`` in the local browser."""

    #: the URL as printed (UTF-8, errors replaced), surrounding whitespace stripped
    url: str
    #: the host the program ran on, when the marker names it (``OPEN_ON_LOCAL(NODE)[URL]``)
    node: str | None = None


class Scanner:
    """Incremental marker scanner: ``feed(bytes) -> list[BrowserOpen]``; ``close()`` flushes.

    Invariants between calls: ``_buf`` holds the bytes of the current, unterminated line and
    ``len(_buf) <= MAX_LINE``; ``_overflowing`` is True if and only if that line has already
    lost bytes to the limit (and was counted in ``overflowed``).
    """

    def __init__(self, urls: bool = False) -> None:
        #: also report printed URLs (``printed.find_urls``)
        self.urls = urls
        self._buf = bytearray()
        self._overflowing = False
        #: lines that exceeded ``MAX_LINE`` (each counted once), since the scanner was made
        self.overflowed = 0

    def feed(self, data: bytes) -> list[BrowserOpen | PrintedUrl]:
        """Take the next bytes of the stream; return the events of the lines they completed.

        The caller acts on the returned events, then feeds the next chunk; at end of stream it
        calls ``close()`` for the last, unterminated line.
        """
        events: list[BrowserOpen | PrintedUrl] = []
        start = 0
        while True:
            m = _LINE_END.search(data, start)
            if m is None:
                break
            self._append(data[start:m.start()])
            events.extend(scan_line(bytes(self._buf), self.urls))
            self._buf.clear()
            self._overflowing = False
            start = m.end()
        if start < len(data):
            self._append(data[start:])
        return events

    def close(self) -> list[BrowserOpen | PrintedUrl]:
        """End of stream: return the events of the unterminated last line.

        The scanner is then empty and may be fed a new stream.
        """
        events = scan_line(bytes(self._buf), self.urls) if self._buf else []
        self._buf.clear()
        self._overflowing = False
        return events

    def _append(self, piece: bytes) -> None:
        """Add ``piece`` to the current line, keeping only its last ``MAX_LINE`` bytes."""
        total = len(self._buf) + len(piece)
        if total <= MAX_LINE:
            self._buf += piece
            return
        if not self._overflowing:
            self._overflowing = True
            self.overflowed += 1
        if len(piece) >= MAX_LINE:
            self._buf[:] = piece[len(piece) - MAX_LINE:]
        else:
            del self._buf[:total - MAX_LINE]
            self._buf += piece


def strip_ansi(line: bytes) -> bytes:
    """``line`` without its ANSI escape sequences."""
    return _ANSI.sub(b"", line) if b"\x1b" in line else line


def scan_line(line: bytes, urls: bool = False) -> list[BrowserOpen | PrintedUrl]:
    """The markers of one complete line (without its line ending), in order; with ``urls``,
    the URLs printed on it if it holds no marker."""
    line = strip_ansi(line)
    first = line.find(MARKER)
    if first < 0:
        return list(find_urls(line)) if urls else []
    closing = _match_brackets(line, first)
    events: list[BrowserOpen | PrintedUrl] = []
    pos = first
    while True:
        m = _OPENING.search(line, pos)
        if m is None:
            return events
        open_at = m.end() - 1
        close_at = closing.get(open_at)
        event = None if close_at is None else _event(line[open_at + 1:close_at], m.group(1))
        if event is None:
            pos = m.start() + len(MARKER)   # an inner marker may still be whole
        else:
            events.append(event)
            assert close_at is not None   # (an event needs its closing bracket)
            pos = close_at + 1


def _match_brackets(line: bytes, start: int) -> dict[int, int]:
    """Index of each ``[`` at or after ``start`` → index of the ``]`` that closes it.

    One pass over the brackets (linear in the line), so a line full of unclosed markers costs
    no more than one full of text.
    """
    closing: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACKET.finditer(line, start):
        i = m.start()
        if line[i] == 0x5B:   # '['
            stack.append(i)
        elif stack:
            closing[stack.pop()] = i
    return closing


def _event(raw: bytes, node: bytes | None) -> BrowserOpen | None:
    raw = raw.strip(_SPACE)
    if not raw or len(raw) > MAX_URL or _BAD_BYTE.search(raw):
        return None
    url = raw.decode("utf-8", errors="replace")
    # C1 controls and Unicode spaces (NEL, NBSP, LINE SEPARATOR…) are refused as well
    if any(ch.isspace() or 0x80 <= ord(ch) <= 0x9F for ch in url):
        return None
    return BrowserOpen(url, None if node is None else node.decode("ascii"))
