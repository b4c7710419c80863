"""The event hub: fan-out, bounded queues, dropping a slow subscriber, closing."""

from __future__ import annotations

import asyncio

import pytest

from tunneld import events
from tunneld.errors import UsageError

pytestmark = pytest.mark.timeout(10)


async def test_every_subscriber_gets_every_event_in_order():
    hub = events.EventHub()
    a, b = hub.subscribe(), hub.subscribe()
    hub.publish("host", host="barhal", old="connecting", new="connected", error=None)
    hub.publish("daemon", event="reloaded")
    for sub in (a, b):
        first, second = await sub.get(), await sub.get()
        assert first["kind"] == "host" and first["new"] == "connected"
        assert first["time"].endswith("Z")
        assert second == {**second, "kind": "daemon", "event": "reloaded"}


async def test_publish_without_subscribers_is_cheap_and_counts():
    hub = events.EventHub()
    hub.publish("host", host="x")
    assert hub.published == 1


async def test_a_slow_subscriber_is_dropped_with_a_note(caplog):
    hub = events.EventHub()
    slow, fast = hub.subscribe(), hub.subscribe()
    for i in range(events.MAX_QUEUED + 5):
        hub.publish("forward", n=i)
        ev = await fast.get()
        assert ev["n"] == i
    assert slow not in hub.subscribers and fast in hub.subscribers
    assert "fell" in (slow.dropped or "")
    got = [await slow.get() for _ in range(events.MAX_QUEUED)]
    assert [e["n"] for e in got] == list(range(events.MAX_QUEUED))
    assert await slow.get() is None  # the end of its stream
    assert "dropped a subscriber" in caplog.text


async def test_close_ends_every_stream():
    hub = events.EventHub()
    sub = hub.subscribe()
    hub.publish("daemon", event="stopping")
    hub.close()
    assert (await sub.get())["event"] == "stopping"
    assert await asyncio.wait_for(sub.get(), 1) is None
    assert sub.dropped is None and not hub.subscribers


async def test_subscribers_are_limited():
    hub = events.EventHub()
    subs = [hub.subscribe() for _ in range(events.MAX_SUBSCRIBERS)]
    with pytest.raises(UsageError):
        hub.subscribe()
    subs[0].close()
    hub.subscribe()
