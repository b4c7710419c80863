"""Host and forward states, the one table of legal transitions, and the backoff policy.

Pure: no I/O.  An illegal transition raises ``IllegalTransition`` (a bug, not a user error).

Host states (design.md §6)::

    stopped ──► connecting ──► connected ──(lost)──► backoff ──(wait)──► connecting …
                    │  └──► needs-auth   (a person must act: `tunnelctl reconnect HOST`)
                    └─────► failed       (host key / config: never retried silently)
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class HostState(str, enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    NEEDS_AUTH = "needs-auth"
    FAILED = "failed"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


class ForwardState(str, enum.Enum):
    #: bound, and the host is connected: clients are served at once
    LISTENING = "listening"
    #: bound, the host is not connected: clients are held (bounded) until it is
    WAITING = "waiting"
    #: the listener is closed (forward removed or daemon stopping)
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


H = HostState
F = ForwardState

HOST_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    H.STOPPED: frozenset({H.CONNECTING}),
    H.CONNECTING: frozenset({H.CONNECTED, H.BACKOFF, H.NEEDS_AUTH, H.FAILED, H.STOPPED}),
    H.CONNECTED: frozenset({H.BACKOFF, H.CONNECTING, H.STOPPED}),
    H.BACKOFF: frozenset({H.CONNECTING, H.STOPPED}),
    H.NEEDS_AUTH: frozenset({H.CONNECTING, H.STOPPED}),
    H.FAILED: frozenset({H.CONNECTING, H.STOPPED}),
}

FORWARD_TRANSITIONS: dict[ForwardState, frozenset[ForwardState]] = {
    F.WAITING: frozenset({F.LISTENING, F.CLOSED}),
    F.LISTENING: frozenset({F.WAITING, F.CLOSED}),
    F.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a programming error."""


def check_host(old: HostState, new: HostState) -> HostState:
    if new not in HOST_TRANSITIONS[old]:
        raise IllegalTransition(f"host state {old} -> {new} is not allowed")
    return new


def check_forward(old: ForwardState, new: ForwardState) -> ForwardState:
    if new not in FORWARD_TRANSITIONS[old]:
        raise IllegalTransition(f"forward state {old} -> {new} is not allowed")
    return new


def forward_state_for(host: HostState) -> ForwardState:
    """What an open listener's state is while its host is in ``host``."""
    return F.LISTENING if host is H.CONNECTED else F.WAITING


#: retry states: the supervisor retries on its own only from these
RETRYING = frozenset({H.CONNECTING, H.BACKOFF})


@dataclass
class Backoff:
    """Exponential backoff with jitter between named bounds: the *schedule* of retries.

    ``next_delay()`` gives the wait before the next scheduled attempt and counts it;
    ``reset()`` goes back to the bottom (a connection that stayed up ``stable_after`` s).
    An attempt made early (a held client, a wake, `tunnelctl reconnect`) does not count:
    only the schedule's own attempts move it up, so clients cannot escalate it.  While a
    client is held, attempts come at most every ``held_interval`` s (``next_held``), so a
    server that comes back is noticed within about that long while someone waits.
    """

    #: first wait, seconds
    initial: float = 0.5
    #: longest wait, seconds
    maximum: float = 60.0
    factor: float = 2.0
    #: each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    jitter: float = 0.2
    #: a connection up this long resets the delay to ``initial``
    stable_after: float = 10.0
    #: while a client is held: at most one (early) attempt this often, seconds
    held_interval: float = 1.0
    attempts: int = 0

    def next_delay(self, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        u = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.maximum, base * u)

    def reset(self) -> None:
        self.attempts = 0

    def next_attempt_at(self, due: float, last_end: float, held: bool,
                        asked: bool = False) -> float:
        """When the next attempt starts (monotonic seconds): the scheduled time ``due``;
        earlier while a client is held (``held_interval`` after the last attempt ended at
        ``last_end``), or at once when it was asked for (``asked``: reconnect, a wake)."""
        if asked:
            return -float("inf")
        if held:
            return min(due, last_end + self.held_interval)
        return due


class Repeats:
    """Collapses a run of identical messages (the same failure, again and again) into its
    first line and a count, so that an outage writes a line per *change*, not per attempt.

    ``note(key, now)`` says whether to log this message, and returns the summary of the run
    it ends (or None).  ``end(now)`` closes the current run (a success, a quiet period).  A
    run longer than ``every`` seconds is summarised on the way too, so the log still shows
    that it goes on.
    """

    def __init__(self, every: float = 300.0) -> None:
        self.every = every
        #: the message of the current run, and when it (or its last summary) was logged
        self.key: str | None = None
        self.since = 0.0
        #: repeats of ``key`` not logged yet
        self.count = 0

    def note(self, key: str, now: float) -> tuple[bool, "Summary | None"]:
        if key == self.key:
            self.count += 1
            if now - self.since >= self.every:
                return False, self._summary(now, keep=True)
            return False, None
        summary = self.end(now)
        self.key, self.since, self.count = key, now, 0
        return True, summary

    def end(self, now: float) -> "Summary | None":
        """The summary of the run so far, if it had repeats; the run is over."""
        summary = self._summary(now) if self.key is not None else None
        self.key, self.count = None, 0
        return summary

    def _summary(self, now: float, keep: bool = False) -> "Summary | None":
        if not self.count or self.key is None:
            return None
        s = Summary(self.key, self.count, now - self.since)
        if keep:
            self.since, self.count = now, 0
        return s


@dataclass(frozen=True)
class Summary:
    """``count`` more messages like ``key`` came in ``seconds``."""

    key: str
    count: int
    seconds: float

    def text(self, what: str = "attempts") -> str:
        return (f"{self.count} more {what} failed the same way in {self.seconds:.0f}s "
                f"({self.key})")


#: how each host state reads in a sentence: "barhal is connecting", "barhal needs a login"
_STATE_PHRASES = {
    H.CONNECTING: "is connecting",
    H.CONNECTED: "is connected",
    H.BACKOFF: "is not connected and waits to retry (backoff)",
    H.NEEDS_AUTH: "needs a login (needs-auth)",
    H.FAILED: "has failed and is not retried on its own (failed)",
    H.STOPPED: "is stopped",
}


def state_phrase(state: HostState) -> str:
    """``state`` as the end of a sentence about the host."""
    return _STATE_PHRASES[state]


#: a security/robustness limit: wall-clock time gained on the monotonic clock between two
#: ticks beyond which we assume the machine slept (or the network may have changed under us)
WAKE_JUMP = 5.0


def slept_for(prev_wall: float, prev_mono: float, wall: float, mono: float,
              threshold: float = WAKE_JUMP) -> float | None:
    """Seconds the machine seems to have slept between two clock readings, or None.

    The monotonic clock stops while a laptop sleeps; the wall clock does not.  A backwards
    wall-clock step (NTP, manual change) is not a sleep.
    """
    gained = (wall - prev_wall) - (mono - prev_mono)
    return gained if gained > threshold else None


# == TCP channel states ==========================================================================
# The lean direct-tcpip channel of the fast path (``fastpath.channel.TCPChannel``).  Kept last in
# this file and self-contained.
#
# Each direction of a channel has its own machine, keyed by (state, event) as h11's
# ``_state.py`` is::
#
#     send:  opening ─confirmed─► open ─eof─► eof-pending ─drained─► eof
#              │                   └──────────┴───close──────────────┴─► close-pending
#              └─close─► abandoned ─confirmed─► close-pending ─drained─► closed
#     recv:  opening ─confirmed─► open ─eof─► eof-pending ─drained─► eof
#                                  └──────────┴───close──────────────┴─► close-pending
#                                                                 ─drained─► closed
#
# plus: refused (from opening/abandoned) and lost (the SSH connection ended) end either side at
# once, and the server's CLOSE ends the send side at once (ours answers it).  A *pending* state
# waits for the data queued before the EOF or CLOSE (for window on the send side, for the local
# socket on the receive side); ``drained`` is that data having passed.  An event not in a table
# is illegal: the channel turns one the server caused into a protocol error, and one of its own
# into ``IllegalTransition``.

class ChanState(str, enum.Enum):
    #: the open request is sent; the server has not answered
    OPENING = "opening"
    OPEN = "open"
    #: an EOF waits for the data queued before it
    EOF_PENDING = "eof_pending"
    EOF = "eof"
    #: a CLOSE waits for the data queued before it
    CLOSE_PENDING = "close_pending"
    CLOSED = "closed"
    #: (send side) the local side left while the server was still opening the channel: CLOSE
    #: as soon as it is confirmed
    ABANDONED = "abandoned"

    def __str__(self) -> str:
        return self.value


class ChanEvent(str, enum.Enum):
    #: the server confirmed the open
    CONFIRMED = "confirmed"
    #: the server refused the open
    REFUSED = "refused"
    #: send side: the local side's EOF; receive side: the server's
    EOF = "eof"
    #: send side: the local side closed; receive side: the server's CLOSE
    CLOSE = "close"
    #: send side: the server's CLOSE, which ours answers at once
    PEER_CLOSE = "peer-close"
    #: the data queued before a pending EOF or CLOSE has passed (or was dropped)
    DRAINED = "drained"
    #: the SSH connection ended under the channel
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


CS = ChanState
CE = ChanEvent

CHAN_SEND_TRANSITIONS: dict[tuple[ChanState, ChanEvent], ChanState] = {
    (CS.OPENING, CE.CONFIRMED): CS.OPEN,
    (CS.ABANDONED, CE.CONFIRMED): CS.CLOSE_PENDING,
    (CS.OPENING, CE.REFUSED): CS.CLOSED,
    (CS.ABANDONED, CE.REFUSED): CS.CLOSED,
    (CS.OPEN, CE.EOF): CS.EOF_PENDING,
    (CS.EOF_PENDING, CE.DRAINED): CS.EOF,
    (CS.CLOSE_PENDING, CE.DRAINED): CS.CLOSED,
    (CS.OPENING, CE.CLOSE): CS.ABANDONED,
    (CS.OPEN, CE.CLOSE): CS.CLOSE_PENDING,
    (CS.EOF_PENDING, CE.CLOSE): CS.CLOSE_PENDING,
    (CS.EOF, CE.CLOSE): CS.CLOSE_PENDING,
    # the local side may end or close a channel that is no longer open for it: nothing changes
    **{(s, CE.EOF): s for s in (CS.OPENING, CS.EOF_PENDING, CS.EOF, CS.CLOSE_PENDING,
                               CS.CLOSED, CS.ABANDONED)},
    **{(s, CE.CLOSE): s for s in (CS.CLOSE_PENDING, CS.CLOSED, CS.ABANDONED)},
    **{(s, CE.PEER_CLOSE): CS.CLOSED for s in (CS.OPEN, CS.EOF_PENDING, CS.EOF,
                                               CS.CLOSE_PENDING, CS.CLOSED)},
    **{(s, CE.LOST): CS.CLOSED for s in CS},
}

CHAN_RECV_TRANSITIONS: dict[tuple[ChanState, ChanEvent], ChanState] = {
    (CS.OPENING, CE.CONFIRMED): CS.OPEN,
    (CS.OPENING, CE.REFUSED): CS.CLOSED,
    (CS.OPEN, CE.EOF): CS.EOF_PENDING,
    (CS.EOF_PENDING, CE.DRAINED): CS.EOF,
    (CS.CLOSE_PENDING, CE.DRAINED): CS.CLOSED,
    **{(s, CE.CLOSE): CS.CLOSE_PENDING for s in (CS.OPEN, CS.EOF_PENDING, CS.EOF)},
    **{(s, CE.LOST): CS.CLOSED for s in (CS.OPENING, CS.OPEN, CS.EOF_PENDING, CS.EOF,
                                         CS.CLOSE_PENDING)},
}

#: receive states in which the server's side of the channel is open (window adjusts, requests)
CHAN_PEER_OPEN = (CS.OPEN, CS.EOF_PENDING, CS.EOF)
#: send states in which the local side is gone: data that arrives is dropped
CHAN_LOCAL_GONE = (CS.CLOSE_PENDING, CS.CLOSED, CS.ABANDONED)


def check_chan_send(old: ChanState, event: ChanEvent) -> ChanState:
    try:
        return CHAN_SEND_TRANSITIONS[(old, event)]
    except KeyError:
        raise IllegalTransition(f"channel send state {old} on {event} is not allowed") from None


def check_chan_recv(old: ChanState, event: ChanEvent) -> ChanState:
    try:
        return CHAN_RECV_TRANSITIONS[(old, event)]
    except KeyError:
        raise IllegalTransition(f"channel receive state {old} on {event} is not allowed") \
            from None
