"""Every state machine of the daemon (host, forward, session), each one table of legal
transitions keyed by (state, event) as h11's ``_state.py`` does, and the backoff policy.

Pure: no I/O.  A transition the table does not have raises ``IllegalTransition`` (a bug, not
a user error); everything that changes one of these states goes through ``*_next``.

Host states (design.md §6)::

    stopped ──► connecting ──► connected ──(lost)──► backoff ──(wait)──► connecting …
                    │  └──► needs-auth   (a person must act: `tunnelctl reconnect HOST`)
                    └─────► failed       (host key / config: never retried silently)

Forward states: closed ──bind──► waiting ⇄ listening (the host connects, or the server grants a
remote forward's listener; and back) ──close──► closed.

Session states: starting ──► running ⇄ disconnected (detached only) ──► exited | killed |
failed | lost (the ended states, which have no way out).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a programming error."""


_S = TypeVar("_S")


def _step(machine: str, table: Mapping[tuple[_S, Any], _S], state: _S, event: Any) -> _S:
    """``table``'s state after ``event`` in ``state``; IllegalTransition if it has none."""
    try:
        return table[state, event]
    except KeyError:
        raise IllegalTransition(f"{machine}: no transition for {event} in state {state}") \
            from None


class _Named(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


# -- hosts ------------------------------------------------------------------------------------


class HostState(_Named):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"
    NEEDS_AUTH = "needs-auth"
    FAILED = "failed"
    STOPPED = "stopped"


class HostEvent(_Named):
    #: a connection attempt starts
    ATTEMPT = "attempt"
    #: the attempt logged in
    UP = "up"
    #: the attempt failed in a way worth retrying (refused, timed out, unresolvable…)
    RETRY = "retry"
    #: the live connection ended
    LOST = "lost"
    #: the login needs a person (or was refused): no retry on its own
    NEEDS_PERSON = "needs-person"
    #: a host key or configuration problem: no retry on its own
    FATAL = "fatal"
    #: the supervisor stops
    STOP = "stop"


H, HE = HostState, HostEvent

HOST_TABLE: dict[tuple[HostState, HostEvent], HostState] = {
    (H.STOPPED, HE.ATTEMPT): H.CONNECTING,
    (H.BACKOFF, HE.ATTEMPT): H.CONNECTING,
    (H.NEEDS_AUTH, HE.ATTEMPT): H.CONNECTING,
    (H.FAILED, HE.ATTEMPT): H.CONNECTING,
    (H.CONNECTING, HE.UP): H.CONNECTED,
    (H.CONNECTING, HE.RETRY): H.BACKOFF,
    (H.CONNECTING, HE.NEEDS_PERSON): H.NEEDS_AUTH,
    (H.CONNECTING, HE.FATAL): H.FAILED,
    (H.CONNECTED, HE.LOST): H.BACKOFF,
    **{(s, HE.STOP): H.STOPPED for s in HostState if s is not H.STOPPED},
}


def host_next(state: HostState, event: HostEvent) -> HostState:
    """The host's state after ``event`` in ``state``."""
    return _step("host", HOST_TABLE, state, event)


def is_connected(state: HostState) -> bool:
    """The one way to ask whether a host is connected (its connection usable)."""
    return state is H.CONNECTED


# -- forwards ---------------------------------------------------------------------------------


class ForwardState(_Named):
    #: bound, and the host is connected: clients are served at once
    LISTENING = "listening"
    #: bound, the host is not connected: clients are held (bounded) until it is
    WAITING = "waiting"
    #: the listener is closed (not bound yet, forward removed or daemon stopping)
    CLOSED = "closed"


class ForwardEvent(_Named):
    #: the listener is bound (a remote forward: accepted, to be requested)
    BIND = "bind"
    #: clients can be served now (the host connected; the server granted the listener)
    UP = "up"
    #: they cannot any more (the host is not connected; the listener is gone)
    DOWN = "down"
    #: the listener is closed for good
    CLOSE = "close"


F, FE = ForwardState, ForwardEvent

FORWARD_TABLE: dict[tuple[ForwardState, ForwardEvent], ForwardState] = {
    (F.CLOSED, FE.BIND): F.WAITING,
    (F.WAITING, FE.UP): F.LISTENING,
    (F.LISTENING, FE.DOWN): F.WAITING,
    (F.WAITING, FE.CLOSE): F.CLOSED,
    (F.LISTENING, FE.CLOSE): F.CLOSED,
}


def forward_next(state: ForwardState, event: ForwardEvent) -> ForwardState:
    """The forward's state after ``event`` in ``state``."""
    return _step("forward", FORWARD_TABLE, state, event)


def forward_follow(state: ForwardState, up: bool) -> ForwardState:
    """An open listener's state once it can (``up``) or cannot serve clients: unchanged, or
    the UP / DOWN transition; a closed one stays closed."""
    if state is F.WAITING and up:
        return forward_next(state, FE.UP)
    if state is F.LISTENING and not up:
        return forward_next(state, FE.DOWN)
    return state


# -- sessions ---------------------------------------------------------------------------------


class SessionState(_Named):
    STARTING = "starting"
    #: a batch job waits in the scheduler's queue
    PENDING = "pending"
    RUNNING = "running"
    #: detached: the connection is down, the command runs on
    DISCONNECTED = "disconnected"
    EXITED = "exited"
    KILLED = "killed"
    FAILED = "failed"
    LOST = "lost"


class SessionEvent(_Named):
    #: a batch job was submitted (it waits in the queue), or is seen waiting again
    QUEUED = "queued"
    #: the command runs on the server (its pid is known; a job: it runs on its node)
    STARTED = "started"
    #: detached: the connection went away (the command runs on)
    DISCONNECTED = "disconnected"
    #: detached: following again on a new connection
    REATTACHED = "reattached"
    #: the command ended with an exit status (or a signal, attached)
    EXITED = "exited"
    #: it ended after `tunnelctl kill`
    KILLED = "killed"
    #: it could not be started or followed (the reason is the session's error)
    FAILED = "failed"
    #: it ended without an exit status (the connection, or the runner, was lost)
    LOST = "lost"


S, SE = SessionState, SessionEvent

#: the states a session ends in (they have no way out)
SESSION_ENDED = frozenset({S.EXITED, S.KILLED, S.FAILED, S.LOST})

SESSION_TABLE: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.STARTING, SE.STARTED): S.RUNNING,
    (S.STARTING, SE.DISCONNECTED): S.DISCONNECTED,
    (S.STARTING, SE.QUEUED): S.PENDING,
    (S.PENDING, SE.STARTED): S.RUNNING,
    (S.PENDING, SE.DISCONNECTED): S.DISCONNECTED,
    (S.DISCONNECTED, SE.QUEUED): S.PENDING,   # a job, seen again while it still waits
    (S.RUNNING, SE.QUEUED): S.PENDING,        # a job requeued (node failure, preemption)
    (S.RUNNING, SE.DISCONNECTED): S.DISCONNECTED,
    (S.DISCONNECTED, SE.REATTACHED): S.RUNNING,
    (S.DISCONNECTED, SE.STARTED): S.RUNNING,   # a start whose answer was lost, found
    **{(s, e): end for s in (S.STARTING, S.RUNNING, S.DISCONNECTED)
       for e, end in ((SE.EXITED, S.EXITED), (SE.KILLED, S.KILLED), (SE.FAILED, S.FAILED),
                      (SE.LOST, S.LOST))},
    **{(S.PENDING, e): end for e, end in ((SE.EXITED, S.EXITED), (SE.KILLED, S.KILLED),
                                           (SE.FAILED, S.FAILED), (SE.LOST, S.LOST))},
}


def session_next(state: SessionState, event: SessionEvent) -> SessionState:
    """The session's state after ``event`` in ``state``."""
    return _step("session", SESSION_TABLE, state, event)


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

CHAN_SEND_TABLE: dict[tuple[ChanState, ChanEvent], ChanState] = {
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

CHAN_RECV_TABLE: dict[tuple[ChanState, ChanEvent], ChanState] = {
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


def chan_send_next(old: ChanState, event: ChanEvent) -> ChanState:
    return _step("channel send side", CHAN_SEND_TABLE, old, event)


def chan_recv_next(old: ChanState, event: ChanEvent) -> ChanState:
    return _step("channel receive side", CHAN_RECV_TABLE, old, event)
