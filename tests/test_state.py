"""The transition tables (every (state, event) pair: in the table or illegal) and the backoff
policy."""

import itertools
import random

import pytest

from tunneld.state import (FORWARD_TABLE, HOST_TABLE, SESSION_ENDED, SESSION_TABLE, Backoff,
                           ForwardEvent, ForwardState, HostEvent, HostState, IllegalTransition,
                           SessionEvent, SessionState, forward_follow, forward_next, host_next,
                           is_connected, session_next)

H, F, S = HostState, ForwardState, SessionState
HE, FE, SE = HostEvent, ForwardEvent, SessionEvent

#: the whole host table, written out: (state, event) -> new state
HOST_EXPECTED = {
    (H.STOPPED, HE.ATTEMPT): H.CONNECTING, (H.BACKOFF, HE.ATTEMPT): H.CONNECTING,
    (H.NEEDS_AUTH, HE.ATTEMPT): H.CONNECTING, (H.FAILED, HE.ATTEMPT): H.CONNECTING,
    (H.CONNECTING, HE.UP): H.CONNECTED, (H.CONNECTING, HE.RETRY): H.BACKOFF,
    (H.CONNECTING, HE.NEEDS_PERSON): H.NEEDS_AUTH, (H.CONNECTING, HE.FATAL): H.FAILED,
    (H.CONNECTED, HE.LOST): H.BACKOFF,
    (H.CONNECTING, HE.STOP): H.STOPPED, (H.CONNECTED, HE.STOP): H.STOPPED,
    (H.BACKOFF, HE.STOP): H.STOPPED, (H.NEEDS_AUTH, HE.STOP): H.STOPPED,
    (H.FAILED, HE.STOP): H.STOPPED,
}
FORWARD_EXPECTED = {
    (F.CLOSED, FE.BIND): F.WAITING, (F.WAITING, FE.UP): F.LISTENING,
    (F.LISTENING, FE.DOWN): F.WAITING, (F.WAITING, FE.CLOSE): F.CLOSED,
    (F.LISTENING, FE.CLOSE): F.CLOSED,
}
_LIVE = (S.STARTING, S.PENDING, S.RUNNING, S.DISCONNECTED)
SESSION_EXPECTED = {
    (S.STARTING, SE.STARTED): S.RUNNING, (S.DISCONNECTED, SE.STARTED): S.RUNNING,
    # a batch job: queued, then it runs; seen waiting again after a re-attach or a requeue
    (S.STARTING, SE.QUEUED): S.PENDING, (S.PENDING, SE.STARTED): S.RUNNING,
    (S.PENDING, SE.DISCONNECTED): S.DISCONNECTED, (S.DISCONNECTED, SE.QUEUED): S.PENDING,
    (S.RUNNING, SE.QUEUED): S.PENDING,
    (S.STARTING, SE.DISCONNECTED): S.DISCONNECTED, (S.RUNNING, SE.DISCONNECTED): S.DISCONNECTED,
    (S.DISCONNECTED, SE.REATTACHED): S.RUNNING,
    **{(s, e): end for s in _LIVE for e, end in ((SE.EXITED, S.EXITED), (SE.KILLED, S.KILLED),
                                                  (SE.FAILED, S.FAILED), (SE.LOST, S.LOST))},
}

MACHINES = [
    pytest.param(HostState, HostEvent, host_next, HOST_EXPECTED, HOST_TABLE, id="host"),
    pytest.param(ForwardState, ForwardEvent, forward_next, FORWARD_EXPECTED, FORWARD_TABLE,
                 id="forward"),
    pytest.param(SessionState, SessionEvent, session_next, SESSION_EXPECTED, SESSION_TABLE,
                 id="session"),
]


@pytest.mark.parametrize("states,events,step,expected,table", MACHINES)
def test_every_state_and_event(states, events, step, expected, table):
    """Every (state, event) pair: the written-out transition, or IllegalTransition."""
    assert table == expected
    for state, event in itertools.product(states, events):
        if (state, event) in expected:
            assert step(state, event) is expected[state, event]
        else:
            with pytest.raises(IllegalTransition, match=f"{event}.*{state}"):
                step(state, event)


def test_every_state_is_reachable_and_every_live_state_can_end():
    for states, table, start in ((HostState, HOST_TABLE, H.STOPPED),
                                 (ForwardState, FORWARD_TABLE, F.CLOSED),
                                 (SessionState, SESSION_TABLE, S.STARTING)):
        seen, todo = {start}, [start]
        while todo:
            s = todo.pop()
            for (a, _), b in table.items():
                if a is s and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert seen == set(states)
    for s in HostState:
        assert s is H.STOPPED or host_next(s, HE.STOP) is H.STOPPED
    for s in set(SessionState) - SESSION_ENDED:
        assert session_next(s, SE.LOST) is S.LOST
    assert not [k for k in SESSION_TABLE if k[0] in SESSION_ENDED]   # no way out of an end


def test_forwards_follow_their_host():
    assert forward_follow(F.WAITING, True) is F.LISTENING
    assert forward_follow(F.LISTENING, False) is F.WAITING
    assert forward_follow(F.LISTENING, True) is F.LISTENING
    assert forward_follow(F.CLOSED, True) is F.CLOSED     # a closed listener stays closed
    assert [is_connected(s) for s in HostState] == [s is H.CONNECTED for s in HostState]


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
        CHAN_RECV_TABLE,
        CHAN_SEND_TABLE,
        ChanEvent,
        ChanState,
        chan_recv_next,
        chan_send_next,
    )
    send, recv = _channel_tables()
    assert CHAN_SEND_TABLE == send and CHAN_RECV_TABLE == recv
    for table, check in ((send, chan_send_next), (recv, chan_recv_next)):
        for state in ChanState:
            for event in ChanEvent:
                if (state, event) in table:
                    assert check(state, event) is table[(state, event)]
                else:
                    with pytest.raises(IllegalTransition, match=f"{event} in state {state}"):
                        check(state, event)


def test_every_channel_state_reached_can_end_and_closed_is_final():
    from tunneld.state import CHAN_RECV_TABLE, CHAN_SEND_TABLE, ChanState
    for table in (CHAN_SEND_TABLE, CHAN_RECV_TABLE):
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
    assert ChanState.ABANDONED not in {s for s, _ in CHAN_RECV_TABLE}
    assert [str(s) for s in ChanState] == ["opening", "open", "eof_pending", "eof",
                                           "close_pending", "closed", "abandoned"]
