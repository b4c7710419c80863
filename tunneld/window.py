"""The receive window of a channel, grown with the link (pure: no I/O, no clock).

An SSH channel moves at most one window per round trip: with OpenSSH's (and asyncssh's)
fixed 2 MiB, one connection is capped at window ÷ RTT — 42 MB/s at 50 ms, 21 MB/s at 100 ms —
however fast the link.  tunneld's lean channel (``fastpath.channel.TCPChannel``) grows its
receive window the way TCP's receive-buffer autotuning (Linux ``tcp_rcv_space_adjust``,
"dynamic right-sizing") and HPN-SSH do: once per round trip it compares what arrived in that
round trip with the window; when the server sent at least half a window in one round trip, the
window was what limited it, and the window doubles, up to ``max_window`` (config).  On a
fast local link a round trip carries a few packets, far below half a window, and the window
stays where it started.

The round trip is the connection's smallest channel open → confirmation time (``rtt``): an
upper bound of the network's round trip (it also holds the server's connect to the target),
measured on every channel, with no extra packets.  An overestimate makes the window grow more
than it needs to, never past ``max_window``.

What counts is what was *delivered* to the local client in the round trip: the channel gives
the window back only for data the local socket took, never for data still waiting for it.
So a slow local reader never makes the window grow (it takes less than half a window per
round trip), a reader that stops closes it, and the window a channel has is the most it can
hold in memory for its client.
"""

from __future__ import annotations

import re

#: the window a channel starts with (OpenSSH's and asyncssh's)
BASE_WINDOW = 2 * 1024 * 1024
#: the default ``max_window``: at 50 ms a window of 16 MiB allows 335 MB/s, more than one
#: channel's share of a CPU moves (bench/results.md, "Long link")
DEFAULT_MAX_WINDOW = 16 * 1024 * 1024
#: the bounds of ``max_window`` (SSH windows are 32-bit: 4 GiB - 1)
MIN_MAX_WINDOW = 64 * 1024
MAX_MAX_WINDOW = 1024 * 1024 * 1024
#: a round trip (s) below which the window never grows: BASE_WINDOW per 2 ms is 1 GB/s, more
#: than a channel moves on one CPU, and below it what looks like a round trip's data is
#: rather a burst read at once after the event loop was busy (loopback, a LAN)
MIN_RTT = 0.002


def start_window(max_window: int) -> int:
    """The window a channel is opened with."""
    return min(BASE_WINDOW, max_window)


def grown(window: int, max_window: int, received: int, elapsed: float, rtt: float) -> int:
    """The window after ``received`` bytes arrived in ``elapsed`` seconds (at least one round
    trip ``rtt``) while the local client kept reading: doubled (up to ``max_window``) when
    at least half a window arrived per round trip, else unchanged.  A window above
    ``max_window`` (lowered by a reload) is kept: credit given cannot be taken back."""
    if window >= max_window or rtt < MIN_RTT or elapsed < rtt:
        return window
    if 2 * received * rtt >= window * elapsed:  # received / elapsed * rtt >= window / 2
        return min(2 * window, max_window)
    return window


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.IGNORECASE)
_UNIT = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string like ``"16MiB"``, ``"16M"``, ``"512KiB"``,
    ``"1GiB"`` (binary units; ``MB`` is taken as MiB, as ssh_config and OpenSSH's
    ``RekeyLimit`` do).  Raises ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like \"16MiB\"")
    if isinstance(value, int):
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a size: give bytes (16777216) or a string like "
                         "\"16MiB\", \"512KiB\", \"1GiB\"")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNIT[unit])


def format_size(n: int) -> str:
    """``16MiB``-style text for a size (exact when it is a whole number of the unit)."""
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
