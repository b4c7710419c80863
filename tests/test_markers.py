"""Marker scanner: tables of streams and the events they give, split-anywhere properties, limits."""

import itertools
import os
import random
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunneld.markers import (
    BROWSER_ENV,
    MARKER,
    MAX_LINE,
    MAX_URL,
    BrowserOpen,
    Scanner,
    scan_line,
    strip_ansi,
)

ESC = b"\x1b"


def scan(stream: bytes) -> list[tuple[str, str | None]]:
    s = Scanner()
    events = s.feed(stream) + s.close()
    return [(e.url, e.node) for e in events]


def scan_chunks(chunks) -> list[BrowserOpen]:
    s = Scanner()
    out = []
    for c in chunks:
        out += s.feed(c)
    return out + s.close()


@pytest.mark.parametrize("stream,expected", [
    # the recipe's form, anywhere in a line
    (b"OPEN_ON_LOCAL[http://0.0.0.0:8090]\n", [("http://0.0.0.0:8090", None)]),
    (b"Opening: OPEN_ON_LOCAL[http://x/] now\n", [("http://x/", None)]),
    (b"noise\nOPEN_ON_LOCAL[http://x/]\nmore noise\n", [("http://x/", None)]),
    # the unterminated last line is flushed by close()
    (b"OPEN_ON_LOCAL[http://x/]", [("http://x/", None)]),
    # the node form
    (b"OPEN_ON_LOCAL(node42)[http://localhost:8888/]\n", [("http://localhost:8888/", "node42")]),
    (b"OPEN_ON_LOCAL(n-1.cluster_a.example.org)[http://x/]\n",
     [("http://x/", "n-1.cluster_a.example.org")]),
    (b"OPEN_ON_LOCAL(" + b"n" * 253 + b")[http://x/]\n", [("http://x/", "n" * 253)]),
    # brackets inside the URL are matched by depth
    (b"OPEN_ON_LOCAL[http://[::1]:8888/lab]\n", [("http://[::1]:8888/lab", None)]),
    (b"OPEN_ON_LOCAL(n)[http://[fe80::1]:80/a[1][2]?q=[x]]\n",
     [("http://[fe80::1]:80/a[1][2]?q=[x]", "n")]),
    (b"[x] OPEN_ON_LOCAL[http://x/] ]]\n", [("http://x/", None)]),
    # several markers on one line, in order
    (b"OPEN_ON_LOCAL[http://a/] and OPEN_ON_LOCAL(n)[http://b/]OPEN_ON_LOCAL[http://c/]\n",
     [("http://a/", None), ("http://b/", "n"), ("http://c/", None)]),
    # line endings: \n, \r\n, \r alone
    (b"OPEN_ON_LOCAL[http://a/]\r\nOPEN_ON_LOCAL[http://b/]\rOPEN_ON_LOCAL[http://c/]\n",
     [("http://a/", None), ("http://b/", None), ("http://c/", None)]),
    # surrounding whitespace is stripped
    (b"OPEN_ON_LOCAL[  http://x/\t]\n", [("http://x/", None)]),
    # ANSI escapes around and inside the marker
    (b"\x1b[32mOPEN_ON_LOCAL[\x1b[0mhttp://x/\x1b[0m]\n", [("http://x/", None)]),
    (b"OPEN_\x1b[1;31mON_LOC\x1b[0mAL[http://x/]\n", [("http://x/", None)]),
    (b"\x1b]0;window title\x07OPEN_ON_LOCAL[http://x/]\n", [("http://x/", None)]),
    (b"\x1b]8;;http://evil/\x1b\\OPEN_ON_LOCAL[http://x/]\x1b]8;;\x1b\\\n", [("http://x/", None)]),
    (b"\x1b(B\x1b[mOPEN_ON_LOCAL[\x1b(Bhttp://x/]\n", [("http://x/", None)]),
    (b"\x1b=OPEN_ON_LOCAL[http://x/\x1b>]\n", [("http://x/", None)]),
    (b"\x1b[?2004hOPEN_ON_LOCAL[http://x/]\x1b[?2004l\n", [("http://x/", None)]),
    # UTF-8 is decoded; bad UTF-8 becomes U+FFFD
    ("OPEN_ON_LOCAL[http://x/ü]\n".encode(), [("http://x/ü", None)]),
    (b"OPEN_ON_LOCAL[http://x/\xff]\n", [("http://x/\ufffd", None)]),
    # exactly MAX_URL bytes is accepted
    (b"OPEN_ON_LOCAL[http://x/" + b"a" * (MAX_URL - 9) + b"]\n",
     [("http://x/" + "a" * (MAX_URL - 9), None)]),
    # an unclosed outer marker does not hide a whole inner one
    (b"OPEN_ON_LOCAL[OPEN_ON_LOCAL[http://x/]\n", [("http://x/", None)]),
    (b"OPEN_ON_LOCAL[not a url] OPEN_ON_LOCAL[http://x/]\n", [("http://x/", None)]),
    # the scanner passes on anything well formed; the URL rules judge it
    (b"OPEN_ON_LOCAL[javascript:alert(1)]\n", [("javascript:alert(1)", None)]),
    # the node form with another bracketed marker after it
    (b"OPEN_ON_LOCAL(a)[http://x/]OPEN_ON_LOCAL(b)[http://y/]\n",
     [("http://x/", "a"), ("http://y/", "b")]),
])
def test_events(stream, expected):
    assert scan(stream) == expected


@pytest.mark.parametrize("stream", [
    b"",
    b"plain text\n",
    b"OPEN_ON_LOCAL[]\n",                       # empty
    b"OPEN_ON_LOCAL[   ]\n",                    # only whitespace
    b"OPEN_ON_LOCAL[http://x/ y]\n",            # inner whitespace
    b"OPEN_ON_LOCAL[http://x/\ty]\n",
    b"OPEN_ON_LOCAL[http://x/\x00]\n",          # control characters
    b"OPEN_ON_LOCAL[http://x/\x01]\n",
    b"OPEN_ON_LOCAL[http://x/\x7f]\n",
    b"OPEN_ON_LOCAL[http://x/\x07]\n",          # BEL outside an OSC is kept, then refused
    "OPEN_ON_LOCAL[http://x/\u0085]\n".encode(),   # NEL (C1 control)
    "OPEN_ON_LOCAL[http://x/\u00a0y]\n".encode(),  # no-break space
    "OPEN_ON_LOCAL[http://x/\u2028y]\n".encode(),  # line separator
    b"OPEN_ON_LOCAL[http://x/" + b"a" * (MAX_URL - 8) + b"]\n",   # MAX_URL + 1 bytes
    b"OPEN_ON_LOCAL[http://x/\n]\n",            # a newline ends the line first
    b"OPEN_ON_LOCAL[http://x/\r]\n",
    b"OPEN_ON_LOCAL[http://x/",                 # never closed
    b"OPEN_ON_LOCAL[http://[::1/\n",            # inner bracket never closed
    b"open_on_local[http://x/]\n",              # the marker is case-sensitive
    b"OPEN_ON_LOCAL [http://x/]\n",
    b"OPEN_ON_LOCAL()[http://x/]\n",            # empty node
    b"OPEN_ON_LOCAL(bad node)[http://x/]\n",
    b"OPEN_ON_LOCAL(a:b)[http://x/]\n",
    b"OPEN_ON_LOCAL(" + b"n" * 254 + b")[http://x/]\n",   # node too long
    b"OPEN_ON_LOCAL(n)\n[http://x/]\n",
    b"OPEN_ON_LOCAL(http://x/)\n",
    b"OPEN_ON_\nLOCAL[http://x/]\n",
])
def test_no_event(stream):
    assert scan(stream) == []


def test_event_only_when_line_is_complete():
    s = Scanner()
    assert s.feed(b"OPEN_ON_LOCAL[http://x/]") == []
    assert s.feed(b" trailing text") == []
    assert s.feed(b"\n") == [BrowserOpen("http://x/")]
    assert s.close() == []
    assert s.close() == []


def test_close_then_reuse():
    s = Scanner()
    assert s.feed(b"OPEN_ON_LOCAL[http://a/]") == []
    assert s.close() == [BrowserOpen("http://a/")]
    assert s.feed(b"OPEN_ON_LOCAL[http://b/]\n") == [BrowserOpen("http://b/")]


def test_crlf_split_between_feeds():
    s = Scanner()
    assert s.feed(b"OPEN_ON_LOCAL[http://x/]\r") == [BrowserOpen("http://x/")]
    assert s.feed(b"\n") == []
    assert s.close() == []


def test_events_are_frozen_values():
    e = BrowserOpen("http://x/", "n")
    assert e == BrowserOpen(url="http://x/", node="n")
    with pytest.raises(AttributeError):
        e.url = "http://y/"  # type: ignore[misc]
    assert BrowserOpen("http://x/").node is None


# A stream with every hard case: markers split by escapes, IPv6, node forms, \r\n, UTF-8,
# rejected markers, and a last line without a newline.
STREAM = (
    b"starting server...\r\n"
    b"\x1b[32mOPEN_ON_LOCAL[\x1b[0mhttp://0.0.0.0:8090/x?y#z\x1b[0m]\r\n"
    b"\x1b]0;title\x07 OPEN_ON_LOCAL(node42)[http://[::1]:8888/lab?token=abc]\n"
    + "log: café ☕ OPEN_ON_LOCAL[http://localhost:5000/ünï] tail\n".encode()
    + b"OPEN_ON_LOCAL[bad url] OPEN_ON_LOCAL[http://a/] OPEN_ON_LOCAL(n)[http://b/[c]]\n"
    b"OPEN_ON_LOCAL[http://progress/]\rprogress 50%\rOPEN_ON_LOCAL[http://done/]"
)
STREAM_EVENTS = [
    BrowserOpen("http://0.0.0.0:8090/x?y#z"),
    BrowserOpen("http://[::1]:8888/lab?token=abc", "node42"),
    BrowserOpen("http://localhost:5000/ünï"),
    BrowserOpen("http://a/"),
    BrowserOpen("http://b/[c]", "n"),
    BrowserOpen("http://progress/"),
    BrowserOpen("http://done/"),
]


def split_at(data: bytes, cuts) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_stream_whole():
    assert scan_chunks([STREAM]) == STREAM_EVENTS


def test_stream_one_byte_at_a_time():
    assert scan_chunks([STREAM[i:i + 1] for i in range(len(STREAM))]) == STREAM_EVENTS


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_stream_split_at_every_byte(cut):
    assert scan_chunks([STREAM[:cut], STREAM[cut:]]) == STREAM_EVENTS


@pytest.mark.parametrize("seed", range(50))
def test_stream_random_chunkings(seed):
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(STREAM)), rng.randint(1, 40))
    assert scan_chunks(split_at(STREAM, cuts)) == STREAM_EVENTS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=60))
def test_stream_any_chunking(cuts):
    chunks = split_at(STREAM, cuts)
    assert b"".join(chunks) == STREAM
    assert scan_chunks(chunks) == STREAM_EVENTS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=299), max_size=20))
def test_any_bytes_any_chunking_same_events(data, cuts):
    """Whatever the bytes, the chunking never changes the events (and nothing raises)."""
    events = scan_chunks([data])
    assert scan_chunks(split_at(data, cuts)) == events
    assert scan_chunks([data[i:i + 1] for i in range(len(data))]) == events
    for e in events:
        assert e.url and e.url == e.url.strip() and len(e.url.encode()) <= MAX_URL


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"OPEN_ON_LOCAL[", b"OPEN_ON_LOCAL(n)[", b"]", b"[", b"(", b")", b"\x1b[", b"\x1b]", b"\x07",
    b"\x1b\\", b"m", b"http://x/", b" ", b"\n", b"\r", b"OPEN_", b"ON_LOCAL", b"\xc3", b"\xbc",
]), max_size=40), st.randoms(use_true_random=False))
def test_marker_soup_any_chunking(parts, rng):
    data = b"".join(parts)
    events = scan_chunks([data])
    cuts = [rng.randint(1, max(1, len(data) - 1)) for _ in range(rng.randint(0, 10))]
    assert scan_chunks(split_at(data, cuts)) == events


# --- limits ------------------------------------------------------------------------------

def test_long_line_memory_is_bounded_and_tail_marker_found():
    s = Scanner()
    garbage = bytes(range(0x21, 0x7f)) * 11   # 1034 bytes, no newline, no marker
    for _ in range(1000):                      # ~1 MB in one line
        assert s.feed(garbage) == []
        assert len(s._buf) <= MAX_LINE
    assert s.overflowed == 1
    assert s.feed(b"OPEN_ON_LOCAL[http://x/]\n") == [BrowserOpen("http://x/")]
    assert s._buf == b""
    assert s.overflowed == 1


def test_long_line_in_one_chunk():
    s = Scanner()
    assert s.feed(b"x" * (10 * MAX_LINE) + b"OPEN_ON_LOCAL[http://x/]") == []
    assert len(s._buf) == MAX_LINE
    assert s.overflowed == 1
    assert s.close() == [BrowserOpen("http://x/")]


def test_long_line_one_byte_at_a_time():
    s = Scanner()
    for _ in range(MAX_LINE + 500):
        s.feed(b"y")
        assert len(s._buf) <= MAX_LINE
    assert s.overflowed == 1
    for b in b"OPEN_ON_LOCAL[http://x/]\n":
        events = s.feed(bytes([b]))
    assert events == [BrowserOpen("http://x/")]


def test_marker_at_the_start_of_an_overlong_line_is_lost():
    """Only the tail of an overlong line is kept (documented behaviour)."""
    assert scan(b"OPEN_ON_LOCAL[http://x/]" + b"z" * MAX_LINE + b"\n") == []


def test_line_of_exactly_max_line_does_not_overflow():
    s = Scanner()
    line = b"z" * (MAX_LINE - 24) + b"OPEN_ON_LOCAL[http://x/]"
    assert len(line) == MAX_LINE
    assert s.feed(line + b"\n") == [BrowserOpen("http://x/")]
    assert s.overflowed == 0


def test_overflowed_counts_each_long_line_once():
    s = Scanner()
    s.feed(b"a" * (MAX_LINE + 1))
    s.feed(b"a" * MAX_LINE)
    s.feed(b"\nshort\n")
    assert s.overflowed == 1
    s.feed(b"b" * (MAX_LINE * 2) + b"\n" + b"c" * (MAX_LINE + 1) + b"\n")
    assert s.overflowed == 3
    s.close()
    assert s.overflowed == 3


def test_many_unclosed_markers_in_one_line_is_fast():
    line = MARKER + b"[" + (MARKER + b"[x") * (MAX_LINE // 16)
    t0 = time.perf_counter()
    assert scan(line + b"\n") == []
    assert scan(line + b"]\n") == [("x", None)]
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("raw,clean", [
    (b"\x1b[32mgreen\x1b[0m", b"green"),
    (b"\x1b[1;31;4mx", b"x"),
    (b"\x1b]0;title\x07x", b"x"),
    (b"\x1b]0;title\x1b\\x", b"x"),
    (b"\x1b]0;never ended", b""),
    (b"\x1bPq#0;2;0;0;0\x1b\\x", b"x"),   # DCS
    (b"\x1b(Bx", b"x"),
    (b"\x1b=x\x1b>", b"x"),
    (b"x\x1b", b"x"),
    (b"no escapes", b"no escapes"),
])
def test_strip_ansi(raw, clean):
    assert strip_ansi(raw) == clean


def test_scan_line_is_the_per_line_function():
    assert scan_line(b"OPEN_ON_LOCAL[http://x/]") == [BrowserOpen("http://x/")]


# --- $BROWSER ----------------------------------------------------------------------------

def test_browser_env_value():
    assert ":" not in BROWSER_ENV and os.pathsep not in BROWSER_ENV
    assert BROWSER_ENV.count("%s") == 1
    # what the shell prints for it is the marker, its URL whole
    out = subprocess.run(["sh", "-c", BROWSER_ENV % "'http://x/?a=1&b=2'"], capture_output=True,
                         timeout=10).stdout
    assert scan(out) == [("http://x/?a=1&b=2", None)]


@pytest.mark.timeout(30)
def test_python_webbrowser_prints_a_marker():
    """Python's webbrowser under BROWSER=BROWSER_ENV prints a marker the scanner finds."""
    url = "http://0.0.0.0:8090/x?a=1&b=$HOME;c=`id`#frag"
    env = {**os.environ, "BROWSER": BROWSER_ENV}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, webbrowser; webbrowser.open(sys.argv[1])", url],
        env=env, capture_output=True, timeout=20, check=True).stdout
    assert scan(out) == [(url, None)]
