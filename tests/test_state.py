"""The transition table and the backoff policy."""

import random

import pytest

from tunneld.state import (FORWARD_TRANSITIONS, HOST_TRANSITIONS, Backoff, ForwardState,
                           HostState, IllegalTransition, check_forward, check_host,
                           forward_state_for)

H, F = HostState, ForwardState

LEGAL = [
    (H.STOPPED, H.CONNECTING), (H.CONNECTING, H.CONNECTED), (H.CONNECTING, H.BACKOFF),
    (H.CONNECTING, H.NEEDS_AUTH), (H.CONNECTING, H.FAILED), (H.CONNECTED, H.BACKOFF),
    (H.BACKOFF, H.CONNECTING), (H.NEEDS_AUTH, H.CONNECTING), (H.FAILED, H.CONNECTING),
    (H.CONNECTED, H.STOPPED), (H.BACKOFF, H.STOPPED),
]
ILLEGAL = [
    (H.STOPPED, H.CONNECTED), (H.BACKOFF, H.CONNECTED), (H.CONNECTED, H.NEEDS_AUTH),
    (H.FAILED, H.CONNECTED), (H.NEEDS_AUTH, H.BACKOFF), (H.STOPPED, H.STOPPED),
    (H.CONNECTED, H.CONNECTED),
]


@pytest.mark.parametrize("old,new", LEGAL)
def test_legal_host_transitions(old, new):
    assert check_host(old, new) is new


@pytest.mark.parametrize("old,new", ILLEGAL)
def test_illegal_host_transitions_raise(old, new):
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        check_host(old, new)


def test_every_state_has_a_row_and_can_stop():
    assert set(HOST_TRANSITIONS) == set(HostState)
    assert set(FORWARD_TRANSITIONS) == set(ForwardState)
    for s in HostState:
        if s is not H.STOPPED:
            assert H.STOPPED in HOST_TRANSITIONS[s]


def test_forward_transitions():
    assert check_forward(F.WAITING, F.LISTENING) is F.LISTENING
    with pytest.raises(IllegalTransition):
        check_forward(F.CLOSED, F.LISTENING)
    assert forward_state_for(H.CONNECTED) is F.LISTENING
    for s in HostState:
        if s is not H.CONNECTED:
            assert forward_state_for(s) is F.WAITING


def test_state_values_are_the_wire_names():
    assert [s.value for s in HostState] == [
        "connecting", "connected", "backoff", "needs-auth", "failed", "stopped"]
    assert str(H.NEEDS_AUTH) == "needs-auth"


def test_backoff_grows_within_bounds_and_resets():
    b = Backoff(initial=0.5, maximum=60, jitter=0.2)
    rng = random.Random(1)
    delays = [b.next_delay(rng) for _ in range(12)]
    for i, d in enumerate(delays[:6]):
        base = 0.5 * 2 ** i
        assert base * 0.8 <= d <= base * 1.2
    assert all(d <= 60 for d in delays)
    assert delays[-1] >= 60 * 0.8
    b.reset()
    assert b.next_delay(rng) <= 0.6


def test_backoff_survives_many_attempts():
    b = Backoff()
    for _ in range(10_000):
        d = b.next_delay()
    assert 0 < d <= b.maximum


@pytest.mark.parametrize("walls,monos,expected", [
    ((100.0, 102.0), (50.0, 52.0), None),          # both advanced together
    ((100.0, 3700.0), (50.0, 52.0), 3598.0),       # slept an hour
    ((100.0, 106.0), (50.0, 51.0), None),          # 5 s gained: at the threshold, not beyond
    ((100.0, 107.0), (50.0, 51.0), 6.0),
    ((100.0, 40.0), (50.0, 52.0), None),           # wall clock stepped back
])
def test_slept_for(walls, monos, expected):
    from tunneld.state import slept_for
    assert slept_for(walls[0], monos[0], walls[1], monos[1]) == expected
