"""A small publish/subscribe hub for state changes, streamed by `tunnelctl events`.

Publishers (host supervisors, the manager, the opener, the daemon) call ``publish(kind,
**fields)`` from plain code: it never blocks and never fails.  Each subscriber has its own
bounded queue; one that falls ``MAX_QUEUED`` events behind is dropped (its stream ends with a
note saying so) rather than making the daemon buffer without bound.

An event is a flat JSON-able dict::

    {"time": "2026-11-21T21:00:00.123Z", "kind": "host", "host": "barhal",
     "old": "connecting", "new": "connected", "error": null}

Kinds and their fields: ``host`` (host, old, new, error) · ``forward`` (host, spec, event:
added | removed | state, origin, old, new) · ``session`` (host, name, event: started | ended,
state, exit_status) · ``open`` (host, url, source) · ``daemon`` (event: reloaded | stopping).
Keys may be added; the ones listed keep their meaning.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .errors import UsageError
from .wire import iso_time

log = logging.getLogger("tunneld")

#: a limit: events a subscriber may fall behind before it is dropped
MAX_QUEUED = 1000
#: a limit: subscribers served at once (each is one `tunnelctl events`)
MAX_SUBSCRIBERS = 64


def _now() -> str:
    return iso_time(time.time(), ms=True)


class Subscription:
    """One subscriber's queue.  ``get()`` returns the next event, or None once the stream
    has ended (the hub closed, or this subscriber was dropped: ``dropped`` says why)."""

    def __init__(self, hub: "EventHub"):
        self.hub = hub
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_QUEUED + 1)
        #: why the hub stopped sending to us (None while subscribed or after a clean close)
        self.dropped: str | None = None

    async def get(self) -> dict[str, Any] | None:
        return await self.queue.get()

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    def __init__(self) -> None:
        #: live subscriptions; a dropped or closed one is removed at once
        self.subscribers: set[Subscription] = set()
        #: events published so far (for tests and `status`)
        self.published = 0

    def subscribe(self) -> Subscription:
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise UsageError(f"too many event streams at once ({MAX_SUBSCRIBERS}); end one "
                             "of the running `tunnelctl events`")
        sub = Subscription(self)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def publish(self, kind: str, **fields: Any) -> None:
        """Queue an event for every subscriber; drop the ones that are too far behind."""
        self.published += 1
        if not self.subscribers:
            return
        event = {"time": _now(), "kind": kind, **fields}
        for sub in list(self.subscribers):
            if sub.queue.qsize() >= MAX_QUEUED:
                self.subscribers.discard(sub)
                sub.dropped = (f"this event stream fell {MAX_QUEUED} events behind and was "
                               "dropped; read it faster, or run `tunnelctl events` again")
                log.warning("events: dropped a subscriber that fell %d events behind",
                            MAX_QUEUED)
                sub.queue.put_nowait(None)  # the one slot kept free for the end mark
                continue
            sub.queue.put_nowait(event)

    def close(self) -> None:
        """End every stream (the daemon is stopping)."""
        for sub in list(self.subscribers):
            self.subscribers.discard(sub)
            if not sub.queue.full():
                sub.queue.put_nowait(None)
