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
    """Exponential backoff with jitter between named bounds.

    ``next_delay()`` gives the wait before the next attempt and counts it; ``reset()`` is
    called once a connection has been stable for ``stable_after`` seconds.
    """

    #: first wait, seconds
    initial: float = 0.5
    #: longest wait, seconds
    maximum: float = 60.0
    factor: float = 2.0
    #: each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    jitter: float = 0.2
    #: a connection up this long resets the delay to ``initial``
    stable_after: float = 30.0
    attempts: int = 0

    def next_delay(self, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        u = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.maximum, base * u)

    def reset(self) -> None:
        self.attempts = 0


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
