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


# -- the retry schedule while clients are held, and runs of repeats ---------------------------

def test_next_attempt_is_the_schedule_unless_someone_waits():
    from tunneld.state import Backoff
    b = Backoff(held_interval=1.0)
    # nobody waits: the scheduled time
    assert b.next_attempt_at(due=100.0, last_end=50.0, held=False) == 100.0
    # a held client: one second after the last attempt ended (at once if that is past) ...
    assert b.next_attempt_at(due=100.0, last_end=50.0, held=True) == 51.0
    assert b.next_attempt_at(due=100.0, last_end=99.5, held=True) == 100.0
    # ... and never later than the schedule; asked for (reconnect, a wake): now
    assert b.next_attempt_at(due=100.0, last_end=50.0, held=False, asked=True) < 0


def test_held_attempts_cannot_escalate_the_schedule():
    """Simulate 20 s of outage with a client held throughout: attempts come once a second,
    and the schedule (what the next unheld wait would be) moves only on its own attempts."""
    from tunneld.state import Backoff
    b = Backoff(jitter=0.0)
    rng = random.Random(0)
    now, due, last_end, made = 0.0, 0.0 + b.next_delay(rng), 0.0, 0
    while now < 20.0:
        start = max(now, b.next_attempt_at(due, last_end, held=True))
        now = last_end = start + 0.01   # a refused connection: fails at once
        made += 1
        if now >= due:
            due = now + b.next_delay(rng)
    assert 19 <= made <= 21
    assert b.attempts <= 6           # 0.5 + 1 + 2 + 4 + 8 < 20 < ... + 16


def test_repeats_collapse_a_run_and_summarise_it():
    from tunneld.state import Repeats
    r = Repeats(every=300.0)
    assert r.note("refused", 0.0) == (True, None)
    for t in range(1, 13):
        assert r.note("refused", float(t)) == (False, None)
    show, summary = r.note("timed out", 13.0)
    assert show and summary is not None and summary.count == 12 and summary.key == "refused"
    assert summary.text() == "12 more attempts failed the same way in 13s (refused)"
    assert r.end(14.0) is None            # no repeats of "timed out": nothing to say
    assert r.note("refused", 15.0) == (True, None)   # a new run logs its first line again


def test_a_long_run_is_summarised_on_the_way():
    from tunneld.state import Repeats
    r = Repeats(every=60.0)
    r.note("down", 0.0)
    for t in range(1, 60):
        assert r.note("down", float(t)) == (False, None)
    show, summary = r.note("down", 61.0)
    assert not show and summary is not None and summary.count == 60
    assert r.note("down", 62.0) == (False, None)
    end = r.end(70.0)
    assert end is not None and end.count == 1


def test_every_host_state_reads_as_a_sentence():
    """No "hpc is failed" / "hpc is still backoff": every state has its own phrase."""
    from tunneld.state import state_phrase
    phrases = {s: state_phrase(s) for s in HostState}
    assert len(set(phrases.values())) == len(HostState)
    assert phrases[H.NEEDS_AUTH] == "needs a login (needs-auth)"
    for s in (H.BACKOFF, H.FAILED, H.NEEDS_AUTH):
        assert not phrases[s].startswith(f"is {s.value}"), phrases[s]
        assert phrases[s].endswith(f"({s.value})"), phrases[s]   # the name `list` shows


# -- TCP channel states (fastpath.channel.TCPChannel) ---------------------------------------------

def _channel_tables():
    from tunneld.state import ChanEvent as E
    from tunneld.state import ChanState as S
    gone = (S.CLOSE_PENDING, S.CLOSED, S.ABANDONED)
    send = {
        (S.OPENING, E.CONFIRMED): S.OPEN, (S.ABANDONED, E.CONFIRMED): S.CLOSE_PENDING,
        (S.OPENING, E.REFUSED): S.CLOSED, (S.ABANDONED, E.REFUSED): S.CLOSED,
        (S.OPEN, E.EOF): S.EOF_PENDING, (S.EOF_PENDING, E.DRAINED): S.EOF,
        (S.OPENING, E.CLOSE): S.ABANDONED,
        (S.OPEN, E.CLOSE): S.CLOSE_PENDING, (S.EOF_PENDING, E.CLOSE): S.CLOSE_PENDING,
        (S.EOF, E.CLOSE): S.CLOSE_PENDING, (S.CLOSE_PENDING, E.DRAINED): S.CLOSED,
        # ignored: an EOF once the channel is not open for it, a close once it is closing
        **{(s, E.EOF): s for s in S if s is not S.OPEN},
        **{(s, E.CLOSE): s for s in gone},
        **{(s, E.PEER_CLOSE): S.CLOSED
           for s in (S.OPEN, S.EOF_PENDING, S.EOF, S.CLOSE_PENDING, S.CLOSED)},
        **{(s, E.LOST): S.CLOSED for s in S},
    }
    recv = {
        (S.OPENING, E.CONFIRMED): S.OPEN, (S.OPENING, E.REFUSED): S.CLOSED,
        (S.OPEN, E.EOF): S.EOF_PENDING, (S.EOF_PENDING, E.DRAINED): S.EOF,
        (S.OPEN, E.CLOSE): S.CLOSE_PENDING, (S.EOF_PENDING, E.CLOSE): S.CLOSE_PENDING,
        (S.EOF, E.CLOSE): S.CLOSE_PENDING, (S.CLOSE_PENDING, E.DRAINED): S.CLOSED,
        **{(s, E.LOST): S.CLOSED for s in S if s not in (S.CLOSED, S.ABANDONED)},
    }
    return send, recv


def test_the_whole_channel_tables():
    """Every (state, event) pair of both directions: the legal ones lead where the machine
    says, every other one raises."""
    from tunneld.state import (
        CHAN_RECV_TRANSITIONS,
        CHAN_SEND_TRANSITIONS,
        ChanEvent,
        ChanState,
        check_chan_recv,
        check_chan_send,
    )
    send, recv = _channel_tables()
    assert CHAN_SEND_TRANSITIONS == send and CHAN_RECV_TRANSITIONS == recv
    for table, check in ((send, check_chan_send), (recv, check_chan_recv)):
        for state in ChanState:
            for event in ChanEvent:
                if (state, event) in table:
                    assert check(state, event) is table[(state, event)]
                else:
                    with pytest.raises(IllegalTransition, match=f"{state} on {event}"):
                        check(state, event)


def test_every_channel_state_reached_can_end_and_closed_is_final():
    from tunneld.state import CHAN_RECV_TRANSITIONS, CHAN_SEND_TRANSITIONS, ChanState
    for table in (CHAN_SEND_TRANSITIONS, CHAN_RECV_TRANSITIONS):
        reached, todo = {ChanState.OPENING}, [ChanState.OPENING]
        while todo:
            state = todo.pop()
            for (old, _), new in table.items():
                if old is state and new not in reached:
                    reached.add(new)
                    todo.append(new)
        assert ChanState.CLOSED in reached
        for (old, _), new in table.items():
            if old is ChanState.CLOSED:
                assert new is ChanState.CLOSED, "closed is final"
    assert ChanState.ABANDONED not in {s for s, _ in CHAN_RECV_TRANSITIONS}
    assert [str(s) for s in ChanState] == ["opening", "open", "eof_pending", "eof",
                                           "close_pending", "closed", "abandoned"]
